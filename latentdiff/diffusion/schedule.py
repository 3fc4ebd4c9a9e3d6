"""Noise schedules: betas, the tables derived from them, and the sigmas a sampler walks through.

Numbers only, no networks. Everything is float64 on the host; `Schedule.tables(device)` hands float32 copies
of the two tables the forward-process kernel gathers from.
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "quadratic", "cosine")
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_KINDS = ("default", "karras", "exponential")

# Where zero-terminal-SNR leaves abar_T = 0 the k-diffusion sigma is infinite; samplers start from the
# sigma of abar = 2^-24 instead (the smallest positive fp16 subnormal, diffusers' choice), about 4096.
_ZERO_SNR_ABAR = 2.0 ** -24


def betas(name: str, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The beta_t of a named schedule as a float64 tensor of length n."""
    if n < 2:
        raise ValueError(f"a beta schedule needs at least 2 timesteps, got n={n}")
    if name == "linear":  # Ho et al. 2020, Sec. 4
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if name in ("scaled_linear", "quadratic"):
        # Linear in sqrt(beta). Stable Diffusion calls it scaled_linear (CompVis' "linear"); Ho et al.'s
        # reference code calls the same curve "quad". Both names give identical numbers.
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if name == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008;
        # beta_t = 1 - abar_t/abar_{t-1}, clipped to 0.999 so the last steps stay invertible.
        s = 0.008
        u = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so abar_T = 0 while abar_1 is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class Schedule:
    """The discrete-time variance-preserving process defined by betas, with every derived table in float64."""

    def __init__(self, betas: torch.Tensor):
        b = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if b.dim() != 1 or len(b) < 2:
            raise ValueError("Schedule(betas) needs a 1-D sequence of at least 2 betas")
        if not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.betas = b
        self.num_timesteps = len(b)
        self.alphas = 1 - b
        ab = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ab).sqrt()
        # Ho et al. 2020, eq. 6-7: q(x_{t-1} | x_t, x0) = N(tilde-mu, tilde-beta) with
        # tilde-mu = coef1 x0 + coef2 x_t and tilde-beta_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
        ab_prev = self.alphas_cumprod_prev
        self.posterior_variance = b * (1 - ab_prev) / (1 - ab)
        # tilde-beta_0 = 0; like improved-diffusion, clip its log to tilde-beta_1.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef2 = (1 - ab_prev) * self.alphas.sqrt() / (1 - ab)
        self.log_snr = torch.log(ab) - torch.log1p(-ab)
        # k-diffusion sigmas: x = x_t / sqrt(abar) = x0 + sigma eps (Karras et al. 2022, Sec. 2).
        ab_finite = ab.clamp(min=_ZERO_SNR_ABAR)
        self.sigmas = ((1 - ab_finite) / ab_finite).sqrt()
        self.log_sigmas = self.sigmas.log()
        self._tables: dict = {}

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """Build from a latentdiff.io.config.DiffusionConfig."""
        b = betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            b = rescale_zero_terminal_snr(b)
        return cls(b)

    def tables(self, device, dtype: torch.dtype = torch.float32):
        """(sqrt_ab, sqrt_1m_ab) for the q_sample kernel, copied once per device and dtype."""
        key = (str(torch.device(device)), dtype)
        if key not in self._tables:
            self._tables[key] = (self.sqrt_alphas_cumprod.to(device=device, dtype=dtype),
                                 self.sqrt_one_minus_alphas_cumprod.to(device=device, dtype=dtype))
        return self._tables[key]

    def sigma_to_t(self, sigma):
        """Fractional timestep of a sigma, interpolating linearly in log sigma (as k-diffusion)."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        log_s = s.log().reshape(-1)
        ls = self.log_sigmas
        hi = torch.searchsorted(ls, log_s).clamp(1, self.num_timesteps - 1)
        lo_v, hi_v = ls[hi - 1], ls[hi]
        w = ((log_s - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        t = (hi - 1 + w).reshape(s.shape)
        return float(t) if not isinstance(sigma, torch.Tensor) else t

    def t_to_sigma(self, t):
        """Sigma at a fractional timestep, interpolating linearly in log sigma (as k-diffusion)."""
        tt = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        lo = tt.floor().long()
        hi = tt.ceil().long()
        w = tt - lo
        s = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()
        return float(s) if not isinstance(t, torch.Tensor) else s


def timesteps(schedule: Schedule, n: int, spacing: str = "leading", steps_offset: int = 1) -> torch.Tensor:
    """n sampling timesteps, descending, float64; spacings as in Lin et al. 2023, Table 2 (diffusers' rules)."""
    T = schedule.num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"number of sampling steps must be in 1..{T}, got {n}")
    if spacing == "linspace":  # fractional t, both ends included (n = 1 gives t = 0, as diffusers)
        return torch.linspace(0, T - 1, n, dtype=torch.float64).flip(0)
    if spacing == "leading":  # every T//n-th step from 0, shifted by steps_offset (SD 1.x/2.x use 1)
        return (torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n) + steps_offset)
    if spacing == "trailing":  # every T/n-th step counted back from T, so the first step is t = T-1
        return torch.round(T - torch.arange(n, dtype=torch.float64) * (T / n)) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n sigmas evenly spaced in sigma^(1/rho), from sigma_max to sigma_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas evenly spaced in log sigma, from sigma_max to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def sampling_sigmas(schedule: Schedule, n: int, kind: str = "default", spacing: str = "trailing",
                    steps_offset: int = 1) -> torch.Tensor:
    """The (n+1,) float64 sigmas of an n-step run, descending, ending in 0.

    default: the sigmas at `timesteps(schedule, n, spacing, steps_offset)`; fractional timesteps (linspace)
    interpolate linearly in sigma, as diffusers' Euler-family schedulers do.
    karras / exponential: between the schedule's smallest and largest sigma (as k-diffusion and A1111).
    """
    if kind == "default":
        t = timesteps(schedule, n, spacing, steps_offset)
        lo = t.floor().long().clamp(0, schedule.num_timesteps - 1)
        hi = t.ceil().long().clamp(0, schedule.num_timesteps - 1)
        w = t - t.floor()
        s = (1 - w) * schedule.sigmas[lo] + w * schedule.sigmas[hi]
    elif kind == "karras":
        s = karras_sigmas(n, float(schedule.sigmas[0]), float(schedule.sigmas[-1]))
    elif kind == "exponential":
        s = exponential_sigmas(n, float(schedule.sigmas[0]), float(schedule.sigmas[-1]))
    else:
        raise ValueError(f"unknown sigma schedule {kind!r}; choose one of {', '.join(SIGMA_KINDS)}")
    return torch.cat([s, s.new_zeros(1)])
