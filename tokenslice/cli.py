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
    "picker": ("tokenslice_picker.cli", "Envoy ext_proc endpoint picker that schedules every chunk"),
    "operator": ("tokenslice_operator.cli", "kopf operator for InferencePool / SchedulingPolicy + webhook"),
    "local": ("tokenslice.local.cli", "the whole data plane on loopback (Envoy, picker, sidecars, vLLM)"),
    "bench": ("tokenslice.bench.cli", "load generator and side-by-side benchmark against the baselines"),
    "engine": ("tokenslice.engine.cli", "build the vLLM engine venv + tiny offline model; start vLLM"),
}

DEPRECATED: dict[str, str] = {"gateway": "picker"}
"""Old subcommand -> new one; accepted (not listed in --help) with a warning."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenslice",
        description="Preemptive, time-sliced LLM serving: requests are generated chunk by chunk so a "
        "scheduler can continue, pause or move them at every chunk boundary.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    entries = [(name, module, {"help": help_text, "description": help_text})
               for name, (module, help_text) in COMMANDS.items()]
    # a parser added without ``help`` is accepted but not listed: the deprecated names stay hidden
    entries += [(old, COMMANDS[new][0], {"description": f"deprecated: use `tokenslice {new}`"})
                for old, new in DEPRECATED.items()]
    for name, module, texts in entries:
        p = sub.add_parser(name, **texts)
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
    if args.command in DEPRECATED:
        print(f"tokenslice: `{args.command}` is deprecated, use `tokenslice {DEPRECATED[args.command]}`",
              file=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"tokenslice {args._unavailable}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
