"""Masks for inpainting and outpainting, prepared as AUTOMATIC1111 prepares them.

A mask is white where the picture is to be repainted. In order: the mask is made binary (an RGBA mask's alpha,
else its grey levels), inverted on request, blurred (a Gaussian of sigma blur_x across and blur_y down), then
either resized to the processing size, or ("only masked", inpaint_full_res) used to crop a region around itself,
padded and widened to the processing size's aspect ratio, that alone is repainted at the processing size. The
masked pixels are filled before encoding as `fill` says. After sampling, the original is laid back over the result
through the blurred mask (`Inpainting.paste_back`), so pixels the blur does not reach keep their values exactly.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from latentdiff.io.images import to_rgb

# A1111's `inpainting_fill` values 0..3: what the masked pixels (or latents) hold before sampling starts
FILLS = ("fill", "original", "latent noise", "latent nothing")


class MaskError(ValueError):
    """A mask or inpainting option that cannot be used; the message says how to fix it."""


def fill_name(value) -> str:
    """A1111's inpainting_fill as a name: 0..3 or one of FILLS (any case, '_' for ' ')."""
    if isinstance(value, bool):
        raise MaskError(f"inpainting fill must be one of {', '.join(FILLS)} or 0..3 (got {value!r})")
    if isinstance(value, int):
        if 0 <= value < len(FILLS):
            return FILLS[value]
    elif isinstance(value, str) and value.strip().lower().replace("_", " ") in FILLS:
        return value.strip().lower().replace("_", " ")
    raise MaskError(f"inpainting fill must be one of {', '.join(FILLS)} or 0..3 (got {value!r})")


@dataclass(frozen=True)
class InpaintOptions:
    """A1111's inpainting settings (defaults: its img2img tab's: blur 4, original content, whole picture)."""
    blur_x: int = 4
    blur_y: int = 4
    fill: str = "original"  # one of FILLS
    full_res: bool = False  # "only masked": repaint a crop around the mask at the processing size, paste it back
    padding: int = 32  # pixels around the mask's box that the crop keeps, with full_res
    invert: bool = False  # repaint what is black in the mask instead
    noise_multiplier: float = 1.0  # scales the noise added to the start latents (A1111's initial_noise_multiplier)

    def __post_init__(self):
        object.__setattr__(self, "fill", fill_name(self.fill))
        for name in ("blur_x", "blur_y"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 256:
                raise MaskError(f"mask blur must be a whole number of pixels in 0..256 (got {name.replace('_', ' ')} "
                                f"{v!r})")
        if not (isinstance(self.padding, int) and 0 <= self.padding <= 4096):
            raise MaskError(f"inpaint full-res padding must be a number of pixels in 0..4096 (got {self.padding!r})")
        m = self.noise_multiplier
        if not (isinstance(m, (int, float)) and math.isfinite(m) and 0 <= m <= 2):
            raise MaskError(f"initial noise multiplier must be in 0..2 (got {m!r}); 1 is the plain img2img start")

    def infotext(self) -> dict:
        """The settings as A1111's infotext keys (those it writes only when they are not the default left out)."""
        out = {"Mask blur": self.blur_x} if self.blur_x == self.blur_y else {"Mask blur x": self.blur_x,
                                                                           "Mask blur y": self.blur_y}
        if self.full_res:
            out.update({"Inpaint area": "Only masked", "Masked area padding": self.padding})
        if self.fill != "original":
            out["Masked content"] = self.fill
        if self.invert:
            out["Mask mode"] = "Inpaint not masked"
        if self.noise_multiplier != 1.0:
            out["Noise multiplier"] = self.noise_multiplier
        return out

    @classmethod
    def from_infotext(cls, fields: dict) -> "InpaintOptions":
        """Inverse of infotext for the keys present in a parsed `parameters` text (ValueError on a bad value)."""
        blur = int(fields.get("Mask blur", 4))
        return cls(blur_x=int(fields.get("Mask blur x", blur)), blur_y=int(fields.get("Mask blur y", blur)),
                   fill=fields.get("Masked content", "original"),
                   full_res=fields.get("Inpaint area") == "Only masked",
                   padding=int(fields.get("Masked area padding", 32)),
                   invert=fields.get("Mask mode") == "Inpaint not masked",
                   noise_multiplier=float(fields.get("Noise multiplier", 1.0)))


# ----------------------------------------------------------------------------------------------
# Pixel operations


def binary_mask(image: Image.Image) -> Image.Image:
    """8-bit mask from any image: a transparent RGBA image's alpha (over half opaque -> 255), else its grey levels."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3] != (255, 255):
            return rgba.getchannel("A").point(lambda a: 255 if a > 128 else 0)
        image = rgba
    return image.convert("L")


def _gaussian_taps(sigma: float) -> np.ndarray:
    """OpenCV's kernel for GaussianBlur(ksize=2*int(2.5*sigma+0.5)+1, sigma), which A1111 blurs masks with."""
    half = int(2.5 * sigma + 0.5)
    x = np.arange(-half, half + 1, dtype=np.float64)
    taps = np.exp(-x * x / (2 * sigma * sigma))
    return taps / taps.sum()


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    taps = _gaussian_taps(sigma)
    half = len(taps) // 2
    n = a.shape[axis]
    # reflect-101 border (OpenCV's default): index -1 reads 1, n reads n-2; folded until inside for tiny images
    idx = np.arange(-half, n + half)
    period = max(2 * (n - 1), 1)
    idx = np.abs(idx) % period
    idx = np.where(idx >= n, period - idx, idx)
    padded = np.take(a, idx, axis=axis)
    out = np.zeros_like(a, dtype=np.float64)
    for k, w in enumerate(taps):
        out += w * np.take(padded, np.arange(k, k + n), axis=axis)
    return out


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """Gaussian blur across (sigma blur_x) then down (blur_y), each rounded back to 8 bits as A1111's two passes."""
    a = np.asarray(mask.convert("L"), dtype=np.float64)
    if blur_x > 0:
        a = np.clip(np.rint(_blur_axis(a, blur_x, 1)), 0, 255)
    if blur_y > 0:
        a = np.clip(np.rint(_blur_axis(a, blur_y, 0)), 0, 255)
    return Image.fromarray(a.astype(np.uint8), "L")


def mask_box(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom), right and bottom exclusive, of the mask's non-zero pixels grown by `padding`
    and kept inside the image; None for an empty mask."""
    a = np.asarray(mask.convert("L")) > 0
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    if not len(rows):
        return None
    h, w = a.shape
    return (max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0),
            min(int(cols[-1]) + 1 + padding, w), min(int(rows[-1]) + 1 + padding, h))


def _widen(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) about its centre to `want` long, then shift it back inside [0, limit) and clip."""
    extra = want - (hi - lo)
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fit_box(box, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """Widen a box (the short side, about its centre) to the width:height aspect ratio, inside the image."""
    left, top, right, bottom = box
    if (right - left) / (bottom - top) > width / height:
        top, bottom = _widen(top, bottom, int((right - left) * height / width), image_h)
    else:
        left, right = _widen(left, right, int((bottom - top) * width / height), image_w)
    return left, top, right, bottom


# Coarse to fine: (blur radius in pixels, times composited). The wide blurs reach the middle of large holes, the
# narrow ones keep the colours near the mask's edge.
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """inpainting_fill "fill": each masked pixel takes the colours around it. The known pixels, premultiplied by
    how known they are (255 - mask), are blurred at each radius of FILL_PASSES and composited over the result so
    far, so unknown colours never bleed in and every hole is covered by the time the unblurred pass lands."""
    known = image.convert("RGB")
    known.putalpha(ImageOps.invert(mask.convert("L")))
    premultiplied = known.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def outpaint_sides(sides) -> tuple[int, int, int, int]:
    """Outpainting's (left, right, top, bottom) checked: four whole numbers of pixels, none below 0, one above."""
    try:
        values = tuple(sides)
    except TypeError:
        values = ()
    if len(values) != 4 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0
                                   for v in values):
        got = " ".join(repr(sides).split())[:80]  # one line, whatever was passed
        raise MaskError(f"outpaint must be 4 whole numbers of pixels >= 0, (left, right, top, bottom) (got {got})")
    if sum(values) == 0:
        raise MaskError("outpaint needs at least one side above 0 pixels (left, right, top, bottom)")
    return tuple(int(v) for v in values)


def outpaint_size(size: tuple[int, int], sides, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of outpaint_canvas's canvas for a picture of `size`: grown by the sides, rounded up to the
    multiple."""
    left, right, top, bottom = sides
    return (-(-(size[0] + left + right) // multiple) * multiple, -(-(size[1] + top + bottom) // multiple) * multiple)


def outpaint_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int,
                    multiple: int = 8) -> tuple[Image.Image, Image.Image]:
    """The picture on a canvas grown by the given pixels on each side (each side rounded up so the canvas is a
    multiple of `multiple`), the new border filled from the picture's edge pixels, and the mask of the new area."""
    image = image.convert("RGB")
    w, h = image.size
    grow_w, grow_h = outpaint_size(image.size, (left, right, top, bottom), multiple)
    right += grow_w - (w + left + right)
    bottom += grow_h - (h + top + bottom)
    a = np.asarray(image)
    canvas = np.pad(a, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, "L")


# ----------------------------------------------------------------------------------------------
# The prepared job


@dataclass
class Inpainting:
    """An inpainting job's pictures: what is encoded and what the result is pasted into.

    image: the (filled) picture to encode, at the processing size; mask: the blurred mask at that size (L);
    overlay: the original picture (at the output size) whose alpha is 255 where the original shows through;
    paste_to: (x, y, w, h) of the repainted crop inside the output with full_res, else None.
    """
    image: Image.Image
    mask: Image.Image
    overlay: Image.Image
    options: InpaintOptions
    paste_to: tuple[int, int, int, int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.overlay.size

    def latent_mask(self, h: int, w: int, device) -> torch.Tensor:
        """(1, 1, h, w) of 0/1: 1 where the latents are repainted (the mask, bicubic to the latent size, rounded)."""
        small = np.asarray(self.mask.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)[..., 0]
        return torch.from_numpy(np.round(small / 255.0)).to(device)[None, None]

    def pixel_mask(self, device) -> torch.Tensor:
        """(1, 1, H, W) of 0/1 at the processing size: the inpainting U-Net's mask (grey levels from 128 up are 1)."""
        return torch.from_numpy(np.asarray(self.mask, dtype=np.float32) >= 128).float().to(device)[None, None]

    def paste_back(self, generated: Image.Image) -> Image.Image:
        """The result in the original: the repainted crop put in place, then the original laid over it through
        the blurred mask (where the mask is 0 the original's pixels come through unchanged)."""
        if self.paste_to is not None:
            x, y, w, h = self.paste_to
            base = Image.new("RGB", self.overlay.size)
            base.paste(generated.convert("RGB").resize((w, h), Image.LANCZOS), (x, y))
            generated = base
        a = np.asarray(self.overlay, dtype=np.float64)
        keep = a[..., 3:] / 255.0
        out = a[..., :3] * keep + np.asarray(generated.convert("RGB"), dtype=np.float64) * (1.0 - keep)
        return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def read_mask(mask: Image.Image, image_size: tuple[int, int], invert: bool = False) -> tuple[Image.Image, list[str]]:
    """The binary mask at the picture's size (resized with a note when it is not), inverted on request; an empty
    or full mask is refused (nothing to repaint, or a plain img2img)."""
    notes = []
    m = binary_mask(mask)
    if m.size != image_size:
        notes.append(f"the mask is {m.width}x{m.height} and the picture {image_size[0]}x{image_size[1]}: the mask "
                     f"was resized to the picture's size")
        m = m.resize(image_size, Image.LANCZOS)
    if invert:
        m = ImageOps.invert(m)
    low, high = m.getextrema()
    if high == 0:
        raise MaskError("the mask is all black: nothing to repaint; paint the area to change white"
                        + ("" if invert else " (or invert the mask)"))
    if low == 255:
        raise MaskError("the mask is all white: that repaints the whole picture, which is plain img2img; "
                        "leave the mask out or paint only the area to change")
    return m, notes


def prepare(image: Image.Image, mask: Image.Image, size: tuple[int, int], options: InpaintOptions) -> Inpainting:
    """The pictures of one inpainting job at the processing size = (width, height)."""
    image = to_rgb(image)
    m, notes = read_mask(mask, image.size, options.invert)
    m = blur_mask(m, options.blur_x, options.blur_y)
    width, height = size
    paste_to = None
    if options.full_res:
        overlay_mask = m
        box = fit_box(mask_box(m, options.padding), width, height, image.width, image.height)
        paste_to = (box[0], box[1], box[2] - box[0], box[3] - box[1])
        work = image.crop(box).resize(size, Image.LANCZOS)
        m = m.crop(box).resize(size, Image.LANCZOS)
    else:
        image = image.resize(size, Image.LANCZOS)
        m = m.resize(size, Image.LANCZOS)
        # doubled: where the blurred edge is at least half white, the repainted pixels show in full
        overlay_mask = m.point(lambda v: min(255, 2 * v))
        work = image
    overlay = image.copy()
    overlay.putalpha(ImageOps.invert(overlay_mask))
    if options.fill == "fill":
        work = fill_masked(work, m)
    return Inpainting(work, m, overlay, options, paste_to, notes)
