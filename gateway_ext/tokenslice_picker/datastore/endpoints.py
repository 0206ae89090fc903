"""Endpoints of the pool: membership, slots granted by the scheduler, and scraped engine load."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


def parse_endpoints(spec: str | Iterable[str]) -> list[str]:
    """``"10.0.0.1:8000,10.0.0.2:8000"`` -> normalised ``ip:port`` list; raise ValueError on junk."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        raw = raw.strip()
        if not raw:
            continue
        host, sep, port = raw.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint {raw!r} is not host:port")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"endpoint {raw!r}: host must be an IP address (Envoy's ORIGINAL_DST "
                             "forwards to an address, not a name)") from None
        addr = f"{host}:{int(port)}"
        if addr not in out:
            out.append(addr)
    return out


@dataclass(slots=True, eq=False)
class Endpoint:
    """One model server (its sidecar's address) as the scheduler sees it."""

    address: str
    name: str = ""
    granted: int = 0
    """Chunk slots the scheduler has granted and not yet seen end."""
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    kv_capacity_tokens: int = 0
    """The engine's KV cache in tokens (``num_gpu_blocks * block_size`` of ``vllm:cache_config_info``); 0 = unknown."""
    scraped_at: float = 0.0
    scrape_ok: bool = False
    mean_chunk_s: float = 1.0
    """EWMA of observed chunk durations; the migration cost model's unit of waiting."""
    chunks_done: int = 0
    tokens_per_s: float = 0.0
    """EWMA of one sequence's decode rate here (tokens a chunk produced / its duration); 0 = not yet seen."""
    labels: dict[str, str] = field(default_factory=dict)

    def observe_chunk(self, seconds: float, alpha: float = 0.2) -> None:
        self.chunks_done += 1
        self.mean_chunk_s = seconds if self.chunks_done == 1 else (1 - alpha) * self.mean_chunk_s + alpha * seconds

    def observe_rate(self, tokens: int, seconds: float, alpha: float = 0.2) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.tokens_per_s = rate if not self.tokens_per_s else (1 - alpha) * self.tokens_per_s + alpha * rate

    def seconds_for(self, tokens: int) -> float:
        """How long one sequence takes to decode ``tokens`` here (the mean chunk time until a rate is known)."""
        return tokens / self.tokens_per_s if self.tokens_per_s else self.mean_chunk_s


class Datastore:
    """The current pool: ``address -> Endpoint``.  Replacing the member list keeps known endpoints' state.

    Listeners are told after every membership change (the dispatcher re-plans queued chunks whose
    KV holder left, and fills slots of endpoints that joined).
    """

    def __init__(self, addresses: Iterable[str] = (), *, default_chunk_s: float = 1.0) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._listeners: list[Callable[[], None]] = []
        self.default_chunk_s = default_chunk_s
        self.version = 0
        self.set_endpoints(addresses)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set_endpoints(self, addresses: Iterable[str], names: dict[str, str] | None = None) -> None:
        new: dict[str, Endpoint] = {}
        for addr in addresses:
            ep = self._endpoints.get(addr) or Endpoint(addr, mean_chunk_s=self.default_chunk_s)
            if names and addr in names:
                ep.name = names[addr]
            new[addr] = ep
        if new.keys() == self._endpoints.keys():
            self._endpoints = new
            return
        self._endpoints = new
        self.version += 1
        for listener in self._listeners:
            listener()

    def get(self, address: str) -> Endpoint | None:
        return self._endpoints.get(address)

    def __contains__(self, address: object) -> bool:
        return address in self._endpoints

    def __len__(self) -> int:
        return len(self._endpoints)

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def addresses(self) -> list[str]:
        return list(self._endpoints)
