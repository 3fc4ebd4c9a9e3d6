"""Adapter files on disk: LoRA / LyCORIS files read and checked against a model, found by name in folders
(`<lora:NAME:...>`), hashed as A1111 records them, and textual-inversion embeddings.

What the tensors mean and how they change the weights is models/lora.py; this file only reads, finds and names.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from latentdiff.io.checkpoint import CheckpointError, load_file
from latentdiff.models.lora import Adapter, AdapterError, Patcher, family, name_table, read_adapter

ADAPTER_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def read_state(path: str | os.PathLike, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; AdapterError naming the file when it is missing, corrupt or pickled
    with more than tensors."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{what} {path} not found")
    if path.suffix not in ADAPTER_SUFFIXES:
        raise AdapterError(f"{what} {path}: unknown file type {path.suffix!r}; use .safetensors (or .pt / .ckpt)")
    try:
        return load_file(path)
    except CheckpointError as e:
        raise AdapterError(f"{what} {e}" if str(e).startswith(str(path)) else f"{what} {path}: {e}") from None


def read_lora(path: str | os.PathLike, unet, text, table=None) -> Adapter:
    """A LoRA / LyCORIS file checked against the modules (nothing applied); keys that match nothing in an otherwise
    good file give one warning with their count and three of them."""
    path = Path(path)
    state, metadata = read_state(path)
    try:
        adapter = read_adapter(state, metadata, table if table is not None else name_table(unet, text),
                               family(unet, text), name=path.stem)
    except AdapterError as e:
        raise AdapterError(f"LoRA {path}: {e}") from None
    if adapter.unmatched:
        n = len(adapter.unmatched)
        warnings.warn(f"LoRA {path}: {n} of its keys match no layer of this model and are ignored "
                      f"(e.g. {', '.join(adapter.unmatched[:3])})", stacklevel=2)
    return adapter


def list_adapters(folders, suffixes=ADAPTER_SUFFIXES) -> dict[str, Path]:
    """{name (file stem): path} of the adapter files in the folders and their subfolders; the first folder wins."""
    found: dict[str, Path] = {}
    for folder in folders or []:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix in suffixes and path.is_file() and not path.name.startswith("."):
                found.setdefault(path.stem, path)
    return found


def find_adapter(name: str, folders, what: str = "LoRA") -> Path:
    """The file `<lora:NAME>` means: NAME's file in the folders (by stem), else AdapterError saying where we looked."""
    hit = list_adapters(folders).get(name)
    if hit is None:
        where = ", ".join(str(f) for f in folders) if folders else "no folder (pass --lora-dir DIR)"
        raise AdapterError(f"unknown {what} {name!r}: no {name}.safetensors (or .pt / .ckpt) in {where}")
    return hit


def short_hash(path: str | os.PathLike) -> str:
    """A1111's `Lora hashes` entry: 12 hex digits of the SHA-256 of a .safetensors file's tensor data (everything
    after its JSON header, so edited metadata keeps the hash), or of the whole file for other types."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:12]


def metadata_of(path: str | os.PathLike) -> dict:
    """A .safetensors file's metadata, JSON values decoded (kohya stores tag frequencies as JSON text)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a listing shows what it can; loading the file reports the damage
        return {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v) if v[:1] in "{[" else v
        except ValueError:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Textual inversion


def read_embedding(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A textual-inversion embedding's vectors: {"": (n, width)} for one text encoder, {"clip_l": ..., "clip_g": ...}
    for SDXL. A1111 .pt (string_to_param, read with weights_only=True), .safetensors (emb_params, or clip_l / clip_g)
    and diffusers' learned_embeds ({token: (width,)})."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        state, _ = read_state(path, "embedding")
    else:
        state = _flatten(_torch_load(path))
    tensors = _embedding_tensors(path, state)
    for k, v in tensors.items():
        if v.ndim == 1:
            tensors[k] = v = v[None]
        if v.ndim != 2 or not torch.isfinite(v).all():
            raise AdapterError(f"embedding {path}: {k or 'its vectors'} {list(v.shape)} is not a finite "
                               f"(vectors, width) matrix")
    return tensors


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise AdapterError(f"embedding {path} was refused: its pickle needs more than tensors to load "
                           f"({str(e).splitlines()[0][:160]}); nothing in it was run. Use a .safetensors "
                           "release") from None
    except Exception as e:  # noqa: BLE001 - any damage is one line naming the file
        raise AdapterError(f"embedding {path} could not be read (truncated or corrupt? "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def _flatten(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> {"a.b": tensor}; everything else (names, steps) is left out."""
    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {}


def _embedding_tensors(path, state) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if v.is_floating_point()}
    if "clip_l" in state or "clip_g" in state:
        return {k: state[k].float() for k in ("clip_l", "clip_g") if k in state}
    if "emb_params" in state:
        return {"": state["emb_params"].float()}
    nested = [k for k in state if k.startswith("string_to_param.")]
    if len(nested) == 1:
        return {"": state[nested[0]].float()}
    if len(state) == 1:
        return {"": next(iter(state.values())).float()}
    raise AdapterError(f"embedding {path}: no emb_params, string_to_param, clip_l / clip_g or single tensor in it "
                       f"(keys: {', '.join(sorted(state)[:5]) or 'none'})")


# ----------------------------------------------------------------------------------------------
# The adapters on a model: loaded ones and those a prompt names


# A1111's extra-network syntax: <lora:NAME>, <lora:NAME:W> (both multipliers), <lora:NAME:TE:UNET>, te=, unet=.
LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """(the prompt without its <lora:...> tags, [(name, unet multiplier, text multiplier)]), in A1111's reading:
    the first number is the text encoders' multiplier and the U-Net's too unless a second number gives it."""
    found = []
    for m in LORA_TAG.finditer(prompt):
        positional, named = [], {}
        for item in m[2].split(":")[1:]:
            key, eq, value = item.partition("=")
            if eq:
                named[key.strip()] = value
            else:
                positional.append(item)
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise AdapterError(f"bad multiplier in {m[0]}: write <lora:NAME:0.8> or <lora:NAME:TE:UNET>") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise AdapterError(f"bad multiplier in {m[0]}: it must be a finite number")
        found.append((m[1].strip(), unet, te))
    return LORA_TAG.sub("", prompt), found


class LoraSet:
    """The adapters on a pipeline's U-Net and text encoder: those given to load(), plus the ones a call's prompts
    name (found by name in `dirs`). Weights change only when the set does; every file is read and checked once
    (again if it changes on disk)."""

    def __init__(self, unet, text):
        self.unet, self.text = unet, text
        self.dirs: list[Path] = []
        self.loaded: dict[Path, tuple[float, float]] = {}
        self.patcher = Patcher(unet, text)
        self.applied: tuple = ()
        self._table = None
        self._cache: dict[Path, tuple] = {}

    def read(self, path) -> tuple[Adapter, str]:
        """(the checked adapter, its A1111 short hash), from the cache while the file is unchanged."""
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError:
            raise AdapterError(f"LoRA {path} not found") from None
        stamp = (st.st_size, st.st_mtime_ns)
        if path not in self._cache or self._cache[path][0] != stamp:
            if self._table is None:
                self._table = name_table(self.unet, self.text)
            adapter = read_lora(path, self.unet, self.text, self._table)
            self._cache[path] = (stamp, adapter, short_hash(path))
        return self._cache[path][1:]

    def load(self, path, weight: float = 1.0, te_weight: float | None = None):
        """Keep this adapter applied (U-Net multiplier `weight`, text encoders `te_weight`, default the same)."""
        self.read(path)  # every check before anything changes
        self.loaded[Path(path).resolve()] = (float(weight), float(weight if te_weight is None else te_weight))
        self.use({})

    def unload(self, path=None):
        """Remove one loaded adapter, or all of them; the weights are the originals again, bit for bit. With none
        left, the memory kept for the next apply is freed too."""
        if path is None:
            self.loaded.clear()
        else:
            self.loaded.pop(Path(path).resolve(), None)
        self.use({})
        if not self.loaded:
            self.patcher.release()

    def use(self, extra: dict[Path, tuple[float, float]]):
        """Apply the loaded adapters plus `extra` (path -> multipliers; a path in both: the extra ones win)."""
        wanted = {**self.loaded, **extra}
        key = tuple(sorted((str(p), m) for p, m in wanted.items()))
        if key == self.applied:
            return
        adapters = [(self.read(p)[0], unet, te) for p, (unet, te) in wanted.items()]
        self.applied = ()  # a failure half-way leaves the originals: apply() restores them first
        self.patcher.apply(adapters)
        self.applied = key

    def activate(self, prompts: list[str]) -> tuple[list[str], str | None]:
        """Apply what the prompts' tags name (one set for the whole batch, first mention wins) with the loaded ones;
        returns the prompts without tags and A1111's `Lora hashes` value (None when no adapter is on)."""
        texts, named = [], {}
        for p in prompts:
            text, tags = extract_loras(p)
            texts.append(text)
            for name, unet, te in tags:
                named.setdefault(name, (unet, te))
        paths = {name: find_adapter(name, self.dirs).resolve() for name in named}
        self.use({paths[name]: m for name, m in named.items()})
        labels = {**{p: p.stem for p in self.loaded}, **{p: name for name, p in paths.items()}}
        hashes = [f"{label.replace(':', '').replace(',', '')}: {self.read(p)[1]}" for p, label in labels.items()]
        return texts, ", ".join(hashes) or None


def load_embeddings(folders, text) -> tuple[dict[str, dict], dict[str, dict]]:
    """Give the text encoder(s) every embedding in the folders that fits them: (loaded, skipped), each {name: info}
    as A1111's /sdapi/v1/embeddings lists them (skipped ones say why)."""
    encoders = {"clip_l": text.clip_l, "clip_g": text.clip_g} if hasattr(text, "clip_g") else {"": text}
    usable = {k: {} for k in encoders}
    loaded, skipped = {}, {}
    for name, path in list_adapters(folders, (".safetensors", ".pt", ".bin")).items():
        try:
            vectors = read_embedding(path)
        except AdapterError as e:
            skipped[name] = {"error": str(e)}
            continue
        first = next(iter(vectors.values()))
        info = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": first.shape[1],
                "vectors": first.shape[0]}
        problem = None
        if set(vectors) != set(encoders):
            problem = (f"it has vectors for {' and '.join(sorted(vectors)) or 'one text encoder'}, this model's "
                       f"text encoders are {' and '.join(sorted(encoders)) or 'one'}: made for another base model")
        elif any(v.shape[1] != encoders[k].config.width for k, v in vectors.items()) or \
                len({v.shape[0] for v in vectors.values()}) != 1:
            problem = ("its vectors are " + ", ".join(f"{list(v.shape)}" for v in vectors.values()) +
                       ", this model's text encoder width is " +
                       " and ".join(str(e.config.width) for e in encoders.values()) + ": made for another base model")
        if problem:
            skipped[name] = dict(info, error=f"embedding {path}: {problem}")
            continue
        loaded[name] = info
        for k in encoders:
            usable[k][name] = vectors[k]
    for k, encoder in encoders.items():
        encoder.set_embeddings(usable[k])
    return loaded, skipped
