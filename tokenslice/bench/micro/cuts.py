"""What one preemption costs on real vLLM: a waiter's first token by a cut, and throughput at a fixed cut rate.

Both parts run on the long-slice plane (Envoy + picker + one sidecar over one vLLM, ``--max-slice-tokens
4096``: one slice per request, so the only chunk ends are cuts), with long greedy ``ignore_eos`` low-priority
streams in the background that are restarted as they end.

``cut`` -- the waiter's TTFT by a cut vs from a free slot. Rounds alternate the two cases (order swapped
every round, so drift hits both alike): *free*: ``slots - 1`` background streams run, the waiter (an
interactive ``--waiter-tokens`` request) gets the free slot; *cut*: a filler stream is started first and
the waiter is sent once the filler's first token arrived -- every slot is taken, so the picker cuts one
(the shortest-running, the filler) and hands its slot to the waiter. After the cut the engine runs the
same ``slots`` sequences as in the free case, so the difference is what the cut costs the waiter. Before
each round the picker's own gauges must show ``slots - 1`` slots granted and nothing queued. One decode
step is measured in the same rounds: the background streams' inter-token time while the waiter ran
(the engine at that load). The picker's metrics add, per case, the waiter's queue time (queued -> slot)
and cut sent -> slot handed over (histogram deltas: as fine as the picker's buckets).

``cutrate`` -- what cuts cost the throughput. ``--streams`` background streams run; periods of
``--period`` seconds alternate (ABBA) between *none* and *cuts*: one cut every ``--cut-interval`` s,
sent by this benchmark as the picker sends it -- the signed ``contract.CutHeaders`` POSTed to the worker's
``CUT_PATH`` for a running chunk (request id from the stream's response id, chunk index counted here).
Sending the cut directly, instead of letting interactive arrivals trigger it, isolates the preemption:
the victim's continuation goes back through the picker and vLLM exactly as after a picker's cut, but no
waiter takes the slot and adds its own prefill and decode, and the number of decoding streams stays
the same in both cases -- so the throughput difference is the cost of the cut and the continuation
alone (HTTP hops, a new vLLM request, the partial KV block recomputed, the slot idle meanwhile). Reported:
total output tok/s per case, tokens lost per cut, % lost at 2 cuts/s, and tokens recomputed per cut --
vLLM's own counters (prompt tokens - prefix-cache hits, less the first chunks' uncached prompts) beside
the picker's estimate (context past the last full KV block).
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tokenslice import contract, promtext
from tokenslice.bench.stats import percentile
from tokenslice.local.stack import DataPlane

PROMPT = "a long batch job about rivers and mountains"
WAITER_PROMPT = "hello, what time is it"
Progress = Callable[[str], None]
PICKER = "tokenslice_picker_"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- one streamed completion as the client sees it -------------------------------------------------

@dataclass(slots=True)
class Stream:
    """One greedy streamed completion: when each event with tokens arrived and how many it carried."""

    sent: float
    request_id: str = ""
    prompt_tokens: int = 0
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    end: float | None = None
    error: str | None = None
    max_tokens: int = 0
    """What it asked for (set by :func:`run_stream`; the cutter leaves a stream alone near its end)."""
    started: asyncio.Event = field(default_factory=asyncio.Event)
    """Set at the first token."""

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def ttft(self) -> float | None:
        return self.times[0] - self.sent if self.times else None

    def tokens_between(self, start: float, stop: float) -> int:
        return sum(n for t, n in zip(self.times, self.counts) if start <= t < stop)


async def run_stream(session: aiohttp.ClientSession, base: str, model: str, prompt: str, max_tokens: int,
                     headers: dict[str, str], s: Stream) -> Stream:
    """Stream one completion into ``s`` (``ignore_eos``, token ids returned so tokens are counted exactly)."""
    s.max_tokens = max_tokens
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    try:
        async with session.post(f"{base}/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                s.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return s
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if not s.request_id and event.get("id"):
                    s.request_id = str(event["id"]).split("-", 1)[-1]  # cmpl-<request id>
                for choice in event.get("choices") or ():
                    if choice.get("prompt_token_ids"):
                        s.prompt_tokens = len(choice["prompt_token_ids"])
                    ids = choice.get("token_ids")
                    n = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                    if n:
                        s.times.append(now)
                        s.counts.append(n)
                        s.started.set()
    except (aiohttp.ClientError, OSError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    finally:
        s.end = time.perf_counter()
        s.started.set()  # a stream that failed before its first token must not hang its waiter
    return s


@dataclass
class Lane:
    """One background stream slot, restarted as its stream ends; what the cutter needs to know of it."""

    index: int
    current: Stream | None = None
    done: list[Stream] = field(default_factory=list)
    chunk_index: int = 0
    tokens_at_cut: int = 0
    generated_before_chunk: int = 0

    def all(self) -> list[Stream]:
        return self.done + ([self.current] if self.current else [])


class Background:
    """``count`` long low-priority streams, each restarted when it ends (a fresh prompt each time)."""

    def __init__(self, session: aiohttp.ClientSession, base: str, model: str, count: int, tokens: int,
                 headers: dict[str, str], *, stagger: bool = False) -> None:
        self.session, self.base, self.model, self.tokens, self.headers = session, base, model, tokens, headers
        self.lanes = [Lane(i) for i in range(count)]
        self.stagger = stagger
        """Lane i's first stream asks for (i + 1) / count of ``tokens``: the streams then end (and restart) spread
        evenly instead of all at once, so the engine's batch -- its contexts, its prefills -- looks the same in
        every period. Without it the lanes restart together every ``tokens`` decode steps and the throughput of
        a period depends on where in that cycle it falls (6.4% spread between equal periods on the H200)."""
        self.errors: list[str] = []
        """Streams that broke after their first token (restarted; reported)."""
        self._tasks: list[asyncio.Task[None]] = []

    def first_tokens(self, lane: Lane) -> int:
        if not self.stagger:
            return self.tokens
        return max(1, self.tokens * (lane.index + 1) // len(self.lanes))

    async def _lane(self, lane: Lane) -> None:
        tokens = self.first_tokens(lane)
        while True:
            s = Stream(sent=time.perf_counter())
            lane.current, lane.chunk_index, lane.tokens_at_cut, lane.generated_before_chunk = s, 0, 0, 0
            await run_stream(self.session, self.base, self.model, f"{uuid.uuid4().hex[:8]} {PROMPT}",
                             tokens, self.headers, s)
            tokens = self.tokens
            lane.done.append(s)
            if s.error and not s.times:  # refused outright: a broken setup, not a hiccup worth riding out
                raise RuntimeError(f"background stream {lane.index} failed: {s.error}")
            if s.error:
                self.errors.append(s.error)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._lane(lane)) for lane in self.lanes]
        await self.all_streaming()

    async def all_streaming(self) -> None:
        """Until every lane's current stream has its first token (raises if a lane died)."""
        while True:
            self.check()
            pending = [lane.current.started for lane in self.lanes if lane.current and not lane.current.times]
            if not pending:
                return
            await asyncio.wait([asyncio.create_task(e.wait()) for e in pending] + self._tasks,
                               return_when=asyncio.FIRST_COMPLETED)

    def check(self) -> None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception():
                raise t.exception()  # type: ignore[misc]

    def streams(self) -> list[Stream]:
        return [s for lane in self.lanes for s in lane.all()]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- the picker's and vLLM's metrics ------------------------------------------------------------------

async def scrape(session: aiohttp.ClientSession, url: str) -> list[promtext.Sample]:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return promtext.parse(await resp.text())


def hist_delta(before: list[promtext.Sample], after: list[promtext.Sample], name: str,
               **match: str) -> list[promtext.Sample]:
    """The histogram's buckets observed between two scrapes (summed over the label sets matching ``match``)."""
    def buckets(samples: list[promtext.Sample]) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in samples:
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in match.items()):
                out[s.labels["le"]] = out.get(s.labels["le"], 0.0) + s.value
        return out
    b, a = buckets(before), buckets(after)
    return [promtext.Sample(f"{name}_bucket", {"le": le}, v - b.get(le, 0.0)) for le, v in a.items()]


def merge_hist(parts: list[list[promtext.Sample]]) -> list[promtext.Sample]:
    acc: dict[tuple[str, str], float] = {}
    for part in parts:
        for s in part:
            key = (s.name, s.labels["le"])
            acc[key] = acc.get(key, 0.0) + s.value
    return [promtext.Sample(n, {"le": le}, v) for (n, le), v in acc.items()]


def quantiles_ms(samples: list[promtext.Sample], name: str) -> dict[str, float | None]:
    def ms(q: float) -> float | None:
        v = promtext.histogram_quantile(samples, name, q)
        return None if v is None else v * 1e3
    count = max((s.value for s in samples if s.labels.get("le") == "+Inf"), default=0.0)
    return {"n": count, "p50_ms": ms(0.5), "p99_ms": ms(0.99)}


async def settle(session: aiohttp.ClientSession, picker_url: str, granted: int, timeout_s: float = 10.0) -> bool:
    """Until the picker shows ``granted`` slots in use and nothing queued (polling its gauges); False on timeout."""
    deadline = time.perf_counter() + timeout_s
    while True:
        samples = await scrape(session, picker_url)
        slots = promtext.total(samples, PICKER + "endpoint_slots_granted")
        queued = promtext.total(samples, PICKER + "queue_length")
        if slots == granted and queued == 0:
            return True
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.01)  # polling the picker's gauges, bounded by the deadline


def engine_counters(samples: list[promtext.Sample]) -> dict[str, float]:
    hits = promtext.total(samples, promtext.PREFIX_HITS) or promtext.total(samples, promtext.PREFIX_HITS_OLD)
    return {"prompt_tokens": promtext.total(samples, promtext.PROMPT_TOKENS), "prefix_hits": hits,
            "generation_tokens": promtext.total(samples, promtext.GENERATION_TOKENS)}


def block_size(samples: list[promtext.Sample], default: int) -> int:
    value = promtext.label(samples, promtext.CACHE_CONFIG, "block_size")
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _dist_ms(values: list[float]) -> dict[str, float | int]:
    return {"n": len(values), "p50": percentile(values, 50) * 1e3, "p90": percentile(values, 90) * 1e3,
            "p99": percentile(values, 99) * 1e3, "max": max(values) * 1e3 if values else math.nan}


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


# --- part cut --------------------------------------------------------------------------------------

@dataclass
class CutRound:
    round: int
    case: str
    """free (slots - 1 streams running) or cut (every slot taken: the picker cuts one)."""
    ttft_s: float | None
    cuts: float
    settled: bool
    itl_s: list[float]
    vllm_itl: tuple[float, float] = (0.0, 0.0)
    """vLLM's inter-token latency (sum, count) over the round."""
    waiter_error: str | None = None


async def cut_part(plane: DataPlane, engine_metrics: str, model: str, *, slots: int, rounds: int, tokens: int,
                   waiter_tokens: int, filler_tokens: int, low: dict[str, str], high: dict[str, str],
                   progress: Progress = _stderr) -> dict[str, Any]:
    """The waiter's TTFT by a cut vs from a free slot, interleaved; see the module docstring."""
    picker_url = plane.picker_metrics_url or ""
    out: list[CutRound] = []
    hists: dict[str, dict[str, list[list[promtext.Sample]]]] = {
        c: {"queue": [], "cut_to_free": []} for c in ("free", "cut")}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        bg = Background(session, plane.url, model, slots - 1, tokens, low)
        await bg.start()
        started = time.perf_counter()
        try:
            for r in range(rounds):
                for case in (("free", "cut") if r % 2 == 0 else ("cut", "free")):
                    settled = await settle(session, picker_url, slots - 1)
                    before = await scrape(session, picker_url)
                    e0 = vllm_itl(await scrape(session, engine_metrics))
                    filler: asyncio.Task[Stream] | None = None
                    if case == "cut":
                        fs = Stream(sent=time.perf_counter())
                        filler = asyncio.create_task(run_stream(session, plane.url, model,
                                                                f"{uuid.uuid4().hex[:8]} {PROMPT}", filler_tokens,
                                                                low, fs))
                        await fs.started.wait()
                    w = Stream(sent=time.perf_counter())
                    await run_stream(session, plane.url, model, f"{uuid.uuid4().hex[:6]} {WAITER_PROMPT} {r}",
                                     waiter_tokens, high, w)
                    if filler is not None:
                        await filler
                    bg.check()
                    after = await scrape(session, picker_url)
                    e1 = vllm_itl(await scrape(session, engine_metrics))
                    cuts = (promtext.total(after, PICKER + "preemptions_total")
                            - promtext.total(before, PICKER + "preemptions_total"))
                    hists[case]["queue"].append(hist_delta(before, after, PICKER + "queue_wait_seconds",
                                                           **{"class": high_class(high)}))
                    hists[case]["cut_to_free"].append(hist_delta(before, after, PICKER + "cut_to_free_seconds"))
                    out.append(CutRound(r, case, w.ttft, cuts, settled, _itl(bg.streams(), w),
                                        (e1[0] - e0[0], e1[1] - e0[1]), w.error))
                done = out[-2:]
                progress(f"[cut] round {r + 1}/{rounds} ({time.perf_counter() - started:.0f}s): "
                         + ", ".join(f"{x.case} {_f(x.ttft_s and x.ttft_s * 1e3)} ms"
                                     + (f" ({x.cuts:g} cut)" if x.case == "cut" else "") for x in done))
        finally:
            await bg.stop()
    summary = cut_summary(out, hists)
    summary["background_errors"] = bg.errors
    return summary


def high_class(headers: dict[str, str]) -> str:
    return next((v for k, v in headers.items() if "class" in k.lower()), "")


def _itl(streams: list[Stream], waiter: Stream) -> list[float]:
    """Each background stream's time per token while the waiter ran: one decode step at that load.

    Per stream, (last - first token arrival in the window) / tokens after the first: events reach the
    client in bursts (several per read), so single gaps say little, their span does.
    """
    if waiter.end is None:
        return []
    lo, hi = waiter.sent, waiter.end
    out: list[float] = []
    for s in streams:
        inside = [(t, n) for t, n in zip(s.times, s.counts) if lo <= t <= hi]
        tokens = sum(n for _, n in inside[1:])
        if len(inside) >= 2 and tokens:
            out.append((inside[-1][0] - inside[0][0]) / tokens)
    return out


def vllm_itl(samples: list[promtext.Sample]) -> tuple[float, float]:
    """vLLM's inter-token latency histogram: (sum, count), either name."""
    for name in (promtext.INTER_TOKEN_LATENCY, promtext.TIME_PER_OUTPUT_TOKEN):
        count = promtext.total(samples, name + "_count")
        if count:
            return promtext.total(samples, name + "_sum"), count
    return 0.0, 0.0


def cut_summary(rounds: list[CutRound], hists: dict[str, dict[str, list[list[promtext.Sample]]]]) -> dict[str, Any]:
    free = [x.ttft_s for x in rounds if x.case == "free" and x.ttft_s is not None]
    cut_all = [x.ttft_s for x in rounds if x.case == "cut" and x.ttft_s is not None]
    cut = [x.ttft_s for x in rounds if x.case == "cut" and x.ttft_s is not None and x.cuts >= 1]
    itl = [v for x in rounds for v in x.itl_s]
    v_sum, v_count = sum(x.vllm_itl[0] for x in rounds), sum(x.vllm_itl[1] for x in rounds)
    step_ms = percentile(itl, 50) * 1e3 if itl else math.nan
    d_free, d_cut = _dist_ms(free), _dist_ms(cut)
    diff = {q: d_cut[q] - d_free[q] for q in ("p50", "p90", "p99")}
    picker = {case: {name: quantiles_ms(merge_hist(parts), PICKER + {"queue": "queue_wait_seconds",
                                                                    "cut_to_free": "cut_to_free_seconds"}[name])
                     for name, parts in by.items()} for case, by in hists.items()}
    return {
        "rounds": len({x.round for x in rounds}),
        "free_ms": d_free, "cut_ms": d_cut, "cut_all_ms": _dist_ms(cut_all),
        "difference_ms": diff,
        "decode_step_ms": {"p50": step_ms, "p90": percentile(itl, 90) * 1e3 if itl else math.nan, "n": len(itl),
                           "vllm_mean": v_sum / v_count * 1e3 if v_count else math.nan},
        "within_one_step_p99": (diff["p99"] <= step_ms) if not math.isnan(diff["p99"] + step_ms) else None,
        "cuts": sum(x.cuts for x in rounds if x.case == "cut"),
        "cuts_in_free_rounds": sum(x.cuts for x in rounds if x.case == "free"),
        "cut_rounds_without_cut": sum(1 for x in rounds if x.case == "cut" and x.cuts < 1),
        "unsettled_rounds": sum(1 for x in rounds if not x.settled),
        "waiter_errors": [x.waiter_error for x in rounds if x.waiter_error],
        "picker": picker,
        "samples": [{"round": x.round, "case": x.case, "ttft_s": x.ttft_s, "cuts": x.cuts, "settled": x.settled,
                     "itl_p50_ms": percentile(x.itl_s, 50) * 1e3 if x.itl_s else None} for x in rounds],
    }


def cut_markdown(s: dict[str, Any], *, slots: int, waiter_tokens: int) -> str:
    f, c, d, step = s["free_ms"], s["cut_ms"], s["difference_ms"], s["decode_step_ms"]
    verdict = {True: "**yes**", False: "**no**", None: "-"}[s["within_one_step_p99"]]
    pq, pc = s["picker"]["free"]["queue"], s["picker"]["cut"]["queue"]
    cf = s["picker"]["cut"]["cut_to_free"]
    lines = [
        f"## cut: a waiter's first token by a cut vs from a free slot ({s['rounds']} rounds, {slots} slots)", "",
        f"An interactive {waiter_tokens}-token request; *free*: {slots - 1} low-priority streams run; *cut*: "
        f"{slots} run and the picker cuts one. Client-side TTFT in ms (cut rounds counted only where a cut "
        "happened); one decode step = the background streams' time per token while the waiter ran.", "",
        "| case | n | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
        f"| free slot | {f['n']} | {_f(f['p50'])} | {_f(f['p90'])} | {_f(f['p99'])} | {_f(f['max'])} |",
        f"| by a cut | {c['n']} | {_f(c['p50'])} | {_f(c['p90'])} | {_f(c['p99'])} | {_f(c['max'])} |",
        f"| difference | | {_f(d['p50'])} | {_f(d['p90'])} | {_f(d['p99'])} | |", "",
        f"One decode step at that load: {_f(step['p50'], 2)} ms p50, {_f(step['p90'], 2)} ms p90 over "
        f"{step['n']} (stream, waiter) windows; vLLM's own mean inter-token latency over the rounds "
        f"{_f(step['vllm_mean'], 2)} ms. Cut p99 within one decode step of free-slot p99: {verdict} "
        f"({_f(d['p99'])} ms vs {_f(step['p50'], 2)} ms).", "",
        f"Cuts: {s['cuts']:g} in {s['rounds']} cut rounds ({s['cut_rounds_without_cut']} rounds found a slot "
        f"without one), {s['cuts_in_free_rounds']:g} in free rounds; rounds whose picker had not settled to "
        f"{slots - 1} granted slots and an empty queue: {s['unsettled_rounds']}; waiter errors: "
        f"{len(s['waiter_errors'])}; background streams broken mid-answer: {len(s.get('background_errors', []))}.",
        "",
        "The picker's own view (histogram quantiles, as coarse as its buckets 1/5/10/50/100 ms): waiter "
        f"queued -> slot p50 / p99: free {_f(pq['p50_ms'])} / {_f(pq['p99_ms'])} ms, cut {_f(pc['p50_ms'])} / "
        f"{_f(pc['p99_ms'])} ms; cut sent -> slot handed over: {_f(cf['p50_ms'])} / {_f(cf['p99_ms'])} ms "
        f"({cf['n']:g} cuts).", ""]
    return "\n".join(lines)


# --- part cutrate ----------------------------------------------------------------------------------

@dataclass
class Period:
    round: int
    case: str
    """none or cuts."""
    start: float
    stop: float
    measured_from: float
    tokens: int = 0
    cuts: int = 0
    misses: int = 0
    first_prompt_tokens: int = 0
    computed_prefill: float = 0.0
    engine_tokens: float = 0.0
    """vLLM's own output-token counter over the whole period (settling included): the engine-side check on
    the client-side count, which a slow client could skew."""
    engine_seconds: float = 0.0

    @property
    def tps(self) -> float:
        return self.tokens / (self.stop - self.measured_from)


class Cutter:
    """Cuts a running chunk of the next background stream every ``interval`` s, as the picker would."""

    def __init__(self, session: aiohttp.ClientSession, worker: str, key: bytes, bg: Background,
                 block: int) -> None:
        self.session, self.worker, self.key, self.bg, self.block = session, worker, key, bg, block
        self.next = 0
        self.estimates: list[int] = []
        self.produced: list[int] = []
        self.failures: dict[str, int] = {}

    async def cut_one(self) -> bool:
        """One cut of the next lane whose current chunk runs; True if the worker acted on it."""
        lanes = self.bg.lanes
        for k in range(len(lanes)):
            lane = lanes[(self.next + k) % len(lanes)]
            s = lane.current
            if (s is None or not s.request_id or s.end is not None or s.tokens <= lane.tokens_at_cut
                    or s.max_tokens - s.tokens < 8):
                continue  # not started, (nearly) ended, or its continuation has not produced a token yet
            headers = contract.CutHeaders(s.request_id, lane.chunk_index, "bench").sign(self.key)
            try:
                async with self.session.post(f"http://{self.worker}{contract.CUT_PATH}", headers=headers) as resp:
                    status = resp.status
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, OSError, ValueError):
                status, body = 0, {}
            if status != 200:
                key = f"http_{status}" if status else "unreachable"
                self.failures[key] = self.failures.get(key, 0) + 1
                continue
            self.next = (self.next + k + 1) % len(lanes)
            produced = int(body.get("tokens", 0))
            context = s.prompt_tokens + lane.generated_before_chunk + produced
            self.estimates.append(context % self.block)  # what the picker's cut_tokens{recomputed} counts
            self.produced.append(produced)
            lane.generated_before_chunk += produced
            lane.chunk_index += 1
            lane.tokens_at_cut = s.tokens
            return True
        return False

    async def run(self, period: Period, interval: float) -> None:
        """Cuts at ``measured_from + k * interval`` until the period ends (the first settles the previous one)."""
        k = 0
        while (at := period.measured_from + k * interval) < period.stop:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))  # the cut schedule itself
            if await self.cut_one():
                period.cuts += 1
            else:
                period.misses += 1
            k += 1


async def cutrate_part(plane: DataPlane, engine_metrics: str, key: bytes, model: str, *, streams: int,
                       rounds: int, tokens: int, period_s: float, interval: float, settle_s: float,
                       low: dict[str, str], default_block: int, progress: Progress = _stderr) -> dict[str, Any]:
    """Output throughput with one cut every ``interval`` s vs none, in alternating periods; see the module doc."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    periods: list[Period] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        block = block_size(await scrape(session, engine_metrics), default_block)
        bg = Background(session, plane.url, model, streams, tokens, low, stagger=True)
        cutter = Cutter(session, plane.sidecar_addresses[0], key, bg, block)
        await bg.start()
        first_engine = engine_counters(await scrape(session, engine_metrics))
        picker_before = await scrape(session, plane.picker_metrics_url or "")
        started = time.perf_counter()
        try:
            for r in range(rounds):
                for case in (("none", "cuts") if r % 2 == 0 else ("cuts", "none")):
                    e0 = engine_counters(await scrape(session, engine_metrics))
                    t0 = time.perf_counter()
                    p = Period(r, case, t0, t0 + period_s, t0 + settle_s)
                    if case == "cuts":
                        await cutter.run(p, interval)
                    await asyncio.sleep(max(0.0, p.stop - time.perf_counter()))  # the period's length
                    bg.check()
                    e1 = engine_counters(await scrape(session, engine_metrics))
                    all_streams = bg.streams()
                    p.tokens = sum(s.tokens_between(p.measured_from, p.stop) for s in all_streams)
                    p.first_prompt_tokens = sum(s.prompt_tokens for s in all_streams
                                                if s.times and t0 <= s.times[0] < p.stop)
                    p.computed_prefill = ((e1["prompt_tokens"] - e0["prompt_tokens"])
                                          - (e1["prefix_hits"] - e0["prefix_hits"]))
                    p.engine_tokens = e1["generation_tokens"] - e0["generation_tokens"]
                    p.engine_seconds = time.perf_counter() - t0
                    periods.append(p)
                done = periods[-2:]
                progress(f"[cutrate] round {r + 1}/{rounds} ({time.perf_counter() - started:.0f}s): "
                         + ", ".join(f"{x.case} {x.tps:.1f} tok/s ({x.cuts} cuts)" for x in done))
            last_engine = engine_counters(await scrape(session, engine_metrics))
            picker_after = await scrape(session, plane.picker_metrics_url or "")
        finally:
            await bg.stop()
    total_cuts = len(cutter.estimates)
    first_prompts = sum(s.prompt_tokens for s in bg.streams() if s.times and s.times[0] >= started)
    computed = ((last_engine["prompt_tokens"] - first_engine["prompt_tokens"])
                - (last_engine["prefix_hits"] - first_engine["prefix_hits"]))
    continuations = (_continuations(picker_after) - _continuations(picker_before))
    return cutrate_summary(periods, cutter, block=block, interval=interval, streams=streams,
                           recomputed_vllm=(computed - first_prompts) / total_cuts if total_cuts else None,
                           continuations=continuations,
                           picker_cuts=promtext.total(picker_after, PICKER + "preemptions_total")
                           - promtext.total(picker_before, PICKER + "preemptions_total")) | {
                               "background_errors": bg.errors}


def _continuations(samples: list[promtext.Sample]) -> float:
    return sum(s.value for s in samples if s.name == PICKER + "dispatches_total" and s.labels.get("kind") ==
               "continuation")


def cutrate_summary(periods: list[Period], cutter: Cutter, *, block: int, interval: float, streams: int,
                    recomputed_vllm: float | None, continuations: float, picker_cuts: float) -> dict[str, Any]:
    none = [p for p in periods if p.case == "none"]
    cuts = [p for p in periods if p.case == "cuts"]
    pairs = [(a, b) for a in none for b in cuts if a.round == b.round]
    # pooled over the rounds: the loss is the difference of the mean rates, per cut the tokens it stands for
    tps_none = statistics.mean(a.tps for a, _ in pairs) if pairs else math.nan
    tps_cuts = statistics.mean(b.tps for _, b in pairs) if pairs else math.nan
    measured_s = sum(b.stop - b.measured_from for _, b in pairs)
    n_cuts = sum(b.cuts for _, b in pairs)
    cuts_per_s = n_cuts / measured_s if measured_s else 0.0
    lost_per_cut = (tps_none - tps_cuts) / cuts_per_s if cuts_per_s else math.nan
    diffs = [a.tps - b.tps for a, b in pairs]
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    spread = statistics.stdev(a.tps for a, _ in pairs) / tps_none if len(pairs) > 1 and tps_none else math.nan
    engine = [(a.engine_tokens / a.engine_seconds, b.engine_tokens / b.engine_seconds) for a, b in pairs
              if a.engine_seconds and b.engine_seconds]
    engine_none = statistics.mean(a for a, _ in engine) if engine else math.nan
    engine_lost = (engine_none - statistics.mean(b for _, b in engine)) / engine_none if engine else math.nan
    engine_sem = (statistics.stdev(a - b for a, b in engine) / math.sqrt(len(engine)) / engine_none
                  if len(engine) > 1 else math.nan)
    lost = (tps_none - tps_cuts) / tps_none if tps_none else math.nan
    lost_sem = sem / tps_none if tps_none else math.nan
    return {
        "streams": streams, "interval_s": interval, "block_size": block,
        "periods": len(periods), "rounds": len(pairs),
        "tps_none_mean": tps_none, "tps_cuts_mean": tps_cuts, "tps_none_spread": spread,
        "lost_fraction": lost, "lost_fraction_sem": lost_sem,
        "lost_fraction_upper": lost + 2 * lost_sem,
        "engine_lost_fraction": engine_lost, "engine_lost_fraction_sem": engine_sem,
        "cuts": n_cuts, "cuts_per_s": cuts_per_s,
        "ticks_without_cut": sum(p.misses for p in cuts),
        "lost_tokens_per_cut": lost_per_cut,
        "lost_tokens_per_cut_sem": sem / cuts_per_s if cuts_per_s else math.nan,
        "lost_fraction_at_2_per_s": 2 * lost_per_cut / tps_none if tps_none else math.nan,
        "lost_slot_ms_per_cut": lost_per_cut / (tps_none / streams) * 1e3 if tps_none else math.nan,
        "recomputed_per_cut_vllm": recomputed_vllm,
        "recomputed_per_cut_estimate": statistics.mean(cutter.estimates) if cutter.estimates else None,
        "produced_per_cut_chunk": statistics.mean(cutter.produced) if cutter.produced else None,
        "worker_refusals": cutter.failures,
        "continuations_granted": continuations, "picker_cuts": picker_cuts,
        "samples": [{"round": p.round, "case": p.case, "tps": p.tps, "tokens": p.tokens, "cuts": p.cuts,
                     "engine_tokens": p.engine_tokens, "engine_seconds": p.engine_seconds,
                     "seconds": p.stop - p.measured_from, "computed_prefill": p.computed_prefill,
                     "first_prompt_tokens": p.first_prompt_tokens} for p in periods],
    }


def cutrate_markdown(s: dict[str, Any], *, period_s: float, settle_s: float) -> str:
    rows = "\n".join(f"| {x['round'] + 1} | {x['case']} | {x['tps']:.1f} | {x['cuts']} |" for x in s["samples"])
    lines = [
        f"## cutrate: throughput with one cut every {s['interval_s']:g} s vs none ({s['streams']} streams, "
        f"{s['rounds']} rounds)", "",
        f"Periods of {period_s:g} s (the first {settle_s:g} s of each not counted), ABBA order; output tokens "
        "delivered to the clients per second. Cuts are the signed cut order sent straight to the worker (no "
        "waiter takes the slot: the cost of the cut and the continuation alone).", "",
        "| round | case | tok/s | cuts |", "|---:|---|---:|---:|", rows, "",
        f"Mean tok/s over the rounds: no cuts {_f(s['tps_none_mean'])}, with cuts {_f(s['tps_cuts_mean'])} "
        f"({_f(s['cuts_per_s'], 2)} cuts/s achieved; {s['ticks_without_cut']} ticks found no running chunk to cut; "
        f"worker refusals {s['worker_refusals'] or 0}); the no-cut periods alone spread "
        f"{_f(100 * s['tps_none_spread'])}% (stdev / mean): the noise floor.", "",
        f"Throughput lost with cuts: **{_f(100 * s['lost_fraction'], 2)}%** (+- {_f(100 * s['lost_fraction_sem'], 2)}"
        f" s.e. of the paired rounds) = **{_f(s['lost_tokens_per_cut'])} output tokens per cut** "
        f"(+- {_f(s['lost_tokens_per_cut_sem'])}) = {_f(s['lost_slot_ms_per_cut'])} ms of one stream's decoding; "
        f"at 2 cuts/s: **{_f(100 * s['lost_fraction_at_2_per_s'], 2)}%** of throughput; mean + 2 s.e. "
        f"{_f(100 * s['lost_fraction_upper'], 2)}%. vLLM's own output-token counter over the same periods "
        f"(settling included): {_f(100 * s['engine_lost_fraction'], 2)}% "
        f"(+- {_f(100 * s['engine_lost_fraction_sem'], 2)}).", "",
        f"Tokens recomputed per cut: {_f(s['recomputed_per_cut_vllm'])} (vLLM: prompt tokens - prefix-cache hits, "
        f"less the first chunks' prompts) vs the picker's estimate {_f(s['recomputed_per_cut_estimate'])} (context "
        f"past the last full {s['block_size']}-token block); the cut chunks had produced "
        f"{_f(s['produced_per_cut_chunk'])} tokens each. Continuation chunks the picker granted: "
        f"{s['continuations_granted']:g}; cuts the picker itself sent: {s['picker_cuts']:g}; background streams "
        f"broken mid-answer: {len(s.get('background_errors', []))}.", ""]
    return "\n".join(lines)


# --- outputs -----------------------------------------------------------------------------------------

def plot_cut(summary: dict[str, Any], path: Path) -> Path | None:
    """CDF of the waiter's TTFT from a free slot and by a cut."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    samples = summary["samples"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for case, label in (("free", "free slot"), ("cut", "by a cut")):
        xs = sorted(x["ttft_s"] * 1e3 for x in samples
                    if x["case"] == case and x["ttft_s"] is not None and (case == "free" or x["cuts"] >= 1))
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{label} (n={len(xs)})")
    step = summary["decode_step_ms"]["p50"]
    if not math.isnan(step):
        ax.axvline(summary["free_ms"]["p99"] + step, color="grey", ls=":", lw=1,
                   label=f"free p99 + one decode step ({step:.1f} ms)")
    ax.set_xlabel("waiter time to first token (ms)")
    ax.set_ylabel("fraction of rounds")
    ax.set_title("interactive TTFT: by a cut vs from a free slot")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out: Path, sections: list[str], doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(sections))
    (out / "results.json").write_text(json.dumps(_clean(doc), indent=1))


def _clean(obj: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

