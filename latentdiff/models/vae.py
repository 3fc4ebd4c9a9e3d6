"""The KL autoencoder of Stable Diffusion (ldm AutoencoderKL layout and parameter names).

Encoder and Decoder follow `ldm.modules.diffusionmodules.model` module for module, so `first_stage_model.*` from
an SD checkpoint loads with `load_state_dict(strict=True)`. Images are in [-1, 1]; latents are scaled by
`scale_factor` so that they have roughly unit variance (Rombach et al. 2022, sec. 3.1 and app. G).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentdiff.models.unet import Upsample  # ldm's: nearest x2, then a 3x3 conv named `conv`, in both networks


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only right and bottom, as ldm does (the weights expect this alignment)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, cfg: "VAEConfig"):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, cfg.resolution
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, g))
                block_in = ch * mult
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: "VAEConfig"):
        super().__init__()
        g, ch = cfg.norm_groups, cfg.ch
        block_in = ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        # `up` is indexed by level (0 = full resolution) though it runs from the lowest resolution up.
        stages = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * cfg.ch_mult[level], g))
                block_in = ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) of a KL-regularized autoencoder (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # ldm's clamp: keeps exp() finite for untrained weights
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over latent elements (Kingma & Welling 2014, app. B)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are scaled by this after encoding (SD 1.x / 2.x)
    force_upcast: bool = False  # run in float32 when the model is fp16: the SDXL VAE overflows in fp16


def _ramp(n: int, ramp: int, device) -> torch.Tensor:
    """1-D blending weight: rises linearly over `ramp` samples at both ends, strictly positive everywhere."""
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    return torch.minimum(torch.ones_like(i), torch.minimum(i, n - i) / max(ramp, 1))


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


class AutoencoderKL(nn.Module):
    """encode(images in [-1, 1]) -> scaled latents; decode(scaled latents) -> images in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode_posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """q(z | images) in unscaled latent units (the KL term is defined there)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: the posterior mean when no generator is given (deterministic), else a sample from it."""
        posterior = self.encode_posterior(images)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return z * self.config.scale_factor

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode(self, latents: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
        """Images from scaled latents; with `tile` (in latents) decode overlapping tiles to bound memory."""
        z = latents / self.config.scale_factor
        if tile is None or (z.shape[-2] <= tile and z.shape[-1] <= tile):
            return self._decode(z)
        return self._decode_tiled(z, tile, overlap)

    def _decode_tiled(self, z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """Decode tiles of `tile` latents that overlap by `overlap`, blended with linear ramps over the overlap.

        Each pixel is the weighted mean of the tiles that cover it; the weights ramp up from the tile edges, so
        seams (where GroupNorm statistics and receptive fields differ between tiles) fade instead of showing.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"tiled decode needs 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        f = self.latent_factor
        B, _, h, w = z.shape
        out = weight = None
        for y in _tile_starts(h, tile, tile - overlap):
            for x in _tile_starts(w, tile, tile - overlap):
                piece = self._decode(z[:, :, y:y + tile, x:x + tile]).float()
                th, tw = piece.shape[-2:]
                if out is None:
                    out = torch.zeros(B, piece.shape[1], h * f, w * f, device=z.device)
                    weight = torch.zeros(1, 1, h * f, w * f, device=z.device)
                wgt = _ramp(th, overlap * f, z.device)[:, None] * _ramp(tw, overlap * f, z.device)[None, :]
                out[:, :, y * f:y * f + th, x * f:x * f + tw] += piece * wgt
                weight[:, :, y * f:y * f + th, x * f:x * f + tw] += wgt
        return (out / weight).to(z.dtype)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruction and posterior, for autoencoder training."""
        posterior = self.encode_posterior(images)
        z = posterior.sample(generator) if self.training else posterior.mode()
        return self._decode(z), posterior
