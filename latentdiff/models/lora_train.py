"""Trainable LoRA layers on our U-Net and text encoder, named as kohya's files name them.

Each wrapped layer keeps its weight and its name; the layer's forward becomes `base(x) + s * up(down(x))` with
`s = alpha / rank` (Hu et al. 2021, eq. 3), set on the instance as kohya's sd-scripts do, so the base state dict,
checkpoints and parameter names stay exactly those of the model. The factors live in a separate module
(`LoraNetwork`), keyed by the kohya module name, whose state dict is the kohya file itself:
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` (r, in), `.lora_up.weight`
(out, r), `.alpha`. 3x3 convs (LoCon) get a 3x3 down with the base conv's stride and padding and a 1x1 up.

Names come from models/lora.py's tables, the ones the loader reads: the U-Net by diffusers module names (kohya's
spelling for SD 1.x / 2.x), the text encoder by Hugging Face CLIP names, whose q / k / v are row blocks of
open_clip's fused `in_proj_weight`; there the attention is recomputed with the three deltas added to the fused
projection's output.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentdiff.models.lora import name_table, unet_diffusers_names
from latentdiff.models.unet import CrossAttention, Downsample, FeedForward, ResBlock, SpatialTransformer, Upsample

# What `targets` may name: attention q/k/v/out, feed-forward, the transformers' proj_in/out, ResBlock and
# resampler convs (LoCon). kohya's default network (networks.lora without conv_dim) is attn + ff + proj.
TARGETS = ("attn", "ff", "proj", "resblock")


class LoraLayer(nn.Module):
    """down (r, in[, kh, kw]) then up (out, r[, 1, 1]), times alpha / r; up starts at zero, so training starts at
    the base model (kohya's and PEFT's initialisation)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, gen: torch.Generator,
                 in_features: int | None = None, out_features: int | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(in_features or base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features or base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=gen)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale, self.dropout = float(alpha) / rank, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:  # on the down projection's output: kohya's network_dropout
            h = F.dropout(h, self.dropout)
        return self.lora_up(h) * self.scale


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _added(base_forward, layer: LoraLayer, x):
    y = base_forward(x)
    return y + layer(x).to(y.dtype)


def _attention(mha: nn.MultiheadAttention, qkv: tuple[LoraLayer, LoraLayer, LoraLayer], query, key=None, value=None,
               need_weights=False, attn_mask=None, **_):
    """open_clip's self-attention (batch first) with each LoRA's delta added to its block of the fused q/k/v
    projection; out_proj is called as a module so that its own LoRA applies."""
    B, L, D = query.shape
    h = mha.num_heads
    proj = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
    proj = proj + torch.cat([layer(query) for layer in qkv], dim=-1).to(proj.dtype)
    q, k, v = proj.view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)  # each (B, heads, L, head dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return mha.out_proj(out.transpose(1, 2).reshape(B, L, D)), None


def _unet_layers(unet: nn.Module, targets) -> dict[str, nn.Module]:
    """Our module name -> Linear / Conv2d for each targeted kind."""
    found = {}
    for name, module in unet.named_modules():
        kind = ("attn" if isinstance(module, CrossAttention) else "ff" if isinstance(module, FeedForward)
                else "resblock" if isinstance(module, (ResBlock, Downsample, Upsample)) else None)
        if isinstance(module, SpatialTransformer) and "proj" in targets:
            found |= {f"{name}.{p}": getattr(module, p) for p in ("proj_in", "proj_out")}
        if kind in targets:
            found |= {f"{name}.{child}": m for child, m in module.named_modules()
                      if isinstance(m, (nn.Linear, nn.Conv2d))}
    return found


class LoraNetwork(nn.Module):
    """The trainable factors, one LoraLayer per kohya module name; `remove()` gives the modules their forward back."""

    def __init__(self, unet: nn.Module, text: nn.Module | None, rank: int, alpha: float, targets=TARGETS[:3],
                 dropout: float = 0.0, seed: int = 0, text_encoder: bool = True):
        super().__init__()
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; use some of {', '.join(TARGETS)}")
        self.layers = nn.ModuleDict()
        self._wrapped: list[nn.Module] = []
        table = name_table(unet, text) if text is not None else None  # the loader's names, to check ours by
        plan = self._unet_plan(unet, targets) + (self._text_plan(text, table, targets) if text_encoder and text else [])
        if not plan:
            raise ValueError(f"the targets {', '.join(targets)} match no layer of this model")
        for key, _, _, _ in plan:
            if table is not None and key not in table:  # the loader must read back every name written
                raise KeyError(f"{key} is not a name the LoRA loader knows")
        narrow = min(plan, key=lambda p: p[3])
        if not 1 <= rank <= narrow[3]:
            raise ValueError(f"rank {rank} must be between 1 and the narrowest targeted layer's width, "
                             f"{narrow[3]} ({narrow[0]})")
        gen = torch.Generator().manual_seed(seed)  # the same factors on every rank and every run of a config
        for key, module, shape, _ in plan:
            self.layers[key] = LoraLayer(module, rank, alpha, dropout, gen, *shape).to(module_device(module))
        self.rank, self.alpha = rank, float(alpha)
        self._attach(plan)

    @staticmethod
    def _unet_plan(unet, targets) -> list:
        """(kohya name, module, (in, out) for Linears given explicitly or None, width) per U-Net layer."""
        diffusers = unet_diffusers_names(unet)
        plan = []
        for name, m in _unet_layers(unet, targets).items():
            key = "lora_unet_" + diffusers[name + ".weight"][:-len(".weight")].replace(".", "_")
            width = min(m.weight.shape[0], math.prod(m.weight.shape[1:]))
            plan.append((key, m, (), width))
        return plan

    @staticmethod
    def _text_plan(text, table, targets) -> list:
        """q / k / v (rows of in_proj: (in, out) given), out_proj, mlp fc1 / fc2, by the loader's HF CLIP names."""
        plan, width = [], text.config.width
        names = {(t.weight, t.rows): k for k, t in table.items() if t.root == "text" and "_text_model_" in k}
        for i, block in enumerate(text.transformer.resblocks):
            prefix = f"transformer.resblocks.{i}."
            if "attn" in targets:
                for j in range(3):
                    key = names[(prefix + "attn.in_proj_weight", (j * width, (j + 1) * width))]
                    plan.append((key, block.attn, (width, width), width))
                plan.append((names[(prefix + "attn.out_proj.weight", None)], block.attn.out_proj, (), width))
            if "ff" in targets:
                for part in ("c_fc", "c_proj"):
                    plan.append((names[(f"{prefix}mlp.{part}.weight", None)], getattr(block.mlp, part), (), width))
        return plan

    def _attach(self, plan):
        qkv: dict[int, list] = {}
        for key, module, _, _ in plan:
            layer = self.layers[key]
            if isinstance(module, nn.MultiheadAttention):
                qkv.setdefault(id(module), [module]).append(layer)
            else:
                module.forward = functools.partial(_added, module.forward, layer)
                self._wrapped.append(module)
        for mha, *layers in qkv.values():
            mha.forward = functools.partial(_attention, mha, tuple(layers))
            self._wrapped.append(mha)

    def __getstate__(self):  # a copy (the EMA's) holds the factors only: not the wrapped modules, not attached
        return self.__dict__ | {"_wrapped": []}

    def remove(self):
        """Undo the wrapping: every module runs its own forward again."""
        for module in self._wrapped:
            del module.forward
        self._wrapped.clear()

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """The factors under kohya's names, ready for a .safetensors file."""
        return {k.removeprefix("layers."): v.detach().contiguous() for k, v in self.state_dict().items()}
