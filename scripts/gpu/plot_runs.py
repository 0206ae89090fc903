"""The chunk-size trade-off on the GPU, across runs: what a time slice costs and what it buys.

Reads the ``results.json`` + ``chunk_breakdown.json`` of one or more ``bench-gpu.sh`` runs (each
run has its own vLLM-FCFS baseline, so throughput is shown relative to the FCFS run *on the same
machine*) and draws three panels per chunk size: the interactive stream's p99 TTFT against both
baselines and its own unloaded p99; output throughput as a share of vLLM FCFS; and where a chunk's
slot time goes (decode of its tokens at vLLM's measured inter-token latency vs the rest: admission,
prefill of the uncached tail, first-token latency, HTTP hops), with the per-token step inflation.

    python3 scripts/gpu/plot_runs.py RUN_DIR [RUN_DIR ...] --out docs/img/gpu-tradeoff.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run: Path) -> list[dict]:
    """One row per tokenslice chunk size of the run, with the run's own baselines attached."""
    results = json.loads((run / "results.json").read_text())
    breakdown = {r["system"]: (r, raw) for r, raw in zip(*(json.loads((run / "chunk_breakdown.json").read_text())[k]
                                                          for k in ("rows", "raw")))}
    systems = {s["summary"]["label"]: s["summary"] for s in results["systems"]}
    fcfs = systems.get("vllm-fcfs")
    unloaded = next((s for s in systems.values() if s["unloaded"]), None)
    prio = systems.get("vllm-priority")
    fcfs_itl = breakdown.get("vllm-fcfs", ({}, {}))[0].get("vllm_itl_ms")
    rows = []
    for label, s in systems.items():
        if s["kind"] != "tokenslice" or s["unloaded"]:
            continue
        row, _raw = breakdown.get(label, ({}, {}))
        held_ms = row.get("gw_grant_to_end_ms")
        decode_ms = (row.get("tokens_per_chunk") or 0) * (row.get("vllm_itl_ms") or 0)
        rows.append({
            "run": run.name, "chunk": s["chunk_size"], "p99": s["groups"]["hi"]["ttft"]["p99"],
            "fcfs_p99": fcfs["groups"]["hi"]["ttft"]["p99"] if fcfs else None,
            "prio_p99": prio["groups"]["hi"]["ttft"]["p99"] if prio else None,
            "unloaded_p99": unloaded["groups"]["hi"]["ttft"]["p99"] if unloaded else None,
            "throughput": s["throughput_tps"] / fcfs["throughput_tps"] if fcfs else None,
            "held_ms": held_ms, "decode_ms": decode_ms,
            "overhead_ms": held_ms - decode_ms if held_ms is not None else None,
            "itl_ms": row.get("vllm_itl_ms"), "fcfs_itl_ms": fcfs_itl,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = sorted((r for run in args.runs for r in load(run)), key=lambda r: r["chunk"])
    chunks = [r["chunk"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))

    a.plot(chunks, [r["p99"] for r in rows], "o-", label="tokenslice (loaded)", color="tab:blue")
    for key, name, style, color in (("fcfs_p99", "vLLM FCFS (same run)", "s--", "tab:red"),
                                    ("prio_p99", "vLLM priority", "^--", "tab:orange"),
                                    ("unloaded_p99", "hi alone through tokenslice", "o:", "black")):
        pts = [(r["chunk"], r[key]) for r in rows if r[key] is not None]
        if pts:
            a.plot(*zip(*pts), style, label=name, color=color)
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xticks(chunks, [str(x) for x in chunks])
    a.set_xlabel("chunk size (decode tokens per time slice)")
    a.set_ylabel("p99 TTFT of 'hi', seconds (log)")
    a.set_title("interactive p99 TTFT under saturation")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)

    b.plot(chunks, [100 * r["throughput"] for r in rows], "o-", color="tab:blue", label="tokenslice")
    b.axhline(100, color="tab:red", label="vLLM FCFS (same machine)")
    b.axhline(90, color="grey", ls=":", label="target 90%")
    b.set_xscale("log", base=2)
    b.set_xticks(chunks, [str(x) for x in chunks])
    b.set_ylim(0, 110)
    b.set_xlabel("chunk size")
    b.set_ylabel("output throughput, % of vLLM FCFS")
    b.set_title("throughput cost of time slicing")
    b.grid(True, alpha=0.3)
    b.legend(fontsize=8, loc="lower right")

    x = range(len(rows))
    c.bar(x, [r["decode_ms"] for r in rows], label="decode (tokens x vLLM ITL)", color="tab:blue")
    c.bar(x, [r["overhead_ms"] or 0 for r in rows], bottom=[r["decode_ms"] for r in rows],
          label="per-chunk overhead (admission, tail prefill, first token, hops)", color="tab:orange")
    for i, r in enumerate(rows):
        if r["held_ms"]:
            c.text(i, r["held_ms"], f"{r['overhead_ms']:.0f} ms\nITL {r['itl_ms']:.1f}", ha="center",
                   va="bottom", fontsize=8)
    c.set_xticks(list(x), [str(r["chunk"]) for r in rows])
    c.set_xlabel("chunk size")
    c.set_ylabel("ms a chunk holds its slot (grant to end)")
    fcfs_itl = next((r["fcfs_itl_ms"] for r in rows if r["fcfs_itl_ms"]), None)
    c.set_title("where a chunk's slot time goes" + (f" (FCFS ITL {fcfs_itl:.1f} ms)" if fcfs_itl else ""))
    c.set_ylim(0, 1.45 * max(r["held_ms"] or r["decode_ms"] for r in rows))
    c.legend(fontsize=8, loc="upper left")
    fig.suptitle("tokenslice on one H100, Llama-3-8B-shaped model, max-num-seqs 16: the chunk-size trade-off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
