"""Masked sampling for ordinary (4-channel) models: the known region of the denoised estimate is the original's.

At every step the sampler forms D = p*x + q*g from the model's output g (samplers.py); inside the mask D is the
model's, outside it is the original latents x0. This is A1111's blend (its CFG denoiser mixes the denoised
estimate with the original latents through the latent mask). For the deterministic samplers it is the same as
putting the original, noised to each step's sigma with the starting noise, back into x (diffusers' inpainting
pipeline): an Euler step from x = x0 + sigma*eps with D = x0 lands on x0 + sigma'*eps. The ancestral samplers add
fresh noise on both sides alike, so the known region stays the original noised to the current sigma.
"""
from __future__ import annotations

import torch


class MaskedDenoiser:
    """A denoiser (samplers.py's protocol) whose denoised estimate is x0 wherever `keep` is 1.

    keep: (1 or B, 1, h, w), 1 where the latents are known, 0 where they are repainted (fractions blend).
    The fused step forms D from the output (and the CFG halves), so the known region is written into the output:
    an output of (x0 - p*x)/q gives D = x0 there (q is never 0: -sigma, -sigma/sqrt(1+sigma^2) or 1).
    """

    def __init__(self, model, x0: torch.Tensor, keep: torch.Tensor):
        self.model, self.x0, self.keep = model, x0, keep
        self.guidance = model.guidance

    def coefs(self, sigma: float):
        return self.model.coefs(sigma)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = self.model(x, sigma)  # (B, C, h, w), or (2B, ...) with the unconditional half first
        p, q = self.model.coefs(sigma)
        known = (self.x0 - p * x) / q
        if out.shape[0] != x.shape[0]:
            # both CFG halves: g = u + s*(c - u) is linear, so it lands on `known` where keep is 1
            known = known.repeat(out.shape[0] // x.shape[0], 1, 1, 1)
        return torch.lerp(out, known.to(out.dtype), self.keep.to(out.dtype))
