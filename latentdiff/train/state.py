"""A run's folder on disk: checkpoints (written atomically), resume points, moving newer ones aside, RNG states."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn

from latentdiff.io.checkpoint import Models, save_models
from latentdiff.io.config import ConfigError
from latentdiff.io.files import atomic_write
from latentdiff.train import lora
from latentdiff.train.dist import Dist, all_gather, barrier, broadcast
from latentdiff.train.losses import EMA


CKPT_RE = re.compile(r"^ckpt-(\d+)$")


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Only renamed directories count; `.tmp-*` leftovers never do."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = CKPT_RE.match(p.name)
            exported = (p / "model.safetensors").is_file() or (p / lora.FILE).is_file()  # train.lora: the factors
            if m and p.is_dir() and (p / "state.pt").is_file() and exported:
                found.append((int(m.group(1)), p))
    return sorted(found)


def rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, gen: torch.Generator):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def estimate_scale_factor(vae, pixels: torch.Tensor) -> float:
    """1 / std of the posterior-mean latents of a batch, so the diffusion model sees unit-variance latents."""
    was_training = vae.training
    vae.eval()
    z = vae.encode_posterior(pixels).mode().float()
    vae.train(was_training)
    return float(1.0 / z.std())


def save_checkpoint(out_dir: Path, step: int, models: Models, trained: dict[str, nn.Module], ema: EMA,
                    opt: torch.optim.Optimizer, gen: torch.Generator, config: dict, counters: dict,
                    d: Dist, keep_last: int, scale_batch: torch.Tensor | None = None,
                    lora_meta: dict[str, str] | None = None) -> Path:
    """Every rank sends its RNG state to rank 0, which writes a temp directory and renames it (atomic).

    With scale_batch (VAE stage), the exported config's vae.scale_factor is estimated from it with the EMA VAE.
    A train.lora run (trained == {"lora": ...}) exports the EMA factors as a kohya file with lora_meta, in the
    checkpoint and as out_dir/lora.safetensors, instead of the whole model.
    """
    rngs = all_gather(rng_state(gen), d)  # RNG of every rank, so a resume continues each rank's stream
    final = out_dir / f"ckpt-{step:08d}"
    if d.main:
        tmp = out_dir / f".tmp-ckpt-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if "lora" in ema.modules:
            lora.save(tmp / lora.FILE, ema.modules["lora"], lora_meta)
        else:
            _export_model(tmp / "model.safetensors", models, ema, step, scale_batch)
        state = {
            "step": step,
            "model": {k: m.state_dict() for k, m in trained.items()},
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling; fp16 training is not offered
            "config": config,
            "rng": rngs,
            "world_size": d.world_size,
            "counters": counters,
        }
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # never deleted: a run moves newer checkpoints aside when it starts (move_aside_after)
            move_aside_after(out_dir, step - 1)
        os.replace(tmp, final)
        if "lora" in ema.modules:  # the newest factors where a user looks for them
            with atomic_write(out_dir / lora.FILE) as latest:
                shutil.copyfile(final / lora.FILE, latest)
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def _export_model(path: Path, models: Models, ema: EMA, step: int, scale_batch: torch.Tensor | None):
    """The EMA weights (the untrained modules as they are) as a latentdiff checkpoint."""
    exported = Models(models.config, **{k: ema.modules.get(k, getattr(models, k)) for k in ("unet", "vae", "text")})
    if scale_batch is not None:
        vae_cfg = dataclasses.replace(exported.config.vae,
                                      scale_factor=estimate_scale_factor(exported.vae, scale_batch))
        exported = dataclasses.replace(exported, config=dataclasses.replace(exported.config, vae=vae_cfg))
    save_models(path, exported.config, exported.unet, exported.vae, exported.text,
                extra_metadata={"latentdiff.train.step": step, "latentdiff.train.weights": "ema"})


def move_aside_after(out_dir: Path, step: int) -> Path | None:
    """Move the checkpoints newer than `step` into out_dir/superseded-TIME/, whole; returns that folder."""
    newer = [p for s, p in list_checkpoints(out_dir) if s > step]
    if not newer:
        return None
    aside = out_dir / time.strftime("superseded-%Y%m%d-%H%M%S")
    k = 1
    while aside.exists():
        aside, k = aside.with_name(f"{aside.name.split('.')[0]}.{k}"), k + 1
    aside.mkdir()
    for p in newer:
        os.replace(p, aside / p.name)
    return aside


def load_state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def weights_digest(modules: dict[str, nn.Module]) -> str:
    """sha256 of the trained parameters' bytes: ranks in sync under DDP hold identical digests."""
    h = hashlib.sha256()
    for k in sorted(modules):
        for name, p in modules[k].state_dict().items():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resume_point(resume: str | None, out_dir: Path, d: Dist) -> Path | None:
    """The checkpoint to continue from ("auto": the newest complete one), decided by rank 0 for every rank.
    Checkpoints live in out_dir, which must be a filesystem every node sees."""
    ckpt_path = None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        ckpt_path = found[-1][1] if found else None
    elif resume:
        ckpt_path = Path(resume)
        if not (ckpt_path / "state.pt").is_file():
            raise ConfigError(f"--resume {resume}: no state.pt there; pass a ckpt-* directory or 'auto'")
    ckpt_path = broadcast(ckpt_path, d)
    if ckpt_path is not None and not (ckpt_path / "state.pt").is_file():
        raise SystemExit(f"error: rank {d.rank} cannot read {ckpt_path}: train.out_dir must be on a filesystem "
                         f"that every node mounts")
    return ckpt_path
