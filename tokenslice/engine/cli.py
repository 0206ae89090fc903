"""``tokenslice engine``: build the engine venv + tiny model, serve it, show what is built."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from tokenslice.engine import layout, model, server, venv


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="engine_command", metavar="SUBCOMMAND")
    p = sub.add_parser("setup", help="create/validate the engine venv and build the tiny model (idempotent)")
    p.add_argument("--force", action="store_true", help="reinstall the venv and rebuild the model")
    p.add_argument("--model-only", action="store_true", help="only (re)build the model (needs the venv)")

    p = sub.add_parser("serve", help="run vLLM in the foreground on 127.0.0.1",
                       description="Run vLLM on 127.0.0.1 with the tokenslice defaults; "
                       "arguments after `--` go to vLLM verbatim.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", type=Path, default=None, help="model dir (default: the tiny model)")
    p.add_argument("--served-model-name", default=layout.MODEL_NAME)
    p.add_argument("--max-num-seqs", type=int, default=server.DEFAULT_MAX_NUM_SEQS)
    p.add_argument("--max-model-len", type=int, default=server.DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--kv-cache-mib", type=int, default=server.DEFAULT_KV_CACHE_MIB)
    p.add_argument("--torch-compile", action="store_true",
                   help="torch.compile the model (faster decode, ~60 s slower start)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="extra vLLM args after --")

    sub.add_parser("info", help="print what is built (JSON)")

    p = sub.add_parser("bench", help="measure startup, decode tokens/s and chunked-continuation fidelity")
    p.add_argument("--url", default=None, help="an already running vLLM (default: start one)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    p.add_argument("--concurrency", default="1,8,16", help="comma-separated stream counts")
    p.add_argument("--torch-compile", action="store_true", help="start vLLM with torch.compile")


def run(args: argparse.Namespace) -> int:
    command = args.engine_command
    if command == "setup":
        return _setup(args)
    if command == "serve":
        return _serve(args)
    if command == "info":
        return _info()
    if command == "bench":
        return _bench(args)
    print("usage: tokenslice engine {setup,serve,info,bench}", file=sys.stderr)
    return 2


def _progress(message: str) -> None:
    print(message, flush=True)


def _setup(args: argparse.Namespace) -> int:
    try:
        if not args.model_only:
            venv.ensure_venv(_progress, force=args.force)
        model.ensure_model(_progress, force=args.force or args.model_only)
    except RuntimeError as exc:
        print(f"engine setup failed: {exc}", file=sys.stderr)
        return 1
    print(f"engine ready. Start it with: tokenslice engine serve --port 8000  "
          f"(model {layout.default_model_dir()})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        model_dir = server.check_built(args.model)
    except server.EngineNotBuilt as exc:
        print(str(exc), file=sys.stderr)
        return 1
    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    cmd = server.vllm_command(model_dir=model_dir, port=args.port, served_model_name=args.served_model_name,
                              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                              torch_compile=args.torch_compile, kv_cache_mib=args.kv_cache_mib,
                              extra_args=extra)
    print(f"$ {' '.join(cmd)}", flush=True)
    os.execve(cmd[0], cmd, server.vllm_env())  # foreground: vLLM replaces this process


def _info() -> int:
    model_dir = layout.default_model_dir()
    info: dict[str, object] = {
        "cache": str(layout.engine_venv().parent),
        "engine_venv": str(layout.engine_venv()),
        "venv_ready": venv.venv_ready(),
        "venv": venv.read_stamp(),
        "model_dir": str(model_dir),
        "model_ready": model.model_ready(model_dir),
        "served_model_name": layout.MODEL_NAME,
    }
    if (model_dir / "tokenslice_model.json").exists():
        info["model"] = model.model_info(model_dir)
    print(json.dumps(info, indent=2))
    return 0 if info["venv_ready"] and info["model_ready"] else 1


def _bench(args: argparse.Namespace) -> int:
    from tokenslice.engine.bench import run_bench

    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    report = asyncio.run(run_bench(args.url, args.tokens, concurrency, torch_compile=args.torch_compile))
    print(json.dumps(report))
    return 0 if report["fidelity"]["ids_equal"] else 1
