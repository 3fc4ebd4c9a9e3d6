"""Shared fixtures: a tiny random-weight model saved as a latentdiff checkpoint (no downloads, ever)."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_config():
    from latentdiff.io.config import load_model_config
    return load_model_config(ROOT / "configs" / "tiny.yaml")


def build_models(config, seed=0):
    """Random modules for a ModelConfig, with non-trivial weights (fixed seed)."""
    from latentdiff.io.checkpoint import Models
    from latentdiff.models.text_encoder import TextEncoder
    from latentdiff.models.unet import UNetModel
    from latentdiff.models.vae import AutoencoderKL
    torch.manual_seed(seed)
    models = Models(config, UNetModel(config.unet), AutoencoderKL(config.vae), TextEncoder(config.text))
    # Zero-initialised output layers (as in SD) would make a random U-Net predict exactly 0: perturb every
    # parameter a little so tests see real signal through all layers.
    with torch.no_grad():
        for m in (models.unet, models.vae, models.text):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return models


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    from latentdiff.io.checkpoint import save_models
    models = build_models(tiny_config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_models(path, models.config, models.unet, models.vae, models.text)
    return path
