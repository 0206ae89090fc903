"""The Envoy bootstrap the picker is fronted by (``tokenslice_picker.envoy``)."""

from __future__ import annotations

from tokenslice_picker.envoy import bootstrap_config
from tokenslice import contract


def test_bootstrap_has_the_protocol_pieces():
    cfg = bootstrap_config(listen_port=1, ext_proc_port=2, admin_port=3)
    text = str(cfg)
    assert contract.DESTINATION_ENDPOINT in text and "ORIGINAL_DST" in text
    ext = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    mode = ext["typed_config"]["processing_mode"]
    assert mode["request_header_mode"] == "SEND" and mode["request_body_mode"] == "NONE"
    assert mode["response_trailer_mode"] == "SEND"  # keeps the stream open until the chunk ends
    assert ext["typed_config"]["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
