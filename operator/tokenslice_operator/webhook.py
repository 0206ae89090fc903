"""The mutating admission webhook (TLS, aiohttp): AdmissionReview in, JSONPatch out.

Registered by a MutatingWebhookConfiguration for pod CREATE (the chart ships it with
its own CA; tests register it against the test API server).  It never denies a pod:
anything unexpected is logged and the pod is admitted untouched.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from typing import Any

import yaml
from aiohttp import web

from tokenslice import inferencepool, policy
from tokenslice_operator.config import (
    CHUNK_URL_ANNOTATION,
    MANAGED_LABEL,
    POLICY_FILE,
    OperatorConfig,
    policy_configmap_name,
)
from tokenslice_operator.inject import SidecarSpec, inject, json_patch, skip_reason
from tokenslice_operator.kube import KubeClient, path

log = logging.getLogger("tokenslice.webhook")
MUTATE_PATH = "/mutate-pods"


class Webhook:
    def __init__(self, client: KubeClient, config: OperatorConfig, native_sidecars: bool) -> None:
        self.client = client
        self.config = config
        self.native_sidecars = native_sidecars

    async def review(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ``response`` part of an AdmissionReview for one pod CREATE."""
        uid = request.get("uid", "")
        allowed = {"uid": uid, "allowed": True}
        pod = request.get("object") or {}
        if request.get("kind", {}).get("kind") != "Pod" or request.get("operation") != "CREATE":
            return allowed
        namespace = request.get("namespace") or pod.get("metadata", {}).get("namespace")
        labels = pod.get("metadata", {}).get("labels") or {}
        pools = _valid_pools(await self.client.list(path("InferencePool", namespace), f"{MANAGED_LABEL}=true"))
        pool = next((p for p in pools if p.selects(labels)), None)
        if pool is None:
            return allowed
        name = pod.get("metadata", {}).get("name") or pod.get("metadata", {}).get("generateName", "?")
        reason = skip_reason(pod, self.config.gpu_resource)
        if reason:
            log.info("pod %s/%s in pool %s: not injecting (%s)", namespace, name, pool.metadata.name, reason)
            return allowed
        mutated = inject(pod, pool, await self._sidecar(pool, namespace))
        patch = json_patch(pod, mutated)
        log.info("pod %s/%s: injected the sidecar (pool %s)", namespace, name, pool.metadata.name)
        return {**allowed, "patchType": "JSONPatch", "patch": base64.b64encode(json.dumps(patch).encode()).decode()}

    async def _sidecar(self, pool: inferencepool.InferencePool, namespace: str) -> SidecarSpec:
        pname = pool.metadata.name
        chunk_url = (pool.metadata.annotations.get(CHUNK_URL_ANNOTATION)
                     or self.config.chunk_url_of(pname, namespace))
        chunk_size = policy.SchedulingPolicySpec().chunk_size
        ref = pool.spec.endpoint_picker_ref
        picker = ref.name if ref else None
        cm = await self.client.get(path("ConfigMap", namespace, policy_configmap_name(picker))) if picker else None
        if cm:  # the policy the picker runs decides the default slice size
            try:
                chunk_size = int(yaml.safe_load(cm["data"][POLICY_FILE]).get("chunkSize", chunk_size))
            except (KeyError, ValueError, TypeError, AttributeError, yaml.YAMLError):
                pass
        return SidecarSpec(image=self.config.sidecar_image, chunk_url=chunk_url, chunk_size=chunk_size,
                           native=self.native_sidecars, pull_policy=self.config.image_pull_policy,
                           gpu_resource=self.config.gpu_resource, kv_offload_gib=self.config.kv_offload_gib)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            review = body.get("request") or {}
        except (json.JSONDecodeError, AttributeError):
            return web.json_response({"error": "expected an AdmissionReview JSON body"}, status=400)
        try:
            response = await self.review(review)
        except Exception:  # never block pod creation on an operator bug
            log.exception("webhook failed; admitting the pod unchanged")
            response = {"uid": review.get("uid", ""), "allowed": True}
        return web.json_response({"apiVersion": body.get("apiVersion", "admission.k8s.io/v1"),
                                  "kind": "AdmissionReview", "response": response})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(MUTATE_PATH, self.handle)
        app.router.add_get("/healthz", _healthz)
        return app


def _valid_pools(objs: list[dict[str, Any]]) -> list[inferencepool.InferencePool]:
    """The pools by name that tokenslice serves (``inferencepool.served``, the reconciler's rule): a pool it
    declines or refuses keeps its pods as they are (its status already says why)."""
    pools = []
    for obj in objs:
        try:
            pools.append(inferencepool.served(obj))
        except inferencepool.PoolError as exc:
            log.warning("ignoring pool: %s", exc)
    return sorted(pools, key=lambda p: p.metadata.name)


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(webhook: Webhook, host: str, port: int, cert: str, key: str) -> web.AppRunner:
    """Start the HTTPS server; returns the runner (``await runner.cleanup()`` stops it)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(webhook.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ctx).start()
    log.info("admission webhook listening on https://%s:%d%s", host, port, MUTATE_PATH)
    return runner
