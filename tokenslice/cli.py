"""The ``tokenslice`` command line: one subcommand per component.

Each component owns its subcommand in a module exposing ``configure(parser)`` and
``run(args) -> int``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sidecar": ("tokenslice_sidecar.cli", "chunking sidecar beside vLLM (driver + worker roles)"),
    "gateway": ("tokenslice_picker.cli", "Envoy ext_proc endpoint picker that schedules every chunk"),
    "operator": ("tokenslice_operator.cli", "kopf operator for InferencePool / SchedulingPolicy + webhook"),
    "local": ("tokenslice.local.cli", "the whole data plane on loopback (Envoy, gateway, sidecars, vLLM)"),
    "bench": ("tokenslice.bench.cli", "load generator and side-by-side benchmark against the baselines"),
    "engine": ("tokenslice.engine.cli", "build the vLLM engine venv + tiny offline model; start vLLM"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenslice",
        description="Preemptive, time-sliced LLM serving: requests are generated chunk by chunk so a "
        "scheduler can continue, pause or move them at every chunk boundary.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # a component not installed in this environment
            p.set_defaults(_unavailable=f"{name}: {exc}")
            continue
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"tokenslice {args._unavailable}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
