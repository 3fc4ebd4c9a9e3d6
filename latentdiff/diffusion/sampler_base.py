"""What every sampler shares: the denoiser protocol, noise streams, host-side sigmas and the fused update.

Samplers work in k-diffusion's sigma space, x = x0 + sigma * eps (Karras et al. 2022, Sec. 2). A model call
returns `out`; `model.coefs(sigma) -> (p, q)` turns it into the denoised estimate D = p*x_in + q*g, where g is
`out` or, when `model.guidance` is set, the classifier-free guided u + guidance*(k - u) of its two halves.
Every update is `ops.sampler_step` (x_next = a*x + b*D + c*d_prev + d*noise) with host float coefficients, so a
sampling loop never waits on the device; what does not fit one call (a history of several D) is summed in torch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from latentdiff.diffusion import ops


class Denoiser:
    """A model callable with the (p, q) that turn its output into D, and an optional CFG scale."""

    def __init__(self, fn: Callable, coefs: Callable | None = None, guidance: float | None = None):
        self.fn = fn
        self._coefs = coefs
        self.guidance = guidance

    def __call__(self, x, sigma: float):
        return self.fn(x, sigma)

    def coefs(self, sigma: float):
        return (0.0, 1.0) if self._coefs is None else self._coefs(sigma)


def as_denoiser(fn) -> Denoiser:
    """Wrap `fn(x, sigma) -> denoised` as a denoiser (p=0, q=1, no guidance); denoisers pass through."""
    if hasattr(fn, "coefs") and hasattr(fn, "guidance"):
        return fn
    return Denoiser(fn)


# ----------------------------------------------------------------------------------------------
# Noise: `noise(like, sigma, sigma_next)` is a standard normal draw shaped like `like` for the step
# sigma -> sigma_next. Gaussian streams ignore the two sigmas; a Brownian tree uses them.


class NoiseSampler:
    """Per-image random streams: row i of every draw comes from generators[i].

    So image i of a batch sees exactly the numbers a single-image run with the same generator sees.
    """

    def __init__(self, generators):
        if isinstance(generators, torch.Generator):
            generators = [generators]
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("NoiseSampler needs at least one torch.Generator")

    @classmethod
    def from_seed(cls, seed: int, batch: int, device="cpu") -> "NoiseSampler":
        """Generators seeded seed, seed+1, ..., seed+batch-1."""
        return cls([torch.Generator(device).manual_seed(seed + i) for i in range(batch)])

    def __call__(self, like: torch.Tensor, sigma=None, sigma_next=None) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]} needs {like.shape[0]} generators, got "
                             f"{len(self.generators)}; pass one generator per image")
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)


class BrownianNoise:
    """One seeded Brownian tree per image over [sigma_min, sigma_max] (k-diffusion's BrownianTreeNoiseSampler).

    A draw for sigma -> sigma_next is (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), so steps that split
    an interval (DPM++ SDE's half steps) see correlated noise, and the same seeds give the same path whatever the
    step count. torchsde builds the tree on the host: a loop that draws from it cannot be captured in a CUDA graph.
    """
    TOL = 1e-6  # torchsde's default, which k-diffusion keeps: the tree reads times, its own ends too, to 6 decimals

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seeds):
        torchsde = self.torchsde()
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != like.shape[0]:
            raise ValueError(f"a batch of {like.shape[0]} needs {like.shape[0]} seeds, got {len(seeds)}")
        lo, hi = sorted((float(sigma_min), float(sigma_max)))
        t0, t1 = (torch.as_tensor(v, dtype=torch.float64) for v in (lo, hi))
        w0 = torch.zeros_like(like[0])
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, tol=self.TOL) for s in seeds]
        self.ends = [round(v, -round(math.log10(self.TOL))) for v in (lo, hi)]  # as the tree holds them

    @staticmethod
    def torchsde():
        """The torchsde module, or a one-line ValueError saying how to install it (it is an optional dependency)."""
        try:
            import torchsde
        except ImportError:
            raise ValueError("Brownian-tree noise needs torchsde: pip install torchsde") from None
        return torchsde

    @classmethod
    def over(cls, like: torch.Tensor, sigmas, seeds) -> "BrownianNoise":
        """A tree over the sigmas a run samples, from the smallest nonzero one to the largest (as A1111 builds it)."""
        s = host_sigmas(sigmas)
        return cls(like, min(v for v in s if v > 0), max(s), seeds)

    def __call__(self, like: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        a = torch.as_tensor(float(sigma), dtype=torch.float64)
        b = torch.as_tensor(float(sigma_next), dtype=torch.float64)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        # torchsde reads a time outside the tree at its end, with a warning; the ends themselves (rounded there)
        # and rounding errors past them (DPM fast's exp(-t)) are read there without one
        ends = [min(max(float(t), self.ends[0]), self.ends[1]) for t in (lo, hi)]
        w = torch.stack([tree(*ends) for tree in self.trees]) * sign
        return (w / (hi - lo).sqrt()).to(device=like.device, dtype=like.dtype)


def draw(noise, x, sigma: float, sigma_next: float):
    """A standard normal draw for the step sigma -> sigma_next (the global generator when noise is None)."""
    return torch.randn_like(x) if noise is None else noise(x, sigma, sigma_next)


# ----------------------------------------------------------------------------------------------
# The loop pieces


def host_sigmas(sigmas) -> list[float]:
    """The schedule as Python floats, checked: at least two entries, non-negative, strictly descending."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.device.type != "cpu":
            raise ValueError("sigmas must be a CPU tensor (the schedule lives on the host); "
                             "use schedule.sampling_sigmas(...) or sigmas.cpu()")
        sigmas = sigmas.to(torch.float64).tolist()
    s = [float(v) for v in sigmas]
    if len(s) < 2:
        raise ValueError("sigmas needs at least two entries (start and end of one step)")
    if any(b >= a for a, b in zip(s, s[1:])) or s[-1] < 0:
        raise ValueError("sigmas must be non-negative and strictly descending")
    return s


class Evaluation:
    """One model call: its raw output, the (p, q) that make D of it, and the input it saw."""
    __slots__ = ("out", "p", "q", "x_in")

    def __init__(self, model, x_in, sigma: float):
        self.out, self.x_in = model(x_in, sigma), x_in
        self.p, self.q = model.coefs(sigma)

    def uncond(self, model):
        """D of the unconditional half (CFG++ steps along it), or None when the model runs no CFG batch."""
        if model.guidance is None:
            return None
        return self.x_in * self.p + self.out[: self.out.shape[0] // 2] * self.q


_MODEL = object()


def apply(model, x, ev: Evaluation, *, guidance=_MODEL, p=None, q=None, **coefs):
    """x_next = a*x + b*D + c*d_prev + d*noise with D from `ev`, as one fused op; returns (x_next, D)."""
    g = model.guidance if guidance is _MODEL else guidance
    return ops.sampler_step(x, ev.out, p=ev.p if p is None else p, q=ev.q if q is None else q,
                            x_in=None if ev.x_in is x else ev.x_in, guidance=g, **coefs)


def step(model, x, sigma: float, *, x_in=None, **coefs):
    """Evaluate the model at (x_in or x, sigma) and apply one fused update; returns (x_next, denoised)."""
    return apply(model, x, Evaluation(model, x if x_in is None else x_in, sigma), **coefs)


def report(callback, i, sigma, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


def combine(pairs):
    """sum(c * t) over (c, t) pairs with host-float c, in torch (None when every c is 0)."""
    out = None
    for c, t in pairs:
        if c != 0 and t is not None:
            out = t * c if out is None else out.add(t, alpha=c)
    return out


def ancestral(s: float, s_next: float, eta: float):
    """Split a step s -> s_next into a deterministic part down to sigma_down and fresh noise sigma_up.

    sigma_up^2 = eta^2 s_next^2 (s^2 - s_next^2) / s^2 is DDIM's sigma_t(eta)^2 / abar_{t-1} (Song et al. 2021,
    eq. 16) in sigma space; sigma_down^2 = s_next^2 - sigma_up^2 keeps the marginal variance right.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * s_next * math.sqrt(max(s * s - s_next * s_next, 0.0)) / s)
    down = math.sqrt(max(s_next * s_next - up * up, 0.0))
    return down, up


def check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
