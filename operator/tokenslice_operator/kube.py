"""The operator's Kubernetes verbs over the ``kubernetes_asyncio`` client (``tokenslice.kubeapi``).

kopf does its own watching; for writing children we need get/list/create/delete, server-side apply and
status patches of ten kinds.  They go through the client's ``ApiClient`` by REST path (one table below)
rather than through its typed classes, which would need one method per kind and verb.  kopf logs in with
the credentials the same client loaded (``connection_info``), so both always talk to the same server with
the same identity (kubeconfig in development and tests, the pod's service account in a cluster).
"""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes_asyncio import client

from tokenslice import inferencepool, kubeapi, policy
from tokenslice.kubeapi import ApiException

FIELD_MANAGER = "tokenslice-operator"

# kind -> (api prefix, plural) for every kind the operator reads or writes.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Pod": ("/api/v1", "pods"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "InferencePool": (f"/apis/{inferencepool.API_GROUP}/{inferencepool.API_VERSION}", inferencepool.PLURAL),
    "SchedulingPolicy": (f"/apis/{policy.API_GROUP}/{policy.API_VERSION}", policy.PLURAL),
}


def path(kind: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
    """REST path of a collection or object of one of the known kinds."""
    prefix, plural = RESOURCES[kind]
    out = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


async def connection_info(cfg: client.Configuration) -> kopf.ConnectionInfo:
    """kopf's login from the client's loaded configuration (called again by kopf on a 401: token re-read)."""
    header = await cfg.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


class KubeClient:
    """The operator's verbs as JSON dicts; ``ApiException`` (``.status``) on a non-2xx answer."""

    def __init__(self, api: client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api = api
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await self.api.close()

    async def request(self, method: str, url: str, *, body: Any = None, params: dict[str, str] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        return await kubeapi.request(self.api, method, url, query=params, body=body, content_type=content_type,
                                     timeout_s=self.timeout_s)

    async def get(self, url: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", url)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, url: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        return (await self.request("GET", url, params=params)).get("items") or []

    async def create(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", url, body=body)

    async def delete(self, url: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            await self.request("DELETE", url, body={"propagationPolicy": "Background"})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: create or converge the fields the operator owns, leaving others' fields alone."""
        meta = obj["metadata"]
        url = path(obj["kind"], meta.get("namespace"), meta["name"])
        return await self.request("PATCH", url, body=obj, params={"fieldManager": FIELD_MANAGER, "force": "true"},
                                  content_type="application/apply-patch+yaml")

    async def merge_patch(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", url, body=body, content_type="application/merge-patch+json")

    async def server_version(self) -> tuple[int, int]:
        """(major, minor) of the API server, e.g. (1, 20)."""
        info = await self.request("GET", "/version")
        digits = lambda s: int("".join(ch for ch in str(s) if ch.isdigit()) or 0)  # noqa: E731  "20+" -> 20
        return digits(info.get("major")), digits(info.get("minor"))
