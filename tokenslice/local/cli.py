"""``tokenslice local up``: the whole data plane on loopback until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from tokenslice.local.stack import EXAMPLE_POLICY, LocalConfig, LocalStack


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="local_command", metavar="ACTION")
    up = sub.add_parser(
        "up", help="start N vLLM engines, a sidecar per engine, the gateway and Envoy; Ctrl-C stops all",
        description="Run tokenslice's whole data plane on 127.0.0.1 and print the OpenAI base URL. "
        "Arguments after `--` go to every vLLM engine.")
    up.add_argument("--engines", type=int, default=1, help="vLLM engines (default 1)")
    up.add_argument("--model", type=Path, default=None, help="local model directory (default: the tiny model)")
    up.add_argument("--chunk-size", type=int, default=None, help="decode tokens per slice (default: policy)")
    up.add_argument("--policy", type=Path, default=None,
                    help=f"policy YAML, reloaded on change (default: {EXAMPLE_POLICY.name})")
    up.add_argument("--port", type=int, default=None, help="Envoy listener port (default: a free one)")
    up.add_argument("--max-num-seqs", type=int, default=None,
                    help="vLLM --max-num-seqs (default: the policy's slotsPerEndpoint)")
    up.add_argument("--max-slice-tokens", type=int, default=None,
                    help="the picker's --max-slice-tokens (default: the picker's own, long slices cut on demand; "
                         "0 = per-slice mode, a new vLLM request every chunk-size tokens)")
    up.add_argument("--mode", choices=["tokenslice", "chunked", "chunked-rr", "direct"], default="tokenslice",
                    help="what runs in front of the engines (default: tokenslice)")
    up.add_argument("--keep-logs", action="store_true", help="keep the run directory (logs, configs)")
    up.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then extra vLLM flags")


def run(args: argparse.Namespace) -> int:
    if args.local_command != "up":
        print("usage: tokenslice local up [--engines N] [--model DIR] [--chunk-size N] [--policy FILE] "
              "[--max-slice-tokens N] [--port P] [-- vLLM args]", file=sys.stderr)
        return 2
    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    try:
        if args.max_slice_tokens is not None and args.max_slice_tokens < 0:
            raise ValueError(f"--max-slice-tokens must be >= 0 (0 = per-slice mode), not {args.max_slice_tokens}")
        config = LocalConfig(engines=args.engines, model_dir=args.model, policy_file=args.policy,
                             chunk_size=args.chunk_size, port=args.port, max_num_seqs=args.max_num_seqs,
                             vllm_args=extra, mode=args.mode, keep_run_dir=args.keep_logs,
                             picker_args=[] if args.max_slice_tokens is None
                             else ["--max-slice-tokens", str(args.max_slice_tokens)])
        config.resolved_policy()
    except (ValueError, OSError) as exc:
        print(f"tokenslice local up: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_up(config))


async def _up(config: LocalConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = LocalStack(config)
    starting = asyncio.create_task(stack.start())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # Ctrl-C while engines were starting
        print("stopping ...", file=sys.stderr)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await stack.stop()
        return 130
    if starting.exception() is not None:
        print(f"tokenslice local up failed: {starting.exception()}", file=sys.stderr)
        return 1
    policy = stack.policy
    print(f"\ntokenslice is up: {len(stack.engines)} engine(s), model {stack.model!r}, mode {config.mode}\n"
          f"  OpenAI base URL: {stack.openai_base_url}\n"
          f"  try: curl -N {stack.url}/v1/completions -H 'content-type: application/json' "
          f"-H '{policy.tenant_header}: web' -H '{policy.class_header}: interactive' "
          f"-d '{{\"model\": \"{stack.model}\", \"prompt\": \"hello\", \"max_tokens\": 32, \"stream\": true}}'\n"
          + (f"  picker metrics: {stack.plane.picker_metrics_url}\n"
             if stack.plane and stack.plane.picker_metrics_url else "")
          + "Ctrl-C stops everything.", flush=True)
    died = asyncio.create_task(_watch(stack))
    await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if died.done() and died.result():
        print(f"{died.result()} exited; stopping the stack", file=sys.stderr)
        code = 1
    died.cancel()
    print("stopping ...", file=sys.stderr, flush=True)
    await stack.stop()
    print("stopped.", file=sys.stderr)
    return code


async def _watch(stack: LocalStack) -> str:
    """Name of the first child that exits on its own (a crashed part takes the stack down, loudly)."""
    procs = stack.plane.processes if stack.plane else []
    while True:
        for p in procs:
            if not p.running:
                return p.name
        for engine in stack.engines:
            if not engine.server.running():
                return engine.name
        await asyncio.sleep(1.0)  # a liveness monitor, not synchronisation
