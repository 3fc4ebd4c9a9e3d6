"""`python -m latentdiff.serve`: AUTOMATIC1111's HTTP API (the `/sdapi/v1` routes its clients use) and a web page.

One worker thread owns the device and runs a queue of jobs; compatible waiting txt2img requests are merged into
one U-Net batch. Secure by default: loopback only unless HTTP Basic auth is set, auth on every route, no route
reads a path the client names, and no response carries paths, credentials or environment.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import gc
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .generate import BUNDLED, UsageError, file_sha256, format_parameters, parse_parameters, save_image, slug

log = logging.getLogger("latentdiff.serve")
STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@dataclass(frozen=True)
class ServeConfig:
    """Limits checked before any work, and the queue's behaviour (a `serve:` section in a YAML file)."""
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 1024 * 1024  # width * height
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter of one request
    max_queue: int = 32  # requests waiting behind the running one; more get 503 at once
    merge_images: int = 8  # waiting txt2img requests are merged into one U-Net batch of up to this many images
    max_body_mb: float = 50.0  # request bodies carry base64 images
    max_prompt_chars: int = 10000  # per prompt; long prompts are encoded in 75-token chunks
    live_preview: bool = True  # /progress may return the predicted x0 of the first image


# ----------------------------------------------------------------------------------------------
# Names: samplers, schedulers, checkpoints


# A1111's display name for each of our base samplers; its other names come from samplers.get_sampler.
SAMPLER_TITLES = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                  "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddpm": "DDPM"}
K_NAMES = {"euler": "k_euler", "euler_ancestral": "k_euler_a", "heun": "k_heun", "dpmpp_2m": "k_dpmpp_2m",
           "dpmpp_2m_sde": "k_dpmpp_2m_sde", "ddim": "ddim", "ddpm": "ddpm"}
# A1111's schedule types we have; "automatic" keeps the schedule the sampler's name implies.
SCHEDULERS = {"automatic": ("Automatic", None), "karras": ("Karras", "karras"),
              "exponential": ("Exponential", "exponential")}


class ApiError(Exception):
    """An error answered in A1111's shape: {"error", "detail", "body", "errors"} with an HTTP status."""

    def __init__(self, status: int, detail, error: str = "HTTPException"):
        super().__init__(detail)
        self.status, self.detail, self.error = status, detail, error


def resolve_sampler(name: str | None, scheduler: str | None, default: str) -> tuple[str, str]:
    """(A1111 sampler name, schedule kind) from a sampler name in any accepted spelling and a schedule type."""
    from .samplers import get_sampler
    name = name or default
    if name.lower().startswith("k_"):  # A1111's old k-diffusion aliases: k_euler_a, k_dpmpp_2m
        name = name[2:]
    try:
        spec = get_sampler(name)
    except ValueError as e:
        raise ApiError(404, f"Sampler not found: {e}") from None
    kind = spec.sigma_kind
    if scheduler and scheduler.lower() != "automatic":
        hit = [k for k, (label, _) in SCHEDULERS.items() if scheduler.lower() in (k, label.lower())]
        if not hit:
            raise ApiError(404, f"Scheduler not found: {scheduler!r}; valid: {', '.join(v[0] for v in SCHEDULERS.values())}")
        kind = SCHEDULERS[hit[0]][1]
    return SAMPLER_TITLES.get(spec.name, spec.name), kind


def sampler_string(title: str, kind: str) -> str:
    """One name for both, as our `Sampler:` infotext stores it ('DPM++ 2M Karras'); get_sampler reads it back."""
    return title if kind == "default" else f"{title} {kind.capitalize()}"


@dataclass(frozen=True)
class Checkpoint:
    """A model file the server may load; clients see its title and name, never its folder."""
    path: Path
    sha256: str

    @property
    def model_name(self) -> str:
        return self.path.stem

    @property
    def hash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.hash}]"

    def names(self) -> set[str]:
        """Every name a client may select it by (A1111's aliases)."""
        return {self.title, self.model_name, self.path.name, self.hash, self.sha256}

    def item(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.path.name, "config": None}


def find_checkpoints(paths: list[str]) -> list[Checkpoint]:
    """Files given on the command line (folders: their .safetensors / .ckpt files), or the bundled model."""
    files: list[Path] = []
    for p in paths or []:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".ckpt"))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"checkpoint {p} not found; pass an existing .safetensors or .ckpt file or a folder of them")
    if not paths:
        if not BUNDLED.exists():
            raise UsageError("no model to serve: this version has no bundled model; pass --checkpoint FILE "
                             "(an SD 1.x / 2.x or latentdiff checkpoint)")
        files = [BUNDLED]
    if not files:
        raise UsageError(f"no .safetensors or .ckpt files in {', '.join(paths)}; pass --checkpoint FILE")
    return [Checkpoint(f.resolve(), file_sha256(f)) for f in files]


# ----------------------------------------------------------------------------------------------
# Images in and out


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """Plain base64 of a PNG with A1111's `parameters` text chunk (no data: prefix, as A1111 answers)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str, max_pixels: int) -> Image.Image:
    """A base64 string or data: URL -> a loaded PIL image. URLs are refused: the server fetches nothing."""
    data = (data or "").strip()
    if data.startswith(("http:", "https:", "file:")) or "://" in data[:16]:  # not "/": JPEG base64 is "/9j/..."
        raise ApiError(400, "Images must be base64 data or a data: URL; the server does not fetch URLs or read files")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data)))
        if im.width * im.height > 4 * max_pixels:  # checked from the header, before decoding the pixels
            raise ApiError(400, f"Image of {im.width}x{im.height} is too large for this server")
        im.load()
        return im
    except ApiError:
        raise
    except Exception:
        raise ApiError(400, "Invalid encoded image") from None


def png_info(image: Image.Image) -> dict:
    """A1111's /png-info answer: the `parameters` text, other text chunks, and the parsed fields."""
    text = image.info.get("parameters") or ""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    params: dict[str, Any] = {}
    if text:
        raw = parse_parameters(text)
        params = {"Prompt": raw.pop("prompt"), "Negative prompt": raw.pop("negative")}
        params.update(raw)
        if "Size" in raw:
            w, _, h = raw["Size"].partition("x")
            params["Size-1"], params["Size-2"] = w, h
    return {"info": text, "items": items, "parameters": params}


# ----------------------------------------------------------------------------------------------
# Jobs and the worker that runs them


@dataclass
class Job:
    """One request, resolved: everything the worker needs, per image where it may differ."""
    checkpoint: Checkpoint
    prompts: list[str]  # one per image
    negatives: list[str]
    seeds: list[int]
    steps: int
    sampler: str  # A1111 title
    kind: str  # sigma schedule
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    clip_skip: int | None = None
    init_image: Image.Image | None = None
    strength: float | None = None
    save: bool = False
    send: bool = True
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    def key(self):
        """Jobs with equal keys can share one U-Net batch; img2img and multi-iteration jobs run alone."""
        if self.init_image is not None or len(self.seeds) > self.batch_size:
            return None
        return (self.checkpoint.sha256, self.steps, self.sampler, self.kind, self.cfg_scale, self.width,
                self.height, self.clip_skip)


@dataclass
class Task:
    """A function to run on the worker in turn with the jobs (a model switch)."""
    fn: Callable
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


class _Interrupted(Exception):
    def __init__(self, denoised):
        self.denoised = denoised


@dataclass
class Progress:
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    time_start: float = 0.0
    job_timestamp: str = "0"
    preview: str | None = None


class Worker:
    """The queue and the one thread that uses the device: jobs run in arrival order, merged when compatible."""

    def __init__(self, checkpoints: list[Checkpoint], config: ServeConfig, device="auto", dtype=None,
                 outdir: str | None = None):
        self.checkpoints, self.config, self.device, self.dtype = checkpoints, config, device, dtype
        self.outdir = os.path.join(str(outdir), "") if outdir else None  # always a folder, even one named x.png
        self.selected = checkpoints[0]
        self.clip_skip = 1  # A1111's CLIP_stop_at_last_layers: 1 is the model's own layer
        self.live_preview = config.live_preview
        self.pipe = None
        self.loaded: Checkpoint | None = None
        self.model_defaults: dict[str, dict] = {}  # per checkpoint sha256, read when it is first loaded
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.cond = threading.Condition()
        self.progress = Progress()
        self.stop = threading.Event()
        self.want_preview = threading.Event()
        self.closed = False
        self.batches = collections.deque(maxlen=1000)  # images per U-Net batch, latest last (tests, benchmarks)
        self.thread = threading.Thread(target=self._loop, name="latentdiff-worker", daemon=True)

    def start(self):
        self.load(self.selected)  # at start-up, so a bad model fails before the server listens
        self.thread.start()

    def close(self):
        with self.cond:
            self.closed = True
            self.stop.set()  # a running job ends at its next step
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def find(self, name: str) -> Checkpoint:
        for c in self.checkpoints:
            if name in c.names():
                return c
        raise ApiError(404, f"Model not found: {name!r}; GET /sdapi/v1/sd-models lists the titles")

    def load(self, ckpt: Checkpoint):
        """Make ckpt the model in memory (one at a time: the old one is freed first)."""
        if self.loaded == ckpt:
            return
        from .checkpoint import CheckpointError
        from .pipeline import Pipeline
        import torch
        self.pipe, self.loaded = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.pipe = Pipeline.from_checkpoint(ckpt.path, device=self.device, dtype=self.dtype)
        except CheckpointError as e:
            log.error("cannot load %s: %s", ckpt.path, e)
            raise ApiError(500, f"Model {ckpt.title} cannot be loaded; see the server log") from None
        self.loaded = ckpt
        c = self.pipe.config
        title, kind = resolve_sampler(c.sampling.sampler, None, c.sampling.sampler)
        self.model_defaults[ckpt.sha256] = {
            "steps": c.sampling.steps, "cfg_scale": c.sampling.guidance, "width": c.image_size,
            "height": c.image_size, "sampler_name": title, "scheduler": "automatic" if kind == "default" else kind,
            "sampler": c.sampling.sampler, "size_multiple": self.pipe.size_multiple}

    def defaults(self, ckpt: Checkpoint | None = None) -> dict:
        """What a request that leaves a field out gets: the model's own settings (those of the first model
        loaded, for one not loaded yet; the worker checks the size again once it is)."""
        ckpt = ckpt or self.selected
        return self.model_defaults.get(ckpt.sha256) or next(iter(self.model_defaults.values()))

    def submit(self, job) -> concurrent.futures.Future:
        """Queue a job; a full queue is refused at once (503) rather than left to pile up."""
        with self.cond:
            if self.closed:
                raise ApiError(503, "Server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise ApiError(503, f"Queue is full ({self.config.max_queue} requests waiting); try again later")
            self.waiting.append(job)
            self.cond.notify()
        return job.future

    def interrupt(self):
        with self.cond:
            if self.running:
                self.stop.set()
                self.progress.interrupted = True

    def queued(self) -> int:
        with self.cond:
            return len(self.waiting)

    def _loop(self):
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    for job in self.waiting:
                        job.future.set_exception(ApiError(503, "Server is shutting down"))
                    return
                group = [self.waiting.popleft()]
                key = group[0].key() if isinstance(group[0], Job) else None
                if key is not None:
                    n = len(group[0].seeds)
                    for job in list(self.waiting):
                        if isinstance(job, Job) and job.key() == key and n + len(job.seeds) <= self.config.merge_images:
                            group.append(job)
                            self.waiting.remove(job)
                            n += len(job.seeds)
                self.running = group
                self.stop.clear()
            results, error = None, None
            try:
                results = [group[0].fn()] if isinstance(group[0], Task) else self._run(group)
            except Exception as e:  # noqa: BLE001 - every error goes back to the requests that caused it
                error = e
                if not isinstance(e, ApiError):
                    log.exception("job failed")
            with self.cond:  # idle again before anyone hears back, so a client's next /progress already says so
                self.running = []
                self.progress = Progress()
            for i, job in enumerate(group):
                if error is None:
                    job.future.set_result(results[i])
                else:
                    job.future.set_exception(error)

    def _run(self, group: list[Job]) -> list[dict]:
        """Run merged jobs (or one job's n_iter iterations) through the pipeline; returns one answer per job."""
        import torch
        from .pipeline import to_pil
        head = group[0]
        self.load(head.checkpoint)
        pipe = self.pipe
        try:  # again for this model: the request was checked against the one loaded then
            pipe.check(steps=head.steps, height=head.height, width=head.width, guidance=head.cfg_scale,
                       strength=head.strength)
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        if len(group) == 1:  # A1111's n_iter: batches of batch_size, one after another
            chunks = [(i, i + head.batch_size) for i in range(0, len(head.seeds), head.batch_size)]
        else:
            chunks = [(0, sum(len(j.seeds) for j in group))]
        prompts = [p for j in group for p in j.prompts]
        negatives = [n for j in group for n in j.negatives]
        seeds = [s for j in group for s in j.seeds]
        stamp = time.strftime("%Y%m%d%H%M%S")
        with self.cond:
            self.progress = Progress(job="txt2img" if head.init_image is None else "img2img",
                                     job_count=len(chunks), time_start=time.time(), job_timestamp=stamp,
                                     sampling_steps=head.steps)
        images, interrupted = [], False
        for no, (a, b) in enumerate(chunks):
            with self.cond:
                self.progress.job_no, self.progress.sampling_step = no, 0
            if self.stop.is_set():
                interrupted = True
                break
            self.batches.append(b - a)

            def on_step(info):
                with self.cond:
                    self.progress.sampling_step = info["i"] + 1
                if self.live_preview and self.want_preview.is_set():
                    self.want_preview.clear()
                    preview = png_base64(to_pil(pipe.decode(info["denoised"][:1]))[0])
                    with self.cond:
                        self.progress.preview = preview
                if self.stop.is_set():
                    raise _Interrupted(info["denoised"])

            gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[a:b]]
            img2img = {"init_image": head.init_image, "strength": head.strength} if head.init_image is not None else {}
            try:
                result = pipe(prompts[a:b], negatives[a:b], num_images=1, seed=seeds[a], generators=gens,
                              steps=head.steps, sampler=sampler_string(head.sampler, head.kind),
                              guidance=head.cfg_scale, height=head.height, width=head.width,
                              clip_skip=head.clip_skip, callback=on_step, progress=False, **img2img)
                images += result.images
            except _Interrupted as e:  # as A1111: the images as far as they got (here: their predicted x0)
                with torch.no_grad():
                    images += to_pil(pipe.decode(e.denoised))
                interrupted = True
                break
        answers, k = [], 0
        for job in group:
            n = min(len(job.seeds), max(0, len(images) - k))
            answers.append(self._answer(job, images[k:k + n], interrupted, stamp))
            k += len(job.seeds)
        return answers

    def _answer(self, job: Job, images: list, interrupted: bool, stamp: str) -> dict:
        """Images as base64 PNGs with their infotext, and A1111's `info` fields."""
        infotexts = []
        for i, _ in enumerate(images):
            infotexts.append(format_parameters(dict(
                prompt=job.prompts[i], negative=job.negatives[i], steps=job.steps,
                sampler=sampler_string(job.sampler, job.kind), guidance=job.cfg_scale, seed=job.seeds[i],
                width=job.width, height=job.height, model_hash=job.checkpoint.hash,
                model=job.checkpoint.model_name, strength=job.strength, clip_skip=job.clip_skip)))
        if job.save and self.outdir:
            from .generate import output_paths
            names = [f"{slug(job.prompts[i])}-{job.seeds[i]}" for i in range(len(images))]
            for path, im, text in zip(output_paths(self.outdir, names), images, infotexts):
                save_image(im, path, text)
        encoded = [png_base64(im, t) for im, t in zip(images, infotexts)] if job.send else []
        info = {"prompt": job.prompts[0], "all_prompts": job.prompts, "negative_prompt": job.negatives[0],
                "all_negative_prompts": job.negatives, "seed": job.seeds[0], "all_seeds": job.seeds,
                "subseed": -1, "all_subseeds": [-1] * len(job.seeds), "subseed_strength": 0,
                "width": job.width, "height": job.height, "sampler_name": job.sampler,
                "scheduler": "automatic" if job.kind == "default" else job.kind, "cfg_scale": job.cfg_scale,
                "steps": job.steps, "batch_size": job.batch_size, "restore_faces": False,
                "sd_model_name": job.checkpoint.model_name, "sd_model_hash": job.checkpoint.hash,
                "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": job.strength,
                "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
                "job_timestamp": stamp, "clip_skip": job.clip_skip or 1, "is_using_inpainting_conditioning": False,
                "version": f"latentdiff {__version__}", "interrupted": interrupted}
        return {"images": encoded, "info": info}


# ----------------------------------------------------------------------------------------------
# The HTTP side: request models, routes, auth


class Txt2Img(BaseModel):
    """A1111's txt2img fields we act on; unknown fields are ignored, as A1111's API ignores them."""
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False


class Img2Img(Txt2Img):
    init_images: list[str] | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="base64 PNG or a data: URL")


def _error_body(status: int, detail, error: str = "HTTPException") -> dict:
    errors = f"{status}: {detail}" if isinstance(detail, str) else str(detail)
    return {"error": error, "detail": detail, "body": "", "errors": errors}


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
        body = json.dumps(_error_body(status, detail)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra, *self.HEADERS]})
        await send({"type": "http.response.body", "body": body})


def create_app(worker: Worker, credentials: list[tuple[str, str]] | None = None, loopback: bool = True):
    """The ASGI app: A1111's routes on `worker`, the page at `/`, behind Guard (loopback: bound to a loopback
    address, so without credentials only requests naming a loopback host are answered)."""
    from fastapi import Body, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    config = worker.config
    static = {name: (STATIC / name).read_bytes() for name in STATIC_FILES}  # read once: no path from a request
    app = FastAPI(title="latentdiff", version=__version__, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(_error_body(e.status, e.detail, e.error), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(_error_body(e.status_code, e.detail), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        detail = [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
                  for err in e.errors()]  # without the input: it may be megabytes of base64
        return JSONResponse(_error_body(422, detail, "RequestValidationError"), status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error")  # the details stay in the server log: they may name paths
        return JSONResponse(_error_body(500, "Internal server error; see the server log", type(e).__name__),
                            status_code=500)

    def make_job(req, init_image=None) -> Job:
        """Validate a request against the model and the limits, before any work, and resolve it into a Job."""
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

    async def run_job(req, job: Job):
        result = await asyncio.wrap_future(worker.submit(job))
        params = req.model_dump()
        params.update(steps=job.steps, cfg_scale=job.cfg_scale, width=job.width, height=job.height,
                      sampler_name=job.sampler, seed=job.seeds[0])
        if "init_images" in params and not req.include_init_images:
            params["init_images"] = None  # as A1111: the response does not repeat the input images
        return {"images": result["images"], "parameters": params, "info": json.dumps(result["info"])}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2Img):
        return await run_job(req, make_job(req))

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2Img):
        if not req.init_images:
            raise ApiError(422, "init_images is empty: give one base64 image")
        if len(req.init_images) > 1:
            raise ApiError(422, "latentdiff takes one init image per request (got %d)" % len(req.init_images))
        image = await asyncio.to_thread(decode_image, req.init_images[0], config.max_pixels)
        return await run_job(req, make_job(req, image.convert("RGB")))

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from .samplers import SAMPLER_NAMES
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

    def options_dict() -> dict:
        d = worker.defaults()
        return {"sd_model_checkpoint": worker.selected.title, "sd_checkpoint_hash": worker.selected.sha256,
                "CLIP_stop_at_last_layers": worker.clip_skip, "samples_format": "png",
                "live_previews_enable": worker.live_preview,
                "latentdiff_defaults": {k: d[k] for k in ("steps", "cfg_scale", "width", "height", "sampler_name",
                                                          "scheduler", "size_multiple")},
                "latentdiff_limits": dataclasses.asdict(config)}

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options_dict()

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

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info")
    async def pnginfo(req: PngInfoRequest):
        return png_info(await asyncio.to_thread(decode_image, req.image, config.max_pixels))

    @app.get("/")
    async def index():
        return Response(static["index.html"], media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in static:  # a fixed set of names read at start-up; the client's string is only a key
            raise ApiError(404, "Not Found")
        return Response(static[name], media_type=STATIC_FILES[name] + "; charset=utf-8")

    return Guard(app, credentials, int(config.max_body_mb * 2**20), check_host=loopback and not credentials)


# ----------------------------------------------------------------------------------------------
# The command


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
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    return p


def load_config(path: str | None, overrides: list[str]) -> ServeConfig:
    from .config import ConfigError, from_dict, load_yaml, parse_overrides
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
            from .generate import output_paths
            output_paths(os.path.join(args.outdir, ""), [])  # a folder we cannot write is a start-up error
        worker = Worker(find_checkpoints(args.checkpoint), config, args.device, args.dtype, args.outdir)
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
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
