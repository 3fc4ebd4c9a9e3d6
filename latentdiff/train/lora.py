"""train.lora: the factors a LoRA run trains, and the kohya-format file it writes (what A1111, ComfyUI, kohya's
sd-scripts and diffusers' load_lora_weights read)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from latentdiff.io.checkpoint import Models
from latentdiff.io.config import ConfigError
from latentdiff.io.files import atomic_write
from latentdiff.models.lora import family
from latentdiff.models.lora_train import LoraNetwork
from latentdiff.train.config import LoraConfig

FILE = "lora.safetensors"  # in each checkpoint and, the newest, in the run's folder


def attach(models: Models, cfg: LoraConfig, seed: int) -> LoraNetwork:
    """Factors on the model's layers (the U-Net's, and the text encoder's with text_encoder), or a one-line
    ConfigError when the rank or the targets do not fit this model."""
    try:
        return LoraNetwork(models.unet, models.text, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout, seed,
                           text_encoder=cfg.text_encoder)
    except ValueError as e:
        raise ConfigError(f"train.lora: {e}") from None


def base_model_version(models: Models) -> str:
    """kohya's ss_base_model_version for the base: sd_v1, sd_v2 (sd_v2_768_v for v-prediction), else ours."""
    name = family(models.unet, models.text)
    if name == "SD 1.x":
        return "sd_v1"
    if name == "SD 2.x":
        return "sd_v2_768_v" if models.config.diffusion.prediction == "v" else "sd_v2"
    return f"latentdiff_{models.config.name}"


def metadata(models: Models, cfg: LoraConfig, step: int, init: str | None) -> dict[str, str]:
    """The ss_* keys A1111's and ComfyUI's LoRA lists show and kohya's tools read (all values strings)."""
    args = {"dropout": cfg.dropout, "targets": list(cfg.targets)}
    if "resblock" in cfg.targets:  # LoCon: kohya records the conv layers' rank and alpha here
        args |= {"conv_dim": cfg.rank, "conv_alpha": cfg.alpha}
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(cfg.alpha), "ss_network_args": json.dumps(args),
            "ss_base_model_version": base_model_version(models),
            "ss_v2": str(base_model_version(models).startswith("sd_v2")),
            "ss_network_train_unet_only": str(not cfg.text_encoder), "ss_steps": str(step),
            "ss_sd_model_name": Path(init).name if init else models.config.name,
            "ss_training_comment": "trained with latentdiff (python -m latentdiff.train, train.lora)"}


def save(path: Path, network: LoraNetwork, meta: dict[str, str]):
    """The factors as one kohya .safetensors file, written atomically."""
    with atomic_write(path) as tmp:
        save_file(network.kohya_state(), str(tmp), metadata=meta)
