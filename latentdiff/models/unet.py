"""The conditioned latent U-Net of Stable Diffusion (openaimodel.UNetModel layout and parameter names).

Every module below is named as in the original `ldm.modules.diffusionmodules.openaimodel` / `ldm.modules.attention`
code, so `model.diffusion_model.*` from an SD 1.x / 2.x checkpoint loads with `load_state_dict(strict=True)`.
Block order in `input_blocks` / `output_blocks` follows the original exactly: the checkpoint indices depend on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first as in ldm (Vaswani et al. 2017, 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim) float32


def micro_conditioning(pooled: torch.Tensor, sizes: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's vector y: pooled text (B, P) and a sinusoidal embedding of each of the six numbers in `sizes`.

    sizes (B, 6) = original (h, w), crop top-left (top, left), target (h, w), as SGM's ConcatTimestepEmbedderND
    embeds them: every number on its own, `dim` channels each, in that order (Podell et al. 2023, 2.2).
    """
    B = sizes.shape[0]
    emb = timestep_embedding(sizes.reshape(-1), dim).view(B, -1)  # (B, 6*dim)
    return torch.cat([pooled.float(), emb.to(pooled.device)], dim=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in the input's dtype, with mean and variance accumulated in float32."""

    def forward(self, x):
        # ldm upcast x to float32 because fp16 sums over large maps overflow; ATen's group_norm kernels (CPU and
        # CUDA) already accumulate fp16/bf16 inputs in float32, so only the parameters need the input's dtype:
        # an fp16 model then runs as one, and under autocast group_norm is computed in float32 anyway.
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between (Ho et al. 2020, app. B)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # each block starts as the identity
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; keys and values come from `context` (text) or, when it is None, from `x` itself."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.view(B, z.shape[1], self.heads, -1).transpose(1, 2) for z in (q, k, v))  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020, eq. 5): value half times GELU of the gate half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map; proj_in/out are 1x1 convs (SD1) or Linear (SD2)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity, as in ldm
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, -1, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential whose children get what they need: ResBlocks the embedding, transformers the context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_heads: int = 8  # SD1: a head count; -1 when num_head_channels is set
    num_head_channels: int = -1  # SD2: 64 channels per head
    transformer_depth: int | tuple[int, ...] = 1  # blocks per SpatialTransformer; SDXL: one per level (0, 2, 10)
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2: proj_in / proj_out are Linear, SD1: 1x1 Conv
    norm_groups: int = 32  # GroupNorm groups (SD: 32); tiny models may use fewer
    adm_in_channels: int = 0  # SDXL: width of the vector y (pooled text + size embeddings) added to emb; 0: none

    def depth(self, level: int) -> int:
        """Transformer blocks at a channel_mult level (the middle block uses the last level's)."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]


class UNetModel(nn.Module):
    """The SD U-Net. forward(x (B,C,h,w), t (B,) int or float, context (B,L,D)) -> (B,out_channels,h,w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False  # the trainer sets this to recompute blocks in the backward pass
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if not isinstance(cfg.transformer_depth, int) and len(cfg.transformer_depth) != len(cfg.channel_mult):
            raise ValueError(f"unet.transformer_depth needs one entry per channel_mult level "
                             f"({len(cfg.channel_mult)}), got {list(cfg.transformer_depth)}")
        if cfg.adm_in_channels:  # SGM's num_classes="sequential": the name label_emb.0.* is the checkpoint's
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        def transformer(ch, level):
            if cfg.num_head_channels == -1:
                heads, dim_head = cfg.num_heads, ch // cfg.num_heads
            else:
                heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
            return SpatialTransformer(ch, heads, dim_head, cfg.depth(level), cfg.context_dim,
                                      cfg.use_linear_in_transformer, groups)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc, groups)]
                ch = mult * mc
                if ds in cfg.attention_resolutions and cfg.depth(level):
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), transformer(ch, -1), ResBlock(ch, emb_dim, ch, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mc * mult, groups)]
                ch = mc * mult
                if ds in cfg.attention_resolutions and cfg.depth(level):
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """y: (B, adm_in_channels), the SDXL vector (see micro_conditioning); required exactly when configured."""
        if not torch.is_tensor(t) or t.ndim == 0:
            t = torch.full((x.shape[0],), float(t), device=x.device)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if (y is None) != (not self.config.adm_in_channels):
            raise ValueError(f"this U-Net takes {'a' if self.config.adm_in_channels else 'no'} vector y "
                             f"(adm_in_channels={self.config.adm_in_channels})")
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
