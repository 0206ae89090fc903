"""Apply vLLM PR #52923 to an installed vLLM 0.26.0, for the GPU overflow benchmark's CPU-offload half.

vLLM 0.26.0's OffloadingConnector can die with ``assert len(offload_keys) == len(offload_block_ids)`` in
``_build_store_jobs`` (vLLM issue #52170) -- it did in both of our H200 overflow runs of 2026-11-30.
Upstream fixed it in PR #52923, first released in vLLM 0.30.0, which pins torch 2.13 (the GPU image
holds 2.11, and a torch plus its CUDA libraries is more than a session can stage).  So the offload
measurement runs on 0.26.0 with exactly that fix: ``RequestOffloadState.storable_chunks`` is capped by
the chunks that have GPU blocks and offload keys, as upstream does.  tokenslice itself needs no vLLM
change; results taken this way say so (docs/gpu.md).

    python3 scripts/gpu/backport_pr52923.py            # patch the vllm that python3 imports
    python3 scripts/gpu/backport_pr52923.py FILE       # patch this scheduler.py

Idempotent; exits 1 with a message if the file holds neither the 0.26.0 text nor the patched one.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARK = "# Backport of vLLM PR #52923"
ORIGINAL = """        if group_config.is_eagle_group and is_decoding:
            num_chunks = max(0, num_chunks - 1)
        return num_chunks
"""
PATCHED = f"""        if group_config.is_eagle_group and is_decoding:
            num_chunks = max(0, num_chunks - 1)
        {MARK} (released in 0.30.0; fixes #52170): cap by
        # the chunks that have GPU blocks and offload keys, so a chunk whose block
        # hash has not arrived yet is deferred instead of failing the assert in
        # _build_store_jobs.
        for config, group_state in zip(self.config.kv_group_configs, self.group_states):
            if config is group_config:
                num_allocated_chunks = (
                    len(group_state.block_ids) // self.config.blocks_per_chunk
                )
                num_keyed_chunks = len(group_state.offload_keys)
                num_chunks = min(num_chunks, num_allocated_chunks, num_keyed_chunks)
        return num_chunks
"""
MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler"


def backport(path: Path) -> str:
    """Patch ``path`` in place; return "patched" or "already patched"."""
    text = path.read_text()
    if MARK in text:
        return "already patched"
    if text.count(ORIGINAL) != 1:
        raise ValueError(
            f"{path}: storable_chunks is not vLLM 0.26.0's (expected its text once); "
            "this backport is for 0.26.0 only -- vLLM >= 0.30.0 carries the fix"
        )
    path.write_text(text.replace(ORIGINAL, PATCHED))
    return "patched"


def scheduler_file() -> Path:
    """The offloading scheduler of the vLLM this python imports, found without importing vLLM."""
    import importlib.util

    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise ValueError(f"{MODULE} not found: is vLLM installed for this python?")
    return Path(spec.origin)


def main(argv: list[str]) -> int:
    try:
        path = Path(argv[0]) if argv else scheduler_file()
        print(f"backport PR #52923: {path}: {backport(path)}")
    except (OSError, ValueError) as exc:
        print(f"backport PR #52923: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
