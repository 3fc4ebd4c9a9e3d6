"""Pictures in and out: any PIL image to RGB as a viewer shows it, tensors <-> PIL, grids, and PNGs with
A1111's `parameters` text chunk (written atomically, read back)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import re

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from latentdiff import __version__
from latentdiff.io.files import atomic_write

ORIENTATION = 0x0112  # the EXIF tag saying how to rotate or mirror the stored pixels for display


# ----------------------------------------------------------------------------------------------
# Decoding and converting


def load_image(data: bytes, resolution: int) -> Image.Image:
    """Decode, flatten transparency onto white, resize the short side to `resolution` and center-crop."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale in the DCT domain when that still covers `resolution`
        img.draft("RGB", (resolution, resolution))
    img.load()  # a truncated file fails here rather than later
    img = to_rgb(img)
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB as a viewer shows it: EXIF orientation applied, 16-bit scaled, alpha on white."""
    if img.getexif().get(ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # convert() would clip these to 255; 65535 maps to 255 (mode I from 16-bit files holds 0..65535 too).
        v = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0



# ----------------------------------------------------------------------------------------------
# Tensors, grids


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Images of one size on a grid, row by row (cols defaults to a near-square layout); empty cells are white."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def from_pil(image: Image.Image, size: tuple[int, int], device, dtype) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized to size = (width, height)."""
    return to_tensor(image.convert("RGB").resize(size, Image.LANCZOS)).unsqueeze(0).to(device, dtype)



# ----------------------------------------------------------------------------------------------
# PNG files and their `parameters` chunk


def png_info(parameters: str | None) -> PngImagePlugin.PngInfo:
    """A PNG text-chunk block holding A1111's `parameters` (empty without)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    return info


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(parameters))
    return buf.getvalue()


def save_image(image: Image.Image | list[Image.Image], path: Path, parameters: str | None = None) -> None:
    """Write a PNG (or a GIF for a list of frames) atomically: a crash never leaves half a file."""
    with atomic_write(path) as tmp:
        if isinstance(image, list):  # animation frames
            image[0].save(tmp, format="GIF", save_all=True, append_images=image[1:], duration=120, loop=0)
        else:
            image.save(tmp, format="PNG", pnginfo=png_info(parameters))


def quote(value):
    """A value as A1111 writes it into the settings line: JSON-quoted when it holds a comma, colon or newline."""
    if not isinstance(value, str) or not any(c in value for c in ",:\n"):
        return value
    return json.dumps(value, ensure_ascii=False)


def format_parameters(p: dict) -> str:
    """The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value, ...`."""
    lines = [p["prompt"]]
    if p.get("negative"):
        lines.append(f"Negative prompt: {p['negative']}")
    fields = [("Steps", p["steps"]), ("Sampler", p["sampler"]), ("CFG scale", p["guidance"]),
              ("Seed", p["seed"]), ("Size", f"{p['width']}x{p['height']}"),
              ("Model hash", p.get("model_hash")), ("Model", p.get("model")),
              ("Denoising strength", p.get("strength")), ("Init image hash", p.get("init_image_hash")),
              *[(k, quote(v)) for k, v in (p.get("extra") or {}).items()],  # inpainting, hires fix: A1111's keys
              ("Clip skip", p.get("clip_skip")), ("Guidance rescale", p.get("guidance_rescale") or None),
              ("Prediction", p.get("prediction")), ("Dtype", p.get("dtype")),
              ("Lora hashes", f'"{p["lora_hashes"]}"' if p.get("lora_hashes") else None),  # quoted, as A1111
              ("Version", f"latentdiff {__version__}")]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def image_hash(image: Image.Image) -> str:
    """The first 10 hex digits of the SHA-256 of an image's RGB pixels and size: an img2img PNG records its init
    image's, so regenerating it can tell the same picture (in any file format) from another."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:10]


def parse_parameters(text: str) -> dict:
    """Inverse of format_parameters (also reads A1111's own files for the keys we know)."""
    lines = text.strip().split("\n")
    settings = lines[-1] if re.match(r"^\s*Steps:\s", lines[-1]) else ""
    body = lines[:-1] if settings else lines
    prompt, negative, neg_started = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            neg_started = True
            line = line[len("Negative prompt:"):].strip()
        (negative if neg_started else prompt).append(line)
    out = {"prompt": "\n".join(prompt), "negative": "\n".join(negative)}
    # values may be quoted and contain commas: "Key: "a, b", Key2: v"
    for key, value in re.findall(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':  # quote's JSON: its escapes are decoded, and only its
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        out[key.strip()] = value
    return out



def read_parameters(path) -> str | None:
    """The `parameters` text chunk of an image file (None when it has none); OSError/ValueError when unreadable."""
    with Image.open(path) as im:
        return im.info.get("parameters")
