"""Where generated artefacts live: one git-ignored cache, rebuilt by the setup commands."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$TOKENSLICE_CACHE`` or ``<repo>/.cache`` (git-ignored)."""
    path = Path(os.environ.get("TOKENSLICE_CACHE") or REPO_ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path
