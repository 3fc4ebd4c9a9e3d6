"""Reverse-process samplers as free functions with one signature, in k-diffusion's sigma space.

x = x0 + sigma * eps, so x = x_t / sqrt(abar) and abar = 1 / (1 + sigma^2) (Karras et al. 2022, Sec. 2).
Every sampler is `sample_<name>(model, x, sigmas, *, noise=None, callback=None, disable=None, **options)`:

- `model(x, sigma: float) -> out` is a denoiser: `model.coefs(sigma) -> (p, q)` turns its output into the
  denoised estimate D = p*x + q*g, and `model.guidance` is None or the CFG scale when `out` stacks the
  unconditional half first, then the conditional half (g = u + guidance*(k - u)). `as_denoiser(fn)` wraps a
  plain `fn(x, sigma) -> denoised`.
- `sigmas` is a CPU float64 tensor (see schedule.sampling_sigmas), descending, usually ending in 0.
- `noise` is a NoiseSampler (one random stream per image) or None for the global generator.
- `callback({"i", "sigma", "x", "denoised"})` runs after each step with the sample at sigma_i and its D.

Each update is a single `ops.sampler_step` call whose scalar coefficients are computed here on the host in
float64 from Python floats, so the loop never waits on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import trange

from latentdiff.diffusion import ops
from latentdiff.diffusion.schedule import sampling_sigmas


# ----------------------------------------------------------------------------------------------
# Denoisers and noise


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

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]} needs {like.shape[0]} generators, got "
                             f"{len(self.generators)}; pass one generator per image")
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        rows = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def _draw(noise, x):
    return torch.randn_like(x) if noise is None else noise(x)


# ----------------------------------------------------------------------------------------------
# The shared loop pieces


def _host_sigmas(sigmas) -> list[float]:
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


def _step(model, x, sigma: float, *, x_in=None, **coefs):
    """Evaluate the model at (x_in or x, sigma) and apply one fused update; returns (x_next, denoised)."""
    out = model(x if x_in is None else x_in, sigma)
    p, q = model.coefs(sigma)
    return ops.sampler_step(x, out, p=p, q=q, x_in=x_in, guidance=model.guidance, **coefs)


def _report(callback, i, sigma, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


def _ancestral(s: float, s_next: float, eta: float):
    """Split a step s -> s_next into a deterministic part down to sigma_down and fresh noise sigma_up.

    sigma_up^2 = eta^2 s_next^2 (s^2 - s_next^2) / s^2 is DDIM's sigma_t(eta)^2 / abar_{t-1} (Song et al. 2021,
    eq. 16) in sigma space; sigma_down^2 = s_next^2 - sigma_up^2 keeps the marginal variance right.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    up = min(s_next, eta * s_next * math.sqrt(max(s * s - s_next * s_next, 0.0)) / s)
    down = math.sqrt(max(s_next * s_next - up * up, 0.0))
    return down, up


# ----------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, noise=None, callback=None, disable=None, variance: str = "small"):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2), with fixed small or large variance."""
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm variance must be 'small' or 'large', got {variance!r}")
    model, s = as_denoiser(model), _host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        # (1) Between two sampled steps t > t' the effective beta is 1 - abar_t/abar_t' (strided sampling);
        #     with abar = 1/(1 + sigma^2) it is (si^2 - sn^2)/(1 + si^2).
        # (2) Posterior mean, eq. 7: tilde-mu = coef1 x0 + coef2 x_t. Divided by sqrt(abar_t') to reach sigma
        #     space it becomes (sn^2/si^2) x + (1 - sn^2/si^2) D.
        r = (sn / si) ** 2
        # (3) Variance, eq. 6 / Sec. 3.2: tilde-beta_t ("small") or beta_t ("large"), also divided by abar_t':
        #     small: sn^2 (si^2 - sn^2)/si^2;  large: (si^2 - sn^2)(1 + sn^2)/(1 + si^2).
        if variance == "small":
            var = sn * sn * (si * si - sn * sn) / (si * si)
        else:
            var = (si * si - sn * sn) * (1 + sn * sn) / (1 + si * si)
        # (4) Algorithm 2, line 3: no noise on the last step to sigma = 0 (t = 1 -> x0 in the paper's indexing).
        std = math.sqrt(var) if sn > 0 else 0.0
        z = _draw(noise, x) if std > 0 else None
        x_next, den = _step(model, x, si, a=r, b=1 - r, d=std, noise=z)
        _report(callback, i, si, x, den)
        x = x_next
    return x


def sample_ddim(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12); eta=0 is the deterministic sampler, eta=1 matches DDPM's variance."""
    # (1) eq. 12: x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma_t^2) eps + sigma_t z, with sigma_t(eta)
    #     of eq. 16. Divided by sqrt(abar_t'), and eps = (x - D)/si in sigma space:
    #     x' = D + sigma_down (x - D)/si + sigma_up z, where sigma_up^2 = sigma_t^2/abar_t' and
    #     sigma_down^2 = (1 - abar_t')/abar_t' - sigma_up^2 = sn^2 - sigma_up^2.
    # (2) That is exactly the Euler step to sigma_down plus sigma_up z: in sigma space DDIM(eta) and Euler
    #     ancestral(eta) are one sampler (Karras et al. 2022, sec. 3), only the default eta differs.
    return sample_euler_ancestral(model, x, sigmas, noise=noise, callback=callback, disable=disable, eta=eta)


@torch.no_grad()
def sample_euler(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the correction)."""
    model, s = as_denoiser(model), _host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        # (1) Alg. 1, line 3 (the ODE of eq. 1 with the score of eq. 3): d_i = (x - D(x, sigma_i)) / sigma_i.
        # (2) Alg. 1, line 4: x' = x + (sn - si) d_i = (sn/si) x + (1 - sn/si) D.
        r = sn / si
        x_next, den = _step(model, x, si, a=r, b=1 - r)
        _report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """Euler step down to sigma_down plus fresh noise sigma_up (k-diffusion's ancestral sampler)."""
    model, s = as_denoiser(model), _host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        # (1) Split sn into sigma_down and sigma_up as DDIM's eq. 16 does (see _ancestral); eta=1 is DDPM's
        #     posterior variance (Ho et al. 2020, eq. 7).
        down, up = _ancestral(si, sn, eta)
        # (2) Karras et al. 2022, Alg. 1, lines 3-4, to sigma_down, then add sigma_up z.
        r = down / si
        z = _draw(noise, x) if up > 0 else None
        x_next, den = _step(model, x, si, a=r, b=1 - r, d=up, noise=z)
        _report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); the last step to sigma = 0 is Euler."""
    model, s = as_denoiser(model), _host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        r = sn / si
        # (1) Alg. 1, lines 3-4: Euler predictor x_e = x + (sn - si) d_i, d_i = (x - D_1)/si.
        x_e, den = _step(model, x, si, a=r, b=1 - r)
        if sn > 0:
            # (2) Alg. 1, lines 6-7: d' = (x_e - D_2)/sn at x_e, x' = x + (sn - si)(d_i + d')/2.
            #     Expanded over (x, D_2, D_1): x' = (sn/si) x - h/(2 sn) D_2 + h/2 (1/sn - 2/si) D_1, h = sn - si.
            h = sn - si
            x_next, _ = _step(model, x, sn, x_in=x_e, a=r, b=-h / (2 * sn), c=h / 2 * (1 / sn - 2 / si),
                              d_prev=den)
        else:
            x_next = x_e  # (3) Alg. 1, line 5: sigma_{i+1} = 0 keeps the Euler step
        _report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep 2nd order in lambda = -log sigma."""
    model, s = as_denoiser(model), _host_sigmas(sigmas)
    old, h_last = None, None
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        if sn == 0:
            a, b, c, h = 0.0, 1.0, 0.0, None  # (1) the exact update to lambda = inf returns D
        else:
            # (2) lambda = log(alpha/sigma_vp) = -log(sigma) here, h = lambda' - lambda, and the
            #     first-order data-prediction update (DPM-Solver++(1)) is x' = (sn/si) x + (1 - e^-h) D.
            h = math.log(si / sn)
            a, em = sn / si, -math.expm1(-h)
            if old is None:
                b, c = em, 0.0
            else:
                # (3) Alg. 2: with r = h_{i-1}/h_i, use D_i + (D_i - D_{i-1})/(2 r) in place of D.
                r = h_last / h
                b, c = em * (1 + 1 / (2 * r)), -em / (2 * r)
        x_next, den = _step(model, x, si, a=a, b=b, c=c, d_prev=old if c != 0 else None)
        _report(callback, i, si, x, den)
        x, old, h_last = x_next, den, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0,
                        solver: str = "midpoint"):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, the SDE variant of Algorithm 2), midpoint or heun correction."""
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde solver must be 'midpoint' or 'heun', got {solver!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    model, s = as_denoiser(model), _host_sigmas(sigmas)
    old, h_last = None, None
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        d, z, h = 0.0, None, None
        if sn == 0:
            a, b, c = 0.0, 1.0, 0.0  # (1) the last step returns D, no noise
        else:
            # (2) Exact solution of the linear part of the data-prediction SDE over h = log(si/sn), with the
            #     noise strength eta: x' = (sn/si) e^{-eta h} x + (1 - e^{-(1+eta) h}) D + sn sqrt(1 - e^{-2 eta h}) z.
            h = math.log(si / sn)
            eh = eta * h
            a = sn / si * math.exp(-eh)
            E = -math.expm1(-h - eh)
            b, c = E, 0.0
            if old is not None:
                # (3) Multistep correction with r = h_{i-1}/h_i on (D_i - D_{i-1}) / r:
                #     midpoint weighs it by E/2, heun by 1 - E/((1+eta) h) (the exact integral of the linear term).
                r = h_last / h
                F = E / 2 if solver == "midpoint" else 1 - E / (h + eh)
                b, c = E + F / r, -F / r
            if eh > 0:
                d = sn * math.sqrt(-math.expm1(-2 * eh))
                z = _draw(noise, x)
        x_next, den = _step(model, x, si, a=a, b=b, c=c, d=d, d_prev=old if c != 0 else None, noise=z)
        _report(callback, i, si, x, den)
        x, old, h_last = x_next, den, h
    return x


# ----------------------------------------------------------------------------------------------
# Names


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
SAMPLER_NAMES = tuple(SAMPLERS)

# Other spellings of each base sampler, normalized by _norm (lowercase, no spaces, '_' or '-', '++' -> 'pp').
# A1111 names ("Euler a", "DPM++ 2M Karras"), diffusers class names and k-diffusion function names reduce to
# these after _norm strips the 'sample' prefix, the 'scheduler' suffix and a 'karras'/'exponential' suffix.
_ALIASES = {
    "ddpm": "ddpm",
    "ddim": "ddim",
    "euler": "euler", "eulerdiscrete": "euler",
    "eulera": "euler_ancestral", "eulerancestral": "euler_ancestral", "eulerancestraldiscrete": "euler_ancestral",
    "heun": "heun", "heundiscrete": "heun",
    "dpmpp2m": "dpmpp_2m", "dpmsolvermultistep": "dpmpp_2m",
    "dpmpp2msde": "dpmpp_2m_sde",
}
_A1111 = ("DDPM", "DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
          "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential")
_DIFFUSERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "HeunDiscreteScheduler", "DPMSolverMultistepScheduler")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, the sigma schedule its name implies, and its base name."""
    fn: Callable
    sigma_kind: str = "default"
    name: str = ""

    def sigmas(self, schedule, steps: int, **kw):
        return sampling_sigmas(schedule, steps, kind=self.sigma_kind, **kw)

    def __call__(self, model, x, sigmas, **kw):
        return self.fn(model, x, sigmas, **kw)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower().replace("++", "pp") if ch not in " _-")


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by our name, an A1111 name, a diffusers class name or a k-diffusion function name."""
    key = _norm(name)
    key = key[len("sample"):] if key.startswith("sample") else key
    key = key[:-len("scheduler")] if key.endswith("scheduler") else key
    kind = "default"
    for suffix in ("karras", "exponential"):
        if key.endswith(suffix) and key[:-len(suffix)] in _ALIASES:
            key, kind = key[:-len(suffix)], suffix
    if key not in _ALIASES:
        raise ValueError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)} (optionally + ' karras' or "
            f"' exponential'), A1111 names {', '.join(repr(n) for n in _A1111)}, diffusers classes "
            f"{', '.join(_DIFFUSERS)} and k-diffusion functions sample_<name>")
    base = _ALIASES[key]
    return SamplerSpec(SAMPLERS[base], kind, base)
