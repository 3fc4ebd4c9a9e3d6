"""The VAE in tiles, equal to the whole-picture VAE: for pictures whose activations do not fit at once.

Cutting the picture into tiles and running the decoder on each changes the result in two ways: a convolution at
a tile's edge sees zeros instead of the neighbouring tile, and each GroupNorm normalises with its tile's statistics
instead of the picture's (blending overlapping tiles hides the first and smears the second into colour drifts).
Here neither happens:

- each tile carries a halo of neighbouring latents at least as wide as the receptive field of the tiled layers, so
  the tile's interior is computed from the same inputs as in the whole picture (the halo itself is thrown away);
- the tiles advance in lockstep, one GroupNorm at a time: every tile runs up to the next norm, the norm's mean and
  variance are summed (in float64) over all tiles' interiors, and every tile is normalised with those.

The parts at the latent resolution that see the whole picture (the middle blocks' attention, and the encoder's
last norm and convolution) run whole: they are the smallest tensors of the network. Between two norms only the
running tile is on the device; the others are parked in host memory when the VAE is on a GPU.
The result equals the untiled VAE to float rounding (tests/test_hires.py checks it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _Tile:
    """One tile's running activation h, the residual kept across a block's norms, and where its interior is."""

    def __init__(self, h: torch.Tensor, interior: tuple[int, int, int, int], origin: tuple[int, int], scale: int):
        self.h, self.skip, self.scale = h, None, scale  # scale: pixels of h per latent
        self.interior, self.origin = interior, origin  # in latents: (top, bottom, left, right) in h; (top, left)

    def core(self, x: torch.Tensor | None = None) -> torch.Tensor:
        t, b, l, r = (v * self.scale for v in self.interior)
        return (self.h if x is None else x)[:, :, t:b, l:r]

    def move(self, device):
        self.h = self.h.to(device)
        if self.skip is not None:
            self.skip = self.skip.to(device)


def _resnet(block, tile: _Tile):
    """models.vae.ResnetBlock.forward for one tile; yields each GroupNorm for the driver to apply."""
    tile.skip = tile.h
    yield block.norm1
    tile.h = block.conv1(F.silu(tile.h))
    yield block.norm2
    tile.h = block.conv2(F.silu(tile.h))
    tile.h = (block.nin_shortcut(tile.skip) if hasattr(block, "nin_shortcut") else tile.skip) + tile.h
    tile.skip = None


def _decoder_up(decoder, tile: _Tile):
    """Decoder.forward after the middle blocks, for one tile."""
    for stage in reversed(decoder.up):
        for block in stage.block:
            yield from _resnet(block, tile)
        if hasattr(stage, "upsample"):
            tile.h = stage.upsample(tile.h)
            tile.scale *= 2
    yield decoder.norm_out
    tile.h = decoder.conv_out(F.silu(tile.h))


def _encoder_down(encoder, tile: _Tile):
    """Encoder.forward up to the middle blocks, for one tile."""
    tile.h = encoder.conv_in(tile.h)
    for stage in encoder.down:
        for block in stage.block:
            yield from _resnet(block, tile)
        if hasattr(stage, "downsample"):
            tile.h = stage.downsample(tile.h)
            tile.scale //= 2


def _group_norm(x: torch.Tensor, norm, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    B, C = x.shape[:2]
    g = norm.num_groups
    y = (x.double().view(B, g, C // g, *x.shape[2:]) - mean.view(B, g, 1, 1, 1)) * rstd.view(B, g, 1, 1, 1)
    dt = torch.promote_types(x.dtype, torch.float32)  # the affine part as GroupNorm computes it
    return (y.view_as(x).to(dt) * norm.weight.to(dt).view(1, C, 1, 1) + norm.bias.to(dt).view(1, C, 1, 1)).to(x.dtype)


def _lockstep(tiles: list[_Tile], program, device: torch.device) -> None:
    """Run program(tile) over all tiles, one GroupNorm at a time, each applied with the whole picture's statistics
    (summed over the tiles' interiors). On a GPU the tiles wait in host memory between norms."""
    park = torch.device("cpu") if device.type != "cpu" else None
    runs = [program(t) for t in tiles]
    norm, stats = None, None
    while True:
        sums, nxt = None, set()
        for run, tile in zip(runs, tiles):
            if park is not None:
                tile.move(device)
            if norm is not None:
                tile.h = _group_norm(tile.h, norm, *stats)
            step = next(run, None)
            nxt.add(step)
            if step is not None:
                x = tile.core().double()
                x = x.reshape(x.shape[0], step.num_groups, -1)
                part = torch.stack([x.sum(-1), (x * x).sum(-1), torch.full_like(x[..., 0], x.shape[-1])])
                sums = part if sums is None else sums + part
            if park is not None:
                tile.move(park)
        if len(nxt) != 1:
            raise RuntimeError("tiles took different paths through the network")
        norm = nxt.pop()
        if norm is None:
            return
        mean = sums[0] / sums[2]
        var = (sums[1] / sums[2] - mean * mean).clamp_min(0)
        stats = mean, torch.rsqrt(var + norm.eps)


def _cut(x: torch.Tensor, tile: int, halo: int, scale: int, park) -> list[_Tile]:
    """Tiles of `tile` latents (scale: pixels of x per latent) with `halo` latents around each, cut at the edges."""
    h, w = x.shape[-2] // scale, x.shape[-1] // scale
    tiles = []
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            t0, l0 = max(0, top - halo), max(0, left - halo)
            b0, r0 = min(h, bottom + halo), min(w, right + halo)
            piece = x[:, :, t0 * scale:b0 * scale, l0 * scale:r0 * scale]
            tiles.append(_Tile(piece.to(park) if park is not None else piece,
                               (top - t0, bottom - t0, left - l0, right - l0), (top, left), scale))
    return tiles


def _paste(tiles: list[_Tile], shape, device, dtype) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    for t in tiles:
        core = t.core().to(device)
        y, x = (v * t.scale for v in t.origin)
        out[:, :, y:y + core.shape[-2], x:x + core.shape[-1]] = core
    return out


def decoder_halo(vae) -> int:
    """Latents of context a decoder tile needs on each side: the reach of the 3x3 convolutions after the middle
    blocks, each counted in latents at its own resolution (plus one for the upsampling's rounding)."""
    cfg, levels = vae.config, len(vae.config.ch_mult)
    reach = 0.0
    for level in range(levels):  # level 0 is the full resolution
        scale = 2 ** (levels - 1 - level)
        reach += 2 * (cfg.num_res_blocks + 1) / scale + (1 / (2 * scale) if level else 0)
    return math.ceil(reach + 1 / 2 ** (levels - 1)) + 1


def encoder_halo(vae) -> int:
    """As decoder_halo, for the encoder up to its middle blocks (a stride-2 convolution reaches two inputs on)."""
    cfg, levels = vae.config, len(vae.config.ch_mult)
    reach = 1 / 2 ** (levels - 1)
    for level in range(levels):
        scale = 2 ** (levels - 1 - level)
        reach += 2 * cfg.num_res_blocks / scale + (2 / scale if level < levels - 1 else 0)
    return math.ceil(reach) + 1


def tileable(vae) -> bool:
    """The tiled path covers the SD layout: no attention outside the middle blocks."""
    return not any(len(s.attn) for s in vae.decoder.up) and not any(len(s.attn) for s in vae.encoder.down)


@torch.no_grad()
def tiled_decode(vae, latents: torch.Tensor, tile: int) -> torch.Tensor:
    """vae.decode(latents) computed `tile` x `tile` latents at a time."""
    dec = vae.decoder
    z = vae.post_quant_conv(latents / vae.config.scale_factor)
    h = dec.mid.block_2(dec.mid.attn_1(dec.mid.block_1(dec.conv_in(z))))  # whole: attention sees every latent
    park = torch.device("cpu") if h.device.type != "cpu" else None
    tiles = _cut(h, tile, decoder_halo(vae), 1, park)
    del h
    _lockstep(tiles, lambda t: _decoder_up(dec, t), z.device)
    f = vae.latent_factor
    return _paste(tiles, (z.shape[0], vae.config.out_ch, z.shape[-2] * f, z.shape[-1] * f), z.device, z.dtype)


@torch.no_grad()
def tiled_encode(vae, images: torch.Tensor, tile: int) -> torch.Tensor:
    """vae.encode(images) (the posterior mean, scaled) computed `tile` x `tile` latents at a time; the picture's
    sides must be multiples of the latent factor."""
    enc, f = vae.encoder, vae.latent_factor
    park = torch.device("cpu") if images.device.type != "cpu" else None
    tiles = _cut(images, tile, encoder_halo(vae), f, park)
    _lockstep(tiles, lambda t: _encoder_down(enc, t), images.device)
    width = enc.mid.block_1.norm1.num_channels
    h = _paste(tiles, (images.shape[0], width, images.shape[-2] // f, images.shape[-1] // f), images.device,
               images.dtype)
    h = enc.conv_out(F.silu(enc.norm_out(enc.mid.block_2(enc.mid.attn_1(enc.mid.block_1(h))))))
    mean = vae.quant_conv(h).chunk(2, dim=1)[0]
    return mean * vae.config.scale_factor
