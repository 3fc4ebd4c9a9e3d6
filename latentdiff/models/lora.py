"""LoRA and LyCORIS adapters on our modules: the name tables, the keys of each file format, the weight deltas, and
applying them with the original weights kept so that removing them restores every weight bit for bit.

Name tables. A LoRA file names the layer it changes by a module path with its dots turned into underscores
(kohya: `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), and underscores are part of the real
names too, so the path cannot be turned back. As A1111, ComfyUI and stable-diffusion.cpp do, we build the table the
other way: from our own modules' names, every spelling a file may use -> the parameter it means.
    U-Net: our ldm names (SDXL kohya files) and the diffusers names of the same modules (SD 1.x/2.x kohya files,
           diffusers / PEFT files), from `unet_diffusers_names`, which walks the blocks as UNetModel builds them.
    Text:  Hugging Face CLIP names (every trainer works on transformers' CLIPTextModel); q/k/v go to row blocks of
           open_clip's fused in_proj_weight (SD 2.x, SDXL bigG and our own encoders).

Deltas (A1111's extensions-builtin/Lora and LyCORIS define them; `r` is the rank, `s = alpha / r`, 1 without alpha):
    LoRA / LoCon   dW = s * up @ down           (conv: up (out, r, 1, 1), down (r, in, kh, kw), flattened)
    LoCon CP       dW = s * einsum(mid (r, r, kh, kw), up, down)
    LoHa           dW = s * (w1a @ w1b) * (w2a @ w2b)   (Hadamard product; hada_t1/t2: each factor a Tucker rebuild)
    LoKr           dW = s * kron(w1, w2)        (each of w1, w2 whole or a product a @ b; lokr_t2: Tucker w2)
    full diff      dW = diff (and diff_b on the bias)
    DoRA           W' = (W + dW) * dora_scale / ||W + dW||, the norm per input column (kohya, LyCORIS default) or
                   per output row (dora_scale shaped (out, 1...), PEFT's lora_magnitude_vector); the change it makes,
                   W' - W, is what the multiplier scales, as A1111 and ComfyUI apply it.
Every delta is computed in float32 (or the dtype asked for) from the original weight, times the multiplier, summed
over the adapters, then added to the weight once and cast to its dtype.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn


class AdapterError(ValueError):
    """An adapter file that cannot be applied to this model; the message says why (the caller adds the file)."""


# ----------------------------------------------------------------------------------------------
# Name tables


_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _unet_blocks(cfg) -> dict[str, tuple[str, str]]:
    """ldm block path -> (diffusers block path, kind: resnet | attention | sampler), walked as UNetModel builds."""
    blocks, n = {}, 1
    levels = len(cfg.channel_mult)

    def attends(level):
        return 2 ** level in cfg.attention_resolutions and cfg.depth(level)
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if attends(level):
                blocks[f"input_blocks.{n}.1"] = (f"down_blocks.{level}.attentions.{j}", "attention")
            n += 1
        if level != levels - 1:
            blocks[f"input_blocks.{n}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", "sampler")
            n += 1
    blocks["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    blocks["middle_block.1"] = ("mid_block.attentions.0", "attention")
    blocks["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    n = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            blocks[f"output_blocks.{n}.0"] = (f"up_blocks.{i}.resnets.{j}", "resnet")
            k = 1
            if attends(level):
                blocks[f"output_blocks.{n}.1"] = (f"up_blocks.{i}.attentions.{j}", "attention")
                k = 2
            if level and j == cfg.num_res_blocks:
                blocks[f"output_blocks.{n}.{k}.conv"] = (f"up_blocks.{i}.upsamplers.0.conv", "sampler")
            n += 1
    return blocks


def unet_diffusers_names(unet: nn.Module) -> dict[str, str]:
    """Our U-Net parameter name -> the name diffusers' UNet2DConditionModel gives the same tensor."""
    blocks = _unet_blocks(unet.config)
    out = {}
    for name, _ in unet.named_parameters():
        module, _, leaf = name.rpartition(".")
        hit = next((b for b in (*_TOP, *blocks) if module == b or module.startswith(b + ".")), None)
        if hit is None:
            raise KeyError(f"{name} has no diffusers name")
        if hit in _TOP:
            new = _TOP[hit] + module[len(hit):]
        else:
            path, kind = blocks[hit]
            rest = module[len(hit) + 1:]
            if kind == "resnet":
                rest = _RESNET[rest]
            new = path + ("." + rest if rest else "")
        out[name] = f"{new}.{leaf}"
    return out


@dataclass(frozen=True)
class Target:
    """Where a file's module lands: a weight of one of our roots, or a block of its rows (q, k or v in in_proj)."""
    root: str  # "unet" or "text"
    weight: str  # parameter name in the root
    rows: tuple[int, int] | None = None
    transpose: bool = False  # OneTrainer's te2 text_projection: a Linear weight, ours is its transpose
    shape: tuple[int, ...] = ()  # the shape an adapter's delta must have
    has_bias: bool = False  # whether a full diff's diff_b has somewhere to go

    @property
    def bias(self) -> str:
        return self.weight[:-len("weight")] + "bias"


# Hugging Face CLIPTextModel layer names -> open_clip's (the models are the same, the names differ).
_HF_TO_OPEN_CLIP = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}


def _text_targets(encoder: nn.Module, root_prefix: str, kohya: str) -> dict[str, Target]:
    table = {}
    width = encoder.config.width
    for i in range(encoder.config.layers):
        block = f"{root_prefix}transformer.resblocks.{i}."
        for j, c in enumerate("qkv"):
            table[f"{kohya}_encoder_layers_{i}_self_attn_{c}_proj"] = Target(
                "text", block + "attn.in_proj_weight", (j * width, (j + 1) * width), shape=(width, width),
                has_bias=True)
        for hf, ours in _HF_TO_OPEN_CLIP.items():
            w = encoder.get_parameter(f"transformer.resblocks.{i}.{ours}.weight")
            table[f"{kohya}_encoder_layers_{i}_{hf}"] = Target("text", f"{block}{ours}.weight", shape=tuple(w.shape),
                                                               has_bias=True)
    if getattr(encoder, "text_projection", None) is not None:
        table[f"{kohya}_text_projection"] = Target("text", root_prefix + "text_projection", transpose=True,
                                                   shape=tuple(encoder.text_projection.shape[::-1]))
    return table


def name_table(unet: nn.Module, text: nn.Module) -> dict[str, Target]:
    """Every module name an adapter file may use for a weight of ours (kohya spelling: prefix, dots as `_`)."""
    table = {}
    renamed = unet_diffusers_names(unet)
    names = set(renamed)
    for name, p in unet.named_parameters():
        if not name.endswith(".weight") or p.ndim < 2:
            continue  # norms and biases: no adapter format targets them alone
        target = Target("unet", name, shape=tuple(p.shape), has_bias=name[:-len("weight")] + "bias" in names)
        for spelling in (name, renamed[name]):
            key = "lora_unet_" + spelling[:-len(".weight")].replace(".", "_")
            if table.get(key, target) != target:
                raise KeyError(f"two U-Net weights are both spelled {key}")
            table[key] = target
    encoders = [("clip_l.", text.clip_l, "lora_te1"), ("clip_g.", text.clip_g, "lora_te2")] \
        if hasattr(text, "clip_g") else [("", text, "lora_te")]
    for root_prefix, encoder, kohya in encoders:
        for key, target in _text_targets(encoder, root_prefix, kohya).items():
            table[key.replace(f"{kohya}_", f"{kohya}_text_model_", 1) if "_encoder_" in key else key] = target
            table[key] = target  # transformers 5 dropped the `text_model.` level, and some files with it
    return table


# ----------------------------------------------------------------------------------------------
# File keys -> modules and their tensors


# The tensor names of each format, by what they are called in each spelling -> our canonical name.
_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
          "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
          "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
          "alpha": "alpha", "dora_scale": "dora_scale", "lora_magnitude_vector": "magnitude",
          "lora_magnitude_vector.weight": "magnitude", "diff": "diff", "diff_b": "diff_b",
          "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1",
          "hada_t2": "t2", "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2",
          "lokr_w2_a": "w2a", "lokr_w2_b": "w2b", "lokr_t2": "t2", "scale": "scale"}
_SUFFIX = re.compile(r"\.(" + "|".join(re.escape(s) for s in sorted(_PARTS, key=len, reverse=True)) + r")$")
# diffusers / PEFT module prefixes -> kohya's; which text prefix depends on the model (SDXL has two encoders).
_DIFFUSERS_PREFIXES = {"unet.": "lora_unet", "text_encoder.": "te", "text_encoder_2.": "lora_te2"}
# diffusers' older attention-processor LoRAs: attn1.processor.to_q_lora.down.weight is attn1.to_q's down factor
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")


def module_key(module: str, sdxl: bool) -> str:
    """A file's module name (kohya, or diffusers / PEFT dotted) in the kohya spelling the name table uses."""
    if module.startswith("lora_"):
        return module
    module = module.removeprefix("base_model.model.")
    for prefix, kohya in _DIFFUSERS_PREFIXES.items():
        if module.startswith(prefix):
            rest = module[len(prefix):]
            if kohya == "te":
                kohya = "lora_te1" if sdxl else "lora_te"
            return kohya + "_" + rest.replace(".", "_")
    return module


def group_modules(state: dict[str, torch.Tensor], sdxl: bool) -> tuple[dict[str, dict[str, torch.Tensor]], list]:
    """{module (kohya spelling): {part: tensor}} and the keys that are no adapter tensor we know."""
    groups, unknown = {}, []
    for key, value in state.items():
        key = _OLD_PROCESSOR.sub(lambda m: f".{m[1] if m[1] != 'to_out' else 'to_out.0'}.lora.{m[2]}.weight", key)
        m = _SUFFIX.search(key)
        if m is None:
            unknown.append(key)
            continue
        groups.setdefault(module_key(key[:m.start()], sdxl), {})[_PARTS[m[1]]] = value
    return groups, unknown


# ----------------------------------------------------------------------------------------------
# Deltas


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _tucker(t, a, b):
    """LyCORIS' Tucker rebuild: t (r1, r2, kh, kw), a (r1, out), b (r2, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, a, b)


def _scale(t: dict, rank: int | None) -> float:
    """alpha / rank (1 without either); a stored `scale` replaces it, as in A1111."""
    if "scale" in t:
        return float(t["scale"])
    return 1.0 if t.get("alpha") is None or rank is None else float(t["alpha"]) / rank


def _lora_factors(t: dict, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA's (up, down) as matrices, the scale (alpha / rank, times gain) on down, the smaller one."""
    return _flat(t["up"]), _flat(t["down"]) * (_scale(t, t["down"].shape[0]) * gain)


@dataclass
class Patch:
    """One module's adapter: `kind` (lora, loha, lokr, full) and its tensors under canonical names."""
    module: str
    target: Target
    kind: str
    tensors: dict[str, torch.Tensor]

    def delta(self, weight: torch.Tensor, dtype=torch.float32, mult: float = 1.0):
        """(dW in the weight's shape, d bias or None) times the multiplier, computed in dtype (from `weight` for DoRA).

        Scales go on the smallest tensor they can: a LoRA's down factor, not the full-size product.
        """
        t = {k: v.to(weight.device, dtype) for k, v in self.tensors.items()}
        dora = "dora_scale" in t
        gain = 1.0 if dora else mult  # DoRA's multiplier scales its own result, below
        if self.kind == "full":
            return t["diff"].reshape(weight.shape) * mult, t["diff_b"] * mult if "diff_b" in t else None
        if self.kind == "lora":
            up, down = _lora_factors(t, gain)
            if "mid" in t:
                dw = torch.einsum("n m k l, i n, m j -> i j k l", t["mid"], up, down)
            else:
                dw = up @ down
        elif self.kind == "loha":
            halves = []
            for i in "12":
                a, b, core = t[f"w{i}a"], t[f"w{i}b"], t.get(f"t{i}")
                halves.append(_tucker(core, a, b) if core is not None else _flat(a) @ _flat(b))
            dw = halves[0] * halves[1] * (_scale(t, t["w1b"].shape[0]) * gain)
        else:  # lokr
            w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
            if "w2" in t:
                w2 = t["w2"]
            elif "t2" in t:
                w2 = _tucker(t["t2"], t["w2a"], t["w2b"])
            else:
                w2 = (t["w2a"] @ _flat(t["w2b"])).reshape(t["w2a"].shape[0], *t["w2b"].shape[1:])
            while w1.ndim < w2.ndim:
                w1 = w1.unsqueeze(-1)
            rank = t["w2b"].shape[0] if "w2b" in t else t["w1b"].shape[0] if "w1b" in t else None
            dw = torch.kron(w1, w2.contiguous()) * (_scale(t, rank) * gain)
        dw = dw.reshape(weight.shape)
        if dora:  # the only format that reads the weight itself
            dw = _dora(weight.to(dtype), dw, t["dora_scale"]) * mult
        return dw, None

    def low_rank(self) -> bool:
        """A plain LoRA on a whole weight (no mid, no DoRA, no row block or transpose): Patcher's fast path."""
        return (self.kind == "lora" and not {"mid", "dora_scale"} & self.tensors.keys()
                and not (self.target.rows or self.target.transpose))

    def shape(self) -> tuple[int, ...]:
        """The shape the delta comes out in, from the factors' shapes alone; AdapterError when they do not chain."""
        t = {k: tuple(v.shape) for k, v in self.tensors.items()}
        if self.kind == "full":
            return t["diff"]
        if self.kind == "lora":
            up, down, mid = t["up"], t["down"], t.get("mid")
            ranks = (up[1] if len(up) > 1 else None, down[0]) if mid is None else (up[1], mid[0], mid[1], down[0])
            if len(up) < 2 or len(down) < 2 or len(set(ranks)) != 1:
                raise AdapterError(f"rank mismatch in {self.module}: lora_up {list(up)}, lora_down {list(down)}"
                                   + (f", lora_mid {list(mid)}" if mid else ""))
            return (up[0], math.prod(down[1:])) if mid is None else (up[0], down[1], *mid[2:])
        if self.kind == "loha":
            shapes = []
            for i in "12":
                a, b, core = t[f"w{i}a"], t[f"w{i}b"], t.get(f"t{i}")
                ok = (a[0], b[0]) == core[:2] if core else len(a) == 2 and a[1] == b[0]
                if not ok:
                    raise AdapterError(f"rank mismatch in {self.module}: hada_w{i}_a {list(a)}, hada_w{i}_b "
                                       f"{list(b)}" + (f", hada_t{i} {list(core)}" if core else ""))
                shapes.append((a[1], b[1], *core[2:]) if core else (a[0], math.prod(b[1:])))
            if shapes[0] != shapes[1]:
                raise AdapterError(f"{self.module}: its two LoHa halves have shapes {list(shapes[0])} and "
                                   f"{list(shapes[1])}")
            return shapes[0]
        pairs = [("w1a", "w1b"), ("w2a", "w2b")]
        for a, b in pairs:
            if a in t and (b not in t or (t[a][-1] != t[b][0] and "t2" not in t)):
                raise AdapterError(f"rank mismatch in {self.module}: lokr_{a[:2]}_a {list(t[a])}, "
                                   f"lokr_{a[:2]}_b {list(t.get(b, ()))}")
        w1 = t["w1"] if "w1" in t else (t["w1a"][0], t["w1b"][1])
        if "w2" in t:
            w2 = t["w2"]
        elif "t2" in t:
            w2 = (t["w2a"][1], t["w2b"][1], *t["t2"][2:])
        else:
            w2 = (t["w2a"][0], *t["w2b"][1:])
        w1 = w1 + (1,) * (len(w2) - len(w1))
        return tuple(x * y for x, y in zip(w1, w2))

    def check(self) -> str | None:
        """Why this module cannot change the target weight (None when it can); AdapterError for a broken file."""
        shape, want = self.shape(), self.target.shape
        if math.prod(shape) != math.prod(want) or shape[0] != want[0]:
            return f"{self.module}: the file's {list(shape)} does not fit the model's {list(want)}"
        if "diff_b" in self.tensors and (not self.target.has_bias or self.tensors["diff_b"].numel() != want[0]):
            return f"{self.module}: its diff_b {list(self.tensors['diff_b'].shape)} has no bias of that size to change"
        scale = self.tensors.get("dora_scale")
        if scale is not None and scale.numel() not in (want[0], want[1]):
            return f"{self.module}: its dora_scale {list(scale.shape)} does not fit the model's {list(want)}"
        return None


def _dora(weight: torch.Tensor, dw: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024): the merged weight's direction with the stored magnitude, as a change to `weight`."""
    merged = weight + dw
    on_out = magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]
    if on_out:  # per output row (PEFT's lora_magnitude_vector; LyCORIS wd_on_out)
        norm = _flat(merged).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        magnitude = magnitude.reshape(norm.shape)
    else:  # per input column (kohya's and LyCORIS' dora_scale (1, in, 1...))
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (weight.ndim - 2))
        magnitude = magnitude.reshape(norm.shape)
    return merged * (magnitude / (norm + torch.finfo(weight.dtype).eps)) - weight


# kind: (tensors it needs, one of each group of alternatives, tensors it may have)
_KINDS = {"lora": ({"down", "up"}, (), {"mid"}),
          "loha": ({"w1a", "w1b", "w2a", "w2b"}, (), {"t1", "t2"}),
          "lokr": (set(), ({"w1"}, {"w1a", "w1b"}), {"w2", "w2a", "w2b", "t2"}),
          "full": ({"diff"}, (), {"diff_b"})}
_ANY = {"alpha", "scale", "dora_scale"}


def _kind(parts: dict) -> str | None:
    """Which format a module's tensors are (None: an adapter type we do not apply, e.g. IA3, OFT, GLoRA)."""
    if "magnitude" in parts:  # PEFT's DoRA magnitude: dora_scale on the output axis
        parts["dora_scale"] = parts.pop("magnitude")
    have = set(parts) - _ANY
    for kind, (need, alternatives, optional) in _KINDS.items():
        allowed = need | optional | set().union(*alternatives)
        if need <= have <= allowed and (not alternatives or any(a <= have for a in alternatives)):
            if kind != "lokr" or "w2" in have or {"w2a", "w2b"} <= have:
                return kind
    return None


# ----------------------------------------------------------------------------------------------
# Adapters: a file's patches, checked against a model


@dataclass
class Adapter:
    """An adapter file read against one model: its patches, and the file keys that matched nothing there."""
    name: str
    patches: list[Patch]
    unmatched: list[str]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


def family(unet: nn.Module, text: nn.Module) -> str:
    """SD 1.x, SD 2.x, SDXL, or another (our own) model, from the text encoders."""
    if hasattr(text, "clip_g"):
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(text.config.width, "latentdiff")


def _file_family(metadata: dict[str, str], groups) -> str | None:
    """The base a file says it was trained on: kohya's ss_base_model_version / ss_v2, or SDXL-only keys."""
    base = metadata.get("ss_base_model_version", "").lower()
    if base.startswith("sdxl"):
        return "SDXL"
    if base.startswith(("sd_v2", "sd_2")) or metadata.get("ss_v2", "").lower() == "true":
        return "SD 2.x"
    if base.startswith(("sd_v1", "sd_1")):
        return "SD 1.x"
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in groups):
        return "SDXL"
    return None


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def read_adapter(state: dict[str, torch.Tensor], metadata: dict[str, str], table: dict[str, Target], model_family: str,
                 name: str = "adapter") -> Adapter:
    """An adapter from a file's tensors, every check made before anything is applied (AdapterError: why not)."""
    groups, unknown = group_modules(state, sdxl=model_family == "SDXL")
    base = _file_family(metadata, groups)
    if base and model_family != "latentdiff" and base != model_family:
        raise AdapterError(f"it is a LoRA for {base}, and this model is {model_family}: use one made for this base")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"{len(bad)} of its tensors hold NaN or infinity ({_few(bad)}): the file is damaged")
    _peft_alpha(groups, metadata)
    patches, unmatched, misfits = [], list(unknown), []
    for module, parts in groups.items():
        target = table.get(module)
        kind = _kind(parts)
        if target is None or kind is None:
            unmatched += [f"{module}.{p}" for p in parts]
            continue
        patch = Patch(module, target, kind, parts)
        problem = patch.check()
        (misfits if problem else patches).append(problem or patch)
    if misfits:
        where = f" ({base})" if base else ""
        raise AdapterError(f"{len(misfits)} of its modules do not fit this {model_family} model's weights (e.g. "
                           f"{misfits[0]}): it was made for another base model{where}")
    if not patches:
        raise AdapterError(f"none of its {len(state)} keys matches a layer of this {model_family} model "
                           f"(e.g. {_few(sorted(state))}): not a LoRA / LyCORIS file for this model")
    return Adapter(name, patches, sorted(unmatched), metadata)


def _peft_alpha(groups, metadata):
    """diffusers keeps a PEFT file's lora_alpha in its metadata (`lora_adapter_metadata`: {"unet.lora_alpha": 8,
    ...}), not beside each module; a module without its own alpha takes its section's."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    sections = (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                ("lora_te_", "text_encoder"))
    for module, parts in groups.items():
        section = next((s for prefix, s in sections if module.startswith(prefix)), None)
        alpha = config.get(f"{section}.lora_alpha")
        if "alpha" not in parts and "down" in parts and isinstance(alpha, (int, float)):
            parts["alpha"] = torch.tensor(float(alpha))


# ----------------------------------------------------------------------------------------------
# Applying: the original weights are kept, so removing or changing adapters restores them bit for bit


class Patcher:
    """Applies a set of adapters, each with a U-Net and a text-encoder multiplier, to the modules' weights in place
    (CUDA graphs captured on them keep working); `apply([])` puts every original weight back."""

    def __init__(self, unet: nn.Module, text: nn.Module, keep_originals: bool = True):
        """keep_originals=False: for a merge that is never undone, where memory for the originals is short (the
        full-size SDXL parity test holds one fp32 U-Net, not two); such a Patcher applies once."""
        self.roots = {"unet": unet, "text": text}
        self.keep_originals, self.used = keep_originals, False
        self.originals: dict[tuple[str, str], torch.Tensor] = {}  # on the CPU: an adapter set may cover gigabytes
        # The originals' buffers after a restore, for the next apply: fresh memory costs more on the CPU than the
        # merge itself (first touch of every page), and a server switching adapters would pay it on every switch.
        # Each keeps the weight's version counter and address at the restore: while both are unchanged the buffer
        # still holds the weight's exact value and need not be copied again (a change made through `.data` does not
        # move the counter: call release() after one). release() frees them.
        self.spare: dict[tuple[str, str], tuple[torch.Tensor, int, int]] = {}

    def _param(self, root: str, name: str) -> torch.Tensor:
        return self.roots[root].get_parameter(name)

    @torch.no_grad()
    def restore(self):
        for (root, name), original in self.originals.items():
            param = self._param(root, name)
            param.copy_(original)
            self.spare[(root, name)] = (original, param._version, param.data_ptr())
        self.originals.clear()

    def release(self):
        """Free the buffers kept for the next apply (the weights are not touched)."""
        self.spare.clear()

    def _keep(self, root: str, name: str, param: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(the CPU buffer that keeps this weight's original while adapters are on, whether it holds it already):
        a spare one when it fits, filled when the weight has not changed since it was restored from it."""
        if not self.keep_originals:
            return None, True  # nothing to keep, nothing to copy
        key = (root, name)
        buf, version, address = self.spare.pop(key, (None, -1, -1))
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype:
            buf = torch.empty(param.shape, dtype=param.dtype, device="cpu")
        self.originals[key] = buf
        return buf, (version, address) == (param._version, param.data_ptr())

    @torch.no_grad()
    def apply(self, adapters: list[tuple[Adapter, float, float]]):
        """Make the weights original + the sum of each adapter's delta times its multiplier (unet, text).

        One weight at a time: its deltas summed in float32, added, cast, so the extra memory is one weight's.
        """
        if self.used and not self.keep_originals:
            raise RuntimeError("this Patcher keeps no original weights: it cannot remove or change its adapters")
        self.used = bool(adapters)
        self.restore()
        by_weight: dict[tuple[str, str], list[tuple[Patch, float]]] = {}
        for adapter, unet_mult, text_mult in adapters:
            for patch in adapter.patches:
                mult = unet_mult if patch.target.root == "unet" else text_mult
                if mult:
                    by_weight.setdefault((patch.target.root, patch.target.weight), []).append((patch, mult))
        fast = [(root, name, *patches[0]) for (root, name), patches in by_weight.items()
                if len(patches) == 1 and patches[0][0].low_rank() and self._param(root, name).is_contiguous()]
        self._write_low_rank_all(fast)
        done = {(root, name) for root, name, _, _ in fast}
        for (root, name), patches in by_weight.items():
            if (root, name) in done:
                continue
            weight = self._param(root, name)
            delta, bias = None, None
            for patch, mult in patches:
                delta, db = self._add(delta, weight, patch, mult)
                if db is not None:
                    bias = db if bias is None else bias + db
            self._write(root, name, delta)
            if bias is not None:
                self._write(root, patches[0][0].target.bias, bias)

    def _write(self, root: str, name: str, delta: torch.Tensor):
        """weight = cast(float32(weight) + delta), the sum formed in the delta's buffer (one pass less). The weight
        is widened first: on the CPU an in-place float32 += bf16 add takes a slow mixed-dtype path (11x slower than
        widening and adding at 1280x5120), and the upcast is exact, so the sum is the same."""
        param = self._param(root, name)
        keep, kept = self._keep(root, name, param)
        if not kept:
            keep.copy_(param.detach())
        param.copy_(delta.add_(param.to(delta.dtype)))

    def _write_low_rank_all(self, items: list[tuple[str, str, "Patch", float]]):
        """_write_low_rank for each (root, name, patch, mult). On the CPU the weights are shared out among as many
        threads as torch uses, each merging whole weights with one thread of its own: the products are thin (rank
        rows deep) and a block of one is too small to split well (SDXL, rank 32, two cores: 1.3 s against 2.4)."""
        workers = torch.get_num_threads()
        if workers < 2 or len(items) < 2 or any(self._param(r, n).device.type != "cpu" for r, n, _, _ in items):
            for item in items:
                self._write_low_rank(*item)
            return

        def merge(item):
            with torch.no_grad():
                self._write_low_rank(*item)

        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(merge, items))
        finally:
            torch.set_num_threads(workers)

    def _write_low_rank(self, root: str, name: str, patch: "Patch", mult: float, rows: int = 256):
        """weight = cast(float32(weight) + up @ down * scale) for one plain LoRA on a whole weight, `rows` rows at a
        time: no full-size float32 delta or widened weight is made (on the CPU, fresh memory that size costs more
        than the product), and the blocks stay in cache, the original's copy taken from each block as it is read.
        The same sum as _add + _write, up to the float32 rounding of the product's blocks."""
        param = self._param(root, name)
        keep, kept_already = self._keep(root, name, param)
        copy_blocks = param.device.type == "cpu" and not kept_already
        if not (kept_already or copy_blocks):
            keep.copy_(param.detach())  # one copy to the host, not one per block
        up, down = _lora_factors({k: v.to(param.device, torch.float32) for k, v in patch.tensors.items()}, mult)
        flat = param.detach().view(param.shape[0], -1)
        kept = keep.view(flat.shape) if copy_blocks else None
        work = torch.empty(min(rows, flat.shape[0]), flat.shape[1], dtype=torch.float32, device=flat.device)
        r = 0
        try:
            for r in range(0, flat.shape[0], rows):
                n = min(rows, flat.shape[0] - r)
                if copy_blocks:
                    kept[r:r + n].copy_(flat[r:r + n])
                block = work[:n].copy_(flat[r:r + n])  # the widening into one reused block: no allocation per block
                flat[r:r + n].copy_(block.addmm_(up[r:r + n], down))
        except BaseException:  # interrupted: the rows not yet merged are still the originals, keep them too
            if copy_blocks:
                kept[r:].copy_(flat[r:])
            raise

    def _add(self, delta, weight: torch.Tensor, patch: Patch, mult: float):
        """(the weight's float32 delta with one patch's change times mult added, its bias change or None); a delta of
        None is started here, from the change itself where it covers the whole weight."""
        target = patch.target
        if delta is None and not (target.rows or target.transpose):
            dw, db = patch.delta(weight.detach(), mult=mult)
            return dw.reshape(weight.shape), self._bias(target, db, weight)
        if delta is None:
            delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        view, out = weight.detach(), delta
        if target.transpose:
            view, out = view.t(), out.t()
        if target.rows:
            view, out = view[target.rows[0]:target.rows[1]], out[target.rows[0]:target.rows[1]]
        dw, db = patch.delta(view, mult=mult)
        out.add_(dw.reshape(out.shape))
        return delta, self._bias(target, db, weight)

    def _bias(self, target: Target, db, weight: torch.Tensor):
        if db is None:
            return None
        bias = torch.zeros(self._param(target.root, target.bias).shape, dtype=torch.float32, device=weight.device)
        (bias[target.rows[0]:target.rows[1]] if target.rows else bias).add_(db.reshape(-1))
        return bias
