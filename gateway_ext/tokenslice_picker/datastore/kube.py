"""Kubernetes mode: the pool's endpoints from an InferencePool's pods, the policy from its CR.

Through the ``kubernetes_asyncio`` client (``tokenslice.kubeapi``: in-cluster service-account credentials
or a kubeconfig).  Pods are *listed* then *watched* from the list's resourceVersion; a watch that ends
resumes from the last version seen, and only an expired one (410 Gone) lists again.  An endpoint is
``podIP:targetPort`` of every Ready, non-terminating pod matching the pool's ``spec.selector``, for every
target port; the pool is read through ``tokenslice.inferencepool.served`` -- the rule the operator and its
webhook use too, so a pool they decline is not served here either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client
from pydantic import ValidationError

from tokenslice import inferencepool, kubeapi
from tokenslice import policy as policy_schema
from tokenslice_picker.datastore.endpoints import Datastore

log = logging.getLogger("tokenslice_picker.kube")


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp") or not pod.get("status", {}).get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []))


class KubeSources:
    """Keeps the datastore equal to the pool's ready pods and (optionally) the policy equal to its CR."""

    def __init__(self, settings: Any, datastore: Datastore,
                 set_policy: Callable[[policy_schema.SchedulingPolicySpec], None],
                 on_result: Callable[[str], None]) -> None:
        self.settings = settings
        self.datastore = datastore
        self.set_policy = set_policy
        self.on_result = on_result
        self.api: client.ApiClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pods: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()

    async def start(self) -> None:
        """Load the credentials (``KubeConfigError`` when there are none), then follow the pool and policy."""
        self.api = await kubeapi.api_client(self.settings.kubeconfig)
        self._tasks.append(asyncio.create_task(kubeapi.supervised("pool watch", self._pool_loop), name="kube-pool"))
        if self.settings.policy_path is None and self.settings.policy is None:
            self._tasks.append(asyncio.create_task(kubeapi.supervised("policy watch", self._policy_loop),
                                                   name="kube-policy"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.api is not None:
            await self.api.close()

    def _publish(self, ports: list[int]) -> None:
        addrs, names = [], {}
        for pod in sorted(self._pods.values(), key=lambda p: p["metadata"]["name"]):
            if pod_ready(pod):
                for port in ports:
                    addr = f"{pod['status']['podIP']}:{port}"
                    addrs.append(addr)
                    names[addr] = pod["metadata"]["name"]
        self.datastore.set_endpoints(addrs, names)

    def _served(self, obj: dict[str, Any] | None) -> inferencepool.InferencePool | None:
        """The pool if it exists and tokenslice serves it (``inferencepool.served``), else None (logged)."""
        if obj is None:
            log.warning("InferencePool not found; serving no endpoints",
                        extra={"pool": self.settings.pool, "namespace": self.settings.namespace})
            return None
        try:
            return inferencepool.served(obj)
        except inferencepool.PoolError as exc:
            log.error("InferencePool not served; serving no endpoints", extra={"error": str(exc)})
            return None

    async def _pool_loop(self) -> None:
        """Follow the pool; follow its pods anew whenever its selector or target ports change.

        A pool that is gone, invalid or declined has no members: the endpoints are emptied until it is back.
        """
        ns, name = self.settings.namespace, self.settings.pool
        custom = client.CustomObjectsApi(self.api)
        pools = kubeapi.ListWatch(custom.list_namespaced_custom_object, inferencepool.API_GROUP,
                                  inferencepool.API_VERSION, ns, inferencepool.PLURAL,
                                  field_selector=f"metadata.name={name}")
        following: tuple[str, tuple[int, ...]] | None = None
        pods: asyncio.Task[None] | None = None
        try:
            async with contextlib.aclosing(pools.__aiter__()) as events:
                async for kind, obj in events:
                    if kind == "SYNCED":
                        obj = next(iter(obj), None)
                    pool = self._served(None if kind == "DELETED" else obj)
                    key = (pool.label_selector(), tuple(pool.target_ports())) if pool else None
                    if key == following:
                        continue
                    following = key
                    if pods is not None:
                        pods.cancel()
                        await asyncio.gather(pods, return_exceptions=True)
                        pods = None
                    if pool is None:
                        self._pods = {}
                        self._publish([])
                    else:
                        pods = asyncio.create_task(
                            kubeapi.supervised("pod watch", lambda p=pool: self._follow_pods(p)), name="kube-pods")
        finally:
            if pods is not None:
                pods.cancel()
                await asyncio.gather(pods, return_exceptions=True)

    async def _follow_pods(self, pool: inferencepool.InferencePool) -> None:
        """List, then watch, the pods the pool selects (until cancelled: the pool changed)."""
        ports = pool.target_ports()
        core = client.CoreV1Api(self.api)
        listing = kubeapi.ListWatch(core.list_namespaced_pod, self.settings.namespace,
                                    label_selector=pool.label_selector())
        async with contextlib.aclosing(listing.__aiter__()) as events:
            async for kind, obj in events:
                if kind == "SYNCED":
                    self._pods = {p["metadata"]["uid"]: p for p in obj}
                elif kind == "DELETED":
                    self._pods.pop(obj["metadata"]["uid"], None)
                else:
                    self._pods[obj["metadata"]["uid"]] = obj
                self._publish(ports)
                if kind == "SYNCED":
                    self.synced.set()

    async def _policy_loop(self) -> None:
        """Follow ``--policy-name``, or else the policy whose ``spec.poolRef.name`` is this pool."""
        ns, name = self.settings.namespace, self.settings.policy_name
        custom = client.CustomObjectsApi(self.api)
        params = {"field_selector": f"metadata.name={name}"} if name else {}
        policies = kubeapi.ListWatch(custom.list_namespaced_custom_object, policy_schema.API_GROUP,
                                     policy_schema.API_VERSION, ns, policy_schema.PLURAL, **params)
        async with contextlib.aclosing(policies.__aiter__()) as events:
            async for kind, obj in events:
                for item in obj if kind == "SYNCED" else [obj] if kind in ("ADDED", "MODIFIED") else []:
                    if name or ((item.get("spec") or {}).get("poolRef") or {}).get("name") == self.settings.pool:
                        self._apply(item)

    def _apply(self, obj: dict[str, Any]) -> None:
        try:
            spec = policy_schema.SchedulingPolicySpec.model_validate(obj.get("spec") or {})
        except ValidationError as exc:
            log.error("SchedulingPolicy rejected; keeping the previous policy", extra={"error": str(exc)})
            self.on_result("invalid")
            return
        self.set_policy(spec)
        self.on_result("applied")
        log.info("policy applied from CR", extra={"name": obj["metadata"]["name"],
                                                  "generation": obj["metadata"].get("generation")})
