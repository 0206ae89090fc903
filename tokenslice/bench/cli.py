"""``tokenslice bench``: run a scenario against tokenslice and the baselines, side by side, in one run."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from tokenslice.paths import REPO_ROOT


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="ACTION")
    demo = sub.add_parser("demo", help="the short head-of-line scenario (a few minutes on 2 cores): table + plots",
                          description="Start the engines and run the short 'demo' scenario against vLLM FCFS, "
                          "vLLM priority, chunking without a scheduler and tokenslice; write results/demo/.")
    _common(demo, default_out=REPO_ROOT / "results" / "demo")
    run = sub.add_parser("run", help="run a scenario (built-in name or YAML file)")
    run.add_argument("scenario", help="built-in scenario name (see `tokenslice bench list`) or a YAML file")
    _common(run, default_out=None)
    aff = sub.add_parser("affinity", help="KV-affinity probe: prefix-cache hits of chunked requests with the "
                         "gateway vs round-robin chunk routing, from vLLM's own counters")
    aff.add_argument("--engines", type=int, default=2)
    aff.add_argument("--chunk-size", type=int, default=32)
    aff.add_argument("--tokens", type=int, default=320, help="output tokens per request")
    aff.add_argument("--requests", type=int, default=3)
    aff.add_argument("--model", type=Path, default=None)
    micro = sub.add_parser("micro", help="micro-benchmarks of one part: picker (its cost per chunk), "
                           "sidecar (chunking cost) or slices (slice ends and cuts on real vLLM); "
                           "`tokenslice bench micro picker --help`")
    micro.add_argument("part", choices=("picker", "sidecar", "slices"))
    micro.add_argument("args", nargs=argparse.REMAINDER, help="the part's own flags")
    refair = sub.add_parser("fairness", help="re-read a stored results.json: fair share over the whole window "
                            "(old) and while both batch tenants were backlogged (approximate: no per-token times)")
    refair.add_argument("results", type=Path, help="a results.json written by `tokenslice bench run`")
    kvplot = sub.add_parser("kv", help="re-read stored results.json files: plot what paused contexts cost under KV "
                            "overflow (recomputed vs loaded from CPU offload, interactive p99), one row per run")
    kvplot.add_argument("results", type=Path, nargs="+", help="results.json files written by `tokenslice bench run`")
    kvplot.add_argument("--out", type=Path, required=True, help="the PNG to write")
    sub.add_parser("list", help="list the built-in scenarios")
    trace = sub.add_parser("trace", help="print a scenario's arrival trace summary (no engines needed)")
    trace.add_argument("scenario")
    trace.add_argument("--seed", type=int, default=None)


def _common(p: argparse.ArgumentParser, default_out: Path | None) -> None:
    p.add_argument("--out", type=Path, default=default_out, help="output directory (default results/<scenario>)")
    p.add_argument("--systems", default=None,
                   help="comma list of vllm-fcfs,vllm-priority,chunked,tokenslice,tokenslice-per-slice (default: the "
                   "scenario's); tokenslice is the default policy (long slices), tokenslice-per-slice the old "
                   "per-slice mode beside it")
    p.add_argument("--chunk-sizes", default=None,
                   help="comma list, e.g. 16,32,64 (default: the scenario's): the policy's chunk size, i.e. the "
                   "fairness quantum of long slices (the slice itself in per-slice mode)")
    p.add_argument("--reserved", default=None,
                   help="comma list of reserved slots for non-preemptible classes, one tokenslice run each "
                   "(e.g. 0,1; default: the scenario's)")
    p.add_argument("--window", type=float, default=None, help="arrival window, seconds")
    p.add_argument("--multiple", type=float, default=None,
                   help="calibrate: offer this multiple of the measured vLLM FCFS capacity (e.g. 1.3); "
                   "turns calibration on for a scenario without it")
    p.add_argument("--no-calibrate", action="store_true", help="replay the scenario's rates as written")
    p.add_argument("--picker-args", default=None,
                   help="extra picker flags for the tokenslice systems, one string, e.g. '--max-slice-tokens 0' "
                   "(per-slice mode instead of the default long slices)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", type=Path, default=None, help="local model directory (default: the tiny model)")
    p.add_argument("--keep-logs", action="store_true", help="keep the run directory with every component's log")
    p.add_argument("--rounds", type=int, default=None,
                   help="run each engine's systems this many times in alternating order (ABBA) and judge the "
                   "targets pooled over the rounds as well (default: the scenario's, 1)")
    p.add_argument("--isolate-cpus", action=argparse.BooleanOptionalAction, default=True,
                   help="give each vLLM engine core a CPU of its own and everything else the others, for every "
                   "system alike (default on; a no-op with fewer CPUs than engines + 1)")


def run(args: argparse.Namespace) -> int:
    from tokenslice.bench.scenario import builtin_scenarios, resolve_scenario

    if args.bench_command == "list":
        for name, path in builtin_scenarios().items():
            sc = resolve_scenario(name)
            print(f"{name:16s} {sc.description}  ({path})")
        return 0
    if args.bench_command == "affinity":
        return _affinity(args)
    if args.bench_command == "kv":
        return _kv_plot(args.results, args.out)
    if args.bench_command == "fairness":
        return _fairness(args.results)
    if args.bench_command == "micro":
        from tokenslice.bench.micro import picker, sidecar, slices

        return {"picker": picker.main, "sidecar": sidecar.main, "slices": slices.main}[args.part](args.args)
    if args.bench_command not in ("demo", "run", "trace"):
        print("usage: tokenslice bench {demo,run,affinity,micro,fairness,list,trace} ...  (see --help)",
              file=sys.stderr)
        return 2
    name = "demo" if args.bench_command == "demo" else args.scenario
    try:
        scenario = resolve_scenario(name)
        update: dict[str, object] = {}
        if args.seed is not None:
            update["seed"] = args.seed
        if args.bench_command != "trace":
            if args.systems:
                update["systems"] = [s.strip() for s in args.systems.split(",") if s.strip()]
            if args.chunk_sizes:
                update["chunk_sizes"] = [int(x) for x in args.chunk_sizes.split(",") if x.strip()]
            if args.reserved:
                update["reserved_slots"] = [int(x) for x in args.reserved.split(",") if x.strip()]
            if args.window:
                update["window_s"] = args.window
            if args.rounds:
                update["rounds"] = args.rounds
            if args.picker_args is not None:
                update["picker_args"] = shlex.split(args.picker_args)
            if args.no_calibrate:
                update["calibrate"] = None
            elif args.multiple:
                update["calibrate"] = {**(scenario.calibrate.model_dump() if scenario.calibrate else {}),
                                       "multiple": args.multiple}
        if update:
            scenario = type(scenario).model_validate({**scenario.model_dump(), **update})
    except (ValueError, OSError) as exc:
        print(f"tokenslice bench: {exc}", file=sys.stderr)
        return 2
    if args.bench_command == "trace":
        return _print_trace(scenario)
    out = args.out or REPO_ROOT / "results" / scenario.name
    return asyncio.run(_run(scenario, out, args))


def _affinity(args: argparse.Namespace) -> int:
    from tokenslice.bench import affinity

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = asyncio.run(affinity.probe(engines=args.engines, chunk_size=args.chunk_size, tokens=args.tokens,
                                      requests=args.requests, model_dir=args.model, progress=progress))
    print(affinity.markdown(rows, engines=args.engines, chunk_size=args.chunk_size, tokens=args.tokens))
    return 0


def _kv_plot(paths: list[Path], out: Path) -> int:
    from tokenslice.bench import plots

    runs = []
    for path in paths:
        try:
            runs.append((path.parent.name or str(path), plots.kv_bars_from_json(json.loads(path.read_text()))))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"tokenslice bench kv: cannot read {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    plots.kv_overflow(runs, out)
    if not out.exists():
        print("tokenslice bench kv: no system with KV counters in these results", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _fairness(path: Path) -> int:
    from tokenslice.bench.report import fairness_from_json

    try:
        doc = json.loads(path.read_text())
        rows = fairness_from_json(doc)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"tokenslice bench fairness: cannot read {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print("| system | share error whole window (old; cost / tokens) | both backlogged | seconds both backlogged "
          "| output tokens while both backlogged |\n|---|---:|---:|---:|---|")
    for label, f in rows:
        b = f.backlogged
        assert b is not None
        toks = " : ".join(f"{t} {v:.0f}" for t, v in sorted(b.output_tokens.items()))
        print(f"| {label} | {f.max_share_error:.1%} / {f.token_share_error:.1%} | {b.max_share_error:.1%} / "
              f"{b.token_share_error:.1%} | {b.seconds:.1f} | {toks} |")
    print("\n(approximate: tokens spread evenly between each request's first token and its end; a tenant counts "
          "as backlogged only while a request of it waits for its first token -- the rows keep no pauses)")
    return 0


def _print_trace(scenario) -> int:  # type: ignore[no-untyped-def]
    from tokenslice.bench.trace import build_trace

    trace = build_trace(scenario)
    print(f"{scenario.name}: {len(trace)} requests in {scenario.window_s:g}s (seed {scenario.seed})")
    if scenario.calibrate:
        print(f"  (rates as written: a run scales the background to {scenario.calibrate.multiple:g}x the measured "
              "vLLM FCFS capacity first)")
    for s in scenario.streams:
        rows = [r for r in trace if r.stream == s.name]
        if rows:
            print(f"  {s.name:10s} tenant {s.tenant:8s} class {s.priority_class:12s} {len(rows):4d} requests "
                  f"({len(rows) / scenario.window_s:.2f}/s), output tokens {sum(r.max_tokens for r in rows)}, "
                  f"first at {rows[0].at:.2f}s")
    return 0


async def _run(scenario, out: Path, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from tokenslice.bench import breakdown, plots, report
    from tokenslice.bench.runner import SystemResult, run_benchmark

    out.mkdir(parents=True, exist_ok=True)
    command = "tokenslice bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 \
        else f"tokenslice bench {args.bench_command}"
    meta = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": platform.node(), "python": platform.python_version(), "cpus": _cpus(),
            "isolate_cpus": args.isolate_cpus}
    done: list[SystemResult] = []
    calibrated: list = []  # the scaled scenario and its Calibrated, once measured

    def write(final: bool) -> str:
        sc = calibrated[0] if calibrated else scenario
        summaries = [report.summarize(r, sc) for r in done]
        table = report.markdown(summaries, sc, command)
        if calibrated:
            table = table.replace("\n", f"\n\nLoad calibrated in this run: {calibrated[1].describe()}.\n", 1)
            meta["calibration"] = calibrated[1].as_json()
        table += report.pooled_markdown(done, summaries, sc)
        table += report.preemption_markdown(done, summaries, sc)
        table += report.kv_markdown(done, summaries, sc)
        (out / "results.md").write_text(table)
        report.write_json(out / "results.json", sc, done, summaries, {**meta, "complete": final})
        rows = [breakdown.breakdown(r.plan.label, r.observation) for r in done]
        (out / "chunk_breakdown.json").write_text(json.dumps(
            {"rows": rows, "raw": [{"label": r.plan.label, **r.observation.as_json()} for r in done]}, indent=1))
        (out / "chunk_breakdown.md").write_text(breakdown.markdown(rows))
        if final:
            for path in plots.write_all(done, summaries, sc, out):
                print(f"wrote {path}", file=sys.stderr)
        return table

    def on_result(result: SystemResult) -> None:
        done.append(result)
        write(final=False)

    def on_calibrated(scaled, cal) -> None:  # type: ignore[no-untyped-def]
        calibrated[:] = [scaled, cal]

    started = time.monotonic()
    try:
        await run_benchmark(scenario, model_dir=args.model, on_result=on_result, keep_run_dir=args.keep_logs,
                            on_calibrated=on_calibrated, isolate_cpus=args.isolate_cpus)
    except Exception as exc:  # keep what was measured; say what broke
        print(f"tokenslice bench: run failed after {len(done)} system(s): {type(exc).__name__}: {exc}",
              file=sys.stderr)
        if done:
            print(write(final=True))
        return 1
    table = write(final=True)
    print(table)
    print(f"results in {out}/ (results.md, results.json, *.png) after {time.monotonic() - started:.0f}s",
          file=sys.stderr)
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))
