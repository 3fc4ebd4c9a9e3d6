"""AUTOMATIC1111's names and shapes: sampler and scheduler titles, the request models, the error body, images
as base64 PNGs, and the infotext and `info` fields of an answer."""
from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from latentdiff import __version__

# latentdiff.io.images loads torch: it is imported in the functions that use it, so that importing the server
# (its --help, its one-line usage errors) stays as quick as before.

# ----------------------------------------------------------------------------------------------
# Names: samplers, schedulers


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


def error_body(status: int, detail, error: str = "HTTPException") -> dict:
    """The JSON body of an error, as A1111 answers it."""
    errors = f"{status}: {detail}" if isinstance(detail, str) else str(detail)
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def resolve_sampler(name: str | None, scheduler: str | None, default: str) -> tuple[str, str]:
    """(A1111 sampler name, schedule kind) from a sampler name in any accepted spelling and a schedule type."""
    from latentdiff.diffusion.samplers import get_sampler
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


# ----------------------------------------------------------------------------------------------
# Images in and out


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """Plain base64 of a PNG with A1111's `parameters` text chunk (no data: prefix, as A1111 answers)."""
    from latentdiff.io.images import png_bytes
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


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


def png_info_answer(image: Image.Image) -> dict:
    """A1111's /png-info answer: the `parameters` text, other text chunks, and the parsed fields.

    (Not io.images.png_info, which builds the PNG text chunk that this reads back.)"""
    from latentdiff.io.images import parse_parameters
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
# Requests


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


# ----------------------------------------------------------------------------------------------
# Answers: a job (serve.worker.Job, read by attribute) in A1111's words


def infotext(job, i: int) -> str:
    """The `parameters` text of the job's i-th image."""
    from latentdiff.io.images import format_parameters
    return format_parameters(dict(
        prompt=job.prompts[i], negative=job.negatives[i], steps=job.steps,
        sampler=sampler_string(job.sampler, job.kind), guidance=job.cfg_scale, seed=job.seeds[i],
        width=job.width, height=job.height, model_hash=job.checkpoint.hash,
        model=job.checkpoint.model_name, strength=job.strength, clip_skip=job.clip_skip))


def answer_info(job, infotexts: list[str], interrupted: bool, stamp: str) -> dict:
    """A1111's `info` fields of a generation answer (sent JSON-encoded, as A1111 does)."""
    return {"prompt": job.prompts[0], "all_prompts": job.prompts, "negative_prompt": job.negatives[0],
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


def answer_parameters(req: Txt2Img, job) -> dict:
    """A1111's `parameters` of a generation answer: the request with the values the job resolved filled in."""
    params = req.model_dump()
    params.update(steps=job.steps, cfg_scale=job.cfg_scale, width=job.width, height=job.height,
                  sampler_name=job.sampler, seed=job.seeds[0])
    if "init_images" in params and not req.include_init_images:
        params["init_images"] = None  # as A1111: the response does not repeat the input images
    return params
