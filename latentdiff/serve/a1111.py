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


# A1111's display name for each of our base samplers (samplers.A1111_TITLES; repeated here so that importing the
# server does not import torch), ComfyUI's names for those A1111 lacks; other spellings come from get_sampler.
SAMPLER_TITLES = {
    "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "euler_ancestral": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "restart": "Restart",
    "ddim": "DDIM", "ddim_cfg_pp": "DDIM CFG++", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
    "euler_cfg_pp": "euler_cfg_pp", "euler_ancestral_cfg_pp": "euler_ancestral_cfg_pp", "heunpp2": "heunpp2",
    "ipndm": "ipndm", "ipndm_v": "ipndm_v", "deis": "deis", "res_multistep": "res_multistep",
    "res_multistep_ancestral": "res_multistep_ancestral", "er_sde": "er_sde", "unipc_bh2": "uni_pc_bh2",
    "ddpm": "DDPM",
}
# A1111's own aliases (its k_ names and lower-case ones).
K_NAMES = {"euler": "k_euler", "euler_ancestral": "k_euler_a", "heun": "k_heun", "dpmpp_2m": "k_dpmpp_2m",
           "dpmpp_2m_sde": "k_dpmpp_2m_sde", "ddim": "ddim", "ddpm": "ddpm", "lms": "k_lms", "dpm_2": "k_dpm_2",
           "dpm_2_ancestral": "k_dpm_2_a", "dpmpp_2s_ancestral": "k_dpmpp_2s_a", "dpmpp_sde": "k_dpmpp_sde",
           "dpmpp_2m_sde_heun": "k_dpmpp_2m_sde_heun", "dpmpp_3m_sde": "k_dpmpp_3m_sde", "dpm_fast": "k_dpm_fast",
           "dpm_adaptive": "k_dpm_ad", "restart": "restart", "ddim_cfg_pp": "ddim_cfgpp", "plms": "plms",
           "unipc": "unipc", "lcm": "k_LCM", "unipc_bh2": "uni_pc_bh2"}
# A1111's schedule types (schedule.SCHEDULES, repeated for the same reason), ComfyUI's linear_quadratic, and
# latentdiff's default (diffusers' timestep spacing: what a sampler name alone means, the models' configs included):
# name -> (label, kind). "automatic" is the sampler's own choice, as A1111 makes it (samplers.A1111_AUTOMATIC).
SCHEDULERS = {name: (label, name) for name, label in (
    ("automatic", "Automatic"), ("default", "Default"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"), ("ddim_uniform", "DDIM"),
    ("beta", "Beta"), ("linear_quadratic", "Linear Quadratic"))}


class ApiError(Exception):
    """An error answered in A1111's shape: {"error", "detail", "body", "errors"} with an HTTP status."""

    def __init__(self, status: int, detail, error: str = "HTTPException"):
        super().__init__(detail)
        self.status, self.detail, self.error = status, detail, error


def validation_detail(errors: list[dict]) -> list[dict]:
    """pydantic's errors as A1111 answers them, without their input (it may be megabytes of base64): the first
    MAX_ERRORS, each bounded, with a last entry saying how many more there were."""
    detail = [{"loc": [str(x)[:64] if isinstance(x, str) else x for x in err.get("loc", ())][:8],
               "msg": str(err.get("msg", ""))[:200], "type": str(err.get("type", ""))[:64]}
              for err in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        detail.append({"loc": [], "msg": f"and {len(errors) - MAX_ERRORS} more errors", "type": "too_many_errors"})
    return detail


def error_body(status: int, detail, error: str = "HTTPException") -> dict:
    """The JSON body of an error, as A1111 answers it."""
    errors = f"{status}: {detail}" if isinstance(detail, str) else str(detail)
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def resolve_sampler(name: str | None, scheduler: str | None, default: str) -> tuple[str, str]:
    """(A1111 sampler name, schedule kind) from a sampler name in any accepted spelling and a schedule type.

    A schedule in the name ("DPM++ 2M Karras") counts unless `scheduler` names one; "automatic" becomes the
    schedule A1111 picks for the sampler ('automatic' still where that is the sampler's own discretization)."""
    from latentdiff.diffusion.samplers import get_sampler
    from latentdiff.diffusion.schedule import resolve_schedule
    try:
        spec = get_sampler(name or default)
    except ValueError as e:
        raise ApiError(404, f"Sampler not found: {e}") from None
    kind = spec.sigma_kind
    if scheduler:
        try:
            kind = resolve_schedule(scheduler)
        except ValueError:
            raise ApiError(404, f"Scheduler not found: {scheduler!r}; valid: "
                                f"{', '.join(v[0] for v in SCHEDULERS.values())}") from None
    if kind == "automatic":
        kind = spec.schedule_kind("automatic")
        kind = "automatic" if kind.startswith("a1111_") else kind
    return SAMPLER_TITLES.get(spec.name, spec.name), kind


def sampler_string(title: str, kind: str) -> str:
    """One name for both, as our `Sampler:` infotext stores it ('DPM++ 2M Karras'); get_sampler reads it back."""
    return title if kind == "default" else f"{title} {SCHEDULERS[kind][0] if kind in SCHEDULERS else kind}"


# ----------------------------------------------------------------------------------------------
# Images in and out


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """Plain base64 of a PNG with A1111's `parameters` text chunk (no data: prefix, as A1111 answers)."""
    from latentdiff.io.images import png_bytes
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


# The formats clients send. Pillow's other readers are attack surface: its ICO reader decodes the PNG inside an icon
# while opening it, before any size check can run, and its EPS reader runs Ghostscript.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: str, max_pixels: int) -> Image.Image:
    """A base64 PNG, JPEG or WebP (or a data: URL of one) -> a loaded PIL image; every image field of a request
    comes through here. URLs are refused: the server fetches nothing. The size is read from the header and refused
    above 4 * max_pixels (an init image may be larger than the output) before any pixel is decoded."""
    data = (data or "").strip()
    if data.startswith(("http:", "https:", "file:")) or "://" in data[:16]:  # not "/": JPEG base64 is "/9j/..."
        raise ApiError(400, "Images must be base64 data or a data: URL; the server does not fetch URLs or read files")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data)), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(400, f"Image is too large for this server (at most {4 * max_pixels} pixels)") from None
    except Exception:
        raise ApiError(400, "Invalid encoded image: send a base64 PNG, JPEG or WebP") from None
    if im.width * im.height > 4 * max_pixels:
        raise ApiError(400, f"Image of {im.width}x{im.height} is too large for this server "
                            f"(at most {4 * max_pixels} pixels)")
    try:
        im.load()
    except Exception:
        raise ApiError(400, "Invalid encoded image: its data is damaged or cut short") from None
    return im


RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}


def resize_init_image(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """An img2img init image brought to width x height as A1111's resize_mode says: 0 stretches it (the pipeline
    does that), 1 scales it to cover the size and crops the middle, 2 scales it to fit inside and fills the margins
    with its edge rows or columns drawn out."""
    if mode == 0 or image.size == (width, height):
        return image
    wider = image.width * height > width * image.height  # than the requested aspect ratio
    if (mode == 1) == wider:  # cover: match heights; fit: match widths
        size = (max(1, image.width * height // image.height), height)
    else:
        size = (width, max(1, image.height * width // image.width))
    import numpy as np
    scaled = image.resize(size, Image.LANCZOS)
    if mode == 1:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    left, top = width // 2 - size[0] // 2, height // 2 - size[1] // 2
    pixels = np.pad(np.asarray(scaled), ((top, height - size[1] - top), (left, width - size[0] - left), (0, 0)),
                    mode="edge")
    return Image.fromarray(pixels)


# Characters of text chunks other than `parameters` that png-info answers with (later ones are left out): a
# compressed chunk of 1 KB can hold 1 MB of text, and Pillow reads up to 64 MB of them.
MAX_INFO_TEXT = 2**20


def png_info_answer(image: Image.Image) -> dict:
    """A1111's /png-info answer: the `parameters` text, other text chunks, and the parsed fields.

    (Not io.images.png_info, which builds the PNG text chunk that this reads back.)"""
    from latentdiff.io.images import parse_parameters
    text = image.info.get("parameters") or ""
    items, room = {}, MAX_INFO_TEXT
    for k, v in image.info.items():
        if isinstance(k, str) and isinstance(v, str) and k != "parameters" and len(v) <= room:
            items[k], room = v, room - len(v)
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


# Lists and dicts are bounded: pydantic reports every bad item of a list, so a long list of bad items would draw an
# answer far larger than the request. A length over the bound is one error, found before the items are looked at.
MAX_LIST_ITEMS = 64  # styles, init_images: clients send a handful
MAX_DICT_KEYS = 1024  # override_settings, alwayson_scripts: some clients send back A1111's whole options dict
MAX_ERRORS = 10  # validation errors answered (the first ones)


class Txt2Img(BaseModel):
    """A1111's txt2img fields we act on; unknown fields are ignored, as A1111's API ignores them."""
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = Field(None, max_length=MAX_LIST_ITEMS)
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
    enable_hr: bool = False  # the hires fix: hr_* below, and denoising_strength for its second pass
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str | None = None  # None: "Latent", as A1111's default latent upscale mode
    hr_second_pass_steps: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    denoising_strength: float = 0.75
    override_settings: dict[str, Any] | None = Field(None, max_length=MAX_DICT_KEYS)
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = Field(None, max_length=MAX_DICT_KEYS)
    send_images: bool = True
    save_images: bool = False


class Img2Img(Txt2Img):
    init_images: list[str] | None = Field(None, max_length=MAX_LIST_ITEMS)
    resize_mode: int = 0
    mask: str | None = None  # inpainting (A1111's API defaults below: blur 4, fill, only masked, no padding)
    mask_blur: int | None = None  # sets both mask_blur_x and mask_blur_y
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="base64 PNG or a data: URL")


# ----------------------------------------------------------------------------------------------
# Answers: a job (serve.worker.Job, read by attribute) in A1111's words


def infotext(job, i: int) -> str:
    """The `parameters` text of the job's i-th image."""
    from latentdiff.io.images import format_parameters, image_hash
    return format_parameters(dict(
        prompt=job.prompts[i], negative=job.negatives[i], steps=job.steps,
        sampler=sampler_string(job.sampler, job.kind), guidance=job.cfg_scale, seed=job.seeds[i],
        width=job.width, height=job.height, model_hash=job.checkpoint.hash,
        model=job.checkpoint.model_name, strength=job.strength, clip_skip=job.clip_skip,
        init_image_hash=None if job.init_image is None else image_hash(job.init_image),
        lora_hashes=getattr(job, "lora_hashes", None), extra=extra_infotext(job, i)))


def extra_infotext(job, i: int) -> dict:
    """The inpainting and hires keys of the job's i-th image, as the pipeline writes them."""
    from latentdiff.io.images import image_hash
    extra = {}
    if job.mask is not None:
        extra = {**job.inpaint.infotext(), "Mask hash": image_hash(job.mask)}
    if job.hires is not None:
        extra.update(job.hires.infotext(sampler_string(job.sampler, job.kind), job.prompts[i], job.negatives[i]))
    return extra


def answer_info(job, infotexts: list[str], interrupted: bool, stamp: str) -> dict:
    """A1111's `info` fields of a generation answer (sent JSON-encoded, as A1111 does)."""
    return {"prompt": job.prompts[0], "all_prompts": job.prompts, "negative_prompt": job.negatives[0],
            "all_negative_prompts": job.negatives, "seed": job.seeds[0], "all_seeds": job.seeds,
            "subseed": -1, "all_subseeds": [-1] * len(job.seeds), "subseed_strength": 0,
            "width": job.width, "height": job.height, "sampler_name": job.sampler,
            "scheduler": job.kind, "cfg_scale": job.cfg_scale,
            "steps": job.steps, "batch_size": job.batch_size, "restore_faces": False,
            "sd_model_name": job.checkpoint.model_name, "sd_model_hash": job.checkpoint.hash,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": job.strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": stamp, "clip_skip": job.clip_skip or 1, "is_using_inpainting_conditioning": False,
            "version": f"latentdiff {__version__}", "interrupted": interrupted,
            "latentdiff_warnings": list(job.warnings)}


def answer_parameters(req: Txt2Img, job) -> dict:
    """A1111's `parameters` of a generation answer: the request with the values the job resolved filled in."""
    params = req.model_dump()
    params.update(steps=job.steps, cfg_scale=job.cfg_scale, width=job.width, height=job.height,
                  sampler_name=job.sampler, seed=job.seeds[0])
    if "init_images" in params and not req.include_init_images:
        params["init_images"] = None  # as A1111: the response does not repeat the input images
        params["mask"] = None
    return params
