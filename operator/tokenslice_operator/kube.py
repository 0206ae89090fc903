"""A small asyncio Kubernetes REST client: exactly the verbs the operator and webhook use.

kopf does its own watching; for writing children we need get/list/create/delete,
server-side apply and status patches.  The client is built from the same
``kopf.ConnectionInfo`` kopf logs in with, so both always talk to the same server
with the same identity (kubeconfig in development and tests, the pod's service
account in a cluster).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import yaml

from tokenslice import inferencepool, policy

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


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def path(kind: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
    """REST path of a collection or object of one of the known kinds."""
    prefix, plural = RESOURCES[kind]
    out = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


def connection_from_kubeconfig(kubeconfig: str | os.PathLike[str]) -> kopf.ConnectionInfo:
    """Credentials of a kubeconfig's current context (token or client certificate)."""
    config = yaml.safe_load(Path(kubeconfig).read_text()) or {}
    by_name = {key: {item["name"]: item.get(key[:-1]) or {} for item in config.get(key, [])}
               for key in ("contexts", "clusters", "users")}
    try:
        context = by_name["contexts"][config["current-context"]]
        cluster = by_name["clusters"][context["cluster"]]
        user = by_name["users"][context["user"]]
    except KeyError as exc:
        raise kopf.LoginError(f"kubeconfig {kubeconfig}: no usable current context ({exc})") from None
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_path=cluster.get("certificate-authority"),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=cluster.get("insecure-skip-tls-verify"),
        token=user.get("token"),
        scheme="Bearer" if user.get("token") else None,
        certificate_path=user.get("client-certificate"),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=user.get("client-key"),
        private_key_data=user.get("client-key-data"),
        default_namespace=context.get("namespace"),
    )


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.fspath(info.ca_path) if info.ca_path else None)
    if info.ca_data:
        ctx.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    if info.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        with tempfile.TemporaryDirectory() as tmp:  # ssl wants files; they are read right away
            cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
            cert.write_bytes(base64.b64decode(info.certificate_data))
            key.write_bytes(base64.b64decode(info.private_key_data))
            ctx.load_cert_chain(cert, key)
    elif cert and key:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


class KubeClient:
    """JSON over HTTPS to one API server; one aiohttp session, closed with ``close()``."""

    def __init__(self, info: kopf.ConnectionInfo, timeout_s: float = 30.0,
                 token_file: str | None = None) -> None:
        """``token_file``: re-read the bearer token per request (in-cluster tokens are rotated)."""
        self._token_file = token_file
        headers = {"Accept": "application/json", "User-Agent": FIELD_MANAGER}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        self._server = info.server.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, url: str, *, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        if self._token_file:
            headers["Authorization"] = "Bearer " + Path(self._token_file).read_text().strip()
        async with self._session.request(method, self._server + url, data=data, params=params,
                                         headers=headers) as resp:
            text = await resp.text()
            payload = json.loads(text) if text and resp.content_type == "application/json" else {}
            if resp.status >= 400:
                raise ApiError(resp.status, payload.get("message") or text[:500], payload.get("reason", ""))
            return payload

    async def get(self, url: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", url)
        except ApiError as exc:
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
        except ApiError as exc:
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
