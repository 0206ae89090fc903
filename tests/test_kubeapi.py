"""tokenslice/kubeapi.py against a REAL kube-apiserver (tests/fixtures/kube.py): the list+watch loop that the
picker's datastore follows pods, pools and policies with.

A watch the server ends must resume from the last resourceVersion seen -- no re-list, no event replayed,
none lost -- and a version the server no longer has (410 Gone) must lead to exactly one new list.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from tests.fixtures.kube import KubeCluster, second_apiserver
from tests.picker.conftest import until
from tokenslice import kubeapi

pytestmark = pytest.mark.k8s


@contextlib.asynccontextmanager
async def _following(lw: kubeapi.ListWatch) -> AsyncIterator[list[tuple[str, Any]]]:
    """Run ``lw`` in a task, recording (kind, names) of what it yields; cancelled on exit."""
    seen: list[tuple[str, Any]] = []

    async def consume() -> None:
        async with contextlib.aclosing(lw.__aiter__()) as events:
            async for kind, obj in events:
                names = sorted(o["metadata"]["name"] for o in obj) if kind == "SYNCED" else obj["metadata"]["name"]
                seen.append((kind, names))

    task = asyncio.create_task(consume())
    try:
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _state(seen: list[tuple[str, Any]]) -> set[str]:
    """The names the reader holds after what it was given (a SYNCED listing replaces everything)."""
    names: set[str] = set()
    for kind, obj in seen:
        if kind == "SYNCED":
            names = set(obj)
        elif kind == "DELETED":
            names.discard(obj)
        else:
            names.add(obj)
    return names


@contextlib.asynccontextmanager
async def _namespace(cluster: KubeCluster) -> AsyncIterator[tuple[client.CoreV1Api, str]]:
    ns = f"lw-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", ns)
    api = await kubeapi.api_client(cluster.kubeconfig)
    try:
        yield client.CoreV1Api(api), ns
    finally:
        await api.close()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def _configmap(core: client.CoreV1Api, ns: str, name: str) -> None:
    await core.create_namespaced_config_map(ns, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})


async def test_a_watch_the_server_ends_resumes_without_relisting_or_replaying(kube_cluster: KubeCluster) -> None:
    async with _namespace(kube_cluster) as (core, ns):
        await _configmap(core, ns, "a")
        # the server ends every watch after 1 s: the loop must resume each time from where it was
        lw = kubeapi.ListWatch(core.list_namespaced_config_map, ns, watch_timeout_s=1)
        async with _following(lw) as seen:
            await until(lambda: seen == [("SYNCED", ["a"])], what="the first listing")
            await _configmap(core, ns, "b")
            await until(lambda: _state(seen) == {"a", "b"}, what="b added")
            watches = lw.watches
            await until(lambda: lw.watches >= watches + 2, timeout_s=30, what="two more watches ended by the server")
            await _configmap(core, ns, "c")
            await until(lambda: _state(seen) == {"a", "b", "c"}, what="c added")
            await core.delete_namespaced_config_map("a", ns)
            await until(lambda: _state(seen) == {"b", "c"}, what="a deleted")
        # one list; every change exactly once (a watch from no version would replay a and b as ADDED)
        assert seen == [("SYNCED", ["a"]), ("ADDED", "b"), ("ADDED", "c"), ("DELETED", "a")]
        assert (lw.lists, lw.expired) == (1, 0)


async def test_a_version_the_server_no_longer_has_is_listed_again(kube_cluster: KubeCluster) -> None:
    """410 Gone -> one new list, then the watch goes on from it.

    A reader listed at version R on one API server and was cut off; meanwhile the collection changed, and it
    reconnects to another API server over the same etcd (an HA replica, or the same server restarted), whose
    watch cache begins after R. Resuming from R is answered 410 Gone "too old resource version"; the loop
    must list again, once, and go on. (etcd compaction alone does not show it on 1.20: watches are served
    from the API server's watch cache, which keeps its own history.)
    """
    async with _namespace(kube_cluster) as (core, ns):
        await _configmap(core, ns, "a")
        stale = (await core.list_namespaced_config_map(ns)).metadata.resource_version
        await _configmap(core, ns, "b")
        await core.delete_namespaced_config_map("a", ns)
        with second_apiserver(kube_cluster) as server:
            cfg = yaml.safe_load(kube_cluster.kubeconfig.read_text())
            cfg["clusters"][0]["cluster"]["server"] = server
            other = kube_cluster.workdir / f"{ns}.kubeconfig"
            other.write_text(yaml.safe_dump(cfg))
            api = await kubeapi.api_client(other)
            try:
                core2 = client.CoreV1Api(api)
                lw = kubeapi.ListWatch(core2.list_namespaced_config_map, ns, resource_version=stale)
                async with _following(lw) as seen:
                    await until(lambda: _state(seen) == {"b"}, timeout_s=60, what="a listing after 410 Gone")
                    await _configmap(core, ns, "c")
                    await until(lambda: _state(seen) == {"b", "c"}, what="c added")
            finally:
                await api.close()
        assert seen == [("SYNCED", ["b"]), ("ADDED", "c")]
        assert (lw.expired, lw.lists) == (1, 1)


async def test_failures_are_retried_with_a_bounded_backoff(kube_cluster: KubeCluster) -> None:
    """A collection the server cannot list (a group it does not serve: 404) is retried for ever, with waits
    that grow and stop growing at the cap, and never yields anything."""
    api = await kubeapi.api_client(kube_cluster.kubeconfig)
    try:
        custom = client.CustomObjectsApi(api)
        backoff = kubeapi.Backoff(first_s=0.02, cap_s=0.08)
        delays: list[float] = []
        next_delay = backoff.next_delay
        backoff.next_delay = lambda: delays.append(next_delay()) or delays[-1]  # type: ignore[method-assign]
        lw = kubeapi.ListWatch(custom.list_namespaced_custom_object, "absent.tokenslice.io", "v1", "default",
                               "nothings", backoff=backoff)
        async with _following(lw) as seen:
            await until(lambda: len(delays) >= 6, what="six retries")
        assert seen == [] and lw.lists == 0
        assert all(d <= 0.08 for d in delays) and max(delays) > 0.04, delays
    finally:
        await api.close()


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = kubeapi.Backoff(first_s=1.0, cap_s=4.0)
    bounds = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0)]
    for low, high in bounds:
        assert low <= b.next_delay() <= high
    b.reset()
    assert 0.5 <= b.next_delay() <= 1.0


async def test_a_failing_loop_is_restarted_not_left_dead() -> None:
    """A watch loop that raises (here: on its first two runs) is started again after a back-off."""
    runs: list[int] = []

    async def loop() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise KeyError("uid")

    await asyncio.wait_for(kubeapi.supervised("test loop", loop, kubeapi.Backoff(first_s=0.01, cap_s=0.02)), 10)
    assert runs == [0, 1, 2]
