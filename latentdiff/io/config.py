"""YAML configs loaded into frozen dataclasses, with dotted command-line overrides."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override the user must fix; the message names the key."""


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp, value, where: str):
    """Turn a YAML value into the annotated type, failing with a message that names the key."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, bool) and ("no" if value is False else "yes") in typing.get_args(tp):
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare no / yes as a boolean
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build the frozen dataclass `cls` from a mapping; unknown keys are an error that names them."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj) -> dict:
    """The inverse of from_dict: plain lists and dicts, ready for YAML or JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


def parse_overrides(args: list[str]) -> dict:
    """`--unet.model_channels=128 --train.lr 1e-4` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config file (a mapping) and apply overrides. Errors name the file."""
    path = Path(path)
    if not path.exists():
        named = CONFIG_DIR / path.name if path.suffix else CONFIG_DIR / f"{path}.yaml"
        if named.exists():
            path = named
        else:
            presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config file {path} not found (bundled presets: {presets})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return merge(data, overrides or {})


# Bundled presets: installed with the package (see setup.py), read from the source tree in development.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
if not CONFIG_DIR.exists():
    CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


# ----------------------------------------------------------------------------------------------
# The model config: the three modules and the diffusion process

from dataclasses import dataclass, field  # noqa: E402

from latentdiff.models.text_encoder import TextConfig  # noqa: E402
from latentdiff.models.unet import UNetConfig  # noqa: E402
from latentdiff.models.vae import VAEConfig  # noqa: E402


@dataclass(frozen=True)
class DiffusionConfig:
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | quadratic | cosine
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000
    prediction: str = "epsilon"  # epsilon | sample | v_prediction
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class SamplingConfig:
    """What `generate` uses when the command line does not say."""
    sampler: str = "DPM++ 2M Karras"
    steps: int = 20
    guidance: float = 7.5


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sd15"
    image_size: int = 512  # the default output size in pixels
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text2: TextConfig | None = None  # SDXL: the second text encoder (OpenCLIP bigG), joined per token to `text`
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def load_model_config(path, overrides: dict | None = None) -> ModelConfig:
    """The `model:` section of a preset or training config, as a ModelConfig."""
    data = load_yaml(path, {"model": overrides} if overrides else None)
    if "model" not in data:
        raise ConfigError(f"config file {path} has no 'model:' section")
    return from_dict(ModelConfig, data["model"], "model")
