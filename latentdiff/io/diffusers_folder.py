"""diffusers-format model folders, as they sit in a disk cache: model_index.json, unet/, vae/, text_encoder/,
text_encoder_2/ (SDXL), tokenizer/, scheduler/scheduler_config.json. Read offline into our modules.

The configs become a ModelConfig; the weights are renamed with the same tables that read adapter files (U-Net:
models.lora.unet_diffusers_names; text encoders: io.checkpoint.hf_clip_to_open_clip) and a VAE table walked here.
What a folder cannot say (which hidden layer SD 2.x and SDXL read, how their tokenizers pad) comes from the family
preset the folder is (SD 1.x, SD 2.x, SDXL), as diffusers' pipelines for those families fix it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from latentdiff.io.checkpoint import CheckpointError, Models, _meta_models, first_line, hf_clip_to_open_clip, load_file
from latentdiff.io.config import CONFIG_DIR, load_model_config
from latentdiff.models.lora import unet_diffusers_names
from latentdiff.models.text_encoder import TextConfig
from latentdiff.models.unet import UNetConfig
from latentdiff.models.vae import VAEConfig

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")


def is_diffusers_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({first_line(e)})") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """A component's tensors: one file, or the shards its .index.json names."""
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_json(index).get("weight_map", {}).values()))
            state = {}
            for shard in shards:
                state.update(load_file(folder / shard)[0])
            return state
        if (folder / name).is_file():
            return load_file(folder / name)[0]
    raise CheckpointError(f"{folder} has no weights ({', '.join(WEIGHT_FILES[:2])}, ...)")


# ---- configs --------------------------------------------------------------------------------------

def _unet_config(c: dict) -> UNetConfig:
    boc = list(c["block_out_channels"])
    attends = ["CrossAttn" in t for t in c["down_block_types"]]
    heads = c.get("num_attention_heads") or c.get("attention_head_dim") or 8
    depth = c.get("transformer_layers_per_block", 1)
    if c.get("use_linear_projection"):  # SD 2.x / SDXL: 64-channel heads, so the head count grows with the width
        per_level = heads if isinstance(heads, list) else [heads] * len(boc)
        head_channels = boc[0] // per_level[0]
        num_heads, num_head_channels = -1, head_channels
    else:  # SD 1.x: attention_head_dim is (for historical reasons) the number of heads
        num_heads, num_head_channels = heads if isinstance(heads, int) else heads[0], -1
    if not isinstance(depth, int) or not all(attends):
        depth = tuple((depth if isinstance(depth, int) else depth[i]) if a else 0 for i, a in enumerate(attends))
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=boc[0],
        channel_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** i for i, a in enumerate(attends) if a), num_heads=num_heads,
        num_head_channels=num_head_channels, transformer_depth=depth, context_dim=c["cross_attention_dim"],
        use_linear_in_transformer=bool(c.get("use_linear_projection")), norm_groups=c.get("norm_num_groups", 32),
        adm_in_channels=(c.get("projection_class_embeddings_input_dim") or 0)
        if c.get("addition_embed_type") == "text_time" else 0)


def _vae_config(c: dict, preset: VAEConfig) -> VAEConfig:
    boc = list(c["block_out_channels"])
    return dataclasses.replace(
        preset, in_channels=c.get("in_channels", 3), out_ch=c.get("out_channels", 3), ch=boc[0],
        ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.get("layers_per_block", 2),
        z_channels=c.get("latent_channels", 4), embed_dim=c.get("latent_channels", 4),
        norm_groups=c.get("norm_num_groups", 32), scale_factor=c.get("scaling_factor", preset.scale_factor),
        force_upcast=bool(c.get("force_upcast", preset.force_upcast)), resolution=c.get("sample_size", 256))


def _text_config(c: dict, preset: TextConfig, projection: bool) -> TextConfig:
    layers = c["num_hidden_layers"]
    # diffusers' SD 2.x text encoder stops at the layer SD 2.x reads (23 of OpenCLIP's 24): its last is ours
    output_layer = "last" if preset.output_layer == "penultimate" and preset.output_ln_final and \
        layers < preset.layers else preset.output_layer
    return dataclasses.replace(
        preset, vocab_size=c.get("vocab_size", 49408), context_length=c.get("max_position_embeddings", 77),
        width=c["hidden_size"], layers=layers, heads=c["num_attention_heads"],
        mlp_ratio=c.get("intermediate_size", 4 * c["hidden_size"]) / c["hidden_size"],
        act="quick_gelu" if c.get("hidden_act", "quick_gelu") == "quick_gelu" else "gelu",
        output_layer=output_layer, embed_dim=c.get("projection_dim", 0) if projection else 0)


def folder_config(path: Path, prediction: str | None = None):
    """The ModelConfig of a diffusers folder, its family preset filled in from the components' configs."""
    index = _json(path / "model_index.json")
    sdxl = "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None
    text_cfg = _json(path / "text_encoder" / "config.json")
    preset = "sdxl-base" if sdxl else "sd21-base" if text_cfg["hidden_size"] == 1024 else "sd15"
    cfg = load_model_config(CONFIG_DIR / f"{preset}.yaml")
    unet_cfg, vae_cfg = _json(path / "unet" / "config.json"), _json(path / "vae" / "config.json")
    sched = _json(path / "scheduler" / "scheduler_config.json") if (path / "scheduler" /
                                                                    "scheduler_config.json").is_file() else {}
    diffusion = dataclasses.replace(
        cfg.diffusion, beta_schedule=sched.get("beta_schedule", cfg.diffusion.beta_schedule),
        beta_start=sched.get("beta_start", cfg.diffusion.beta_start), beta_end=sched.get("beta_end",
                                                                                           cfg.diffusion.beta_end),
        num_timesteps=sched.get("num_train_timesteps", cfg.diffusion.num_timesteps),
        prediction=prediction or sched.get("prediction_type", cfg.diffusion.prediction),
        zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", cfg.diffusion.zero_terminal_snr)))
    vae = _vae_config(vae_cfg, cfg.vae)
    changes = dict(name=path.name, unet=_unet_config(unet_cfg), vae=vae, diffusion=diffusion,
                   text=_text_config(text_cfg, cfg.text, projection=False),
                   image_size=unet_cfg.get("sample_size", cfg.image_size // 8) * 2 ** (len(vae.ch_mult) - 1))
    if sdxl:
        changes["text2"] = _text_config(_json(path / "text_encoder_2" / "config.json"), cfg.text2, projection=True)
    return dataclasses.replace(cfg, **changes)


# ---- weights --------------------------------------------------------------------------------------

_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_diffusers_name(name: str, levels: int) -> str:
    """Our (ldm) VAE parameter name -> diffusers' AutoencoderKL name."""
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", name):
        level = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])
        return f"{m[1]}.{m[2]}_blocks.{level}.resnets.{m[4]}.{_VAE_RESNET.get(m[5], m[5])}.{m[6]}"
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", name):
        level = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])
        return f"{m[1]}.{m[2]}_blocks.{level}.{m[4]}rs.0.conv.{m[5]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.(weight|bias)", name):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_VAE_RESNET.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", name):
        return f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN[m[2]]}.{m[3]}"
    return re.sub(r"\.norm_out\.", ".conv_norm_out.", name)


def _rename(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], names: dict[str, str], where: str):
    """Our state dict from theirs by the name map (1x1 convs from Linear weights reshaped); every key accounted for."""
    out, missing = {}, []
    for k, want in ours.items():
        v = theirs.get(names.get(k, k))
        if v is None:
            missing.append(names.get(k, k))
        elif v.numel() != want.numel():
            raise CheckpointError(f"{where}: {names.get(k, k)} is {list(v.shape)}, the config says {list(want.shape)}")
        else:
            out[k] = v.reshape(want.shape)
    extra = sorted(set(theirs) - {names.get(k, k) for k in ours} - {"text_model.embeddings.position_ids",
                                                                      "embeddings.position_ids"})
    if missing or extra:
        raise CheckpointError(f"{where} does not match its config: {len(missing)} missing ({', '.join(missing[:3])}), "
                              f"{len(extra)} unexpected ({', '.join(extra[:3])})")
    return out


def _text_state(folder: Path, encoder, where: str) -> dict[str, torch.Tensor]:
    hf = _weights(folder)
    projection = hf.pop("text_projection.weight", None)
    mapped, leftover = hf_clip_to_open_clip(hf)
    if leftover:
        raise CheckpointError(f"{where}: {len(leftover)} tensors are no CLIP text-model weight ({', '.join(leftover[:3])})")
    if projection is not None:
        mapped["text_projection"] = projection.t()  # Linear weight (out, in); open_clip multiplies x @ P
    if "logit_scale" in encoder.state_dict():  # CLIP's temperature, unused by diffusion models: not in the folder
        mapped["logit_scale"] = torch.tensor(4.6052)
    return _rename(encoder.state_dict(), mapped, {}, where)


def load_diffusers_folder(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32,
                          prediction: str | None = None) -> Models:
    """Models from a diffusers folder (SD 1.x / 2.x / SDXL), offline; built on meta and assigned, as load_models."""
    path = Path(path)
    config = folder_config(path, prediction)
    models = _meta_models(config)
    unet_names = unet_diffusers_names(models.unet)
    vae_names = {k: vae_diffusers_name(k, len(config.vae.ch_mult)) for k in models.vae.state_dict()}
    parts = {"unet": _rename(models.unet.state_dict(), _weights(path / "unet"), unet_names, f"{path}/unet"),
             "vae": _rename(models.vae.state_dict(), _weights(path / "vae"), vae_names, f"{path}/vae")}
    if config.text2 is None:
        parts["text"] = _text_state(path / "text_encoder", models.text, f"{path}/text_encoder")
    else:
        parts["text"] = {f"clip_l.{k}": v for k, v in _text_state(path / "text_encoder", models.text.clip_l,
                                                                   f"{path}/text_encoder").items()}
        parts["text"] |= {f"clip_g.{k}": v for k, v in _text_state(path / "text_encoder_2", models.text.clip_g,
                                                                    f"{path}/text_encoder_2").items()}
    for part, tensors in parts.items():
        module = getattr(models, part)
        tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
        module.load_state_dict(tensors, strict=True, assign=True)
        module.eval()
    return models
