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
import urllib.parse
from pathlib import Path
from typing import Any

from latentdiff import __version__
from latentdiff.cli import UsageError
# The request models are module names here: FastAPI resolves the routes' (string) annotations in this module.
from latentdiff.serve.a1111 import (K_NAMES, RESIZE_MODES, SAMPLER_TITLES, SCHEDULERS, ApiError, Img2Img,
                                    PngInfoRequest, Txt2Img, answer_parameters, decode_image, error_body,
                                    png_info_answer, resize_init_image, resolve_sampler, sampler_string,
                                    validation_detail)
from latentdiff.serve.worker import WORKER_DEAD, Job, Task, Worker, prompt_chunks

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


DEFAULT_PORTS = {"http": 80, "https": 443}


def same_origin(origin: bytes, host: bytes, scheme: str) -> bool:
    """Whether an Origin header names this server: the scheme the request came in on (uvicorn takes it from
    X-Forwarded-Proto when a trusted proxy sends one), and the host and port of its Host header."""
    try:
        o = urllib.parse.urlsplit(origin.decode("latin-1").strip())
        h = urllib.parse.urlsplit(f"{scheme}://{host.decode('latin-1').strip()}")
        theirs = (o.scheme, o.hostname, o.port or DEFAULT_PORTS.get(o.scheme))
        return bool(o.hostname) and theirs == (scheme, h.hostname, h.port or DEFAULT_PORTS.get(scheme))
    except (ValueError, UnicodeDecodeError):  # a port that is not a number
        return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware in front of every route (the page and its files too): Basic auth, the Host check, refusal of
    cross-site and non-JSON requests that change state, a body size cap, 503 once the worker is gone, and headers
    that keep the page from loading anything from elsewhere."""

    SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store"),
               (b"content-security-policy",
                b"default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'")]

    def __init__(self, app, credentials: list[tuple[str, str]] | None, max_body: int, check_host: bool = False,
                 dead=lambda: False):
        self.app = app
        self.check_host = check_host
        self.dead = dead  # () -> bool: the worker thread stopped, so no request can be served
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
        if scope.get("method") not in self.SAFE_METHODS:
            refused = self.refuse_change(headers, scope.get("scheme", "http"), length)
            if refused:
                return await self._reply(scope, send, *refused)
        if length > self.max_body:
            return await self._reply(scope, send, 413, f"Request body over {self.max_body // 2**20} MB")
        if self.dead():
            return await self._reply(scope, send, 503, WORKER_DEAD)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.HEADERS
            await send(message)
        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def refuse_change(headers: dict, scheme: str, length: int) -> tuple[int, str] | None:
        """(status, reason) for a state-changing request that may come from another site's page, else None.

        A page anywhere can make the browser POST here (a form, or fetch without reading the answer), and the Host
        check cannot tell: the request names our host. Browsers say where it comes from, in Origin and
        Sec-Fetch-Site; clients that are not browsers (webuiapi, curl) send neither and pass. The body must be
        declared JSON too: a page can send form and text/plain bodies to another origin without asking, but not
        JSON."""
        origin = headers.get(b"origin")
        if headers.get(b"sec-fetch-site", b"").strip().lower() == b"cross-site" or (
                origin is not None and not same_origin(origin, headers.get(b"host", b""), scheme)):
            return 403, ("Cross-origin request refused: this server takes requests that change something only from "
                         "its own page and from clients that are not browsers")
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if length > 0 and kind != b"application/json":  # an empty body (curl -d '' .../interrupt) is nothing to parse
            return 415, "Send the request body as JSON, with Content-Type: application/json"
        return None

    async def _reply(self, scope, send, status, detail, extra=()):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps(error_body(status, detail)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra, *self.HEADERS]})
        await send({"type": "http.response.body", "body": body})


class AccessLog:
    """ASGI middleware outside Guard: one line per request, refused ones included (client, method, path, status,
    milliseconds). The path only: no query string, headers or body, so no prompt and no credentials."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = (scope.get("client") or ("-",))[0]
            path = repr(scope.get("path", ""))[1:-1]  # escaped: a %0A in a path cannot start a forged log line
            log.info("%s %s %s %d %.0f ms", client, scope.get("method", "-"), path, status[0],
                     1000 * (time.perf_counter() - start))


# ----------------------------------------------------------------------------------------------
# Requests into jobs


def size_warning(width: int, height: int, trained: int) -> str | None:
    """A note when a size is far (over 1.5x either way) from the one the model was trained at, which draws
    repeated or broken subjects rather than failing."""
    if max(width, height) <= 1.5 * trained and min(width, height) >= trained / 1.5:
        return None
    return (f"{width}x{height} is far from the {trained}x{trained} this model was trained at: expect repeated or "
            f"broken subjects; ask for width={trained}, height={trained} (or leave them out)")


def make_job(worker: Worker, req, init_image=None, mask=None) -> Job:
    """Validate a request against the model and the limits, before any work, and resolve it into a Job."""
    config = worker.config
    unsupported = [name for name, on in [
        ("subseed_strength (variation seeds)", req.subseed_strength),
        ("restore_faces", req.restore_faces), ("tiling", req.tiling), ("script_name", req.script_name),
        ("alwayson_scripts (extensions)", req.alwayson_scripts), ("styles", req.styles)] if on]
    if unsupported:
        raise ApiError(422, f"Not supported by latentdiff: {', '.join(unsupported)}; leave them out")
    over = req.override_settings or {}
    ckpt = worker.find(str(over["sd_model_checkpoint"])) if over.get("sd_model_checkpoint") else worker.selected
    d = worker.defaults(ckpt)
    steps = d["steps"] if req.steps is None else req.steps
    cfg = d["cfg_scale"] if req.cfg_scale is None else req.cfg_scale
    width = d["width"] if req.width is None else req.width  # 0 is refused below, not read as "the default"
    height = d["height"] if req.height is None else req.height
    title, kind = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler, d["sampler"])
    n = req.batch_size * req.n_iter
    m = d["size_multiple"]
    problems = []
    if not 1 <= steps <= config.max_steps:
        problems.append(f"steps must be in 1..{config.max_steps} (got {steps})")
    if not math.isfinite(cfg) or cfg < 0:
        problems.append(f"cfg_scale must be a finite number >= 0 (got {cfg})")
    if width <= 0 or height <= 0 or width % m or height % m:
        problems.append(f"width and height must be positive multiples of {m} for this model (got {width}x{height})")
    if width > config.max_width or height > config.max_height or width * height > config.max_pixels:
        problems.append(f"{width}x{height} is over this server's limit ({config.max_width}x{config.max_height}, "
                        f"{config.max_pixels} pixels)")
    if req.batch_size < 1 or req.n_iter < 1 or n > config.max_images:
        problems.append(f"batch_size and n_iter must be at least 1 and batch_size * n_iter at most "
                        f"{config.max_images} (got {req.batch_size} x {req.n_iter})")
    if req.seed != -1 and not 0 <= req.seed <= 2**63 - max(n, 1):  # every image's seed below 2^63
        problems.append(f"seed must be -1 (random) or in 0..{2**63 - max(n, 1)} for {n} image(s) (got {req.seed})")
    strength = None
    if init_image is not None:
        strength = req.denoising_strength
        if not 0.0 < strength <= 1.0:
            problems.append(f"denoising_strength must be in (0, 1] (got {strength})")
        if req.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode must be one of {', '.join(f'{k} ({v})' for k, v in RESIZE_MODES.items())}; "
                            f"3 (latent upscale) is not supported (got {req.resize_mode})")
    clip = over.get("CLIP_stop_at_last_layers", worker.clip_skip)
    problems += clip_skip_problems(clip, d["clip_layers"])
    loras, lora_hashes = prompt_loras(worker, req.prompt, problems)
    notes = []  # a mask of another size, resized as A1111 does: said in the answer's info
    inpaint = None if mask is None else inpaint_options(req, mask, init_image, problems, notes)
    hires = None
    if req.enable_hr and init_image is None:  # A1111's img2img has no hires fix
        hires = hires_options(worker, req, d, (width, height, m), problems)
    chunks, hires_chunks = request_chunks(worker, ckpt, req, cfg, min(max(steps, 1), config.max_steps), hires,
                                          problems)
    if problems:
        raise ApiError(422, "; ".join(problems))
    if init_image is not None and not (inpaint and inpaint.full_res):  # "only masked" crops the picture as it is
        init_image = resize_init_image(init_image, req.resize_mode, width, height)
        if mask is not None:
            from latentdiff.io.masks import binary_mask
            mask = resize_init_image(binary_mask(mask).convert("RGB"), req.resize_mode, width, height).convert("L")
    if hires is not None:
        strength = hires.strength  # the infotext's "Denoising strength", as A1111 writes it for the second pass
    seed = random.randrange(2**32) if req.seed == -1 else req.seed
    warning = size_warning(width, height, d["width"])
    if warning:
        log.warning("%s", warning)
    return Job(checkpoint=ckpt, prompts=[req.prompt] * n, negatives=[req.negative_prompt] * n,
               seeds=[seed + i for i in range(n)], steps=steps, sampler=title, kind=kind, cfg_scale=cfg,
               width=width, height=height, batch_size=req.batch_size, clip_skip=None if clip == 1 else clip,
               init_image=init_image, strength=strength, save=req.save_images, send=req.send_images,
               warnings=([warning] if warning else []) + notes, chunks=chunks, hires_chunks=hires_chunks,
               loras=loras, lora_hashes=lora_hashes, mask=mask, inpaint=inpaint, hires=hires)


def inpaint_options(req, mask, init_image, problems: list[str], notes: list[str]):
    """A1111's inpainting fields as io.masks.InpaintOptions, with the mask checked against the picture (a mask of
    another size gets a note: make_job may resize it with the picture, so the pipeline would not see it)."""
    from latentdiff.io.masks import InpaintOptions, MaskError, read_mask
    blur_x, blur_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    try:
        options = InpaintOptions(blur_x=blur_x, blur_y=blur_y, fill=req.inpainting_fill,
                                 full_res=req.inpaint_full_res, padding=req.inpaint_full_res_padding,
                                 invert=bool(req.inpainting_mask_invert),
                                 noise_multiplier=1.0 if req.initial_noise_multiplier is None
                                 else req.initial_noise_multiplier)
        notes.extend(read_mask(mask, init_image.size, options.invert)[1])  # all black or all white: refused now
    except MaskError as e:
        problems.append(str(e))
        return None
    return options


def hires_options(worker: Worker, req, d: dict, size: tuple[int, int, int], problems: list[str]):
    """A1111's hires fields (enable_hr) as a pipeline.Hires, its second pass checked against the server's limits."""
    from latentdiff.pipeline import Hires
    config, (width, height, m) = worker.config, size
    try:
        upscaler = worker.upscaler(req.hr_upscaler or "Latent")
    except ApiError as e:
        problems.append(str(e.detail))
        return None
    sampler = None
    if req.hr_sampler_name or req.hr_scheduler:
        sampler = sampler_string(*resolve_sampler(req.hr_sampler_name or req.sampler_name or req.sampler_index,
                                                  req.hr_scheduler, d["sampler"]))
    hires = Hires(scale=req.hr_scale, resize_x=req.hr_resize_x, resize_y=req.hr_resize_y,
                  steps=req.hr_second_pass_steps, strength=req.denoising_strength, upscaler=upscaler,
                  sampler=sampler, prompt=req.hr_prompt or None, negative_prompt=req.hr_negative_prompt or None)
    try:
        hires.check(config.max_steps)
    except ValueError as e:
        problems.append(str(e).replace("hires steps", "hr_second_pass_steps").replace("hires denoising strength",
                                                                                       "denoising_strength"))
        return None
    _, (w, h) = hires.sizes(width, height, m)
    if w > config.max_width or h > config.max_height or w * h > config.max_pixels:
        problems.append(f"the hires size {w}x{h} is over this server's limit ({config.max_width}x"
                        f"{config.max_height}, {config.max_pixels} pixels): lower hr_scale or hr_resize_x/y")
    return hires


def prompt_loras(worker: Worker, prompt: str, problems: list[str]) -> tuple[tuple, str | None]:
    """The prompt's <lora:NAME:...> tags, each NAME in the server's LoRA folders: (sorted tags, `Lora hashes`)."""
    from latentdiff.io.adapters import AdapterError, extract_loras
    try:
        tags = extract_loras(prompt)[1]
    except AdapterError as e:
        problems.append(str(e))
        return (), None
    if any(name not in worker.lora_files for name, *_ in tags):
        worker.refresh_loras()  # a file added since: A1111 needs refresh-loras for it, we look once more
    unknown = [name for name, *_ in tags if name not in worker.lora_files]
    if unknown:
        problems.append(f"unknown LoRA {', '.join(map(repr, unknown))}: GET /sdapi/v1/loras lists the names")
        return (), None
    first = {}
    for name, unet, te in tags:
        first.setdefault(name, (name, unet, te))
    hashes = ", ".join(f"{name}: {worker.lora_hash(name)}" for name in first)
    return tuple(sorted(first.values())), hashes or None


def shown(value, limit: int = 40) -> str:
    """A client's value in an error message, cut short: the message must not grow with the request."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def clip_skip_problems(value, layers: int) -> list[str]:
    """A1111's CLIP_stop_at_last_layers: an integer from 1 (the last layer) to the text encoder's layers; JSON's true
    is not 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= layers:
        return [f"CLIP_stop_at_last_layers must be an integer in 1..{layers} for this model (got {shown(value)})"]
    return []


def request_chunks(worker: Worker, ckpt, req, cfg: float, steps: int, hires, problems: list[str]) -> tuple[int, int]:
    """The chunks of the contexts a request's prompts are encoded into, of the first pass and of the hires pass (0
    without one), as ckpt's text encoder cuts them (serve.worker.prompt_chunks; problems noted when over the
    limits): each chunk is a 77-token block of context to attend to. steps: the request's, within the limit."""
    texts = [req.prompt, req.negative_prompt] + ([req.hr_prompt, req.hr_negative_prompt] if hires else [])
    if max(len(t) for t in texts) > worker.config.max_prompt_chars:
        problems.append(f"prompts may have at most {worker.config.max_prompt_chars} characters")
        return 1, 0
    chunks, hires_chunks, over = prompt_chunks(worker.prompt_encoder(ckpt), req.prompt, req.negative_prompt, steps,
                                               cfg, hires, worker.config.max_prompt_chunks)
    problems += over
    return chunks, hires_chunks


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
    add_adapter_routes(app, worker)
    add_page_routes(app)
    return AccessLog(Guard(app, credentials, int(config.max_body_mb * 2**20), check_host=loopback and not credentials,
                           dead=lambda: worker.dead))


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
        return JSONResponse(error_body(422, validation_detail(e.errors()), "RequestValidationError"), status_code=422)

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
    async def txt2img(req: Txt2Img):  # make_job tokenizes the prompts: off the event loop
        return await run_job(req, await asyncio.to_thread(make_job, worker, req))

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2Img):
        if not req.init_images:
            raise ApiError(422, "init_images is empty: give one base64 image")
        if len(req.init_images) > 1:
            raise ApiError(422, "latentdiff takes one init image per request (got %d)" % len(req.init_images))
        image = await asyncio.to_thread(decode_image, req.init_images[0], config.max_pixels)
        mask = None
        if req.mask:
            try:
                mask = await asyncio.to_thread(decode_image, req.mask, config.max_pixels)
            except ApiError as e:
                raise ApiError(422, f"mask: {e.detail}") from None
        return await run_job(req, await asyncio.to_thread(make_job, worker, req, image.convert("RGB"), mask))


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

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        """The hires fix's pixel upscalers: PIL's and the --upscaler-dir networks (no paths, as everywhere)."""
        from latentdiff.models.upscalers import PIXEL_MODES
        return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                for n in PIXEL_MODES] + [{"name": n, "model_name": n, "model_path": None, "model_url": None,
                                          "scale": None} for n in sorted(worker.upscaler_files)]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        from latentdiff.models.upscalers import LATENT_MODES
        return [{"name": n} for n in LATENT_MODES]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [c.item() for c in worker.checkpoints]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options_dict(worker)

    @app.post("/sdapi/v1/options")
    async def set_options(req: dict[str, Any] = Body(...)):
        """Changes only the settings it knows; everything else (A1111's paths included) is ignored. All are checked
        before any is changed, CLIP skip against the model selected by the same request if it selects one."""
        from pydantic import TypeAdapter, ValidationError
        name = req.get("sd_model_checkpoint")
        ckpt = worker.find(str(name)) if name and name != worker.selected.title else None
        problems = []
        if "CLIP_stop_at_last_layers" in req:
            problems += clip_skip_problems(req["CLIP_stop_at_last_layers"], worker.defaults(ckpt)["clip_layers"])
        if "live_previews_enable" in req:
            try:  # A1111's clients send true, "true", "false", 0 ...: pydantic's reading of a bool, not Python's
                live = TypeAdapter(bool).validate_python(req["live_previews_enable"])
            except ValidationError:
                problems.append(f"live_previews_enable must be true or false "
                                f"(got {shown(req['live_previews_enable'])})")
        if problems:
            raise ApiError(422, "; ".join(problems))
        if ckpt is not None:
            await asyncio.wrap_future(worker.submit(Task(lambda: worker.load(ckpt))))
            worker.selected = ckpt
        if "CLIP_stop_at_last_layers" in req:
            worker.clip_skip = req["CLIP_stop_at_last_layers"]
        if "live_previews_enable" in req:
            worker.live_preview = live and config.live_preview
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


def add_adapter_routes(app, worker: Worker):
    """A1111's LoRA and embedding lists: loras, refresh-loras, embeddings, refresh-embeddings (names, not paths)."""

    @app.get("/sdapi/v1/loras")
    async def loras():
        from latentdiff.io.adapters import metadata_of
        files = await asyncio.to_thread(worker.refresh_loras)
        out = []
        for name, path in files.items():
            meta = await asyncio.to_thread(metadata_of, path)
            out.append({"name": name, "alias": str(meta.get("ss_output_name") or name), "path": path.name,
                        "metadata": meta})
        return out

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        await asyncio.to_thread(worker.refresh_loras)
        return None

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        pipe = worker.pipe
        if pipe is None:
            return {"loaded": {}, "skipped": {}}
        skipped = {k: {f: v for f, v in info.items() if f != "error"} for k, info in pipe.embeddings_skipped.items()}
        return {"loaded": dict(pipe.embeddings), "skipped": skipped}

    @app.post("/sdapi/v1/refresh-embeddings")
    async def refresh_embeddings():
        await asyncio.wrap_future(worker.submit(Task(worker.load_embeddings)))
        return None


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
