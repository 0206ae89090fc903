"""Kubernetes mode: the pool's endpoints from an InferencePool's pods, the policy from its CR.

A small aiohttp client (no kubernetes SDK): in-cluster service-account credentials or a
kubeconfig (token, client certificate, CA).  Pods are *listed* then *watched* from the list's
resourceVersion; a dropped or expired (410) watch re-lists.  An endpoint is ``podIP:targetPort``
of every Ready, non-terminating pod matching the pool's ``spec.selector``, for every target port; the
pool is read through ``tokenslice.inferencepool`` (upstream ``inference.networking.k8s.io/v1``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from pydantic import ValidationError

from tokenslice import inferencepool
from tokenslice import policy as policy_schema
from tokenslice_picker.datastore.endpoints import Datastore

log = logging.getLogger("tokenslice_picker.kube")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(RuntimeError):
    pass


class KubeClient:
    def __init__(self, server: str, *, token: str | None = None, ssl_context: ssl.SSLContext | bool = True) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def in_cluster(cls) -> KubeClient:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("not in a cluster (KUBERNETES_SERVICE_HOST unset); pass --kubeconfig")
        ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
        return cls(f"https://{host}:{port}", token=(SA_DIR / "token").read_text().strip(), ssl_context=ctx)

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str]) -> KubeClient:
        cfg = yaml.safe_load(Path(path).read_text())
        ctx_name = cfg.get("current-context")
        context = next((c["context"] for c in cfg.get("contexts", []) if c["name"] == ctx_name),
                       (cfg.get("contexts") or [{"context": {}}])[0]["context"])
        cluster = next(c["cluster"] for c in cfg["clusters"] if not context.get("cluster")
                       or c["name"] == context["cluster"])
        user = next((u["user"] for u in cfg.get("users", []) if u["name"] == context.get("user")), {})
        base = Path(path).parent
        server = cluster["server"]
        ssl_ctx: ssl.SSLContext | bool = True
        if server.startswith("https"):
            if cluster.get("insecure-skip-tls-verify"):
                ssl_ctx = False
            else:
                ssl_ctx = ssl.create_default_context()
                if "certificate-authority-data" in cluster:
                    ssl_ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
                elif "certificate-authority" in cluster:
                    ssl_ctx.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))
            cert, key = _material(user, "client-certificate", base), _material(user, "client-key", base)
            if cert and key:
                if not isinstance(ssl_ctx, ssl.SSLContext):
                    ssl_ctx = ssl.create_default_context()
                    ssl_ctx.check_hostname = False
                    ssl_ctx.verify_mode = ssl.CERT_NONE
                ssl_ctx.load_cert_chain(cert, key)
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = (base / user["tokenFile"]).read_text().strip()
        return cls(server, token=token, ssl_context=ssl_ctx)

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers,
                                                  timeout=aiohttp.ClientTimeout(total=None, sock_read=330))
        return self._session

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        s = await self.session()
        async with s.get(self.server + path, params=params, ssl=self.ssl) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise KubeError(f"GET {path}: {resp.status} {body[:300]}")
            return json.loads(body)

    async def watch(self, path: str, **params: str) -> AsyncIterator[dict[str, Any]]:
        s = await self.session()
        params = {**params, "watch": "1", "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
        async with s.get(self.server + path, params=params, ssl=self.ssl) as resp:
            if resp.status != 200:
                raise KubeError(f"WATCH {path}: {resp.status} {(await resp.text())[:300]}")
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)


def _material(user: dict[str, Any], name: str, base: Path) -> str | None:
    """A kubeconfig cert/key: a file path, or ``-data`` written to a private temp file for ssl."""
    if user.get(f"{name}-data"):
        fd, tmp = tempfile.mkstemp(prefix="tokenslice-kube-")
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(user[f"{name}-data"]))
        return tmp
    if user.get(name):
        return str(base / user[name])
    return None


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
        self.client = (KubeClient.from_kubeconfig(settings.kubeconfig) if settings.kubeconfig
                       else KubeClient.in_cluster())
        self._tasks: list[asyncio.Task[None]] = []
        self._pods: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._pods_loop(), name="kube-pods"))
        if self.settings.policy_path is None and self.settings.policy is None:
            self._tasks.append(asyncio.create_task(self._policy_loop(), name="kube-policy"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.client.close()

    async def _pool(self) -> inferencepool.InferencePool:
        ns, name = self.settings.namespace, self.settings.pool
        try:
            return inferencepool.InferencePool.parse(await self.client.get(inferencepool.path(ns, name)))
        except inferencepool.PoolError as exc:
            raise KubeError(str(exc)) from None

    def _publish(self, ports: list[int]) -> None:
        addrs, names = [], {}
        for pod in sorted(self._pods.values(), key=lambda p: p["metadata"]["name"]):
            if pod_ready(pod):
                for port in ports:
                    addr = f"{pod['status']['podIP']}:{port}"
                    addrs.append(addr)
                    names[addr] = pod["metadata"]["name"]
        self.datastore.set_endpoints(addrs, names)

    async def _pods_loop(self) -> None:
        """Follow the pool's pods; re-list when the pool's selector or target ports change (pods leave)."""
        while True:
            try:
                pool = await self._pool()
                tasks = {asyncio.create_task(self._follow_pods(pool)), asyncio.create_task(self._until_changed(pool))}
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except (KubeError, aiohttp.ClientError, OSError, TimeoutError, KeyError, ValueError) as exc:
                log.warning("pool watch failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)  # back-off before re-listing

    async def _follow_pods(self, pool: inferencepool.InferencePool) -> None:
        """List, then watch, the pods the pool selects; returns when the watch ends (re-list)."""
        ports, selector = pool.target_ports(), pool.label_selector()
        path = f"/api/v1/namespaces/{self.settings.namespace}/pods"
        listing = await self.client.get(path, labelSelector=selector)
        self._pods = {p["metadata"]["uid"]: p for p in listing.get("items", [])}
        self._publish(ports)
        self.synced.set()
        rv = listing["metadata"]["resourceVersion"]
        async for event in self.client.watch(path, labelSelector=selector, resourceVersion=rv):
            kind, obj = event.get("type"), event.get("object", {})
            if kind == "ERROR":
                return  # e.g. 410 Gone: re-list
            if kind == "BOOKMARK":
                continue
            uid = obj["metadata"]["uid"]
            if kind == "DELETED":
                self._pods.pop(uid, None)
            else:
                self._pods[uid] = obj
            self._publish(ports)

    async def _until_changed(self, pool: inferencepool.InferencePool) -> None:
        """Return once the pool's selector or target ports differ from ``pool``'s (or the pool is gone)."""
        ns, name = self.settings.namespace, self.settings.pool
        current = (pool.label_selector(), pool.target_ports())
        async for event in self.client.watch(inferencepool.path(ns), fieldSelector=f"metadata.name={name}"):
            kind = event.get("type")
            if kind in ("ERROR", "DELETED"):
                return
            if kind in ("ADDED", "MODIFIED"):
                try:
                    seen = inferencepool.InferencePool.parse(event.get("object") or {})
                    if (seen.label_selector(), seen.target_ports()) != current:
                        return
                except inferencepool.PoolError:
                    return

    async def _policy_loop(self) -> None:
        """Follow ``--policy-name``, or else the policy whose ``spec.poolRef.name`` is this pool."""
        ns, name = self.settings.namespace, self.settings.policy_name
        path = f"/apis/{policy_schema.API_GROUP}/{policy_schema.API_VERSION}/namespaces/{ns}/{policy_schema.PLURAL}"
        params = {"fieldSelector": f"metadata.name={name}"} if name else {}
        while True:
            try:
                async for event in self.client.watch(path, **params):
                    obj = event.get("object", {})
                    mine = name or ((obj.get("spec") or {}).get("poolRef") or {}).get("name") == self.settings.pool
                    if event.get("type") in ("ADDED", "MODIFIED") and mine:
                        self._apply(obj)
                    elif event.get("type") == "ERROR":
                        break
            except asyncio.CancelledError:
                raise
            except (KubeError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("policy watch failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

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
