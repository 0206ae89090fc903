"""Converge one pool: its picker objects, its published policy, and the status of both.

Everything about a pool is recomputed from the API server each time (level-triggered),
so the same function serves creation, updates, drift repair, policy changes and an
operator restart.  Writes are server-side applies (no-ops when nothing changed) and
status patches skipped when nothing changed, so reconciling never feeds itself.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from tokenslice import inferencepool, policy
from tokenslice.inferencepool import InferencePool, PoolError, UnsupportedPool
from tokenslice.kubeapi import ApiException
from tokenslice_operator import children
from tokenslice_operator.config import (
    CONTROLLER_NAME,
    MANAGED_BY,
    MANAGED_LABEL,
    POLICY_LABEL,
    POOL_LABEL,
    OperatorConfig,
    endpoints_service_name,
    policy_configmap_name,
)
from tokenslice_operator.kube import KubeClient, path

log = logging.getLogger("tokenslice.operator")
Manifest = dict[str, Any]
CHILD_KINDS = ("Deployment", "Service", "ConfigMap", "RoleBinding", "Role", "ServiceAccount")
"""Listed and deleted by label on pool deletion; the signing Secret is deleted by name (never listed or read)."""


@dataclass
class Reconciler:
    """Operator-scoped state: the client, the settings and one lock per pool (no globals)."""

    client: KubeClient
    config: OperatorConfig
    locks: defaultdict[tuple[str, str], asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    async def sync_pool(self, namespace: str, name: str) -> None:
        """Converge everything that hangs off pool ``namespace/name`` (which may not exist)."""
        async with self.locks[(namespace, name)]:
            await self._sync_pool(namespace, name)

    async def sync_policy(self, policy_obj: Manifest) -> None:
        """A policy changed or went away: converge the pool it names and any pool still publishing it."""
        meta = policy_obj["metadata"]
        pools = set()
        ref = ((policy_obj.get("spec") or {}).get("poolRef") or {}).get("name")
        if ref:
            pools.add(ref)
        published = await self.client.list(path("ConfigMap", meta["namespace"]),
                                           f"{POLICY_LABEL}={meta['name']},{POOL_LABEL}")
        pools.update(cm["metadata"]["labels"][POOL_LABEL] for cm in published)
        for pool in sorted(pools):
            await self.sync_pool(meta["namespace"], pool)

    # --- the pool ---------------------------------------------------------------------------------
    async def _sync_pool(self, namespace: str, name: str) -> None:
        pool = await self.client.get(path("InferencePool", namespace, name))
        policies = [p for p in await self.client.list(path("SchedulingPolicy", namespace))
                    if ((p.get("spec") or {}).get("poolRef") or {}).get("name") == name]
        if pool is None or pool["metadata"].get("deletionTimestamp"):
            await self._remove_children(namespace, name)
            for p in policies:
                await self._set_policy_status(p, False, "PoolNotFound", f"InferencePool {name} does not exist")
            return
        if (pool["metadata"].get("labels") or {}).get(MANAGED_LABEL) != "true":
            # never managed, or the label was removed: nothing of ours may remain
            await self._remove_children(namespace, name)
            await self._drop_pool_status(pool)
            for p in policies:
                await self._set_policy_status(p, False, "PoolNotManaged",
                                              f"InferencePool {name} lacks the label {MANAGED_LABEL}: \"true\"")
            return
        try:
            model = inferencepool.served(pool)  # the one rule: the webhook and the picker decide by it too
            picker, port = model.picker_ref()
            await self._check_not_foreign(namespace, picker)
            await self._check_not_foreign(namespace, self.config.gateway_service_name(name))
            if children.fail_open(model):
                await self._check_not_foreign(namespace, endpoints_service_name(name))
        except PoolError as exc:
            reason = "UnsupportedAppProtocol" if isinstance(exc, UnsupportedPool) else "InvalidExtensionRef"
            if isinstance(exc, UnsupportedPool):
                await self._remove_children(namespace, name)
            await self._set_pool_status(pool, resolved=(False, reason, str(exc)),
                                        ready=(False, reason, "no picker for this pool"))
            for p in policies:
                await self._set_policy_status(p, False, "PoolInvalid", f"InferencePool {name}: {exc}")
            return

        winner, spec, keep_published = self._choose_policy(policies)
        await self._ensure_secret(model)
        for obj in (children.service_account(model, picker), children.role(model, picker),
                    children.role_binding(model, picker)):
            await self.client.apply(obj)
        cm_path = path("ConfigMap", namespace, policy_configmap_name(picker))
        current_cm = await self.client.get(cm_path)
        if not (keep_published and current_cm is not None):
            await self.client.apply(children.policy_configmap(model, picker, spec, winner))
            current_cm = await self.client.get(cm_path)
        deployment = await self.client.apply(children.deployment(model, picker, self.config))
        await self.client.apply(children.service(model, picker, port, self.config))
        await self.client.apply(children.gateway_service(model, picker, self.config))
        if children.fail_open(model):
            await self.client.apply(children.endpoints_service(model))
        else:
            await self._drop_endpoints_service(namespace, name)

        available = int((deployment.get("status") or {}).get("availableReplicas") or 0)
        ready = ((True, "PickerAvailable", f"Deployment {picker} has {available} available replica(s)")
                 if available else
                 (False, "PickerUnavailable", f"Deployment {picker} has no available replica yet"))
        await self._set_pool_status(pool, resolved=(True, "ResolvedRefs", f"picker Service {picker} port {port}"),
                                    ready=ready)
        await self._set_policy_statuses(policies, winner, current_cm, name)

    def _choose_policy(self, policies: list[Manifest]) -> tuple[Manifest | None, policy.SchedulingPolicySpec, bool]:
        """The oldest policy naming the pool governs it; (policy, spec, keep what is published)."""
        if not policies:
            return None, policy.SchedulingPolicySpec(), False
        winner = min(policies, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))
        try:
            return winner, policy.SchedulingPolicySpec.model_validate(winner.get("spec") or {}), False
        except ValidationError:
            # An invalid edit must not silently replace a working policy with the defaults.
            return winner, policy.SchedulingPolicySpec(), True

    async def _check_not_foreign(self, namespace: str, picker: str) -> None:
        existing = await self.client.get(path("Service", namespace, picker))
        labels = (existing or {}).get("metadata", {}).get("labels") or {}
        if existing is not None and any(labels.get(k) != v for k, v in MANAGED_BY.items()):
            raise PoolError(f"Service {picker} exists and is not managed by tokenslice")

    async def _drop_endpoints_service(self, namespace: str, pool: str) -> None:
        """A pool that is not FailOpen has no endpoints Service of ours (one of the same name not ours stays)."""
        url = path("Service", namespace, endpoints_service_name(pool))
        labels = ((await self.client.get(url) or {}).get("metadata") or {}).get("labels") or {}
        if labels.get(POOL_LABEL) == pool and all(labels.get(k) == v for k, v in MANAGED_BY.items()):
            await self.client.delete(url)
            log.info("deleted Service %s/%s (pool %s is no longer FailOpen)", namespace, url.rsplit("/", 1)[-1], pool)

    async def _ensure_secret(self, pool: InferencePool) -> None:
        # create-only: the operator's RBAC lets it read no Secret at all, its own included
        secret = children.signing_secret(pool)
        m = secret["metadata"]
        try:
            await self.client.create(path("Secret", m["namespace"]), secret)
            log.info("created signing secret %s/%s", m["namespace"], m["name"])
        except ApiException as exc:
            if exc.status != 409:  # it exists (or another writer won the race): its key stands
                raise

    async def _remove_children(self, namespace: str, pool: str) -> None:
        """Explicit clean-up on pool deletion (the GC does it too where a controller-manager runs)."""
        selector = f"{POOL_LABEL}={pool},app.kubernetes.io/managed-by=tokenslice-operator"
        for kind in CHILD_KINDS:
            for obj in await self.client.list(path(kind, namespace), selector):
                if await self.client.delete(path(kind, namespace, obj["metadata"]["name"])):
                    log.info("deleted %s %s/%s (pool %s is gone)", kind, namespace, obj["metadata"]["name"], pool)
        secret = children.signing_secret_name(pool)
        if await self.client.delete(path("Secret", namespace, secret)):
            log.info("deleted Secret %s/%s (pool %s is gone)", namespace, secret, pool)

    # --- status -----------------------------------------------------------------------------------
    async def _set_pool_status(self, pool: Manifest, resolved: tuple[bool, str, str],
                               ready: tuple[bool, str, str]) -> None:
        """Write only our own entry of status.parents (controllerName tokenslice.io/operator).

        status.parents belongs to whatever Gateway controllers use the pool; we never touch their
        entries, and write with the resourceVersion we read so a concurrent writer is never overwritten.
        """
        m = pool["metadata"]
        url = path("InferencePool", m["namespace"], m["name"], "status")
        for _ in range(8):
            gen = pool["metadata"].get("generation", 0)
            parents = (pool.get("status") or {}).get("parents") or []
            ours = next((p for p in parents if p.get("controllerName") == CONTROLLER_NAME), None)
            old = {c["type"]: c for c in (ours or {}).get("conditions") or []}
            picker = ((pool["spec"].get("endpointPickerRef") or {}).get("name")) or m["name"]
            entry = {
                "parentRef": {"group": "tokenslice.io", "kind": "EndpointPicker", "name": picker,
                              "namespace": m["namespace"]},
                "controllerName": CONTROLLER_NAME,
                "conditions": [
                    condition("Accepted", True, "Accepted", "managed by the tokenslice operator", gen, old),
                    condition("ResolvedRefs", *resolved, gen, old),
                    condition("Ready", *ready, gen, old),
                ],
            }
            if ours == entry:
                return
            others = [p for p in parents if p.get("controllerName") != CONTROLLER_NAME]
            body = {"metadata": {"resourceVersion": m["resourceVersion"]}, "status": {"parents": others + [entry]}}
            try:
                await self.client.merge_patch(url, body)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
            fresh = await self.client.get(path("InferencePool", m["namespace"], m["name"]))
            if fresh is None:
                return
            pool, m = fresh, fresh["metadata"]

    async def _drop_pool_status(self, pool: Manifest) -> None:
        parents = (pool.get("status") or {}).get("parents") or []
        others = [p for p in parents if p.get("controllerName") != CONTROLLER_NAME]
        if len(others) == len(parents):
            return
        m = pool["metadata"]
        try:
            await self.client.merge_patch(path("InferencePool", m["namespace"], m["name"], "status"),
                                          {"metadata": {"resourceVersion": m["resourceVersion"]},
                                           "status": {"parents": others}})
        except ApiException as exc:
            if exc.status not in (404, 409):  # 409: a newer version is on its way and brings another event
                raise

    async def _set_policy_statuses(self, policies: list[Manifest], winner: Manifest | None,
                                   cm: Manifest | None, pool: str) -> None:
        cm_labels = (cm or {}).get("metadata", {}).get("labels") or {}
        cm_gen = ((cm or {}).get("metadata", {}).get("annotations") or {}).get("tokenslice.io/policy-generation")
        where = f"ConfigMap {(cm or {}).get('metadata', {}).get('name')}"
        for p in policies:
            meta = p["metadata"]
            if p is not winner:
                await self._set_policy_status(p, False, "Conflicted",
                                              f"SchedulingPolicy {winner['metadata']['name']} already governs "
                                              f"InferencePool {pool} (the oldest policy wins)")
                continue
            problems = validation_problems(p)
            published = cm_labels.get(POLICY_LABEL) == meta["name"]
            if problems:
                keeping = f"; still serving generation {cm_gen}" if published else ""
                await self._set_policy_status(p, False, "Invalid", "; ".join(problems) + keeping)
            elif published and cm_gen == str(meta.get("generation", 0)):
                await self._set_policy_status(p, True, "Programmed", f"published to {where} for InferencePool {pool}")
            else:
                await self._set_policy_status(p, True, "Pending", f"not yet published to {where}")

    async def _set_policy_status(self, p: Manifest, ok: bool, reason: str, message: str) -> None:
        meta = p["metadata"]
        gen = meta.get("generation", 0)
        old = {c["type"]: c for c in (p.get("status") or {}).get("conditions") or []}
        accepted_ok = ok or reason == "Pending"
        accepted_reason = "Accepted" if accepted_ok else reason
        programmed_ok = ok and reason == "Programmed"
        status = {
            "observedGeneration": gen,
            "conditions": [
                condition("Accepted", accepted_ok, accepted_reason,
                          "valid; its pool exists and is managed" if accepted_ok else message, gen, old),
                condition("Programmed", programmed_ok, reason, message, gen, old),
            ],
        }
        if p.get("status") == status:
            return
        try:
            await self.client.merge_patch(path("SchedulingPolicy", meta["namespace"], meta["name"], "status"),
                                          {"status": status})
        except ApiException as exc:
            if exc.status != 404:
                raise


def validation_problems(p: Manifest) -> list[str]:
    """What is wrong with a SchedulingPolicy beyond what the API server's schema checks."""
    try:
        policy.SchedulingPolicySpec.model_validate(p.get("spec") or {})
    except ValidationError as exc:
        return [_describe(err) for err in exc.errors()]
    return []


def _describe(err: Any) -> str:
    where = ".".join(str(x) for x in err.get("loc") or ())
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"spec.{where}: {msg}" if where else msg


def condition(ctype: str, ok: bool, reason: str, message: str, generation: int,
              old: dict[str, Manifest]) -> Manifest:
    """A metav1.Condition, keeping lastTransitionTime while the status does not change."""
    status = "True" if ok else "False"
    previous = old.get(ctype)
    since = (previous["lastTransitionTime"] if previous and previous.get("status") == status
             else datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return {"type": ctype, "status": status, "observedGeneration": generation, "lastTransitionTime": since,
            "reason": reason, "message": message[:32000]}
