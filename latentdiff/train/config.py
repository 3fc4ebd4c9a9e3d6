"""The `train:` section of a training config, and the whole file (model:, data:, train:) checked before any work."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from latentdiff.data.loader import DataConfig
from latentdiff.diffusion import process
from latentdiff.diffusion.schedule import Schedule
from latentdiff.io.checkpoint import config_problem
from latentdiff.io.config import ConfigError, ModelConfig, from_dict, load_yaml
from latentdiff.models.lora_train import TARGETS


@dataclass(frozen=True)
class LoraConfig:
    """train.lora: train low-rank factors on the frozen base, saved as a kohya LoRA / LoCon file."""
    rank: int = 16  # kohya's network_dim
    alpha: float = 16.0  # the delta is scaled by alpha / rank (kohya's network_alpha)
    # attn: attention q/k/v/out; ff: feed-forward; proj: the transformers' proj_in/out (these three: kohya's
    # default network); resblock: ResBlock and resampler convs, 3x3 included (LoCon)
    targets: tuple[str, ...] = ("attn", "ff", "proj")
    text_encoder: bool = False  # also train factors on the text encoder's attention / MLP (the same targets)
    dropout: float = 0.0  # on each down projection's output, while training (kohya's network_dropout)
    # The frozen U-Net and text encoder held in bf16 (half the memory; the step runs under bf16 autocast, on the CPU
    # too), the factors, their gradients, Adam moments and EMA in fp32. The VAE stays fp32. fp16 is not offered:
    # training through fp16 activations needs loss scaling, which this trainer does not do.
    base_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True)
class TrainConfig:
    stage: Literal["vae", "unet"] = "unet"
    steps: int = 10000
    lr: float = 1e-4
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "constant"] = "constant"
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    # The cosine's length in steps (0: train.steps). A resume keeps the length of the run it continues, so raising
    # train.steps there trains on at the schedule's end value instead of jumping back up the curve; set
    # train.reschedule=true to stretch the schedule over the new train.steps (the LR change is logged).
    lr_schedule_steps: int = 0
    reschedule: bool = False
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
    # U-Net stage with neither init nor init_vae: the VAE stays random and frozen, so the U-Net learns latents no
    # decoder can turn back into pictures and the result draws noise. Refused unless this is true (pipeline tests,
    # benchmarks: configs/train-tiny.yaml sets it); then the run says so loudly.
    allow_untrained_vae: bool = False
    train_text_encoder: bool = False  # U-Net stage: train the text encoder with the U-Net instead of freezing it
    lora: LoraConfig | None = None  # U-Net stage: train only LoRA factors (see LoraConfig); None: full fine-tuning
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


UNTRAINED_VAE = (
    "train.stage=unet with neither train.init nor train.init_vae trains the U-Net on a random, untrained VAE: "
    "the loss falls but the model draws noise. Fine-tune a trained model instead (configs/finetune-emoji.yaml, "
    "or --train.init=FILE for an SD or latentdiff checkpoint), or train the VAE first (--train.stage=vae) and "
    "pass its checkpoint as --train.init_vae=FILE; --train.allow_untrained_vae=true runs it anyway (pipeline tests)")


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
    if train.stage == "unet" and train.init is None and train.init_vae is None and not train.allow_untrained_vae:
        raise ConfigError(UNTRAINED_VAE)
    checks = [
        (train.steps >= 1, f"train.steps must be at least 1 (got {train.steps})"),
        (math.isfinite(train.lr) and train.lr >= 0, f"train.lr must be a number >= 0 (got {train.lr})"),
        (train.warmup_steps >= 0, f"train.warmup_steps must be at least 0 (got {train.warmup_steps})"),
        (train.lr_schedule_steps >= 0,
         f"train.lr_schedule_steps must be at least 0, 0 meaning train.steps (got {train.lr_schedule_steps})"),
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
        *lora_checks(train),
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


def lora_checks(train: TrainConfig) -> list[tuple[bool, str]]:
    """What train.lora needs that does not depend on the model (the rank's upper bound does: the trainer checks it)."""
    lora = train.lora
    if lora is None:
        return []
    unknown = sorted(set(lora.targets) - set(TARGETS))
    return [
        (train.stage == "unet", "train.lora trains LoRA factors on the U-Net (and text encoder): it needs "
                                "train.stage=unet, not the VAE stage"),
        (not train.train_text_encoder, "train.lora with train.train_text_encoder would train the whole text encoder "
                                       "too: use train.lora.text_encoder=true for LoRA factors on it"),
        (lora.rank >= 1, f"train.lora.rank must be at least 1 (got {lora.rank})"),
        (math.isfinite(lora.alpha) and lora.alpha > 0, f"train.lora.alpha must be a number > 0 (got {lora.alpha})"),
        (bool(lora.targets) and not unknown,
         f"train.lora.targets: {', '.join(unknown) or 'none given'}; use some of {', '.join(TARGETS)}"),
        (0.0 <= lora.dropout < 1.0, f"train.lora.dropout must be in [0, 1) (got {lora.dropout})"),
        (lora.base_dtype == "float32" or train.mixed_precision != "no",
         "train.lora.base_dtype=bfloat16 runs the step under bf16 autocast: it cannot be used with "
         "train.mixed_precision=no (set it to auto or bf16)"),
    ]


def check_weighting(model: ModelConfig, train: TrainConfig):
    """The U-Net loss weights must be finite at every timestep of the model's schedule."""
    if train.stage == "unet" and train.loss_weighting != "simple":
        try:
            process.loss_weight(0, Schedule.from_config(model.diffusion), train.loss_weighting,
                                  model.diffusion.prediction, train.min_snr_gamma)
        except ValueError as e:
            raise ConfigError(f"train.loss_weighting: {e}") from None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, then constant or cosine decay to lr * min_lr_ratio at the schedule's last step
    (train.lr_schedule_steps, else train.steps), held there after it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, schedule_steps(cfg) - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_steps(cfg: TrainConfig) -> int:
    """The LR schedule's length in steps."""
    return cfg.lr_schedule_steps or cfg.steps


def resumed_schedule(cfg: TrainConfig, saved: dict, step: int) -> tuple[TrainConfig, str | None]:
    """The config a resume at `step` trains with, given the `train:` section the checkpoint was written with, and a
    line for the log when the LR schedule differs from the run's: the run's length is kept unless train.reschedule."""
    before = dataclasses.replace(cfg, lr_schedule_steps=saved.get("lr_schedule_steps") or saved["steps"])
    if not cfg.reschedule:
        if cfg.steps == saved["steps"] or cfg.lr_schedule == "constant":
            return before, None
        return before, (f"train.steps is {cfg.steps} (the run was for {saved['steps']}): the LR schedule keeps the "
                        f"run's length of {schedule_steps(before)} steps, so step {step} trains at lr "
                        f"{lr_at(step, before):.3g}; --train.reschedule=true stretches it over {cfg.steps} steps")
    after = dataclasses.replace(cfg, lr_schedule_steps=cfg.lr_schedule_steps or cfg.steps)
    if schedule_steps(after) == schedule_steps(before):
        return after, None
    return after, (f"train.reschedule: the LR schedule now spans {schedule_steps(after)} steps (was "
                   f"{schedule_steps(before)}); the lr at step {step} goes from {lr_at(step, before):.3g} to "
                   f"{lr_at(step, after):.3g}")
