"""Upscalers for the hires fix, by A1111's names: latent interpolation, PIL resampling, and super-resolution
networks (ESRGAN and the other architectures spandrel reads; io/upscalers.py loads their files).

A latent upscaler resizes the first pass's latents; a pixel upscaler resizes its decoded picture, which is then
encoded again. A network multiplies the size by its scale (repeatedly, up to three times, while the picture is still
smaller than the target, as A1111 does) and Lanczos takes it to the exact size.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# name -> (torch.nn.functional.interpolate mode, antialias), as A1111's latent_upscale_modes
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_MODES = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
BUILT_IN = (*LATENT_MODES, *PIXEL_MODES)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size) with one of LATENT_MODES, computed in float32."""
    mode, antialias = LATENT_MODES[name]
    return F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias)


def _ramp(n: int, ramp: int) -> torch.Tensor:
    """Blending weight over a tile side: rises linearly over `ramp` samples from each end, never 0."""
    i = torch.arange(n, dtype=torch.float32) + 0.5
    return torch.clamp(torch.minimum(i, n - i) / max(ramp, 1), max=1.0)


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    return list(range(0, n - tile, stride)) + [n - tile]


class ModelUpscaler:
    """A super-resolution network: `net` maps (B, 3, h, w) in [0, 1] to (B, 3, h*scale, w*scale).

    Large pictures run in overlapping tiles of `tile` input pixels (the network's activations grow with the area),
    blended with linear ramps over the overlap.
    """

    def __init__(self, name: str, net: Callable, scale: int, device="cpu", dtype=torch.float32, tile: int = 512,
                 overlap: int = 32):
        self.name, self.net, self.scale = name, net, scale
        self.device, self.dtype, self.tile, self.overlap = torch.device(device), dtype, tile, overlap

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the network over (1, 3, H, W) in [0, 1], tile by tile."""
        _, _, H, W = x.shape
        s, t = self.scale, self.tile
        out = torch.zeros(1, 3, H * s, W * s)
        weight = torch.zeros(1, 1, H * s, W * s)
        for y in _starts(H, t, t - self.overlap):
            for x0 in _starts(W, t, t - self.overlap):
                piece = x[:, :, y:y + t, x0:x0 + t].to(self.device, self.dtype)
                up = self.net(piece).float().cpu().clamp(0, 1)
                h, w = up.shape[-2:]
                wgt = _ramp(h, self.overlap * s)[:, None] * _ramp(w, self.overlap * s)[None, :]
                out[:, :, y * s:y * s + h, x0 * s:x0 * s + w] += up * wgt
                weight[:, :, y * s:y * s + h, x0 * s:x0 * s + w] += wgt
        return out / weight

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """The picture at size = (width, height): network passes until it is at least that large, then Lanczos."""
        for _ in range(3):
            if image.width >= size[0] and image.height >= size[1]:
                break
            x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            y = self.run(x)[0].permute(1, 2, 0).numpy()
            image = Image.fromarray(np.rint(y * 255.0).astype(np.uint8))
        return image.resize(size, Image.LANCZOS) if image.size != size else image


def upscale_image(image: Image.Image, size: tuple[int, int], upscaler: str | ModelUpscaler) -> Image.Image:
    """A decoded picture at size = (width, height) through a PIL resampler or a network."""
    if isinstance(upscaler, ModelUpscaler):
        return upscaler(image, size)
    return image.resize(size, PIXEL_MODES[upscaler])

