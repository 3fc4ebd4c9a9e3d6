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
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from latentdiff.data.loader import DataConfig, Loader, check_data, make_loader
from latentdiff.data.memory import make_memory_loader
from latentdiff.diffusion.schedule import Schedule
from latentdiff.io.checkpoint import Models, build_models as build_fresh, load_models
from latentdiff.io.config import ConfigError, ModelConfig, to_dict
from latentdiff.io.files import atomic_write
from latentdiff.train.config import TrainConfig, check_weighting, lr_at, resumed_schedule, schedule_steps
from latentdiff.train.dist import Dist, all_gather, all_reduce_sum, any_rank, barrier, setup_distributed
from latentdiff.train import lora as train_lora
from latentdiff.train.log import Logger, save_samples
from latentdiff.train.losses import EMA, UNetLoss, VAELoss
from latentdiff.train.state import load_state, move_aside_after, resume_point, save_checkpoint, set_rng_state, \
    weights_digest


# ----------------------------------------------------------------------------------------------
# Setting up: models, what trains, optimizer, resume


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
            from latentdiff.models.text_encoder import TextEncoder
            with torch.device("meta"):  # tokenization needs the config only, no weights
                self._encoder = TextEncoder(self.cfg)
        return self._encoder.tokenize(captions)

    def __getstate__(self):
        return {"cfg": self.cfg, "_encoder": None}


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves at the end of the step. Loader workers ignore both signals
    (data.ignore_stop_signals), so a signal to the whole process group stops the run the same way.

    Under torchrun the ranks agree on the flag after every step (dist.any_rank: one all-reduce of one float over
    gloo, on the host), so all of them stop at the end of the step in which the first rank got the signal, or of
    the next step when it came after that step's check (during a checkpoint or a sample grid). The worst case from
    signal to saved checkpoint: the rest of the step, any checkpoint or grid under way, one more step, the save.
    torchrun's agent passes a SIGTERM on to the ranks and kills them --shutdown-timeout (30) seconds later."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.previous = {sig: signal.signal(sig, self.handler) for sig in self.SIGNALS}

    def handler(self, signum, frame):
        self.flag = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """Everything the loop carries from one step to the next."""
    d: Dist
    cfg: TrainConfig
    data_cfg: DataConfig
    out_dir: Path
    models: Models
    trained: dict[str, nn.Module]
    model: nn.Module  # the loss module, wrapped in DDP under torchrun
    params: list[torch.Tensor]
    ema: EMA
    opt: torch.optim.Optimizer
    gen: torch.Generator
    bf16: bool  # bf16 autocast
    step: int = 0
    counters: dict = dataclasses.field(default_factory=lambda: {"nonfinite_steps": 0, "skipped_samples": 0})
    config_dict: dict = dataclasses.field(default_factory=dict)
    fixed_batch: dict | None = None  # VAE stage: the first 8 images, for sample grids and the latent scale factor
    notes: list[str] = dataclasses.field(default_factory=list)  # for train.log once it is open

    @property
    def autocast(self) -> torch.autocast:
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def estimate_scale(self) -> bool:
        cfg = self.cfg
        return cfg.stage == "vae" and (cfg.vae_scale_factor == "estimate" or
                                       (cfg.vae_scale_factor == "auto" and cfg.init is None))


def trained_modules(models: Models, cfg: TrainConfig) -> tuple[dict[str, nn.Module], nn.Module]:
    """The modules this stage trains (the rest frozen) and the loss module that DDP wraps."""
    if cfg.stage == "unet":
        trained = {"unet": models.unet} | ({"text": models.text} if cfg.train_text_encoder else {})
        frozen = ["vae"] + ([] if cfg.train_text_encoder else ["text"])
        schedule = Schedule.from_config(models.config.diffusion)
        loss_module = UNetLoss(models, schedule, trains_text(cfg), cfg.loss_weighting, cfg.min_snr_gamma,
                               cfg.timestep_bias)
        if cfg.lora is not None:  # only the factors train; a submodule of the loss, so DDP syncs their gradients
            trained, frozen = {"lora": train_lora.attach(models, cfg.lora, cfg.seed)}, ["unet", "vae", "text"]
            loss_module.lora = trained["lora"]
            if cfg.lora.base_dtype == "bfloat16":  # the factors are modules of their own: they stay fp32
                models.unet.to(torch.bfloat16)
                models.text.to(torch.bfloat16)
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
    return trained, loss_module


def trains_text(cfg: TrainConfig) -> bool:
    """Whether gradients flow through the text encoder (trained whole, or LoRA factors on it)."""
    return cfg.train_text_encoder or (cfg.lora is not None and cfg.lora.text_encoder)


def make_optimizer(trained: dict[str, nn.Module], cfg: TrainConfig) -> tuple[list, torch.optim.Optimizer]:
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norm scales (as nanoGPT)
    no_decay = [p for p in params if p.ndim < 2]
    # Fused on every device: it skips a step on the device when told (found_inf, as under a GradScaler), so a
    # non-finite step needs no host sync to be skipped.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)
    return params, opt


def setup(model_cfg: ModelConfig | None, data_cfg: DataConfig, cfg: TrainConfig, d: Dist,
          ckpt_path: Path | None) -> Run:
    """Models (fresh, fine-tuned or resumed), the trained modules, EMA, optimizer and per-rank generator."""
    state = load_state(ckpt_path) if ckpt_path is not None else None
    if state is not None and state["config"]["train"]["stage"] != cfg.stage:
        raise ConfigError(f"{ckpt_path} is a {state['config']['train']['stage']}-stage checkpoint; "
                          f"this config trains the {cfg.stage} stage")
    if state is not None and ("lora" in state["model"]) != (cfg.lora is not None):
        raise ConfigError(f"{ckpt_path} is a {'LoRA' if 'lora' in state['model'] else 'full fine-tuning'} checkpoint; "
                          f"resume it with{'' if 'lora' in state['model'] else 'out'} train.lora, as it was trained")
    notes = []
    if state is not None:  # the run's LR schedule, unless train.reschedule asks for the new train.steps'
        cfg, note = resumed_schedule(cfg, state["config"]["train"], int(state["step"]))
        notes += [note] if note else []
    if state is not None and cfg.lora is None:
        models = load_models(ckpt_path / "model.safetensors", device=d.device, dtype=torch.float32)
    else:  # a LoRA checkpoint holds the factors only: the base is built again as at the start
        models = build_models(model_cfg, cfg, d.device)
        if state is not None and to_dict(models.config) != state["config"]["model"]:
            raise ConfigError(f"{ckpt_path} holds LoRA factors for another base model: resume with the run's "
                              f"train.init and model: section")
    if cfg.stage == "unet" and models.config.text2 is not None:
        raise SystemExit("error: training an SDXL U-Net is not supported (its pooled-text and size conditioning "
                         "are not in the trainer); the VAE stage works, or train an SD 1.x / 2.x layout")
    check_weighting(models.config, cfg)
    trained, loss_module = trained_modules(models, cfg)
    if state is not None:
        for k, m in trained.items():
            m.load_state_dict(state["model"][k])
    ema = EMA(trained, cfg.ema_decay, cfg.ema_warmup)
    params, opt = make_optimizer(trained, cfg)
    gen = torch.Generator(d.device).manual_seed(cfg.seed * 100003 + d.rank)  # per-rank noise and timesteps
    use_bf16 = (cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and d.device.type == "cuda")
                or (cfg.lora is not None and cfg.lora.base_dtype == "bfloat16"))
    run = Run(d, cfg, data_cfg, Path(cfg.out_dir), models, trained, loss_module, params, ema, opt, gen, use_bf16,
              notes=notes)
    if state is not None:
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        run.step = int(state["step"])
        run.counters = dict(state["counters"])
        if state["world_size"] == d.world_size:
            set_rng_state(state["rng"][d.rank], gen)
        else:  # a different world size has no per-rank stream to continue: fresh per-rank seeds
            gen.manual_seed(cfg.seed * 100003 + d.rank + 7919 * run.step)
    if d.enabled:
        run.model = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=trains_text(cfg))  # a penultimate-layer text encoder leaves params unused
    if cfg.compile:  # in place: the module keeps its parameter names, DDP and EMA see the same tensors
        (models.unet if cfg.stage == "unet" else models.vae).compile()
    run.config_dict = {"model": to_dict(models.config), "data": to_dict(data_cfg), "train": to_dict(cfg)}
    return run


def open_run_dir(run: Run, resumed_from: Path | None) -> Logger:
    """Creates out_dir (only now, so a run refused above leaves nothing behind), moves newer checkpoints aside,
    clears partial writes, writes config.yaml and opens the log."""
    d, out_dir, cfg = run.d, run.out_dir, run.cfg
    aside = None
    if d.main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create train.out_dir {out_dir}: {e.strerror or e}; choose another") from None
        aside = move_aside_after(out_dir, run.step)
    barrier(d)
    log = Logger(out_dir, d, run.step, cfg.steps)
    if aside is not None:
        log.info(f"moved {', '.join(p.name for p in sorted(aside.iterdir()))} (newer than step {run.step}, from an "
                 f"earlier run) to {aside}; nothing was deleted")
    if d.main:
        for p in out_dir.glob(".tmp-*"):  # partial writes of a killed run
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log.info(f"removed {p.name}, left by an interrupted write")
        with atomic_write(out_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(run.config_dict, sort_keys=False))
    n_params = sum(p.numel() for p in run.params)
    log.info(f"{cfg.stage} stage: {n_params / 1e6:.2f}M trained parameters, {d.world_size} rank(s) on "
             f"{d.device.type}, {'bf16 autocast' if run.bf16 else 'fp32'}, "
             + ("bf16 base, " if cfg.lora is not None and cfg.lora.base_dtype == "bfloat16" else "")
             + (f"resumed from {resumed_from.name} at step {run.step}" if resumed_from is not None
                else f"initialised from {cfg.init}" if cfg.init is not None
                else f"from scratch on the VAE of {cfg.init_vae}" if cfg.init_vae is not None else "from scratch"))
    if cfg.stage == "unet" and cfg.init is None and cfg.init_vae is None:
        log.info("WARNING: this U-Net trains on a random, untrained VAE (train.allow_untrained_vae): it will draw "
                 "noise however low the loss goes. For a model that draws, fine-tune one (train.init) or train the "
                 "VAE first and pass it as train.init_vae")
    for note in run.notes:
        log.info(note)
    return log


def open_loader(run: Run, log: Logger):
    """Small sets (data.in_memory) live on the device, captions tokenized once; large ones stream from shards."""
    d, cfg, data_cfg, model_cfg = run.d, run.cfg, run.data_cfg, run.models.config
    tokenize = Tokenizer(model_cfg.text) if cfg.stage == "unet" else None
    side = data_cfg.resolution // run.models.vae.latent_factor
    latent_shape = (model_cfg.vae.embed_dim, side, side)
    loader = make_memory_loader(data_cfg, rank=d.rank, world_size=d.world_size, seed=cfg.seed + 1000 * run.step,
                                tokenize=tokenize, device=d.device, log=log.info, latent_shape=latent_shape)
    if loader is None:
        loader = make_loader(data_cfg, rank=d.rank, world_size=d.world_size, seed=cfg.seed + 1000 * run.step,
                             tokenize=tokenize, latent_shape=latent_shape)
    return loader


def endless(loader):
    while True:  # a finite loader (no resampling) restarts: the step count, not epochs, ends the run
        yield from loader


# ----------------------------------------------------------------------------------------------
# One step, and what is counted of it


class Window:
    """Per-step numbers that stay on the device and are read (one host sync) at the log steps only: the summed
    finite losses, the finite and non-finite steps of the window, the current run of non-finite steps and the step
    at which that run reached train.max_consecutive_nonfinite (0: not reached)."""

    def __init__(self, d: Dist, max_nonfinite: int):
        self.d, self.max_nonfinite = d, max_nonfinite
        self.sums = torch.zeros(3, dtype=torch.float64, device=d.device)
        self.run = torch.zeros((), dtype=torch.int64, device=d.device)
        self.limit_step = torch.zeros((), dtype=torch.int64, device=d.device)
        self.grad_norm = torch.full((), float("nan"), device=d.device)
        self.pending_nonfinite = torch.zeros((), dtype=torch.int64, device=d.device)  # not yet in counters
        self.pending_skipped, self.images, self.t = 0, 0, time.perf_counter()

    def record(self, step: int, loss: torch.Tensor, norm: torch.Tensor, ok: torch.Tensor):
        self.sums += torch.stack([torch.where(ok, loss.double(), 0.0), ok.double(), (~ok).double()])
        self.pending_nonfinite += ~ok
        self.run = torch.where(ok, 0, self.run + 1)
        self.limit_step = torch.where((self.run >= self.max_nonfinite) & (self.limit_step == 0), step + 1,
                                      self.limit_step)
        self.grad_norm = norm

    def fold(self, counters: dict):
        """Adds the steps and samples skipped since the last call (every rank's) to counters: a host sync."""
        n = all_reduce_sum(torch.tensor([self.pending_skipped], dtype=torch.float64, device=self.d.device), self.d)
        counters["skipped_samples"] += int(n.item())
        counters["nonfinite_steps"] += int(self.pending_nonfinite.item())
        self.pending_skipped = 0
        self.pending_nonfinite.zero_()


def train_step(run: Run, batches, window: Window):
    """grad_accum micro-batches, then one optimizer and EMA step that the device skips when non-finite."""
    cfg, d = run.cfg, run.d
    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.step, cfg)
    loss_sum = torch.zeros((), device=d.device)
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        window.pending_skipped += int(batch.get("n_skipped", 0))
        window.images += batch["latents" if "latents" in batch else "pixels"].shape[0]
        batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if run.fixed_batch is None and cfg.stage == "vae":
            run.fixed_batch = {"pixels": batch["pixels"][:8].clone()}
        last = micro == cfg.grad_accum - 1
        # Gradients are all-reduced once per optimizer step: the non-final micro-steps skip DDP's sync.
        sync = contextlib.nullcontext() if last or not d.enabled else run.model.no_sync()
        with sync:
            with run.autocast:
                loss = run.model(batch, run.gen)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().float()
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(run.params, clip)
    loss_value = all_reduce_sum(loss_sum / cfg.grad_accum, d) / d.world_size  # queued, not waited for
    # Every rank sees the same all-reduced loss and gradient norm, so every rank skips the same steps.
    ok = torch.isfinite(loss_value) & torch.isfinite(norm)
    run.opt.found_inf = (~ok).float()  # fused AdamW leaves weights, moments and step count alone when 1
    run.opt.step()
    run.ema.update(ok)
    window.record(run.step, loss_value, norm, ok)
    run.opt.zero_grad(set_to_none=True)
    run.step += 1


def log_window(run: Run, window: Window, log: Logger, start_time: float):
    """The host syncs of a log step: the device numbers, and across ranks the images and the skipped samples."""
    cfg, d, step, counters = run.cfg, run.d, run.step, run.counters
    loss_total, finite, nonfinite, norm_value, limit_at = torch.cat(
        [window.sums, window.grad_norm.double().view(1), window.limit_step.double().view(1)]).tolist()
    images = all_reduce_sum(torch.tensor([window.images], dtype=torch.float64, device=d.device), d).item()
    window.fold(counters)
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
                 "images_per_s": images / max(now - window.t, 1e-9),
                 "nonfinite_steps": counters["nonfinite_steps"],
                 "skipped_samples": counters["skipped_samples"], "elapsed_s": now - start_time})
    window.sums.zero_()
    window.t, window.images = now, 0


def checkpoint(run: Run, window: Window, log: Logger):
    window.fold(run.counters)  # the saved counters include a partial log window
    path = save_checkpoint(run.out_dir, run.step, run.models, run.trained, run.ema, run.opt, run.gen,
                           run.config_dict, run.counters, run.d, run.cfg.keep_last,
                           run.fixed_batch["pixels"] if run.estimate_scale else None,
                           train_lora.metadata(run.models, run.cfg.lora, run.step, run.cfg.init)
                           if run.cfg.lora else None)
    log.info(f"step {run.step}: saved {path}")


def ranks_in_sync(run: Run, log: Logger) -> bool:
    """Ranks in sync hold the same bytes: every rank hashes its weights and rank 0 compares them."""
    digests = all_gather(weights_digest(run.trained), run.d)
    same = len(set(digests)) == 1
    log.info(f"weights digest per rank: {' '.join(digests)} ({'identical' if same else 'DIFFERENT'} across "
             f"{run.d.world_size} rank(s))")
    return same


# ----------------------------------------------------------------------------------------------
# The loop


def finished(run: Run, ckpt_path: Path):
    """A resume of a run that already reached train.steps: say so, and how to train on."""
    if run.d.main:
        print(f"{ckpt_path} is already at step {run.step} and train.steps is {run.cfg.steps}: nothing to train. To "
              f"train on, raise it (--resume auto --train.steps=N, N > {run.step}); the LR schedule then keeps the "
              f"run's {schedule_steps(run.cfg)} steps unless you add --train.reschedule=true", file=sys.stderr)
    if run.d.enabled:
        dist.destroy_process_group()


def train(model_cfg: ModelConfig | None, data_cfg: DataConfig, cfg: TrainConfig, resume: str | None = None) -> int:
    """The training loop; returns the final step. Runs alone or under torchrun."""
    d = setup_distributed()
    check_data(data_cfg, world_size=d.world_size)  # a data mistake fails now, before anything is written
    ckpt_path = resume_point(resume, Path(cfg.out_dir), d)
    run = setup(model_cfg, data_cfg, cfg, d, ckpt_path)
    if ckpt_path is not None and run.step >= cfg.steps:
        finished(run, ckpt_path)
        return run.step
    log = open_run_dir(run, ckpt_path)
    stop, loader = StopRequested(), None
    try:
        loader = open_loader(run, log)
        batches, window = endless(loader), Window(d, cfg.max_consecutive_nonfinite)
        start_time, start_step = time.perf_counter(), run.step
        # Under torchrun each rank runs in its own session: if the agent is killed, stop rather than train on
        # unsupervised (a dead agent can neither restart a failed rank nor stop the others).
        agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        while run.step < cfg.steps:
            if agent is not None and os.getppid() != agent:
                raise SystemExit(f"error: the torchrun agent (pid {agent}) is gone; stopping at step {run.step}. "
                                 f"Restart with --resume auto")
            train_step(run, batches, window)
            log.advance()
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                log_window(run, window, log, start_time)
            if any_rank(stop.flag, d):  # every rank stops at the same step (StopRequested says when)
                log.info(f"step {run.step}: stop requested (SIGTERM/SIGINT); saving and exiting")
                checkpoint(run, window, log)
                break
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
                checkpoint(run, window, log)
            if cfg.sample_every and run.step % cfg.sample_every == 0 and d.main:  # after the save: never costs it
                save_samples(run.out_dir / "samples" / f"step-{run.step:08d}.png", run.models, run.ema, cfg, data_cfg,
                             d.device, run.fixed_batch)
        same = ranks_in_sync(run, log)
        log.info(f"done: step {run.step}, {run.counters['nonfinite_steps']} non-finite step(s) skipped, "
                 f"{run.counters['skipped_samples']} corrupt sample(s) skipped, {run.step - start_step} step(s) in "
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
    return run.step
