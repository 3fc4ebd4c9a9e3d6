"""Super-resolution network files (ESRGAN, Real-ESRGAN, SwinIR and the other architectures spandrel reads) for the
hires fix: tensors read without running code, the architecture recognised by spandrel from the key names."""
from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.io.checkpoint import CheckpointError, _torch_load, load_file
from latentdiff.models.upscalers import ModelUpscaler

SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
# Real-ESRGAN and BasicSR releases keep the weights one level down, under one of these
WRAPPERS = ("params_ema", "params", "state_dict", "model")


class UpscalerError(ValueError):
    """An upscaler file that cannot be used; one line that names the file."""


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state, _ = load_file(path)
        return state
    obj = _torch_load(path)  # weights_only: a pickle that needs code is refused, and nothing in it runs
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise UpscalerError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_upscaler(path, device="cpu", dtype: torch.dtype = torch.float32) -> ModelUpscaler:
    """An upscaler network from a file, named by the file's stem (as A1111 lists them)."""
    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"upscaler {path} not found; pass an existing .pth or .safetensors file")
    if path.suffix not in SUFFIXES:
        raise UpscalerError(f"{path}: unknown upscaler file type {path.suffix!r}; use .pth or .safetensors")
    try:
        import spandrel
    except ImportError:
        raise UpscalerError(f"reading {path.name} needs spandrel: pip install spandrel") from None
    try:
        state = read_state(path)
    except CheckpointError as e:
        raise UpscalerError(str(e)) from None
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except Exception as e:  # spandrel raises its own UnsupportedModelError, or a shape error from a broken file
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise UpscalerError(f"{path} is not an upscaler network spandrel knows ({first})") from None
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.input_channels != 3 or model.scale < 1:
        raise UpscalerError(f"{path} is a {model.architecture.name} network that does not upscale RGB pictures")
    use_half = dtype == torch.float16 and model.supports_half
    model.to(device).eval()
    if use_half:
        model.half()
    return ModelUpscaler(path.stem, model, model.scale, device, torch.float16 if use_half else torch.float32)
