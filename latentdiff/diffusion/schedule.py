"""Noise schedules: betas, the tables derived from them, and the sigmas a sampler walks through.

Numbers only, no networks. Everything is float64 on the host; `Schedule.tables(device)` hands float32 copies
of the two tables the forward-process kernel gathers from.
"""
from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "quadratic", "cosine")
SPACINGS = ("leading", "trailing", "linspace")

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


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """n sigmas, log sigma a power rho of a ramp from 1 to 0 (k-diffusion's polyexponential; rho 1: exponential)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()


# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step sigmas for SD 1.5 and SDXL; other step counts
# interpolate log sigma linearly over an even grid (their how-to's loglinear_interp, as A1111 does).
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def align_your_steps_sigmas(n: int, sdxl: bool = False) -> torch.Tensor:
    """n sigmas of the AYS table for SD 1.5 (or SDXL), log-linearly interpolated when n is not 11."""
    table = AYS_SDXL if sdxl else AYS_SD15
    if n == len(table):
        return torch.tensor(table, dtype=torch.float64)
    ys = [math.log(v) for v in reversed(table)]  # ascending, on the grid k / (len - 1)
    out = []
    for j in range(n):
        pos = (j / (n - 1) if n > 1 else 0.0) * (len(ys) - 1)
        k = min(int(pos), len(ys) - 2)
        out.append(math.exp(ys[k] + (pos - k) * (ys[k + 1] - ys[k])))
    return torch.tensor(out[::-1], dtype=torch.float64)


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """A1111's KL-optimal schedule (AYS paper, Thm. 1): n + 1 sigmas evenly spaced in arctan sigma, max to min."""
    u = torch.arange(n + 1, dtype=torch.float64) / n
    return torch.tan(u * math.atan(sigma_min) + (1 - u) * math.atan(sigma_max))


def linear_quadratic_sigmas(n: int, sigma_max: float, threshold: float = 0.025, linear_steps: int | None = None):
    """ComfyUI's linear_quadratic (from Mochi): 1 - s falls linearly to `threshold` over the first half of the
    steps, then quadratically to 1; scaled by sigma_max. n + 1 sigmas ending in 0."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    lin = n // 2 if linear_steps is None else linear_steps
    quad = n - lin
    diff = lin - threshold * n
    qc = diff / (lin * quad ** 2)
    lc = threshold / lin - 2 * diff / quad ** 2
    const = qc * lin ** 2
    ramp = [i * threshold / lin for i in range(lin)] + [qc * i * i + lc * i + const for i in range(lin, n)] + [1.0]
    return torch.tensor([1.0 - v for v in ramp], dtype=torch.float64) * sigma_max


def beta_ppf(p: float, a: float, b: float) -> float:
    """The p-quantile of the Beta(a, b) distribution, by bisection on the regularized incomplete beta I_x(a, b)."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _betainc(a, b, mid) < p else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), with the symmetry I_x(a,b) = 1 - I_1-x(b,a)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


# Schedule names: ours, A1111's labels ("Karras", "SGM Uniform"), and ComfyUI's names.
SCHEDULES = {  # name -> A1111 label; `automatic` is the sampler's own (samplers.SamplerSpec resolves it)
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim_uniform": "DDIM",
    "beta": "Beta", "linear_quadratic": "Linear Quadratic",
}
SIGMA_KINDS = ("default",) + tuple(SCHEDULES)
_SCHEDULE_ALIASES = {"ddim": "ddim_uniform", "sgmuniform": "sgm_uniform", "ays": "align_your_steps"}


def _norm_schedule(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in " _-")


# Normalized names and labels -> schedule, for splitting titles like "DPM++ 2M SGM Uniform".
SCHEDULE_SUFFIXES = {**{_norm_schedule(k): k for k in SCHEDULES},
                     **{_norm_schedule(v): k for k, v in SCHEDULES.items()}, **_SCHEDULE_ALIASES}


def resolve_schedule(name: str) -> str:
    """Our name of a schedule given by name, A1111 label or alias ('Karras', 'SGM Uniform', 'ddim')."""
    key = _norm_schedule(name)
    if key == "default":
        return "default"
    if key in SCHEDULE_SUFFIXES:
        return SCHEDULE_SUFFIXES[key]
    raise ValueError(f"unknown sigma schedule {name!r}; choose one of {', '.join(SIGMA_KINDS)} "
                     f"(or A1111's labels {', '.join(repr(v) for v in SCHEDULES.values())})")


def _uniform_t(schedule: Schedule, n: int, last: bool = True) -> torch.Tensor:
    """Sigmas at n timesteps evenly spaced from T-1 down to 0 (or n of n+1, dropping 0), log-linear in sigma."""
    T = schedule.num_timesteps
    t = torch.linspace(T - 1, 0, n if last else n + 1, dtype=torch.float64)
    return schedule.t_to_sigma(t if last else t[:-1])


def _a1111_sigmas(schedule: Schedule, n: int, kind: str) -> torch.Tensor:
    """The discretizations A1111's own samplers walk (no trailing 0: they stop at the smallest timestep).

    a1111_timesteps: DDIM / PLMS / DDIM CFG++, timesteps range(0, T, T // n) + 1, run from the top down to t = 1
    (n - 1 model calls; for n = 1, where A1111 makes none, one step to 0).
    a1111_unipc: UniPC's time-uniform grid, n + 1 points from t = T-1 to 0 with log alpha interpolated in t.
    a1111_lcm: LCM's 50-step grid (timesteps 19, 39, ..., 999), n points evenly spaced in its t, plus 0.
    """
    T, sig = schedule.num_timesteps, schedule.sigmas
    if kind == "a1111_timesteps":
        ts = [min(t + 1, T - 1) for t in range(0, T, max(T // n, 1))]
        if len(ts) == 1:  # one step: A1111 runs none and returns the noise; one step to 0 instead
            return torch.cat([sig[ts], sig.new_zeros(1)])
        return sig[torch.tensor(ts[::-1])]
    if kind == "a1111_unipc":
        t = torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)
        la = 0.5 * schedule.alphas_cumprod.clamp(min=_ZERO_SNR_ABAR).log()
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - t.floor()
        la_t = (1 - w) * la[lo] + w * la[hi]
        return torch.expm1(-2 * la_t).sqrt()
    if kind == "a1111_lcm":
        skip = T // 50
        grid = sig[skip - 1::skip].log()  # timesteps skip-1, 2 skip-1, ..., T-1
        t = (torch.linspace(T - 1, skip - 1, n, dtype=torch.float64) - (skip - 1)) / skip
        t = t.clamp(0, len(grid) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - t.floor()
        return torch.cat([((1 - w) * grid[lo] + w * grid[hi]).exp(), sig.new_zeros(1)])
    raise ValueError(f"unknown A1111 discretization {kind!r}")


def sampling_sigmas(schedule: Schedule, n: int, kind: str = "default", spacing: str = "trailing",
                    steps_offset: int = 1, sdxl: bool = False) -> torch.Tensor:
    """The float64 host sigmas of an n-step run, descending, ending in 0 (but see kl_optimal and a1111_*).

    default: the sigmas at `timesteps(schedule, n, spacing, steps_offset)` (diffusers' spacings); fractional
    timesteps (linspace) interpolate linearly in sigma, as diffusers' Euler-family schedulers do.
    The rest are A1111's / ComfyUI's schedules over the model's sigma_min = sigmas[0], sigma_max = sigmas[T-1]:
    uniform = normal (t evenly spaced from T-1 to 0), sgm_uniform (n of n+1 evenly spaced t, then 0), karras,
    exponential, polyexponential (rho 1), simple (every T/n-th sigma from the top), ddim_uniform (every T//n-th
    from t = 1, possibly n+1 of them), beta (A1111's: Beta(0.6, 0.6) quantiles placed linearly between sigma_min
    and sigma_max), kl_optimal (A1111's: n+1 sigmas ending at sigma_min, no 0), linear_quadratic (ComfyUI's),
    align_your_steps (the SD 1.5 table, SDXL's with sdxl=True).
    """
    kind = resolve_schedule(kind) if not kind.startswith("a1111_") else kind
    T, sig = schedule.num_timesteps, schedule.sigmas
    smin, smax = float(sig[0]), float(sig[-1])
    if not 1 <= n <= T:
        raise ValueError(f"number of sampling steps must be in 1..{T}, got {n}")
    zero = sig.new_zeros(1)
    if kind == "default":
        t = timesteps(schedule, n, spacing, steps_offset)
        lo = t.floor().long().clamp(0, T - 1)
        hi = t.ceil().long().clamp(0, T - 1)
        w = t - t.floor()
        return torch.cat([(1 - w) * sig[lo] + w * sig[hi], zero])
    if kind.startswith("a1111_"):
        return _a1111_sigmas(schedule, n, kind)
    if kind in ("uniform", "normal"):
        return torch.cat([_uniform_t(schedule, n), zero])
    if kind == "sgm_uniform":
        return torch.cat([_uniform_t(schedule, n, last=False), zero])
    if kind == "karras":
        return torch.cat([karras_sigmas(n, smin, smax), zero])
    if kind == "exponential":
        return torch.cat([exponential_sigmas(n, smin, smax), zero])
    if kind == "polyexponential":
        return torch.cat([polyexponential_sigmas(n, smin, smax), zero])
    if kind == "simple":
        step = T / n
        return torch.cat([sig[[T - 1 - int(x * step) for x in range(n)]], zero])
    if kind == "ddim_uniform":
        return torch.cat([sig[list(range(1, T, max(T // n, 1)))].flip(0), zero])
    if kind == "beta":
        q = [beta_ppf(1 - j / (n - 1) if n > 1 else 1.0, 0.6, 0.6) for j in range(n)]
        return torch.tensor([smin + v * (smax - smin) for v in q] + [0.0], dtype=torch.float64)
    if kind == "kl_optimal":
        return kl_optimal_sigmas(n, smin, smax)
    if kind == "linear_quadratic":
        return linear_quadratic_sigmas(n, smax)
    if kind == "align_your_steps":
        return torch.cat([align_your_steps_sigmas(n, sdxl), zero])
    raise ValueError(f"the schedule {kind!r} depends on the sampler; use samplers.get_sampler(name).sigmas(...)")
