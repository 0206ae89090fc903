"""``tokenslice sidecar``: the chunking sidecar beside vLLM."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from tokenslice.contract import (
    KEY_ENV,
    KEY_FILE_ENV,
    MIN_KEY_BYTES,
    ContractError,
    load_key,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the pool target port beside vLLM. Client requests to /v1/completions and "
        "/v1/chat/completions are run as chunks of the size the gateway's signed admission names "
        "(the policy's class chunk size), else of --chunk-size decode tokens (driver role); "
        "signed chunk requests from the gateway run one chunk on the local vLLM (worker role); "
        "every other path passes through to vLLM. Own metrics at /tokenslice/metrics.")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="listen port = the pool's target port "
                        "(default %(default)s)")
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8200", help="the local vLLM (default %(default)s)")
    parser.add_argument("--chunk-url", default=None,
                        help="gateway (Envoy) base URL that chunks are sent through; default: straight to "
                        "--vllm-url (no gateway)")
    parser.add_argument("--chunk-size", type=int, default=32, help="decode tokens per chunk when the gateway's "
                        "admission names no size (default %(default)s)")
    parser.add_argument("--advertise", default=None,
                        help="HOST:PORT this pod is reached at, reported as the KV holder (default "
                        "127.0.0.1:<port>)")
    parser.add_argument("--signing-key-file", default=None,
                        help=f"HMAC key shared with the gateway, at least {MIN_KEY_BYTES} bytes (else "
                        f"${KEY_FILE_ENV} or ${KEY_ENV}); required")
    parser.add_argument("--default-tenant", default="default", help="tenant of requests the gateway did not admit")
    parser.add_argument("--default-class", default="standard", help="class of requests the gateway did not admit")
    parser.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                        help="largest request body accepted; a bigger one is a 413 (default %(default)s)")
    parser.add_argument("--read-timeout", type=float, default=300.0,
                        help="longest silence tolerated on an upstream stream, seconds (default %(default)s)")
    parser.add_argument("--failover-retries", type=int, default=3,
                        help="chunks per request that may fail by a dead worker, engine or pod and be resumed from "
                        "the tokens already streamed (default %(default)s; 0: fail the request)")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    from .app import SidecarConfig, build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.chunk_size < 1:
        raise SystemExit("--chunk-size must be at least 1")
    try:
        key = load_key(key_file=args.signing_key_file)
    except ContractError as exc:  # no fallback: chunks signed with a key no peer shares would all be refused
        raise SystemExit(f"tokenslice sidecar: {exc}") from None
    config = SidecarConfig(vllm_url=args.vllm_url, chunk_url=args.chunk_url, chunk_size=args.chunk_size,
                           advertise=args.advertise or f"127.0.0.1:{args.port}", key=key,
                           default_tenant=args.default_tenant, default_class=args.default_class,
                           read_timeout_s=args.read_timeout, failover_retries=args.failover_retries,
                           max_body_bytes=args.max_body_bytes)
    logging.getLogger("tokenslice.sidecar").info(
        "sidecar on %s:%d -> vLLM %s, chunks of %d via %s", args.host, args.port, args.vllm_url, args.chunk_size,
        args.chunk_url or "local vLLM")
    web.run_app(build_app(config), host=args.host, port=args.port, handler_cancellation=True, access_log=None,
                print=None)
    return 0
