"""Kubernetes I/O outside kopf, through the ``kubernetes_asyncio`` client: credentials, calls, list+watch.

The operator (reconciler, webhook) and the picker's datastore share this one module, so they load
credentials the same way (a kubeconfig's current context, else the pod's service account, whose token the
client re-reads as the kubelet rotates it), raise the same error (``ApiException``, with ``.status``) and
follow collections with the same list+watch loop.  Objects stay plain JSON dicts: every reader parses the
kinds it cares about through the one model of each (``tokenslice.inferencepool``, ``tokenslice.policy``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

__all__ = ["ApiException", "Backoff", "KubeConfigError", "ListWatch", "api_client", "configuration", "request",
           "supervised"]

log = logging.getLogger("tokenslice.kube")
WATCH_TIMEOUT_S = 300
"""Server-side end of each watch request (``timeoutSeconds``); the loop then resumes where it was."""
CONNECT_TIMEOUT_S = 10.0
# errors of one request that a retry may cure: connection lost or refused, a timed-out read, a truncated or
# malformed body
TRANSIENT = (ApiException, aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, KeyError)


class KubeConfigError(RuntimeError):
    """No usable credentials: no kubeconfig given and not running in a pod with a service account."""


async def configuration(kubeconfig: str | os.PathLike[str] | None) -> client.Configuration:
    """Credentials of ``kubeconfig``'s current context, else of the pod's service account (token re-read)."""
    cfg = client.Configuration()
    if kubeconfig:
        try:
            await config.load_kube_config(config_file=os.fspath(kubeconfig), client_configuration=cfg)
        except (ConfigException, OSError, KeyError, TypeError) as exc:
            raise KubeConfigError(f"kubeconfig {kubeconfig}: {exc}") from None
        return cfg
    try:
        config.load_incluster_config(client_configuration=cfg)
    except ConfigException as exc:
        raise KubeConfigError(f"not in a cluster ({exc}); pass a kubeconfig") from None
    return cfg


async def api_client(kubeconfig: str | os.PathLike[str] | None) -> client.ApiClient:
    """An ``ApiClient`` (one aiohttp session; ``await api.close()``) for ``configuration(kubeconfig)``."""
    return client.ApiClient(await configuration(kubeconfig))


async def request(api: client.ApiClient, method: str, path: str, *, query: Mapping[str, str] | None = None,
                  body: Any = None, content_type: str = "application/json",
                  timeout_s: float = 30.0) -> dict[str, Any]:
    """One call by REST path, as the typed API classes make it (the client's auth, TLS and errors).

    For verbs that are generic over many kinds (the operator's get/list/apply/delete of ten kinds), where
    the typed classes would need one method per kind and verb.  ``ApiException`` on a non-2xx answer.
    """
    resp = await api.call_api(path, method, query_params=list((query or {}).items()),
                              header_params={"Accept": "application/json", "Content-Type": content_type},
                              body=body, auth_settings=["BearerToken"], _preload_content=False,
                              _request_timeout=timeout_s)
    return await read_json(resp)


async def read_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON body of a response asked for with ``_preload_content=False`` (raw dicts, no model classes)."""
    async with resp:
        data = await resp.read()
    if not 200 <= resp.status < 300:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = data.decode(errors="replace")
        raise exc
    return json.loads(data) if data else {}


def status_message(exc: BaseException) -> str:
    """The API server's own message of an ``ApiException`` (its Status body), else the exception's text."""
    if isinstance(exc, ApiException) and exc.body:
        try:
            return str(json.loads(exc.body).get("message") or exc.body)[:500]
        except (ValueError, AttributeError):
            return str(exc.body)[:500]
    return str(exc)


@dataclass
class Backoff:
    """Bounded exponential back-off with jitter between failed attempts; ``reset()`` after a success."""

    first_s: float = 0.5
    cap_s: float = 30.0
    _delay_s: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._delay_s = 0.0

    def next_delay(self) -> float:
        """The next wait: first_s, doubling up to cap_s, each scaled by a random 0.5-1.0 (no thundering herd)."""
        self._delay_s = min(self.cap_s, self._delay_s * 2 if self._delay_s else self.first_s)
        return self._delay_s * random.uniform(0.5, 1.0)


async def supervised(name: str, loop: Callable[[], Awaitable[None]], backoff: Backoff | None = None) -> None:
    """Run ``loop`` for ever: if it fails (a bug, an object shaped unlike any API server sends), log the
    traceback and start it again after a back-off, rather than leave a task dead that nobody awaits."""
    backoff = backoff or Backoff()
    while True:
        try:
            await loop()
            return
        except Exception:
            delay = backoff.next_delay()
            log.exception("%s failed; restarting", name, extra={"retry_in_s": round(delay, 2)})
            await asyncio.sleep(delay)  # back-off before the restart, not synchronisation


class ListWatch:
    """Follow one collection: list, watch from the list's resourceVersion, resume, re-list only on 410 Gone.

    ``async for kind, obj in ListWatch(core.list_namespaced_pod, ns, label_selector=...)`` yields
    ``("SYNCED", items)`` after every (re)list -- the whole collection, to replace what the reader holds --
    then ``("ADDED" | "MODIFIED" | "DELETED", obj)`` for every change.  A watch the server ends
    (``timeoutSeconds``) or that breaks resumes from the last resourceVersion seen (bookmarks included), so
    nothing is missed and nothing replayed; only when that version has expired (410 Gone: etcd compacted
    it, or it fell out of the watch cache) does it list again.  Failures wait ``backoff`` and retry, for
    ever: a reader that must stop cancels its task (iterate inside ``contextlib.aclosing``).
    """

    def __init__(self, list_fn: Callable[..., Awaitable[Any]], *args: Any, backoff: Backoff | None = None,
                 resource_version: str | None = None, watch_timeout_s: int = WATCH_TIMEOUT_S,
                 **kwargs: Any) -> None:
        """``resource_version``: resume from there rather than list first (a reader that kept its state)."""
        self.list_fn, self.args, self.kwargs = list_fn, args, kwargs
        self.backoff = backoff or Backoff()
        self.resource_version = resource_version
        self.watch_timeout_s = watch_timeout_s
        self.lists = 0
        self.watches = 0
        self.expired = 0

    async def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            try:
                if self.resource_version is None:
                    listing = await read_json(await self.list_fn(*self.args, **self.kwargs,
                                                                 _preload_content=False))
                    self.lists += 1
                    self.resource_version = listing["metadata"]["resourceVersion"]
                    self.backoff.reset()
                    yield "SYNCED", listing.get("items") or []
                async for kind, obj in self._watch():
                    yield kind, obj
            except ApiException as exc:
                if exc.status == 410:  # Gone: our version is older than what the server still has
                    self.expired += 1
                    log.info("watch expired (410 Gone); listing again", extra={"error": status_message(exc)})
                    self.resource_version = None
                    continue
                await self._pause(exc)
            except TRANSIENT as exc:
                await self._pause(exc)

    async def _watch(self) -> AsyncIterator[tuple[str, Any]]:
        """One watch request from ``self.resource_version``, until the server ends it."""
        self.watches += 1
        w = watch.Watch(return_type="object")  # events as plain dicts, like the list
        async with w:
            stream = w.stream(self.list_fn, *self.args, **self.kwargs, resource_version=self.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
                              _request_timeout=(CONNECT_TIMEOUT_S, self.watch_timeout_s + 30))
            async for event in stream:
                self.resource_version = w.resource_version or self.resource_version
                self.backoff.reset()
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    yield event["type"], event["raw_object"]

    async def _pause(self, exc: BaseException) -> None:
        delay = self.backoff.next_delay()
        log.warning("list/watch failed; retrying", extra={"error": status_message(exc), "retry_in_s": round(delay, 2)})
        await asyncio.sleep(delay)  # back-off before the next attempt, not synchronisation
