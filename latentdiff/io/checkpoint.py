"""Single-file checkpoints: official SD 1.x / 2.x / SDXL files and our own, in the original LDM key layout.

    model.diffusion_model.*      U-Net           (our UNetModel names, unchanged)
    first_stage_model.*          VAE             (our AutoencoderKL names, unchanged)
    cond_stage_model.transformer.[text_model.]*   SD1 text encoder, Hugging Face CLIPTextModel names (mapped here)
    cond_stage_model.model.*     SD2 and latentdiff text encoder, open_clip names (unchanged)
    conditioner.embedders.0.transformer.text_model.*   SDXL CLIP-L, Hugging Face names (mapped as for SD1)
    conditioner.embedders.1.model.*                    SDXL OpenCLIP bigG, open_clip names (unchanged)

Our files add the ModelConfig as JSON under the safetensors metadata key "latentdiff_config", so one loader
serves both. Pickled files (.ckpt/.pt) are only read through torch.load(weights_only=True): a pickle that needs
anything but tensors and containers is refused before any of it runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from latentdiff.io.config import CONFIG_DIR, ModelConfig, from_dict, load_model_config, to_dict
from latentdiff.io.files import atomic_write
from latentdiff.diffusion.ops import PREDICTIONS
from latentdiff.models.text_encoder import DualTextEncoder, TextEncoder
from latentdiff.models.unet import UNetModel
from latentdiff.models.vae import AutoencoderKL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."  # SD2 and ours: open_clip names
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # SD1: Hugging Face CLIPTextModel names
SDXL_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL CLIP-L: Hugging Face names, text_model.* below
SDXL_G_PREFIX = "conditioner.embedders.1.model."  # SDXL OpenCLIP bigG: open_clip names
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only text encoder (bigG)
EMA_PREFIX = "model_ema."
CONFIG_KEY = "latentdiff_config"
# The small emoji model that ships with latentdiff (installed as package data): what the commands use by default.
BUNDLED = Path(__file__).resolve().parent.parent / "weights" / "emoji.safetensors"

# DDPM.register_schedule buffers: stored without a prefix in official files; we recompute them from the config.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the problem."""


@dataclass
class Models:
    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text: TextEncoder | DualTextEncoder  # DualTextEncoder when config.text2 is set (SDXL)


# ---- reading files --------------------------------------------------------------------------------

def first_line(e: BaseException, named: bool = True) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    line = lines[0] if lines else ""
    return f"{type(e).__name__}: {line}" if named else line


def load_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of a .safetensors (memory-mapped) or .ckpt/.pt file (tensors only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt? "
                                  f"{first_line(e)})") from None
        return state, metadata
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        obj = _torch_load(path)
        metadata = {}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            if "global_step" in obj:
                metadata["global_step"] = str(obj["global_step"])
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors (or .ckpt / .pt)")


def _torch_load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # old (non-zip) torch.save files cannot be memory-mapped: read them
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: its pickle needs more than tensors to load ({first_line(e)}); nothing in it was "
            "run. Convert it to .safetensors in a trusted environment, or use a .safetensors release") from None
    except Exception as e:
        raise CheckpointError(f"{path} could not be read (truncated or corrupt? {first_line(e)})") from None


# ---- key layouts ----------------------------------------------------------------------------------

_HF_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}


def hf_clip_to_open_clip(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face CLIPTextModel names (with or without `text_model.`) -> our open_clip names.

    q/k/v projections are concatenated into open_clip's (3*width, width) in_proj. Returns the mapped tensors and
    the source keys that have no counterpart (position_ids is dropped silently: it is arange(77), not a weight).
    """
    out, leftover, qkv = {}, [], {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "embeddings.position_ids":
            continue
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = (key, value)
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)) and m[2] in _HF_LAYER:
            out[f"transformer.resblocks.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"] = value
        else:
            leftover.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                [parts[c][1] for c in "qkv"], dim=0)
        else:  # an incomplete triple cannot be mapped: report it, and in_proj will show up as missing
            leftover += [name for name, _ in parts.values()]
    return out, leftover


def open_clip_to_hf_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our open_clip names -> Hugging Face CLIPTextModel names under `text_model.` (the inverse of the above)."""
    to_hf = {v: k for k, v in _HF_LAYER.items()}
    out = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".")[-1]] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for c, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{c}_proj.{m[2]}"] = part
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)) and m[2] in to_hf:
            out[f"text_model.encoder.layers.{m[1]}.{to_hf[m[2]]}.{m[3]}"] = value
        else:
            raise KeyError(f"{key} has no Hugging Face CLIPTextModel name")
    return out


def ema_key(unet_key: str) -> str:
    """Where LDM's EMA stores a U-Net weight: dots removed, e.g. model_ema.diffusion_modelout2weight."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_state_dict(state: dict[str, torch.Tensor], unet_keys=(), ema: bool = False):
    """Sort a file's keys by component: ({"unet", "vae", "text"} -> state dict, unexpected keys).

    Schedule buffers, position_ids and model_ema.* are accepted and dropped; with ema=True the U-Net weights
    are taken from the EMA copies of `unet_keys` instead. diffusers' conversion scripts leave transformers' names
    for two things in the open_clip parts: position_ids (dropped) and SDXL bigG's projection as a Linear weight.
    """
    parts = {"unet": {}, "vae": {}, "text": {}}
    hf_text, hf_l, unexpected = {}, {}, []
    for key, value in state.items():
        if key.endswith(".text_model.embeddings.position_ids") and key.startswith((TEXT_PREFIX, SDXL_G_PREFIX)):
            continue  # arange(77), under the name diffusers' scripts keep: not a weight
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        elif key.startswith(TEXT_PREFIX):
            parts["text"][key[len(TEXT_PREFIX):]] = value
        elif key.startswith(SD1_TEXT_PREFIX):
            hf_text[key[len(SD1_TEXT_PREFIX):]] = value
        elif key.startswith(SDXL_L_PREFIX):
            hf_l[key[len(SDXL_L_PREFIX):]] = value
        elif key.startswith(SDXL_G_PREFIX):
            parts["text"]["clip_g." + key[len(SDXL_G_PREFIX):]] = value
        elif key in SCHEDULE_BUFFERS or key.startswith(EMA_PREFIX):
            continue
        else:
            unexpected.append(key)
    if hf_text:
        mapped, leftover = hf_clip_to_open_clip(hf_text)
        parts["text"].update(mapped)
        unexpected += [SD1_TEXT_PREFIX + k for k in leftover]
    if hf_l:
        mapped, leftover = hf_clip_to_open_clip(hf_l)
        parts["text"].update({"clip_l." + k: v for k, v in mapped.items()})
        unexpected += [SDXL_L_PREFIX + k for k in leftover]
    text = parts["text"]
    if "clip_g.text_projection.weight" in text and "clip_g.text_projection" not in text:
        # transformers' Linear weight is (out, in); open_clip's projection is applied as x @ P, so (in, out)
        text["clip_g.text_projection"] = text.pop("clip_g.text_projection.weight").t().contiguous()
    if ema:
        found = [k for k in unet_keys if ema_key(k) in state]
        if not found:
            raise CheckpointError("the checkpoint has no EMA weights (model_ema.*) to choose; drop --ema "
                                  "(ema=True in Python), which is for SD files that keep them beside the raw weights")
        parts["unet"] = {k: state[ema_key(k)] for k in found}
    return parts, unexpected


def state_dict_for(models: Models) -> dict[str, torch.Tensor]:
    """The single-file layout of our own checkpoints: every weight under its LDM prefix."""
    out = {}
    for prefix, module in ((UNET_PREFIX, models.unet), (VAE_PREFIX, models.vae)):
        out.update({prefix + k: v for k, v in module.state_dict().items()})
    if isinstance(models.text, DualTextEncoder):  # SDXL: the official layout, so other tools read our files
        out.update({SDXL_L_PREFIX + k: v for k, v in open_clip_to_hf_clip(models.text.clip_l.state_dict()).items()})
        out.update({SDXL_G_PREFIX + k: v for k, v in models.text.clip_g.state_dict().items()})
    else:
        out.update({TEXT_PREFIX + k: v for k, v in models.text.state_dict().items()})
    return out


# ---- configs --------------------------------------------------------------------------------------

def detect_config(state: dict[str, torch.Tensor], metadata: dict[str, str], prediction: str | None = None,
                  name: str = "checkpoint") -> ModelConfig:
    """The ModelConfig of a file: stored in our metadata, else SD1 or SD2 from the text-encoder keys and shapes.

    v-prediction leaves no trace in the weights, so it comes only from `prediction` (or our stored config).
    """
    if prediction is not None and prediction not in PREDICTIONS:
        raise CheckpointError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if CONFIG_KEY in metadata:
        try:
            stored = json.loads(metadata[CONFIG_KEY])
            if _depth(stored) > MAX_CONFIG_DEPTH:
                raise ValueError(f"nested more than {MAX_CONFIG_DEPTH} levels deep")
            cfg = from_dict(ModelConfig, stored, "model")
        except (ValueError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{name}: the stored latentdiff config is invalid ({first_line(e)})") from None
    else:
        sdxl_g = any(k.startswith(SDXL_G_PREFIX) for k in state)
        if not sdxl_g and any(k.startswith(SDXL_REFINER_PREFIX) for k in state):
            raise CheckpointError(f"{name} is an SDXL refiner (one bigG text encoder, aesthetic-score conditioning), "
                                  "which is not supported; use an SDXL base checkpoint")
        if sdxl_g:
            preset = "sdxl-base"
        elif any(k.startswith(TEXT_PREFIX) for k in state):
            preset = "sd21-v" if prediction == "v_prediction" else "sd21-base"
        elif any(k.startswith(SD1_TEXT_PREFIX) for k in state):
            preset = "sd15"
        else:
            raise CheckpointError(f"{name}: no text-encoder keys (cond_stage_model.transformer.*, "
                                  "cond_stage_model.model.* or conditioner.embedders.*), so this is not an "
                                  "SD 1.x / 2.x / SDXL single-file checkpoint")
        cfg = load_model_config(CONFIG_DIR / f"{preset}.yaml")
        cfg = fit_text_config(dataclasses.replace(cfg, unet=_unet_from_shapes(cfg.unet, state)), state)
    if prediction is not None:
        cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, prediction=prediction))
    return cfg


MAX_CONFIG_DEPTH = 4  # containers: ModelConfig -> unet -> channel_mult is 3; anything deeper is not a config


def _depth(obj) -> int:
    """How many containers deep parsed JSON nests (a number is 0, [1] is 1), counted level by level without
    recursion (a hostile file may nest thousands of levels) and only up to MAX_CONFIG_DEPTH + 1."""
    depth, level = 0, [obj]
    while depth <= MAX_CONFIG_DEPTH:
        containers = [o for o in level if isinstance(o, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [v for o in containers for v in (o.values() if isinstance(o, dict) else o)]
    return depth


def _ints(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def config_problem(config: ModelConfig, state: dict[str, torch.Tensor] | None = None) -> str | None:
    """Why building `config` would fail or run away, checked before anything is built: sizes out of range, norm
    groups or heads that do not divide their widths, or more parameters than the file's tensors hold."""
    u, v, t = config.unet, config.vae, config.text
    ranges = [("image_size", config.image_size, 8, 1 << 16), ("diffusion.num_timesteps",
              config.diffusion.num_timesteps, 2, 100_000), ("sampling.steps", config.sampling.steps, 1, 10_000)]
    for part, fields in (("unet", ("in_channels", "out_channels", "model_channels", "num_res_blocks", "norm_groups",
                                   "context_dim", "channel_mult")),
                         ("vae", ("in_channels", "out_ch", "ch", "num_res_blocks", "z_channels", "embed_dim",
                                  "norm_groups", "ch_mult")),
                         ("text", ("vocab_size", "context_length", "width", "layers", "heads"))):
        for f in fields:
            ranges += [(f"{part}.{f}", x, 1, 1 << 20) for x in _ints(getattr(getattr(config, part), f))]
    ranges += [("unet.transformer_depth", x, 0, 16) for x in _ints(u.transformer_depth)]
    ranges += [("unet.num_res_blocks", u.num_res_blocks, 1, 16), ("vae.num_res_blocks", v.num_res_blocks, 1, 16)]
    ranges += [("unet.channel_mult length", len(u.channel_mult), 1, 8), ("vae.ch_mult length", len(v.ch_mult), 1, 8)]
    for name, x, low, high in ranges:
        if not isinstance(x, int) or not low <= x <= high:
            return f"{name} is {x!r}, outside {low}..{high}"
    if not (u.num_heads >= 1 or (u.num_heads == -1 and u.num_head_channels >= 1)):
        return f"unet.num_heads is {u.num_heads} (num_head_channels {u.num_head_channels}): no attention heads"
    widths = [("unet", u.model_channels * m, u.norm_groups) for m in u.channel_mult]
    widths += [("vae", v.ch * m, v.norm_groups) for m in v.ch_mult]
    for part, width, groups in widths:
        if width % groups:
            return f"{part}.norm_groups {groups} does not divide a width of {width} channels"
    heads = [u.model_channels * m // u.num_head_channels if u.num_heads == -1 else u.num_heads for m in u.channel_mult]
    if any(h < 1 or (u.model_channels * m) % h for h, m in zip(heads, u.channel_mult)) or t.width % t.heads:
        return "the attention heads do not divide the widths of the U-Net or the text encoder"
    # A lower bound on the parameters the config builds (the second 3x3 conv of every residual block, the text
    # encoder's embeddings and attention/MLP weights). Orders of magnitude above what the file holds is a config
    # that would take minutes or all memory to build; a nearer mismatch gets the per-key report after building.
    least = sum((2 * u.num_res_blocks + 1) * 9 * (u.model_channels * m) ** 2 for m in u.channel_mult)
    least += sum((2 * v.num_res_blocks + 1) * 9 * (v.ch * m) ** 2 for m in v.ch_mult)
    least += (t.vocab_size + t.context_length) * t.width + t.layers * int(4 + 2 * t.mlp_ratio) * t.width ** 2
    held = None if state is None else sum(x.numel() for x in state.values())
    if held is not None and least > 1000 * held:
        return f"the config describes at least {least:,} parameters, but the file holds {held:,}"
    return None


def _unet_from_shapes(ucfg, state):
    """Fields the weights do show (channels, context width, Linear vs conv proj_in), so variants load too."""
    changes = {}
    if (w := state.get(UNET_PREFIX + "input_blocks.0.0.weight")) is not None and w.ndim == 4:
        changes["in_channels"] = w.shape[1]  # e.g. 9 for the inpainting models
    if (w := state.get(UNET_PREFIX + "out.2.weight")) is not None and w.ndim == 4:
        changes["out_channels"] = w.shape[0]
    if (w := state.get(UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")) is not None:
        changes["context_dim"] = w.shape[1]
    if (w := state.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")) is not None:
        changes["use_linear_in_transformer"] = w.ndim == 2
    return dataclasses.replace(ucfg, **changes)


# ---- building and loading models ------------------------------------------------------------------

def inpainting_variant(config: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """A config given for a file whose conv_in takes the inpainting layout's channels (latents, mask, masked-picture
    latents: 2 * out + 1, 9 for SD) describes that file's inpainting variant: a model's yaml loads its inpainting
    file too, as the presets do through _unet_from_shapes when no config is given."""
    w, u = state.get(UNET_PREFIX + "input_blocks.0.0.weight"), config.unet
    if w is None or w.ndim != 4 or w.shape[1] == u.in_channels or w.shape[1] != 2 * u.out_channels + 1:
        return config
    return dataclasses.replace(config, unet=dataclasses.replace(u, in_channels=int(w.shape[1])))


def _text_encoder(config: ModelConfig) -> TextEncoder | DualTextEncoder:
    return TextEncoder(config.text) if config.text2 is None else DualTextEncoder(config.text, config.text2)


def build_models(config: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32) -> Models:
    """Freshly initialized modules (for training from scratch and tests)."""
    with torch.device(device):
        models = Models(config, UNetModel(config.unet), AutoencoderKL(config.vae), _text_encoder(config))
    for m in (models.unet, models.vae, models.text):
        m.to(dtype)
    return models


def _meta_models(config: ModelConfig) -> Models:
    with torch.device("meta"):
        return Models(config, UNetModel(config.unet), AutoencoderKL(config.vae), _text_encoder(config))


def _mismatch_report(name: str, config: ModelConfig, parts, unexpected: list[str], models: Models) -> str | None:
    missing, shaped = [], []
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX if config.text2 is None else ""}
    for part, module in (("unet", models.unet), ("vae", models.vae), ("text", models.text)):
        want, have = module.state_dict(), parts[part]
        missing += [prefixes[part] + k for k in want if k not in have]
        unexpected += [prefixes[part] + k for k in have if k not in want]
        shaped += [f"{prefixes[part] + k} (file {list(have[k].shape)}, model {list(v.shape)})"
                   for k, v in want.items() if k in have and have[k].shape != v.shape]
    if not (missing or unexpected or shaped):
        return None

    def few(keys):
        return f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""
    return (f"{name} does not match the {config.name} model: {len(missing)} missing keys{few(missing)}, "
            f"{len(unexpected)} unexpected keys{few(unexpected)}, {len(shaped)} mis-shaped keys{few(shaped)}")


LOGIT_SCALE = 4.6052  # log(100): CLIP's temperature at the end of training (clamped there), as released files hold


def fit_text_config(config: ModelConfig, state: dict[str, torch.Tensor]) -> ModelConfig:
    """The SD 2.x text encoder that files from diffusers' convert_diffusers_to_original_stable_diffusion.py hold.

    diffusers' SD 2.x text_encoder keeps 23 of OpenCLIP-H's 24 layers (the last one, which penultimate
    conditioning never runs, is dropped) and no text_projection or logit_scale (SD 2.x conditioning uses neither),
    and the script writes just that. Read as 23 layers with the last one's output and no projection, such a file
    gives the same conditioning as the full one; CLIP skip then counts from its 23rd layer, as in diffusers.
    """
    text = config.text
    if config.text2 is not None:
        return config
    stem = re.escape(TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\."
    layers = {int(m[1]) for k in state if (m := re.match(stem, k))}
    if text.output_layer == "penultimate" and layers and max(layers) + 1 == text.layers - 1:
        text = dataclasses.replace(text, layers=text.layers - 1, output_layer="last")
    if text.embed_dim and layers and not any(TEXT_PREFIX + k in state for k in ("text_projection", "logit_scale")):
        text = dataclasses.replace(text, embed_dim=0)
    return config if text == config.text else dataclasses.replace(config, text=text)


def _complete_text(name: str, config: ModelConfig, text: dict[str, torch.Tensor]):
    """Fills logit_scale where a file lacks it (it scales CLIP's image-text scores; generation never uses it), and
    refuses an SDXL file without bigG's text_projection, which the pooled embedding the U-Net sees is made with."""
    for prefix, cfg in (("", config.text),) if config.text2 is None else (("clip_g.", config.text2),):
        if cfg.embed_dim and prefix + "logit_scale" not in text:
            text[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE)
    if config.text2 is not None and config.text2.embed_dim and "clip_g.text_projection" not in text:
        raise CheckpointError(f"{name} has no {SDXL_G_PREFIX}text_projection (nor transformers' text_projection."
                              f"weight): SDXL's pooled text embedding, part of the U-Net's conditioning, is made with "
                              f"it; use a file that keeps the bigG text encoder's projection")


def load_models(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                prediction: str | None = None, ema: bool = False, config: ModelConfig | None = None) -> Models:
    """Models from an SD 1.x / 2.x / SDXL or latentdiff single-file checkpoint, in eval mode, on `device` in `dtype`.

    Modules are built on the meta device and the file's tensors are assigned into them one component at a
    time, so peak memory is about the file plus the model in `dtype`.
    """
    state, metadata = load_file(path)
    if ema and metadata.get("latentdiff.train.weights") == "ema":
        raise CheckpointError(f"{path} is a latentdiff training checkpoint: its weights already are the EMA weights "
                              f"(the trainer exports them), so drop --ema (ema=True in Python); --ema is for SD files "
                              f"that keep EMA copies (model_ema.*) beside the raw weights")
    if config is None:
        config = detect_config(state, metadata, prediction, name=str(path))
    else:
        config = inpainting_variant(config, state)
        if prediction is not None:
            config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, prediction=prediction))
    config = fit_text_config(config, state)
    problem = config_problem(config, state)
    if problem:
        raise CheckpointError(f"{path}: cannot build the {config.name} model: {problem}")
    try:
        models = _meta_models(config)
    except (ValueError, RuntimeError, ArithmeticError, AssertionError) as e:
        raise CheckpointError(f"{path}: cannot build the {config.name} model ({first_line(e)})") from None
    try:
        parts, unexpected = split_state_dict(state, models.unet.state_dict().keys(), ema=ema)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    del state
    _complete_text(str(path), config, parts["text"])
    report = _mismatch_report(str(path), config, parts, unexpected, models)
    if report:
        raise CheckpointError(report)
    for part in ("unet", "vae", "text"):
        module: nn.Module = getattr(models, part)
        tensors = parts.pop(part)
        for k in list(tensors):  # convert one tensor at a time so the source can be freed as we go
            v = tensors[k]
            tensors[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        module.load_state_dict(tensors, strict=True, assign=True)
        module.eval()
    return models


def save_models(path: str | os.PathLike, config: ModelConfig, unet: UNetModel, vae: AutoencoderKL,
                text: TextEncoder, dtype: torch.dtype | None = None, extra_metadata: dict | None = None) -> None:
    """Write one .safetensors file in the LDM layout with the config in its metadata; atomic (temp + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: latentdiff checkpoints are .safetensors files; name it *.safetensors")
    tensors = {}
    for k, v in state_dict_for(Models(config, unet, vae, text)).items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.to("cpu").contiguous()
    metadata = {CONFIG_KEY: json.dumps(to_dict(config))}
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def swap_vae(models: Models, other: Models, src_name, vae_name) -> Models:
    """models with other's VAE (a fine-tuned decoder): same VAE config and latent scale, bit-identical encoder."""
    if other.config.vae != models.config.vae:
        raise CheckpointError(f"the VAE in {vae_name} is not the architecture (or latent scale factor) of the one "
                              f"in {src_name}; pass a VAE trained from it")
    mine, theirs = models.vae.state_dict(), other.vae.state_dict()
    encoder = [k for k in mine if k.startswith(("encoder.", "quant_conv."))]
    if not all(torch.equal(mine[k].float(), theirs[k].float()) for k in encoder):
        raise CheckpointError(f"the VAE encoder in {vae_name} differs from the one in {src_name}: its latents are not "
                              f"those the U-Net learnt; fine-tune the decoder only (train.vae_trainable=decoder)")
    return dataclasses.replace(models, vae=other.vae)
