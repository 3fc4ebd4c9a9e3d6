"""Train the VAE or the latent U-Net on webdataset shards, alone or under torchrun (DDP).

    python -m latentdiff.train --config configs/train-tiny.yaml [--resume auto] [--train.lr=1e-4 ...]
    torchrun --nproc_per_node=8 -m latentdiff.train --config my.yaml
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m latentdiff.train --config my.yaml          # the same command on every node

The run directory (train.out_dir) holds
    config.yaml                      the resolved config of the latest start
    log.csv, train.log               metrics every log_every steps; messages
    samples/step-00001000.png        validation grids from the EMA weights
    ckpt-00001000/model.safetensors  the EMA weights as a latentdiff checkpoint (`generate --checkpoint` reads it)
    ckpt-00001000/state.pt           raw weights, EMA, optimizer, step, config and the RNG states of every rank,
                                     readable with torch.load(weights_only=True)
A checkpoint is written into a `.tmp-*` directory and renamed when complete, so a kill during the write leaves
only a temp directory: `--resume auto` never picks it and the next start deletes it.

A run owns the checkpoints up to its start step. One that starts behind the newest checkpoint (a fresh start in
a used out_dir, or --resume of an older ckpt-* to roll back a divergence) first moves every newer checkpoint,
whole, into `superseded-<time>/`: they are never overwritten, pruned or deleted, and `--resume auto` then
continues the run started last. keep_last prunes only the run's own checkpoints.

Resuming restores weights, EMA, optimizer, step and every rank's RNG; the data stream restarts with a seed that
depends on the step (shards are resampled, so no position within an epoch is kept).
"""
from __future__ import annotations

import contextlib
import dataclasses
import copy
import csv
import hashlib
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

from . import diffusion
from .checkpoint import CheckpointError, Models, build_models as build_fresh, config_problem, load_models, save_models
from .config import ConfigError, ModelConfig, from_dict, load_yaml, parse_overrides, to_dict
from .data import DataConfig, DataError, Loader, check_data, make_loader
from .memory_loader import make_memory_loader
from .files import atomic_write
from .generate import ArgumentParser
from .schedule import Schedule


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["vae", "unet"] = "unet"
    steps: int = 10000
    lr: float = 1e-4
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "constant"] = "constant"
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step (the effective batch is batch_size * grad_accum * ranks)
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n)) after n updates, as ldm's LitEma
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    gradient_checkpointing: bool = False
    init: str | None = None  # a checkpoint to fine-tune (SD 1.x / 2.x or latentdiff; its config replaces model:)
    # U-Net stage from scratch on a trained VAE: the VAE (weights and scale_factor) from this checkpoint, the U-Net
    # and text encoder fresh from model: (so model.diffusion, model.unet, ... overrides apply)
    init_vae: str | None = None
    train_text_encoder: bool = False  # U-Net stage: train the text encoder with the U-Net instead of freezing it
    loss_weighting: Literal["simple", "min_snr", "vlb"] = "simple"
    # U-Net stage: draw t = floor(T * u^(1 / (1 + b))), u uniform, so P(t < k) = (k / T)^(1 + b): b > 0 spends more
    # of the batch at high noise, where the text alone has to decide what is drawn; 0: uniform
    timestep_bias: float = 0.0
    min_snr_gamma: float = 5.0
    # VAE stage: "decoder" freezes the encoder (and quant_conv), so the latents stay those a U-Net may already be
    # learning while the decoder keeps improving (SD's ft-MSE VAE was made this way); use it with train.init
    vae_trainable: Literal["all", "decoder"] = "all"
    kl_weight: float = 1e-6  # VAE stage: loss = L1 + kl_weight * KL, both summed per image (ldm's convention)
    # VAE stage: "estimate" exports vae.scale_factor = 1/std of the latents (unit-variance U-Net inputs, as ldm's
    # scale_by_std); "keep" leaves the config's; "auto" estimates from scratch and keeps when fine-tuning (init),
    # because a U-Net trained on the old latents expects the old factor.
    vae_scale_factor: Literal["auto", "estimate", "keep"] = "auto"
    out_dir: str = "runs/train"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0  # 0: no sample grids
    sample_prompts: tuple[str, ...] = ("a photograph of an astronaut riding a horse",)
    sample_steps: int = 20
    sample_sampler: str | None = None  # None: the model config's sampling defaults
    sample_guidance: float | None = None
    max_consecutive_nonfinite: int = 10  # checked at the log steps (skipped steps change no weights meanwhile)


def load_config(path, overrides: dict | None = None) -> tuple[ModelConfig | None, DataConfig, TrainConfig]:
    """A training config file: `model:` (optional with train.init), `data:` and `train:` sections."""
    raw = load_yaml(path, overrides)
    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)} in {path}; "
                          f"a training config has model:, data: and train:")
    if "data" not in raw:
        raise ConfigError(f"config file {path} has no 'data:' section (at least data.shards)")
    train = from_dict(TrainConfig, raw.get("train") or {}, "train")
    data = from_dict(DataConfig, raw["data"], "data")
    model = from_dict(ModelConfig, raw["model"], "model") if raw.get("model") is not None else None
    if model is None and train.init is None:
        raise ConfigError(f"config file {path} needs a 'model:' section or train.init (a checkpoint to start from)")
    if train.init_vae is not None and (train.init is not None or train.stage != "unet"):
        raise ConfigError("train.init_vae starts a U-Net stage from scratch on a trained VAE: use it with "
                          "train.stage=unet and without train.init")
    checks = [
        (train.steps >= 1, f"train.steps must be at least 1 (got {train.steps})"),
        (math.isfinite(train.lr) and train.lr >= 0, f"train.lr must be a number >= 0 (got {train.lr})"),
        (train.warmup_steps >= 0, f"train.warmup_steps must be at least 0 (got {train.warmup_steps})"),
        (math.isfinite(train.grad_clip) and train.grad_clip >= 0,
         f"train.grad_clip must be >= 0, 0 turning clipping off (got {train.grad_clip})"),
        (train.timestep_bias >= 0.0, f"train.timestep_bias must be at least 0, 0 being uniform (got {train.timestep_bias})"),
        (train.grad_accum >= 1, f"train.grad_accum must be at least 1 (got {train.grad_accum})"),
        (train.keep_last >= 1, f"train.keep_last must be at least 1 (got {train.keep_last})"),
        (train.log_every >= 1, f"train.log_every must be at least 1 (got {train.log_every})"),
        (train.checkpoint_every >= 1, f"train.checkpoint_every must be at least 1 (got {train.checkpoint_every})"),
        (0.0 <= train.ema_decay < 1.0, f"train.ema_decay must be in [0, 1) (got {train.ema_decay})"),
        (train.max_consecutive_nonfinite >= 1,
         f"train.max_consecutive_nonfinite must be at least 1 (got {train.max_consecutive_nonfinite})"),
        (not (train.stage == "vae" and data.latents),
         "train.stage=vae trains on pixels: set data.latents=false (latent shards are for the U-Net stage)"),
        (not (train.stage == "vae" and train.train_text_encoder),
         "train.train_text_encoder needs train.stage=unet"),
        (train.vae_trainable == "all" or (train.stage == "vae" and train.init is not None),
         "train.vae_trainable=decoder fine-tunes a trained VAE: it needs train.stage=vae and train.init"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if model is not None:
        problem = config_problem(model)
        if problem:
            raise ConfigError(f"model: {problem}")
        check_weighting(model, train)
    return model, data, train


def check_weighting(model: ModelConfig, train: TrainConfig):
    """The U-Net loss weights must be finite at every timestep of the model's schedule."""
    if train.stage == "unet" and train.loss_weighting != "simple":
        try:
            diffusion.loss_weight(0, Schedule.from_config(model.diffusion), train.loss_weighting,
                                  model.diffusion.prediction, train.min_snr_gamma)
        except ValueError as e:
            raise ConfigError(f"train.loss_weighting: {e}") from None


# ----------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process.


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Dist:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # The rendezvous (MASTER_ADDR/PORT or torchrun's c10d store) comes from the environment, so one node and
        # many nodes run the same code.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Dist(rank, local_rank, world_size, device)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, d: Dist):
    """Rank 0's value of a small picklable object, on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# What is trained: one module per stage, so DDP wraps a single forward that returns the loss.


def sample_timesteps(n: int, num_timesteps: int, bias: float, gen: torch.Generator, device) -> torch.Tensor:
    """(n,) int64 timesteps in [0, T): uniform for bias 0, else P(t < k) = (k / T)^(1 + bias)."""
    if bias == 0.0:
        return torch.randint(0, num_timesteps, (n,), generator=gen, device=device)
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    return (u.pow(1.0 / (1.0 + bias)) * num_timesteps).long().clamp_(max=num_timesteps - 1)


class UNetLoss(nn.Module):
    """Diffusion loss (Ho et al. 2020, eq. 14) with the config's prediction type and per-timestep weighting."""

    def __init__(self, models: Models, schedule: Schedule, train_text: bool, weighting: str, gamma: float,
                 timestep_bias: float = 0.0):
        super().__init__()
        self.unet, self.text, self.vae = models.unet, models.text, models.vae
        self.schedule, self.train_text, self.weighting, self.gamma = schedule, train_text, weighting, gamma
        self.timestep_bias = timestep_bias
        self.prediction = models.config.diffusion.prediction

    def forward(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            if "latents" in batch:
                x0 = batch["latents"]
            else:  # encoding on the fly: the latents encode-shards writes (the posterior mean, in fp32)
                with torch.autocast(batch["pixels"].device.type, enabled=False):
                    x0 = self.vae.encode(batch["pixels"].float())
            x0 = x0.float()
        with contextlib.nullcontext() if self.train_text else torch.no_grad():
            context = self.text(batch["tokens"])  # (B, 77, D)
        B = x0.shape[0]
        t = sample_timesteps(B, self.schedule.num_timesteps, self.timestep_bias, gen, x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t, target = diffusion.training_batch(x0, t, noise, self.schedule, self.prediction)
        pred = self.unet(x_t, t, context).float()
        mse = (pred - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if self.weighting == "simple":
            return mse.mean()
        w = diffusion.loss_weight(t, self.schedule, self.weighting, self.prediction, self.gamma)  # (B,)
        return (w.to(mse) * mse).mean()


class VAELoss(nn.Module):
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (Rombach et al. 2022, sec. 3 / appendix G).

    Both terms are summed over each image and averaged over the batch, as ldm's LPIPSWithDiscriminator does, so
    a kl_weight of 1e-6 means what it means in SD's autoencoder configs. No perceptual (LPIPS) or adversarial
    term: they need pretrained weights, and nothing is downloaded here.
    """

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        x = batch["pixels"]
        rec, posterior = self.vae(x, gen)  # decoded from a posterior sample in train mode
        rec_loss = (rec.float() - x.float()).abs().flatten(1).sum(1).mean()
        return rec_loss + self.kl_weight * posterior.kl().float().mean()


class EMA:
    """Exponential moving average of the trained modules (copies in float32, never trained)."""

    def __init__(self, modules: dict[str, nn.Module], decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.source = modules
        self.modules = {k: copy.deepcopy(m).float().eval().requires_grad_(False) for k, m in modules.items()}
        device = next(p.device for m in self.modules.values() for p in m.parameters())
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per update

    @property
    def updates(self) -> int:
        return int(self.count)

    def current_decay(self) -> torch.Tensor:
        n = self.count
        return ((1 + n) / (10 + n)).clamp(max=self.decay) if self.warmup else torch.full_like(n, self.decay)

    @torch.no_grad()
    def update(self, ok: torch.Tensor | None = None):
        """One EMA step; with ok (a bool tensor) False, the average and its count stay as they are."""
        weight = 1.0 - self.current_decay()
        if ok is not None:
            weight = weight * ok
        for k, m in self.source.items():
            ema = [p for p in self.modules[k].parameters()]
            src = [p if p.dtype == torch.float32 else p.float() for p in m.parameters()]  # no_grad: no detach
            torch._foreach_lerp_(ema, src, weight.float())  # ema = d * ema + (1 - d) * p
            for be, bs in zip(self.modules[k].buffers(), m.buffers()):
                be.copy_(bs if ok is None else torch.where(ok, bs, be))
        self.count += 1 if ok is None else ok

    def state_dict(self) -> dict:
        return {"updates": self.updates, "modules": {k: m.state_dict() for k, m in self.modules.items()}}

    def load_state_dict(self, state: dict):
        self.count.fill_(int(state["updates"]))
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, then constant or cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Checkpoints


CKPT_RE = re.compile(r"^ckpt-(\d+)$")


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Only renamed directories count; `.tmp-*` leftovers never do."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
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
                    d: Dist, keep_last: int, scale_batch: torch.Tensor | None = None) -> Path:
    """Every rank sends its RNG state to rank 0, which writes a temp directory and renames it (atomic).

    With scale_batch (VAE stage), the exported config's vae.scale_factor is estimated from it with the EMA VAE.
    """
    rngs = all_gather(rng_state(gen), d)  # RNG of every rank, so a resume continues each rank's stream
    final = out_dir / f"ckpt-{step:08d}"
    if d.main:
        tmp = out_dir / f".tmp-ckpt-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        exported = Models(models.config, **{k: ema.modules.get(k, getattr(models, k)) for k in ("unet", "vae", "text")})
        if scale_batch is not None:
            vae_cfg = dataclasses.replace(exported.config.vae,
                                          scale_factor=estimate_scale_factor(exported.vae, scale_batch))
            exported = dataclasses.replace(exported, config=dataclasses.replace(exported.config, vae=vae_cfg))
        save_models(tmp / "model.safetensors", exported.config, exported.unet, exported.vae, exported.text,
                    extra_metadata={"latentdiff.train.step": step, "latentdiff.train.weights": "ema"})
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
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


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


# ----------------------------------------------------------------------------------------------
# Logging


class Logger:
    """Rank 0 only: tqdm progress bar, log.csv, train.log, TensorBoard when installed."""

    FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "nonfinite_steps", "skipped_samples", "elapsed_s"]

    def __init__(self, out_dir: Path, d: Dist, start: int, total: int):
        self.d, self.out_dir = d, out_dir
        self.bar = self.tb = None
        if not d.main:
            return
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, disable=None)
        path = out_dir / "log.csv"
        new = not path.exists()
        self.csv_file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.FIELDS)
        if new:
            self.csv.writeheader()
        self.text = open(out_dir / "train.log", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def info(self, message: str):
        if self.d.main:
            tqdm.write(message, file=sys.stderr)
            self.text.write(message + "\n")
            self.text.flush()

    def metrics(self, row: dict):
        if not self.d.main:
            return
        self.csv.writerow(row)
        self.csv_file.flush()
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.1f}")
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "images_per_s"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.d.main and not self.csv_file.closed:
            self.bar.close()
            self.csv_file.close()
            self.text.close()
            if self.tb is not None:
                self.tb.close()


@torch.no_grad()
def save_samples(path: Path, models: Models, ema: EMA, cfg: TrainConfig, data_cfg: DataConfig, device,
                 fixed_batch: dict | None):
    """A grid from the EMA weights: prompts for the U-Net stage, originals over reconstructions for the VAE."""
    from .pipeline import Pipeline, image_grid, to_pil

    if cfg.stage == "unet":
        m = Models(models.config, ema.modules["unet"], models.vae, ema.modules.get("text", models.text))
        training = {k: getattr(m, k).training for k in ("unet", "vae", "text")}
        pipe = Pipeline(m, device=device, dtype=torch.float32)
        images = pipe(list(cfg.sample_prompts), steps=cfg.sample_steps, sampler=cfg.sample_sampler,
                      guidance=cfg.sample_guidance, seed=cfg.seed, height=data_cfg.resolution,
                      width=data_cfg.resolution, progress=False).images
        for k, was in training.items():
            getattr(m, k).train(was)
        rows = [images]
    else:
        vae = ema.modules["vae"]
        x = fixed_batch["pixels"][:8].to(device)
        rows = [to_pil(x), to_pil(vae.decode(vae.encode(x)))]
    grid = image_grid([im for row in rows for im in row], cols=len(rows[0]))  # rows are of equal length
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")


def weights_digest(modules: dict[str, nn.Module]) -> str:
    """sha256 of the trained parameters' bytes: ranks in sync under DDP hold identical digests."""
    h = hashlib.sha256()
    for k in sorted(modules):
        for name, p in modules[k].state_dict().items():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The run


def build_models(model_cfg: ModelConfig | None, cfg: TrainConfig, device) -> Models:
    """Random weights from the config (seeded, so every rank builds the same), or the init checkpoint."""
    if cfg.init is not None:  # the checkpoint's own config (stored, or detected for SD files) wins over model:
        return load_models(cfg.init, device=device, dtype=torch.float32)
    if cfg.init_vae is not None:
        src = load_models(cfg.init_vae, device=device, dtype=torch.float32)
        if dataclasses.replace(src.config.vae, scale_factor=0.0) != dataclasses.replace(model_cfg.vae, scale_factor=0.0):
            raise ConfigError(f"the VAE in {cfg.init_vae} is not the one model.vae describes; make model.vae "
                              f"match the checkpoint that trained it")
        model_cfg = dataclasses.replace(model_cfg, vae=src.config.vae)
    torch.manual_seed(cfg.seed)
    models = build_fresh(model_cfg, device=device)
    if cfg.init_vae is not None:
        models.vae.load_state_dict(src.vae.state_dict())
    return models


class Tokenizer:
    """captions -> (B, 77) ids for the loader: holds only the text config, so it pickles into workers cheaply."""

    def __init__(self, cfg):
        self.cfg, self._encoder = cfg, None

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self._encoder is None:
            from .text_encoder import TextEncoder
            with torch.device("meta"):  # tokenization needs the config only, no weights
                self._encoder = TextEncoder(self.cfg)
        return self._encoder.tokenize(captions)

    def __getstate__(self):
        return {"cfg": self.cfg, "_encoder": None}


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves at the end of the step. Loader workers ignore both signals
    (data.ignore_stop_signals), so a signal to the whole process group stops the run the same way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.previous = {sig: signal.signal(sig, self.handler) for sig in self.SIGNALS}

    def handler(self, signum, frame):
        self.flag = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(model_cfg: ModelConfig | None, data_cfg: DataConfig, cfg: TrainConfig, resume: str | None = None) -> int:
    """The training loop; returns the final step. Runs alone or under torchrun."""
    d = setup_distributed()
    out_dir = Path(cfg.out_dir)
    check_data(data_cfg, world_size=d.world_size)  # a data mistake fails now, before anything is written

    # Resume point: rank 0 decides and tells the others, so every rank loads the same step. Checkpoints live
    # in out_dir, which must be a filesystem every node sees.
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
    state = load_state(ckpt_path) if ckpt_path is not None else None
    if state is not None and state["config"]["train"]["stage"] != cfg.stage:
        raise ConfigError(f"{ckpt_path} is a {state['config']['train']['stage']}-stage checkpoint; "
                          f"this config trains the {cfg.stage} stage")

    models = load_models(ckpt_path / "model.safetensors", device=d.device, dtype=torch.float32) \
        if state is not None else build_models(model_cfg, cfg, d.device)
    model_cfg = models.config
    if cfg.stage == "unet" and model_cfg.text2 is not None:
        raise SystemExit("error: training an SDXL U-Net is not supported (its pooled-text and size conditioning "
                         "are not in the trainer); the VAE stage works, or train an SD 1.x / 2.x layout")
    schedule = Schedule.from_config(model_cfg.diffusion)
    check_weighting(model_cfg, cfg)
    if cfg.stage == "unet":
        trained = {"unet": models.unet} | ({"text": models.text} if cfg.train_text_encoder else {})
        frozen = ["vae"] + ([] if cfg.train_text_encoder else ["text"])
        loss_module = UNetLoss(models, schedule, cfg.train_text_encoder, cfg.loss_weighting, cfg.min_snr_gamma,
                               cfg.timestep_bias)
        models.unet.gradient_checkpointing = cfg.gradient_checkpointing
    else:
        if cfg.gradient_checkpointing:
            raise ConfigError("train.gradient_checkpointing is implemented for the U-Net stage only")
        trained, frozen = {"vae": models.vae}, ["unet", "text"]
        loss_module = VAELoss(models.vae, cfg.kl_weight)
    for k in frozen:
        getattr(models, k).eval().requires_grad_(False)
    for m in trained.values():
        m.train().requires_grad_(True)
    if cfg.stage == "vae" and cfg.vae_trainable == "decoder":
        for m in (models.vae.encoder, models.vae.quant_conv):
            m.eval().requires_grad_(False)
    if state is not None:
        for k, m in trained.items():
            m.load_state_dict(state["model"][k])

    ema = EMA(trained, cfg.ema_decay, cfg.ema_warmup)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norm scales (as nanoGPT)
    no_decay = [p for p in params if p.ndim < 2]
    # Fused on every device: it skips a step on the device when told (found_inf, as under a GradScaler), so a
    # non-finite step needs no host sync to be skipped.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)
    step, counters = 0, {"nonfinite_steps": 0, "skipped_samples": 0}
    gen = torch.Generator(d.device).manual_seed(cfg.seed * 100003 + d.rank)  # per-rank noise and timesteps
    if state is not None:
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        counters = dict(state["counters"])
        if state["world_size"] == d.world_size:
            set_rng_state(state["rng"][d.rank], gen)
        else:  # a different world size has no per-rank stream to continue: fresh per-rank seeds
            gen.manual_seed(cfg.seed * 100003 + d.rank + 7919 * step)
    resumed, state = state is not None, None  # drop the host copy of the weights before training

    model = loss_module
    if d.enabled:
        model = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=cfg.train_text_encoder)  # a penultimate-layer text encoder leaves params unused
    if cfg.compile:  # in place: the module keeps its parameter names, DDP and EMA see the same tensors
        (models.unet if cfg.stage == "unet" else models.vae).compile()

    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and d.device.type == "cuda")
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    config_dict = {"model": to_dict(model_cfg), "data": to_dict(data_cfg), "train": to_dict(cfg)}
    aside = None
    if d.main:  # made only now, so a run refused above leaves nothing behind
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create train.out_dir {out_dir}: {e.strerror or e}; choose another") from None
        aside = move_aside_after(out_dir, step)
    barrier(d)
    log = Logger(out_dir, d, step, cfg.steps)
    if aside is not None:
        log.info(f"moved {', '.join(p.name for p in sorted(aside.iterdir()))} (newer than step {step}, from an "
                 f"earlier run) to {aside}; nothing was deleted")
    if d.main:
        for p in out_dir.glob(".tmp-*"):  # partial writes of a killed run
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log.info(f"removed {p.name}, left by an interrupted write")
        with atomic_write(out_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    n_params = sum(p.numel() for p in params)
    log.info(f"{cfg.stage} stage: {n_params / 1e6:.2f}M trained parameters, {d.world_size} rank(s) on "
             f"{d.device.type}, {'bf16 autocast' if use_bf16 else 'fp32'}, "
             + (f"resumed from {ckpt_path.name} at step {step}" if resumed
                else f"initialised from {cfg.init}" if cfg.init is not None
                else f"from scratch on the VAE of {cfg.init_vae}" if cfg.init_vae is not None else "from scratch"))

    stop = StopRequested()
    loader = None
    try:
        tokenize = None
        if cfg.stage == "unet":
            tokenize = Tokenizer(model_cfg.text)
        side = data_cfg.resolution // models.vae.latent_factor
        latent_shape = (model_cfg.vae.embed_dim, side, side)
        # Small sets (data.in_memory) live on the device, captions tokenized once; large ones stream from shards.
        loader = make_memory_loader(data_cfg, rank=d.rank, world_size=d.world_size, seed=cfg.seed + 1000 * step,
                                    tokenize=tokenize, device=d.device, log=log.info, latent_shape=latent_shape)
        if loader is None:
            loader = make_loader(data_cfg, rank=d.rank, world_size=d.world_size, seed=cfg.seed + 1000 * step,
                                 tokenize=tokenize, latent_shape=latent_shape)

        def batches():
            while True:  # a finite loader (no resampling) restarts: the step count, not epochs, ends the run
                yield from loader

        data_iter = batches()
        fixed_batch = None  # VAE stage: the first 8 images, for sample grids and the latent scale factor
        estimate_scale = cfg.stage == "vae" and (cfg.vae_scale_factor == "estimate" or
                                                 (cfg.vae_scale_factor == "auto" and cfg.init is None))
        # Per-step numbers stay on the device and are read (one host sync) at the log steps only: the summed
        # finite losses, finite and non-finite steps of the window, the current run of non-finite steps and the
        # step at which that run reached train.max_consecutive_nonfinite (0: not reached).
        window = torch.zeros(3, dtype=torch.float64, device=d.device)
        run = torch.zeros((), dtype=torch.int64, device=d.device)
        limit_step = torch.zeros((), dtype=torch.int64, device=d.device)
        grad_norm = torch.full((), float("nan"), device=d.device)
        pending_nonfinite = torch.zeros((), dtype=torch.int64, device=d.device)  # not yet in counters
        pending_skipped, window_t, window_images = 0, time.perf_counter(), 0
        start_time, start_step = time.perf_counter(), step

        def fold_counters():
            """Adds the steps and samples skipped since the last call (every rank's) to counters: a host sync."""
            nonlocal pending_skipped
            n = all_reduce_sum(torch.tensor([pending_skipped], dtype=torch.float64, device=d.device), d)
            counters["skipped_samples"] += int(n.item())
            counters["nonfinite_steps"] += int(pending_nonfinite.item())
            pending_skipped = 0
            pending_nonfinite.zero_()

        def checkpoint_now():
            fold_counters()  # the saved counters include a partial log window
            path = save_checkpoint(out_dir, step, models, trained, ema, opt, gen, config_dict, counters, d,
                                   cfg.keep_last, fixed_batch["pixels"] if estimate_scale else None)
            log.info(f"step {step}: saved {path}")

        # Under torchrun each rank runs in its own session: if the agent is killed, stop rather than train on
        # unsupervised (a dead agent can neither restart a failed rank nor stop the others).
        agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        while step < cfg.steps:
            if agent is not None and os.getppid() != agent:
                raise SystemExit(f"error: the torchrun agent (pid {agent}) is gone; stopping at step {step}. "
                                 f"Restart with --resume auto")
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss_sum = torch.zeros((), device=d.device)
            for micro in range(cfg.grad_accum):
                batch = next(data_iter)
                pending_skipped += int(batch.get("n_skipped", 0))
                window_images += batch["latents" if "latents" in batch else "pixels"].shape[0]
                batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                if fixed_batch is None and cfg.stage == "vae":
                    fixed_batch = {"pixels": batch["pixels"][:8].clone()}
                last = micro == cfg.grad_accum - 1
                # Gradients are all-reduced once per optimizer step: the non-final micro-steps skip DDP's sync.
                sync = contextlib.nullcontext() if last or not d.enabled else model.no_sync()
                with sync:
                    with autocast:
                        loss = model(batch, gen)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            loss_value = all_reduce_sum(loss_sum / cfg.grad_accum, d) / d.world_size  # queued, not waited for
            # Every rank sees the same all-reduced loss and gradient norm, so every rank skips the same steps.
            ok = torch.isfinite(loss_value) & torch.isfinite(norm)
            opt.found_inf = (~ok).float()  # fused AdamW leaves weights, moments and step count alone when 1
            opt.step()
            ema.update(ok)
            window += torch.stack([torch.where(ok, loss_value.double(), 0.0), ok.double(), (~ok).double()])
            pending_nonfinite += ~ok
            run = torch.where(ok, 0, run + 1)
            limit_step = torch.where((run >= cfg.max_consecutive_nonfinite) & (limit_step == 0), step + 1, limit_step)
            grad_norm = norm
            opt.zero_grad(set_to_none=True)
            step += 1
            log.advance()

            stop_flag = stop.flag
            if step % cfg.log_every == 0 or step == cfg.steps:
                # The host syncs of the window: the device numbers, and across ranks the images, the stop flag (so
                # every rank stops at the same step) and the skipped samples.
                loss_total, finite, nonfinite, norm_value, limit_at = torch.cat(
                    [window, grad_norm.double().view(1), limit_step.double().view(1)]).tolist()
                images, stop_ranks = all_reduce_sum(torch.tensor([window_images, float(stop.flag)],
                                                                 dtype=torch.float64, device=d.device), d).tolist()
                stop_flag = stop_ranks > 0
                fold_counters()
                if nonfinite:
                    log.info(f"step {step}: {int(nonfinite)} step(s) with a non-finite loss or gradient norm in the "
                             f"last {int(finite + nonfinite)} skipped ({counters['nonfinite_steps']} in all)")
                if limit_at > 0:
                    limit = cfg.max_consecutive_nonfinite
                    log.info(f"error: {limit} non-finite losses in a row (train.max_consecutive_nonfinite={limit}); "
                             f"stopping. Lower train.lr, check the data, or resume from the last checkpoint.")
                    raise SystemExit(f"error: {limit} consecutive non-finite losses at step {int(limit_at)} "
                                     f"(train.max_consecutive_nonfinite={limit}); lower train.lr or check the data")
                now = time.perf_counter()
                log.metrics({"step": step, "loss": loss_total / finite if finite else float("nan"),
                             "lr": lr_at(step - 1, cfg), "grad_norm": norm_value,
                             "images_per_s": images / max(now - window_t, 1e-9),
                             "nonfinite_steps": counters["nonfinite_steps"],
                             "skipped_samples": counters["skipped_samples"], "elapsed_s": now - start_time})
                window.zero_()
                window_t, window_images = now, 0
            elif d.enabled:
                stop_flag = False  # ranks agree on a stop at the log steps only
            if stop_flag:
                log.info(f"step {step}: stop requested (SIGTERM/SIGINT); saving and exiting")
                checkpoint_now()
                break
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint_now()
            if cfg.sample_every and step % cfg.sample_every == 0 and d.main:  # after the save: a grid never costs it
                save_samples(out_dir / "samples" / f"step-{step:08d}.png", models, ema, cfg, data_cfg, d.device,
                             fixed_batch)

        # Ranks in sync hold the same bytes: every rank hashes its weights and rank 0 compares them.
        digests = all_gather(weights_digest(trained), d)
        same = len(set(digests)) == 1
        log.info(f"weights digest per rank: {' '.join(digests)} ({'identical' if same else 'DIFFERENT'} across "
                 f"{d.world_size} rank(s))")
        log.info(f"done: step {step}, {counters['nonfinite_steps']} non-finite step(s) skipped, "
                 f"{counters['skipped_samples']} corrupt sample(s) skipped, {step - start_step} step(s) in "
                 f"{time.perf_counter() - start_time:.1f}s")
    finally:
        if isinstance(loader, Loader):
            loader.close()
        stop.restore()
        log.close()
    if d.enabled:
        dist.destroy_process_group()
    if not same:
        raise SystemExit("error: ranks hold different weights at the end of training (DDP out of sync)")
    return step


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m latentdiff.train",
        description="Train the VAE or the latent U-Net on webdataset shards (run under torchrun for DDP).",
        epilog="Any config key can be overridden: --train.lr=1e-4 --data.batch_size=16 --model.unet.model_channels=64")
    parser.add_argument("--config", required=True, help="training config YAML (model:, data:, train:)")
    parser.add_argument("--resume", default=None,
                        help="'auto': continue from the newest complete checkpoint in train.out_dir (a fresh start "
                             "when there is none); or a ckpt-* directory")
    args, rest = parser.parse_known_args(argv)
    try:
        model_cfg, data_cfg, cfg = load_config(args.config, parse_overrides(rest))
        train(model_cfg, data_cfg, cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The message of a user error; one raised in a loader worker arrives wrapped in the worker's traceback."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].partition(": ")[2] or lines[-1]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
