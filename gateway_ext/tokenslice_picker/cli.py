"""``tokenslice picker``: run the endpoint picker, or print the Envoy bootstrap that fronts it.

Every ``PickerSettings`` field has a flag here (the in-process ``policy`` and the raw key aside).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from tokenslice import contract
from tokenslice.envoy import Address, ExtProc, render_bootstrap
from tokenslice.policy import load_policy
from tokenslice_picker.datastore.endpoints import parse_endpoints
from tokenslice_picker.logs import setup_logging
from tokenslice_picker.server import Picker, PickerSettings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grpc-port", type=int, default=9002, help="ext_proc + gRPC health port (default 9002)")
    parser.add_argument("--grpc-host", default="0.0.0.0", help="bind address for gRPC (default 0.0.0.0)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (default 9090)")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--policy", type=Path, help="SchedulingPolicy YAML (spec or whole object); hot-reloaded")
    parser.add_argument("--endpoints", default="", help="static pool: ip:port,ip:port (local mode)")
    parser.add_argument("--signing-key-file", type=Path,
                        help=f"HMAC key shared with the sidecars (else ${contract.KEY_FILE_ENV} / ${contract.KEY_ENV})")
    parser.add_argument("--api-keys-file", type=Path,
                        help="YAML list of {tenant, key}: clients authenticate with 'Authorization: Bearer <key>' "
                        "(a Secret mounted as a file); an unknown key is refused (401)")
    parser.add_argument("--identity-header", help="tenant header set by an authenticating proxy in front of Envoy; "
                        "believed only from --trusted-proxies, stripped from everyone else")
    parser.add_argument("--trusted-proxies", default="", help="comma-separated CIDRs of that proxy")
    parser.add_argument("--trust-tenant-header", action="store_true",
                        help="believe the policy's tenantHeader as sent by any client (loopback demos only)")
    parser.add_argument("--kube", action="store_true", help="Kubernetes mode: watch the InferencePool's pods")
    parser.add_argument("--pool", help="InferencePool name (Kubernetes mode)")
    parser.add_argument("--namespace", default="default", help="namespace of the pool (Kubernetes mode)")
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig (default: in-cluster credentials)")
    parser.add_argument("--policy-name", help="Kubernetes mode without --policy: follow this SchedulingPolicy CR "
                                              "(default: the one whose spec.poolRef names --pool)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes (0=off)")
    parser.add_argument("--prefill-tokens-per-second", type=float, default=4000.0,
                        help="migration cost model: prefix recompute speed of an idle endpoint")
    parser.add_argument("--default-chunk-seconds", type=float, default=1.0,
                        help="chunk duration assumed before one is observed")
    parser.add_argument("--idle-grace", type=float, default=2.0,
                        help="seconds a tenant counts as active after its last chunk ended (fair-share lift)")
    parser.add_argument("--policy-poll", type=float, default=1.0, help="seconds between policy file checks")
    parser.add_argument("--load-weight", type=float, default=1.0, help="weight of the least-load scorer")
    parser.add_argument("--prefix-weight", type=float, default=2.0, help="weight of the prefix-affinity scorer")
    parser.add_argument("--kv-cache-weight", type=float, default=0.5, help="weight of the free-KV-cache scorer")
    parser.add_argument("--driver-weight", type=float, default=0.5, help="weight of the driver-affinity scorer")
    parser.add_argument("--no-preemption", dest="preemption", action="store_false",
                        help="never cut a running chunk (a waiter waits for a slice end)")
    parser.add_argument("--cut-timeout", type=float, default=2.0, help="seconds a worker has to acknowledge a cut")
    slice_default = PickerSettings.model_fields["max_slice_tokens"].default
    slack_default = PickerSettings.model_fields["fair_share_slack_quanta"].default
    parser.add_argument("--fair-share-slack", type=float, default=slack_default, metavar="QUANTA",
                        help=f"a fair-share cut only when the running slice's tenant is ahead of the waiter's by "
                             f"this many of the class's quanta (default {slack_default:g}; 0 = at any lead)")
    parser.add_argument("--max-slice-tokens", type=int, default=slice_default,
                        help=f"long slices (default {slice_default}): admit requests with this slice, cut a running "
                             "one when a more important chunk or an owed tenant waits; the class's chunk size stays "
                             "the fairness quantum. 0 = per-slice mode (slices of the class's chunk size; the old "
                             "behaviour, for comparison)")
    parser.add_argument("--kv-residency", action="store_true",
                        help="residency-aware scheduling: resume continuations whose KV is probably still cached "
                             "first (within a class, bounded by --residency-bonus-tokens), no fair-share cut that "
                             "overflows the cache, evicted KV costs nothing to move")
    parser.add_argument("--kv-capacity-tokens", type=int, default=0,
                        help="each engine's KV cache in tokens (default 0: scraped from vllm:cache_config_info)")
    parser.add_argument("--kv-offload-tokens", type=int, default=0,
                        help="each engine's CPU offload tier in tokens (vLLM --kv-offloading-size; resident but "
                             "slower)")
    parser.add_argument("--residency-bonus-tokens", type=float, default=256.0,
                        help="how many virtual tokens a resident continuation may run ahead of fair share")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="auto = uvloop when installed (measured: lower per-chunk cost), else asyncio")
    parser.add_argument("--print-envoy-config", action="store_true",
                        help="print the Envoy bootstrap for this picker and exit (each pool's gateway)")
    parser.add_argument("--envoy-listen-port", type=int, default=8081)
    parser.add_argument("--envoy-listen-address", default="0.0.0.0")
    parser.add_argument("--envoy-admin-port", type=int, default=19000)
    parser.add_argument("--envoy-admin-address", default="127.0.0.1")
    parser.add_argument("--envoy-ext-proc-host", default="127.0.0.1",
                        help="address Envoy uses to reach this picker (a Service name is not allowed: STATIC)")
    parser.add_argument("--envoy-fail-open", default="",
                        help="InferencePool failureMode FailOpen: host:port,... of the pool's endpoints (a host may be "
                             "a DNS name) Envoy routes to, round robin, when this picker is unreachable; "
                             "empty: FailClose (500)")


def run(args: argparse.Namespace) -> int:
    if args.print_envoy_config:
        sys.stdout.write(render_bootstrap(listen=Address(args.envoy_listen_address, args.envoy_listen_port),
                                          admin=Address(args.envoy_admin_address, args.envoy_admin_port),
                                          upstream=ExtProc(args.envoy_ext_proc_host, args.grpc_port,
                                                           fail_open=tuple(a for a in args.envoy_fail_open.split(",")
                                                                           if a))))
        return 0
    setup_logging(args.log_level)
    try:
        key = contract.load_key(key_file=args.signing_key_file)
        if args.policy:
            load_policy(args.policy)  # fail fast with a readable message
        if args.kube and not args.pool:
            raise ValueError("--kube needs --pool NAME")
        if not args.kube and not args.endpoints:
            raise ValueError("give --endpoints ip:port,... (local mode) or --kube --pool NAME")
        settings = PickerSettings(
            signing_key=key, endpoints=parse_endpoints(args.endpoints) if args.endpoints else [],
            policy_path=args.policy, grpc_host=args.grpc_host, grpc_port=args.grpc_port,
            metrics_host=args.metrics_host, metrics_port=args.metrics_port,
            scrape_interval_s=args.scrape_interval, prefill_tokens_per_second=args.prefill_tokens_per_second,
            default_chunk_seconds=args.default_chunk_seconds, idle_grace_s=args.idle_grace,
            policy_poll_s=args.policy_poll, load_weight=args.load_weight, prefix_weight=args.prefix_weight,
            kv_cache_weight=args.kv_cache_weight, driver_weight=args.driver_weight, preemption=args.preemption,
            cut_timeout_s=args.cut_timeout, max_slice_tokens=args.max_slice_tokens,
            fair_share_slack_quanta=args.fair_share_slack, kv_residency=args.kv_residency,
            kv_capacity_tokens=args.kv_capacity_tokens, kv_offload_tokens=args.kv_offload_tokens,
            residency_bonus_tokens=args.residency_bonus_tokens, kube=args.kube, pool=args.pool,
            namespace=args.namespace, kubeconfig=args.kubeconfig, policy_name=args.policy_name,
            api_keys_file=args.api_keys_file, identity_header=args.identity_header,
            trusted_proxies=[c for c in args.trusted_proxies.split(",") if c],
            trust_tenant_header=args.trust_tenant_header)
    except (contract.ContractError, ValueError, ValidationError, OSError) as exc:
        print(f"tokenslice picker: {exc}", file=sys.stderr)
        return 2
    if args.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.event_loop == "uvloop":
                print("tokenslice picker: --event-loop uvloop needs `pip install uvloop`", file=sys.stderr)
                return 2
        else:
            return uvloop.run(_serve(settings))
    return asyncio.run(_serve(settings))


async def _serve(settings: PickerSettings) -> int:
    picker = Picker(settings)
    await picker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"tokenslice picker: ext_proc on {settings.grpc_host}:{picker.grpc_port}, "
          f"metrics on :{picker.metrics_port}, {len(picker.datastore)} endpoint(s)", file=sys.stderr, flush=True)
    await stop.wait()
    await picker.stop(grace_s=5.0)
    return 0
