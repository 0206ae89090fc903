"""Wire kopf, the reconciler and the webhook into one running operator.

Handlers are level-triggered ``on.event`` handlers registered in an explicit registry
(no kopf globals): every watch event of a pool, a policy or a managed child re-converges
the pool it belongs to.  Initial listings replay every object, so a restarted operator
converges without stored progress; no finalizers or annotations are put on users' objects.

Several replicas: kopf peering (a ClusterKopfPeering, ``tokenslice`` by default) pauses every replica
but the one with the highest priority; each replica picks a random priority so two never tie
(kopf pauses *all* replicas of equal priority).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes_asyncio import client

from tokenslice import inferencepool, kubeapi, policy
from tokenslice_operator.config import MANAGED_BY, POOL_LABEL, OperatorConfig
from tokenslice_operator.kube import FIELD_MANAGER, KubeClient, connection_info
from tokenslice_operator.reconcile import Reconciler
from tokenslice_operator.webhook import Webhook, serve

log = logging.getLogger("tokenslice.operator")
PEERING_NAME = "tokenslice"
# no secrets: the operator may not read any Secret (its signing Secret is only ever created or deleted)
CHILD_RESOURCES = (("apps", "v1", "deployments"), ("", "v1", "services"), ("", "v1", "configmaps"),
                   ("", "v1", "serviceaccounts"),
                   ("rbac.authorization.k8s.io", "v1", "roles"), ("rbac.authorization.k8s.io", "v1", "rolebindings"))


def build_registry(reconciler: Reconciler, cfg: client.Configuration) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await connection_info(cfg)  # the client's credentials; a rotated token is re-read

    @kopf.on.event(inferencepool.API_GROUP, inferencepool.API_VERSION, inferencepool.PLURAL, registry=registry)
    async def pool_event(namespace: str, name: str, **_: Any) -> None:
        await reconciler.sync_pool(namespace, name)

    @kopf.on.event(policy.API_GROUP, policy.API_VERSION, policy.PLURAL, registry=registry)
    async def policy_event(body: kopf.Body, **_: Any) -> None:
        await reconciler.sync_policy(dict(body))

    async def child_event(namespace: str, labels: kopf.Labels, **_: Any) -> None:
        await reconciler.sync_pool(namespace, labels[POOL_LABEL])

    for group, version, plural in CHILD_RESOURCES:
        kopf.on.event(group, version, plural, registry=registry, id=f"child-{plural}",
                      labels={**MANAGED_BY, POOL_LABEL: kopf.PRESENT})(child_event)
    return registry


def settings(priority: int | None = None, peering_name: str = PEERING_NAME) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    s.peering.name = peering_name
    s.peering.clusterwide = True
    s.peering.mandatory = True
    s.peering.priority = random.randint(1, 2**31 - 1) if priority is None else priority
    s.peering.stealth = False
    s.scanning.disabled = True  # resources must exist at start: no cluster-wide CRD watch needed
    s.posting.enabled = True
    s.posting.level = logging.WARNING
    s.watching.server_timeout = 300
    s.persistence.finalizer = "tokenslice.io/operator"
    return s


@dataclass
class RunOptions:
    kubeconfig: str | None = None
    config: OperatorConfig = field(default_factory=OperatorConfig)
    webhook_host: str = "0.0.0.0"
    standalone: bool = False
    priority: int | None = None
    liveness_endpoint: str | None = None
    peering_name: str = PEERING_NAME


async def run_operator(opts: RunOptions, stop_flag: asyncio.Event | threading.Event | None = None,
                       ready_flag: asyncio.Event | threading.Event | None = None) -> None:
    """Run until ``stop_flag`` is set (or forever): kopf + the webhook when certificates are given."""
    try:
        kube_cfg = await kubeapi.configuration(opts.kubeconfig)
    except kubeapi.KubeConfigError as exc:
        raise kopf.LoginError(f"no --kubeconfig/$KUBECONFIG and no usable service account: {exc}") from None
    api = client.ApiClient(kube_cfg)
    api.user_agent = FIELD_MANAGER
    kube = KubeClient(api)
    runner = None
    try:
        reconciler = Reconciler(client=kube, config=opts.config)
        cfg = opts.config
        if cfg.webhook_cert and cfg.webhook_key and cfg.webhook_port:
            native = await kube.server_version() >= (1, 29)
            runner = await serve(Webhook(kube, cfg, native_sidecars=native), opts.webhook_host, cfg.webhook_port,
                                 cfg.webhook_cert, cfg.webhook_key)
        await kopf.operator(
            registry=build_registry(reconciler, kube_cfg),
            settings=settings(opts.priority, opts.peering_name),
            clusterwide=True,
            standalone=opts.standalone,
            liveness_endpoint=opts.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if runner is not None:
            await runner.cleanup()
        await kube.close()
