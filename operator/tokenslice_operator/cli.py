"""``tokenslice operator``: run the operator (default) or regenerate the CRDs (``crds``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pydantic import ValidationError

from tokenslice_operator import crdgen
from tokenslice_operator.config import OperatorConfig


def configure(parser: argparse.ArgumentParser) -> None:
    d = OperatorConfig()
    parser.add_argument("action", nargs="?", choices=["run", "crds"], default="run",
                        help="run: the operator + admission webhook (default); crds: regenerate crds/ and the chart's")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="kubeconfig to use (default: $KUBECONFIG, else the pod's service account)")
    parser.add_argument("--picker-image", default=d.picker_image, help="image of the picker (one per managed pool)")
    parser.add_argument("--sidecar-image", default=d.sidecar_image, help="image of the injected sidecar")
    parser.add_argument("--image-pull-policy", default=d.image_pull_policy)
    parser.add_argument("--gateway-image", default=d.gateway_image, help="Envoy image of each pool's gateway")
    parser.add_argument("--gateway-port", type=int, default=d.gateway_port, help="port of each pool's gateway")
    parser.add_argument("--gateway-service", default=d.gateway_service,
                        help="Service name of each pool's gateway ({pool} is filled in)")
    parser.add_argument("--chunk-url", default=d.chunk_url,
                        help="URL injected sidecars send chunks to ({pool}, {namespace} are filled in; "
                             "default: the pool's gateway Service)")
    parser.add_argument("--gpu-resource", default=d.gpu_resource)
    parser.add_argument("--webhook-port", type=int, default=d.webhook_port,
                        help="HTTPS port of the admission webhook (0: no webhook)")
    parser.add_argument("--webhook-host", default="0.0.0.0")
    parser.add_argument("--webhook-cert", help="TLS certificate (PEM) of the webhook")
    parser.add_argument("--webhook-key", help="TLS private key (PEM) of the webhook")
    parser.add_argument("--standalone", action="store_true", help="no peering (a single replica, no peering CRDs)")
    parser.add_argument("--peering-name", default="tokenslice",
                        help="ClusterKopfPeering the replicas coordinate through (the chart creates it)")
    parser.add_argument("--priority", type=int, help="peering priority (default: random, so replicas never tie)")
    parser.add_argument("--health-port", type=int, default=0, help="serve kopf's liveness /healthz here (0: off)")
    parser.add_argument("--health-host", default="0.0.0.0", help="address of the liveness endpoint")
    parser.add_argument("--picker-max-slice-tokens", type=int, default=d.picker_max_slice_tokens,
                        help="every pool's picker: --max-slice-tokens N (default: the picker's own, long slices; "
                             "0 = per-slice mode)")
    parser.add_argument("--kv-residency", action="store_true", help="every pool's picker: --kv-residency")
    parser.add_argument("--kv-offload-gib", type=float, default=d.kv_offload_gib,
                        help="injected vLLM containers get vLLM's native CPU KV offload of this size (0: off)")
    parser.add_argument("--kv-offload-tokens", type=int, default=d.kv_offload_tokens,
                        help="that offload tier in tokens, for every pool's picker (--kv-offload-tokens)")
    parser.add_argument("--picker-api-keys-secret", default=d.picker_api_keys_secret,
                        help="Secret in each pool's namespace ({pool} is filled in) with the picker's API keys, "
                             "mounted read-only as its --api-keys-file (default: none)")
    parser.add_argument("--picker-api-keys-key", default=d.picker_api_keys_key,
                        help="key of that Secret holding the YAML list of {tenant, key}")
    parser.add_argument("--picker-trusted-proxies", default="",
                        help="comma-separated CIDRs of an authenticating proxy in front of every pool's gateway "
                             "(each picker's --trusted-proxies)")
    parser.add_argument("--picker-identity-header", default=d.picker_identity_header,
                        help="the tenant header that proxy sets (each picker's --identity-header; default: a "
                             "GIE/llm-d fairness id)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    if args.action == "crds":
        return crdgen.main([])
    from tokenslice_operator.app import RunOptions, run_operator

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = OperatorConfig(
            picker_image=args.picker_image, sidecar_image=args.sidecar_image, gateway_image=args.gateway_image,
            gateway_port=args.gateway_port, gateway_service=args.gateway_service,
            image_pull_policy=args.image_pull_policy, chunk_url=args.chunk_url, gpu_resource=args.gpu_resource,
            webhook_port=args.webhook_port, webhook_cert=args.webhook_cert, webhook_key=args.webhook_key,
            kv_residency=args.kv_residency, kv_offload_gib=args.kv_offload_gib,
            kv_offload_tokens=args.kv_offload_tokens, picker_api_keys_secret=args.picker_api_keys_secret or None,
            picker_api_keys_key=args.picker_api_keys_key,
            picker_trusted_proxies=[c for c in args.picker_trusted_proxies.split(",") if c],
            picker_identity_header=args.picker_identity_header or None,
            picker_max_slice_tokens=args.picker_max_slice_tokens,
        )
    except ValidationError as exc:  # a bad flag value: one readable line per problem, no traceback
        problems = "; ".join((f"--{str(e['loc'][0]).replace('_', '-')}: " if e["loc"] else "") + e["msg"]
                             for e in exc.errors())
        print(f"tokenslice operator: {problems}", file=sys.stderr)
        return 2
    opts = RunOptions(kubeconfig=args.kubeconfig, config=config, webhook_host=args.webhook_host,
                      standalone=args.standalone, priority=args.priority, peering_name=args.peering_name,
                      liveness_endpoint=(f"http://{args.health_host}:{args.health_port}/healthz"
                                         if args.health_port else None))
    try:
        asyncio.run(run_operator(opts))
    except KeyboardInterrupt:
        pass
    return 0
