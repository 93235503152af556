"""dg-serve ARTIFACT: an OpenAI-compatible server for an exported DiffusionGemma, with a live canvas page at /."""

import argparse
import errno
import os
import socket
import sys
from importlib.metadata import version
from pathlib import Path

from dg_runtime import UserError, load
from dg_runtime.backends import BACKENDS
from dg_runtime.cli import FLAGS
from dg_runtime.errors import run_cli
from dg_runtime.generate import check_runtime_options


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dg-serve", allow_abbrev=False,
                                     description="Serve an exported DiffusionGemma artifact over OpenAI's API.")
    parser.add_argument("artifact", type=Path, help="artifact folder written by dg-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--backend", help=f"one of {', '.join(BACKENDS)} (default: onnxruntime if the artifact has "
                        "ONNX graphs, else openvino)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU or AUTO (default CPU)")
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: the backend's choice)")
    parser.add_argument("--precision", choices=["f32", "bf16", "f16"], help="OpenVINO CPU inference precision")
    parser.add_argument("--api-key", default=os.environ.get("DG_SERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $DG_SERVE_API_KEY, else none)")
    parser.add_argument("--model-name", help="the model id the API lists and accepts (default: the folder's name)")
    parser.add_argument("--queue-size", type=int, default=16,
                        help="requests waiting beyond the one running; more get 503 with Retry-After (default 16)")
    parser.add_argument("--prefix-cache-mb", type=int, default=512,
                        help="memory for KV of earlier prompts reused by later ones; 0 turns it off (default 512)")
    parser.add_argument("--cache-dir", type=Path, help="OpenVINO's model cache: the first start writes the compiled "
                        "model there (about the weights' size), later starts read it instead of compiling")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch http(s) image URLs in image_url parts (default: only inline base64 data: URLs; "
                             "a server that fetches URLs reaches what its network reaches for its clients)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('dg-edge')}")
    return parser.parse_args(argv)


def serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise UserError(f"dg-serve needs the [serve] extra ({exc.name} is missing): pip install 'dg-edge[serve]'") \
            from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535 (got {args.port})")
    if args.queue_size < 1:
        raise UserError(f"--queue-size must be at least 1 (got {args.queue_size})")
    if args.prefix_cache_mb < 0:
        raise UserError(f"--prefix-cache-mb must be 0 or more (got {args.prefix_cache_mb})")
    check_runtime_options(args.backend, args.threads, args.precision, seed=None, cache_dir=args.cache_dir)
    listener = bind(args.host, args.port)  # before loading: a busy port is said at once
    model = load(args.artifact, backend=args.backend, device=args.device, threads=args.threads,
                 precision=args.precision, verify=not args.no_verify, memory_upkeep=True,
                 cache_dir=args.cache_dir)
    model_id = args.model_name or args.artifact.resolve().name.removesuffix(".dg")
    app = create_app(model, model_id, args.api_key, args.queue_size, args.prefix_cache_mb,
                     image_urls=args.allow_image_urls)
    host, port = listener.getsockname()[:2]
    print(f"dg-serve: {model_id} on {model.backend}, http://{host}:{port} (the page at /, the API at /v1)",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    return 0


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; choose another with --port") from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"cannot listen on {host}: not an address of this machine; use --host 127.0.0.1 "
                            "or 0.0.0.0") from None
        raise
    return listener


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("dg-serve", lambda: serve(args), FLAGS)


if __name__ == "__main__":
    sys.exit(main())
