"""What is trained: one module per stage, so DDP wraps a single forward that returns the loss; and the EMA."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from latentdiff.diffusion import process
from latentdiff.diffusion.schedule import Schedule
from latentdiff.io.checkpoint import Models


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
        x_t, target = process.training_batch(x0, t, noise, self.schedule, self.prediction)
        pred = self.unet(x_t, t, context).float()
        mse = (pred - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if self.weighting == "simple":
            return mse.mean()
        w = process.loss_weight(t, self.schedule, self.weighting, self.prediction, self.gamma)  # (B,)
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


def _chunks(a: list[torch.Tensor], b: list[torch.Tensor], limit: int):
    """(a[i:j], b[i:j]) runs of the two lists holding about `limit` elements each."""
    start, size = 0, 0
    for i, t in enumerate(a):
        size += t.numel()
        if size >= limit or i == len(a) - 1:
            yield a[start:i + 1], b[start:i + 1]
            start, size = i + 1, 0


class EMA:
    """Exponential moving average of the trained modules (copies in float32, never trained)."""

    CHUNK = 1 << 25  # elements per foreach call of update(): a 128 MB float32 temporary at most (one tensor more)

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
        weight = weight.float()
        for k, m in self.source.items():
            src = [p if p.dtype == torch.float32 else p.float() for p in m.parameters()]  # no_grad: no detach
            # ema += (1 - d) * (p - ema). The weight stays a device tensor: _foreach_mul_ has a Tensor overload,
            # whereas _foreach_lerp_ takes a Scalar weight and would read it back to the host on every step. In
            # chunks, so the temporary p - ema never holds more than CHUNK elements (a U-Net's copy would not).
            for ema, new in _chunks(list(self.modules[k].parameters()), src, self.CHUNK):
                diff = torch._foreach_sub(new, ema)
                torch._foreach_mul_(diff, weight)
                torch._foreach_add_(ema, diff)
            for be, bs in zip(self.modules[k].buffers(), m.buffers()):
                be.copy_(bs if ok is None else torch.where(ok, bs, be))
        self.count += 1 if ok is None else ok

    def state_dict(self) -> dict:
        return {"updates": self.updates, "modules": {k: m.state_dict() for k, m in self.modules.items()}}

    def load_state_dict(self, state: dict):
        self.count.fill_(int(state["updates"]))
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
