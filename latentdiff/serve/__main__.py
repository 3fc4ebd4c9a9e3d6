"""`python -m latentdiff.serve`: AUTOMATIC1111's HTTP API (the `/sdapi/v1` routes its clients use) and a web page.

One worker thread owns the device and runs a queue of jobs; compatible waiting txt2img requests are merged into
one U-Net batch. Secure by default: loopback only unless HTTP Basic auth is set, auth on every route, no route
reads a path the client names, and no response carries paths, credentials or environment.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from latentdiff import __version__
from latentdiff.cli import UsageError, output_paths
from latentdiff.serve.a1111 import ApiError
from latentdiff.serve.app import create_app, is_loopback, parse_credentials
from latentdiff.serve.worker import ServeConfig, Worker, find_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m latentdiff.serve",
        description="Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, samplers, sd-models, options, "
                    "progress, interrupt, png-info) and a web page at /.",
        epilog="Binding an address other than loopback needs --api-auth (or LATENTDIFF_API_AUTH, which keeps the "
               "password out of the process list) or an explicit --insecure-no-auth. Limits: --config FILE with a "
               "`serve:` section, or --serve.KEY=VALUE (keys: " + ", ".join(f.name for f in dataclasses.fields(ServeConfig)) + ").")
    p.add_argument("--checkpoint", nargs="+", action="extend", default=[],
                   help="model files or folders of them, selectable by title (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", help="USER:PASS[,USER2:PASS2]: HTTP Basic auth on every route, page included")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback bind without auth (anyone who can reach the port can use it)")
    p.add_argument("--config", help="a YAML file with a `serve:` section of limits")
    p.add_argument("--outdir", help="where save_images=true writes PNGs (without it, nothing is written)")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="LoRA / LyCORIS files for <lora:NAME:W> in prompts (GET /sdapi/v1/loras lists them)")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="textual-inversion embeddings, used by file name in prompts (GET /sdapi/v1/embeddings)")
    p.add_argument("--upscaler-dir", action="append", default=[], metavar="DIR",
                   help="ESRGAN-family .pth / .safetensors files for the hires fix's hr_upscaler, by file name")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    return p


def load_config(path: str | None, overrides: list[str]) -> ServeConfig:
    from latentdiff.io.config import ConfigError, from_dict, load_yaml, parse_overrides
    try:
        over = parse_overrides(overrides)
        unknown = [k for k in over if k != "serve"]
        if unknown:
            raise ConfigError(f"unknown option(s) --{', --'.join(unknown)}; limits are set as --serve.KEY=VALUE")
        data = load_yaml(path, over) if path else over
        return from_dict(ServeConfig, data.get("serve", {}), "serve")
    except ConfigError as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, rest)
        credentials = parse_credentials(args.api_auth or os.environ.get("LATENTDIFF_API_AUTH"))
        if not is_loopback(args.host) and credentials is None and not args.insecure_no_auth:
            raise UsageError(f"refusing to serve on {args.host} without authentication: add --api-auth USER:PASS "
                             "(or set LATENTDIFF_API_AUTH), or --insecure-no-auth if that network is trusted")
        if not 0 < args.port < 65536:
            raise UsageError(f"--port must be in 1..65535 (got {args.port})")
        if args.outdir:
            output_paths(os.path.join(args.outdir, ""), [])  # a folder we cannot write is a start-up error
        worker = Worker(find_checkpoints(args.checkpoint), config, args.device, args.dtype, args.outdir)
        for folder in args.lora_dir + args.embeddings_dir:
            if not os.path.isdir(folder):
                raise UsageError(f"folder {folder} not found; --lora-dir and --embeddings-dir take existing folders")
        worker.lora_dirs = [Path(d) for d in args.lora_dir]
        worker.embeddings_dirs = [Path(d) for d in args.embeddings_dir]
        worker.refresh_loras()
        for folder in args.upscaler_dir:
            if not os.path.isdir(folder):
                raise UsageError(f"folder {folder} not found; --upscaler-dir takes existing folders")
        worker.find_upscalers([Path(d) for d in args.upscaler_dir])
        try:
            worker.start()
        except ApiError as e:
            raise UsageError(str(e.detail)) from None
        except RuntimeError as e:
            raise UsageError(f"device {args.device!r} is not usable here: {str(e).splitlines()[0]}") from None
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:  # bound here, so a taken port is one line of error rather than uvicorn's log and exit
        family, kind, proto, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        worker.close()
        print(f"{parser.prog}: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"latentdiff: serving {worker.selected.title} at http://{shown}:{args.port}/"
          f"{' (Basic auth on)' if credentials else ''}", file=sys.stderr, flush=True)
    app = create_app(worker, credentials, loopback=is_loopback(args.host))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", server_header=False))
    # uvicorn shuts down gracefully on SIGINT / SIGTERM and then raises the signal again, to whatever handler was
    # there before it: this one notes it, so the worker is closed and the stop is logged before an exit 0.
    stopped_by: list[int] = []

    def note_stop(signum, frame):
        stopped_by.append(signum)
        server.should_exit = True  # also before uvicorn has installed its own handler
    previous = {sig: signal.signal(sig, note_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()
        why = f" ({signal.Signals(stopped_by[0]).name})" if stopped_by else ""
        print(f"latentdiff: stopped serving at http://{shown}:{args.port}/{why}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
