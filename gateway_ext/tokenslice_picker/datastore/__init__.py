"""The pool's endpoints and their live load (the only place the picker learns about pods)."""

from tokenslice_picker.datastore.endpoints import Datastore, Endpoint, parse_endpoints

__all__ = ["Datastore", "Endpoint", "parse_endpoints"]
