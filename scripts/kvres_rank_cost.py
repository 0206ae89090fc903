"""What a dispatch pass paid, with --kv-residency, before its first (interactive) chunk came out of the
ordering: the residency ordering of commit 24221da (ranked the whole queue first) against this tree's
(lazy: pinned chunks go out before any run behind them is ranked).  Prints microseconds per pass.

    .venv/bin/python scripts/kvres_rank_cost.py      # from the repository root (git history needed)
"""

from __future__ import annotations

import subprocess
import sys
import time
import types

from tokenslice_picker.datastore.endpoints import Datastore
from tokenslice_picker.flowcontrol.chunk import make_chunk
from tokenslice_picker.scheduling.residency import ResidencyTracker

EP = "10.0.0.1:80"
BEFORE = "24221da"


def main() -> None:
    src = subprocess.run(["git", "show", f"{BEFORE}:gateway_ext/tokenslice_picker/scheduling/residency.py"],
                         capture_output=True, text=True, check=True).stdout
    old = types.ModuleType("residency_before")
    sys.modules[old.__name__] = old
    exec(compile(src, old.__name__, "exec"), old.__dict__)
    ds = Datastore([EP])
    ep = ds.get(EP)
    assert ep is not None
    ep.kv_capacity_tokens = 2048
    for n in (30, 300, 3000):
        hi = make_chunk("hi", "web", "interactive", prompt_tokens=30, slice=32)
        lo = [make_chunk(f"r{i}", f"t{i % 8}", "batch", index=1, prompt_tokens=100, slice=32, kv_holder=EP)
              for i in range(n)]
        queue = [hi, *lo]
        out = {}
        for name, tracker_type in (("before", old.ResidencyTracker), ("after", ResidencyTracker)):
            tracker = tracker_type()
            for c in lo[: n // 2]:  # half the requests were served here before
                tracker.on_grant(c, ep)
                tracker.on_release(c, ep, 32)
            reps = max(1, 3000 // n)
            t0 = time.perf_counter()
            for _ in range(reps):
                tracker._by_endpoint[EP].tiers = None  # a grant or release since the last pass
                first = next(iter(tracker.order(queue, counter=lambda k, t: 0.0, holder=ds.get,
                                                pinned=lambda c: c.priority_class == "interactive")))
                assert first is hi
            out[name] = (time.perf_counter() - t0) / reps * 1e6
        print(f"{n} queued batch chunks: the interactive chunk out after {out['before']:.0f} us before, "
              f"{out['after']:.1f} us now")


if __name__ == "__main__":
    main()
