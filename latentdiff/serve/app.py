"""The HTTP side of `python -m latentdiff.serve`: AUTOMATIC1111's `/sdapi/v1` routes and the web page on a Worker,
behind Guard (Basic auth, the Host check of a loopback server, a body size cap).

Secure by default: loopback only unless HTTP Basic auth is set, auth on every route, no route reads a path the
client names, and no response carries paths, credentials or environment.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

from latentdiff import __version__
from latentdiff.cli import UsageError
# The request models are module names here: FastAPI resolves the routes' (string) annotations in this module.
from latentdiff.serve.a1111 import (K_NAMES, SAMPLER_TITLES, SCHEDULERS, ApiError, Img2Img, PngInfoRequest, Txt2Img,
                                    answer_parameters, decode_image, error_body, png_info_answer, resolve_sampler)
from latentdiff.serve.worker import Job, Task, Worker

log = logging.getLogger("latentdiff.serve")
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


# ----------------------------------------------------------------------------------------------
# Who may ask: credentials, Host, body size


def parse_credentials(text: str | None) -> list[tuple[str, str]] | None:
    """'user:pass[,user2:pass2]' (A1111's --api-auth format) -> pairs; None when not given."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise UsageError("--api-auth must look like USER:PASSWORD (several: USER:PASS,USER2:PASS2)")
        pairs.append((user, password))
    return pairs


def _hostname(host: bytes) -> str:
    """The name in a Host header, without its port: b'[::1]:7860' -> '::1', b'localhost:7860' -> 'localhost'."""
    text = host.decode("latin-1").strip()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware in front of every route (the page and its files too): Basic auth, a body size cap,
    and headers that keep the page from loading anything from elsewhere."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store"),
               (b"content-security-policy",
                b"default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'")]

    def __init__(self, app, credentials: list[tuple[str, str]] | None, max_body: int, check_host: bool = False):
        self.app = app
        self.check_host = check_host
        digest = lambda s: hashlib.sha256(s.encode()).digest()  # noqa: E731 - equal lengths for compare_digest
        self.credentials = [(digest(u), digest(p)) for u, p in credentials] if credentials else None
        self.max_body = max_body

    def authorized(self, header: bytes | None) -> bool:
        """Constant time in the secrets: every stored pair is compared, user and password both, always."""
        user = password = ""
        if header and header[:6].lower() == b"basic ":
            try:
                user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                pass
        u, p = hashlib.sha256(user.encode()).digest(), hashlib.sha256(password.encode()).digest()
        ok = False
        for cu, cp in self.credentials:
            ok |= hmac.compare_digest(cu, u) & hmac.compare_digest(cp, p)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.credentials is not None and not self.authorized(headers.get(b"authorization")):
            return await self._reply(scope, send, 401, "Incorrect username or password",
                                     [(b"www-authenticate", b'Basic realm="latentdiff"')])
        if self.check_host and not is_loopback(_hostname(headers.get(b"host", b""))):
            # A loopback server without auth: a page elsewhere that points its own name at 127.0.0.1 (DNS
            # rebinding) would otherwise be same-origin with us and could read every answer.
            return await self._reply(scope, send, 400, "Host not allowed: this server answers only to localhost")
        if scope["type"] == "websocket":
            return await self._reply(scope, send, 404, "Not Found")
        if b"transfer-encoding" in headers:  # every client we serve sends a length; chunked bodies would be unbounded
            return await self._reply(scope, send, 411, "Send the request body with a Content-Length")
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = self.max_body + 1
        if length > self.max_body:
            return await self._reply(scope, send, 413, f"Request body over {self.max_body // 2**20} MB")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.HEADERS
            await send(message)
        await self.app(scope, receive, send_with_headers)

    async def _reply(self, scope, send, status, detail, extra=()):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps(error_body(status, detail)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra, *self.HEADERS]})
        await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------
# Requests into jobs


def make_job(worker: Worker, req, init_image=None) -> Job:
    """Validate a request against the model and the limits, before any work, and resolve it into a Job."""
    config = worker.config
    unsupported = [name for name, on in [
        ("enable_hr (hires fix)", req.enable_hr), ("subseed_strength (variation seeds)", req.subseed_strength),
        ("restore_faces", req.restore_faces), ("tiling", req.tiling), ("script_name", req.script_name),
        ("alwayson_scripts (extensions)", req.alwayson_scripts),
        ("styles", req.styles), ("mask (inpainting)", getattr(req, "mask", None))] if on]
    if unsupported:
        raise ApiError(422, f"Not supported by latentdiff: {', '.join(unsupported)}; leave them out")
    over = req.override_settings or {}
    ckpt = worker.find(over["sd_model_checkpoint"]) if over.get("sd_model_checkpoint") else worker.selected
    d = worker.defaults(ckpt)
    steps = d["steps"] if req.steps is None else req.steps
    cfg = d["cfg_scale"] if req.cfg_scale is None else req.cfg_scale
    width = req.width or d["width"]
    height = req.height or d["height"]
    title, kind = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler, d["sampler"])
    n = req.batch_size * req.n_iter
    m = d["size_multiple"]
    problems = []
    if not 1 <= steps <= config.max_steps:
        problems.append(f"steps must be in 1..{config.max_steps} (got {steps})")
    if not math.isfinite(cfg):
        problems.append(f"cfg_scale must be a finite number (got {cfg})")
    if width <= 0 or height <= 0 or width % m or height % m:
        problems.append(f"width and height must be positive multiples of {m} for this model (got {width}x{height})")
    if width > config.max_width or height > config.max_height or width * height > config.max_pixels:
        problems.append(f"{width}x{height} is over this server's limit ({config.max_width}x{config.max_height}, "
                        f"{config.max_pixels} pixels)")
    if req.batch_size < 1 or req.n_iter < 1 or n > config.max_images:
        problems.append(f"batch_size and n_iter must be at least 1 and batch_size * n_iter at most "
                        f"{config.max_images} (got {req.batch_size} x {req.n_iter})")
    if not -1 <= req.seed < 2**63 - n:
        problems.append(f"seed must be -1 (random) or in 0..2^63 (got {req.seed})")
    strength = None
    if init_image is not None:
        strength = req.denoising_strength
        if not 0.0 < strength <= 1.0:
            problems.append(f"denoising_strength must be in (0, 1] (got {strength})")
    clip = over.get("CLIP_stop_at_last_layers", worker.clip_skip)
    if not isinstance(clip, int) or clip < 1:
        problems.append(f"CLIP_stop_at_last_layers must be an integer >= 1 (got {clip!r})")
    if max(len(req.prompt), len(req.negative_prompt)) > config.max_prompt_chars:
        problems.append(f"prompts may have at most {config.max_prompt_chars} characters")
    if problems:
        raise ApiError(422, "; ".join(problems))
    seed = random.randrange(2**32) if req.seed == -1 else req.seed
    return Job(checkpoint=ckpt, prompts=[req.prompt] * n, negatives=[req.negative_prompt] * n,
               seeds=[seed + i for i in range(n)], steps=steps, sampler=title, kind=kind, cfg_scale=cfg,
               width=width, height=height, batch_size=req.batch_size, clip_skip=None if clip == 1 else clip,
               init_image=init_image, strength=strength, save=req.save_images, send=req.send_images)


# ----------------------------------------------------------------------------------------------
# The app and its routes


def create_app(worker: Worker, credentials: list[tuple[str, str]] | None = None, loopback: bool = True):
    """The ASGI app: A1111's routes on `worker`, the page at `/`, behind Guard (loopback: bound to a loopback
    address, so without credentials only requests naming a loopback host are answered)."""
    from fastapi import FastAPI

    config = worker.config
    app = FastAPI(title="latentdiff", version=__version__, docs_url=None, redoc_url=None)
    add_error_handlers(app)
    add_generation_routes(app, worker)
    add_info_routes(app, worker)
    add_page_routes(app)
    return Guard(app, credentials, int(config.max_body_mb * 2**20), check_host=loopback and not credentials)


def add_error_handlers(app):
    """Every error answered in A1111's shape; internal details go to the server log only."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.status, e.detail, e.error), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(e.status_code, e.detail), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        detail = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]  # without the input: it may be megabytes of base64
        return JSONResponse(error_body(422, detail, "RequestValidationError"), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error")  # the details stay in the server log: they may name paths
        return JSONResponse(error_body(500, "Internal server error; see the server log", type(e).__name__),
                            status_code=500)


def add_generation_routes(app, worker: Worker):
    """txt2img and img2img: requests checked, then queued on the worker."""
    config = worker.config

    async def run_job(req, job: Job):
        result = await asyncio.wrap_future(worker.submit(job))
        params = answer_parameters(req, job)
        return {"images": result["images"], "parameters": params, "info": json.dumps(result["info"])}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2Img):
        return await run_job(req, make_job(worker, req))

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2Img):
        if not req.init_images:
            raise ApiError(422, "init_images is empty: give one base64 image")
        if len(req.init_images) > 1:
            raise ApiError(422, "latentdiff takes one init image per request (got %d)" % len(req.init_images))
        image = await asyncio.to_thread(decode_image, req.init_images[0], config.max_pixels)
        return await run_job(req, make_job(worker, req, image.convert("RGB")))


def add_info_routes(app, worker: Worker):
    """samplers, schedulers, sd-models, options (read and set), progress, interrupt, png-info."""
    from fastapi import Body

    config = worker.config

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from latentdiff.diffusion.samplers import SAMPLER_NAMES
        out = []
        for name in SAMPLER_NAMES:
            aliases = list(dict.fromkeys([K_NAMES.get(name, name), name, f"sample_{name}"]))
            out.append({"name": SAMPLER_TITLES.get(name, name), "aliases": aliases, "options": {}})
        return out

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": k, "label": label, "aliases": None, "default_rho": 7.0 if kind == "karras" else -1,
                 "need_inner_model": False} for k, (label, kind) in SCHEDULERS.items()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [c.item() for c in worker.checkpoints]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options_dict(worker)

    @app.post("/sdapi/v1/options")
    async def set_options(req: dict[str, Any] = Body(...)):
        """Changes only the settings it knows; everything else (A1111's paths included) is ignored."""
        if "CLIP_stop_at_last_layers" in req:
            clip = req["CLIP_stop_at_last_layers"]
            if not isinstance(clip, int) or isinstance(clip, bool) or clip < 1:
                raise ApiError(422, f"CLIP_stop_at_last_layers must be an integer >= 1 (got {clip!r})")
            worker.clip_skip = clip
        if "live_previews_enable" in req:
            worker.live_preview = bool(req["live_previews_enable"]) and config.live_preview
        if req.get("sd_model_checkpoint") and req["sd_model_checkpoint"] != worker.selected.title:
            ckpt = worker.find(str(req["sd_model_checkpoint"]))
            await asyncio.wrap_future(worker.submit(Task(lambda: worker.load(ckpt))))
            worker.selected = ckpt
        return None

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return progress_dict(worker, skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    async def pnginfo(req: PngInfoRequest):
        return png_info_answer(await asyncio.to_thread(decode_image, req.image, config.max_pixels))


def add_page_routes(app):
    """The page at `/` and its files, read once here: no route reads a path from a request."""
    from fastapi.responses import Response

    static = {name: (STATIC / name).read_bytes() for name in STATIC_FILES}

    @app.get("/")
    async def index():
        return Response(static["index.html"], media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in static:  # a fixed set of names read at start-up; the client's string is only a key
            raise ApiError(404, "Not Found")
        return Response(static[name], media_type=STATIC_FILES[name] + "; charset=utf-8")


def options_dict(worker: Worker) -> dict:
    """GET /sdapi/v1/options: A1111's settings we have, and our defaults and limits."""
    d = worker.defaults()
    return {"sd_model_checkpoint": worker.selected.title, "sd_checkpoint_hash": worker.selected.sha256,
            "CLIP_stop_at_last_layers": worker.clip_skip, "samples_format": "png",
            "live_previews_enable": worker.live_preview,
            "latentdiff_defaults": {k: d[k] for k in ("steps", "cfg_scale", "width", "height", "sampler_name",
                                                      "scheduler", "size_multiple")},
            "latentdiff_limits": dataclasses.asdict(worker.config)}


def progress_dict(worker: Worker, skip_current_image: bool) -> dict:
    """GET /sdapi/v1/progress: the running job's progress, the queue, and the live preview (asked for here,
    made at the worker's next step)."""
    with worker.cond:
        p = dataclasses.replace(worker.progress)
        count = len(worker.waiting) + (1 if worker.running else 0)
    if not skip_current_image and worker.running:
        worker.want_preview.set()
    value, eta = 0.0, 0.0
    if p.job_count:
        value = min(1.0, (p.job_no + (p.sampling_step / p.sampling_steps if p.sampling_steps else 0)) / p.job_count)
        elapsed = time.time() - p.time_start
        eta = elapsed / max(value, 0.01) - elapsed
    state = {"skipped": False, "interrupted": p.interrupted, "stopping_generation": False, "job": p.job,
             "job_count": p.job_count, "job_timestamp": p.job_timestamp, "job_no": p.job_no,
             "sampling_step": p.sampling_step, "sampling_steps": p.sampling_steps, "queued": count}
    return {"progress": value, "eta_relative": eta, "state": state,
            "current_image": None if skip_current_image else p.preview, "textinfo": None}
