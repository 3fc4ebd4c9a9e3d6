"""Reverse-process samplers as free functions with one signature, in k-diffusion's sigma space; and their names.

x = x0 + sigma * eps, so x = x_t / sqrt(abar) and abar = 1 / (1 + sigma^2) (Karras et al. 2022, Sec. 2).
Every sampler is `sample_<name>(model, x, sigmas, *, noise=None, callback=None, disable=None, **options)`:

- `model(x, sigma: float) -> out` is a denoiser: `model.coefs(sigma) -> (p, q)` turns its output into the
  denoised estimate D = p*x + q*g, and `model.guidance` is None or the CFG scale when `out` stacks the
  unconditional half first, then the conditional half (g = u + guidance*(k - u)). `as_denoiser(fn)` wraps a
  plain `fn(x, sigma) -> denoised`.
- `sigmas` is a CPU float64 tensor (see schedule.sampling_sigmas), descending, usually ending in 0.
- `noise(like, sigma, sigma_next)` is a NoiseSampler (one random stream per image), a BrownianNoise, or None
  for the global generator.
- `callback({"i", "sigma", "x", "denoised"})` runs after each step with the sample at sigma_i and its D.

Each update is one `ops.sampler_step` call whose scalar coefficients are computed here on the host in float64
from Python floats, so the loop never waits on the device. This file holds the one-step methods (one to three
model calls per step, no history) and the names; samplers_multistep.py the methods with a history of D, and
samplers_dpm_solver.py DPM-Solver's fast and adaptive drivers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm, trange

from latentdiff.diffusion.sampler_base import (BrownianNoise, Denoiser, Evaluation, NoiseSampler, ancestral, apply,
                                               as_denoiser, check_choice, combine, draw, host_sigmas, report, step)
from latentdiff.diffusion.samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from latentdiff.diffusion.samplers_multistep import (sample_deis, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                                                     sample_dpmpp_2m_sde_heun, sample_dpmpp_3m_sde, sample_er_sde,
                                                     sample_ipndm, sample_ipndm_v, sample_lms, sample_plms,
                                                     sample_res_multistep, sample_res_multistep_ancestral,
                                                     sample_unipc, sample_unipc_bh2)
from latentdiff.diffusion.schedule import SCHEDULE_SUFFIXES, karras_sigmas, resolve_schedule, sampling_sigmas

__all__ = ["BrownianNoise", "Denoiser", "NoiseSampler", "as_denoiser", "get_sampler", "SamplerSpec", "SAMPLERS",
           "SAMPLER_NAMES", "A1111_TITLES"]


# ----------------------------------------------------------------------------------------------
# DDPM, DDIM and the Euler family


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, noise=None, callback=None, disable=None, variance: str = "small"):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2), with fixed small or large variance."""
    check_choice("ddpm variance", variance, ("small", "large"))
    model, s = as_denoiser(model), host_sigmas(sigmas)
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
        z = draw(noise, x, si, sn) if std > 0 else None
        x_next, den = step(model, x, si, a=r, b=1 - r, d=std, noise=z)
        report(callback, i, si, x, den)
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
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        # (1) Alg. 1, line 3 (the ODE of eq. 1 with the score of eq. 3): d_i = (x - D(x, sigma_i)) / sigma_i.
        # (2) Alg. 1, line 4: x' = x + (sn - si) d_i = (sn/si) x + (1 - sn/si) D.
        r = sn / si
        x_next, den = step(model, x, si, a=r, b=1 - r)
        report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """Euler step down to sigma_down plus fresh noise sigma_up (k-diffusion's ancestral sampler)."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        # (1) Split sn into sigma_down and sigma_up as DDIM's eq. 16 does (see ancestral); eta=1 is DDPM's
        #     posterior variance (Ho et al. 2020, eq. 7).
        down, up = ancestral(si, sn, eta)
        # (2) Karras et al. 2022, Alg. 1, lines 3-4, to sigma_down, then add sigma_up z.
        r = down / si
        z = draw(noise, x, si, sn) if up > 0 else None
        x_next, den = step(model, x, si, a=r, b=1 - r, d=up, noise=z)
        report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0,
                                  guidance_scale: float = 1.0):
    """CFG++ (Chung et al. 2024, Alg. 1 and its ancestral form): renoise along the unconditional prediction.

    guidance_scale multiplies the model's CFG scale (A1111's DDIM CFG++ maps its 0..12.5 slider to 0..1).
    Without a CFG batch the unconditional prediction is the prediction itself and this is Euler ancestral.
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    g = None if model.guidance is None else model.guidance * guidance_scale
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        ev = Evaluation(model, x, si)
        down, up = ancestral(si, sn, eta)
        # (1) CFG++ eq. 11 in sigma space: x' = D_cfg + sigma_down * eps_u + sigma_up z with
        #     eps_u = (x - D_u)/si, the direction of the unconditional prediction instead of the guided one.
        r = down / si if sn > 0 else 0.0
        d_u = ev.uncond(model) if r else None
        z = draw(noise, x, si, sn) if up > 0 and sn > 0 else None
        if d_u is None:
            x_next, den = apply(model, x, ev, guidance=g, a=r, b=1 - r, d=up, noise=z)
        else:
            x_next, den = apply(model, x, ev, guidance=g, a=r, b=1.0, c=-r, d_prev=d_u, d=up, noise=z)
        report(callback, i, si, x, den)
        x = x_next
    return x


def sample_euler_cfg_pp(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """CFG++ with Euler steps (ComfyUI's euler_cfg_pp): eta = 0, the model's CFG scale as given."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, noise=noise, callback=callback, disable=disable, eta=0.0)


def sample_ddim_cfg_pp(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 0.0):
    """A1111's DDIM CFG++: DDIM along the unconditional noise, with the CFG scale divided by 12.5."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, noise=noise, callback=callback, disable=disable, eta=eta,
                                         guidance_scale=1 / 12.5)


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, noise=None, callback=None, disable=None, boundary: Callable | None = None):
    """Latent consistency sampling (Luo et al. 2023, Alg. 1): jump to D, renoise to the next sigma.

    boundary(sigma) -> (c_skip, c_out) applies LCM's consistency parameterization D' = c_skip x_t + c_out D
    (eq. 9, x_t = x / sqrt(1 + sigma^2) the VP input), as diffusers' LCMScheduler does; see lcm_boundary.
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        ev = Evaluation(model, x, si)
        p, q = ev.p, ev.q
        if boundary is not None:
            # (1) D' = c_out (p x + q g) + c_skip x / sqrt(1 + si^2): folded into the kernel's (p, q).
            c_skip, c_out = boundary(si)
            p, q = c_out * p + c_skip / math.sqrt(1 + si * si), c_out * q
        # (2) Alg. 1, line 6: x' = D + sigma_next z (the forward process from D to sigma_next, in sigma space).
        z = draw(noise, x, si, sn) if sn > 0 else None
        x_next, den = apply(model, x, ev, p=p, q=q, a=0.0, b=1.0, d=sn, noise=z)
        report(callback, i, si, x, den)
        x = x_next
    return x


def lcm_boundary(schedule, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Callable:
    """LCM's c_skip, c_out at the integer timestep of sigma (Luo et al. 2023, eq. 9; diffusers' LCMScheduler)."""
    def scalings(sigma: float):
        t = round(float(schedule.sigma_to_t(sigma))) * timestep_scaling
        return sigma_data ** 2 / (t * t + sigma_data ** 2), t / math.sqrt(t * t + sigma_data ** 2)
    return scalings


# ----------------------------------------------------------------------------------------------
# Second and third order single-step methods


@torch.no_grad()
def sample_heun(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); the last step to sigma = 0 is Euler."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        x_next, den = _heun_step(model, x, si, sn)
        report(callback, i, si, x, den)
        x = x_next
    return x


def _heun_step(model, x, si: float, sn: float, second_order: bool = True):
    """One step of Karras et al. 2022, Algorithm 1 (Euler when sn = 0 or second_order is off): (x', D_1)."""
    r = sn / si
    # (1) Alg. 1, lines 3-4: Euler predictor x_e = x + (sn - si) d_i, d_i = (x - D_1)/si.
    x_e, den = step(model, x, si, a=r, b=1 - r)
    if sn == 0 or not second_order:
        return x_e, den  # (3) Alg. 1, line 5: sigma_{i+1} = 0 keeps the Euler step
    # (2) Alg. 1, lines 6-7: d' = (x_e - D_2)/sn at x_e, x' = x + (sn - si)(d_i + d')/2.
    #     Expanded over (x, D_2, D_1): x' = (sn/si) x - h/(2 sn) D_2 + h/2 (1/sn - 2/si) D_1, h = sn - si.
    h = sn - si
    x_next, _ = step(model, x, sn, x_in=x_e, a=r, b=-h / (2 * sn), c=h / 2 * (1 / sn - 2 / si), d_prev=den)
    return x_next, den


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """DPM-Solver-2 in sigma space (Lu et al. 2022, Alg. 1 with r = 1/2 in log sigma; k-diffusion's sample_dpm_2)."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        x_next, den = _dpm_2_step(model, x, si, sn)
        report(callback, i, si, x, den)
        x = x_next
    return x


def _dpm_2_step(model, x, si: float, target: float, **extra):
    """x + (target - si) d(x_mid, s_mid) with x_mid the Euler step to the log midpoint; Euler to target = 0."""
    if target == 0:
        return step(model, x, si, a=0.0, b=1.0, **extra)
    # (1) s_mid = exp((log si + log target)/2); x_mid = x + (s_mid - si) d_i = (s_mid/si) x + (1 - s_mid/si) D_1.
    s_mid = math.sqrt(si * target)
    r = s_mid / si
    x_mid, den = step(model, x, si, a=r, b=1 - r)
    # (2) x' = x + (target - si) (x_mid - D_2)/s_mid: x_mid enters through the kernel's d_prev slot.
    k = (target - si) / s_mid
    x_next, _ = step(model, x, s_mid, x_in=x_mid, a=1.0, b=-k, c=k, d_prev=x_mid, **extra)
    return x_next, den


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """DPM-Solver-2 down to sigma_down, then sigma_up of fresh noise (k-diffusion's sample_dpm_2_ancestral)."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        down, up = ancestral(si, sn, eta)
        extra = {}
        if down > 0 and up > 0:  # k-diffusion adds noise only after a DPM-Solver-2 step
            extra = dict(d=up, noise=draw(noise, x, si, sn))
        x_next, den = _dpm_2_step(model, x, si, down, **extra)
        report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1 with r = 1/2) to sigma_down, then sigma_up of fresh noise."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        down, up = ancestral(si, sn, eta)
        z = draw(noise, x, si, sn) if sn > 0 and up > 0 else None
        if down == 0:
            x_next, den = step(model, x, si, a=0.0, b=1.0, d=up, noise=z)  # Euler to 0 is D
        else:
            # (1) lambda = -log sigma, h = lambda(down) - lambda(si); midpoint s = lambda + h/2,
            #     sigma_s = sqrt(si down).
            #     First-order data-prediction step to s: u = (sigma_s/si) x - expm1(-h/2) D_1.
            h = math.log(si / down)
            sig_s = math.sqrt(si * down)
            u, den = step(model, x, si, a=sig_s / si, b=-math.expm1(-h / 2))
            # (2) The full step with D at the midpoint: x' = (down/si) x - expm1(-h) D_2 (+ sigma_up z).
            x_next, _ = step(model, x, sig_s, x_in=u, a=down / si, b=-math.expm1(-h), d=up, noise=z)
        report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0,
                     r: float = 0.5):
    """DPM-Solver++ (stochastic, k-diffusion's sample_dpmpp_sde): two ancestral data-prediction stages per step.

    k-diffusion and A1111 draw its noise from a Brownian tree (pass a BrownianNoise for the same numbers).
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    fac = 1 / (2 * r)
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        if sn == 0:
            x_next, den = step(model, x, si, a=0.0, b=1.0)  # Euler to 0 is D
        else:
            # (1) Stage 1: sigma_s at lambda + r h; ancestral split si -> sigma_s, first-order (Euler) step to
            #     sigma_down, plus sigma_up of noise for the interval (si, sigma_s).
            sig_s = si * (sn / si) ** r
            sd, su = ancestral(si, sig_s, eta)
            z1 = draw(noise, x, si, sig_s) if su > 0 else None
            u, den = step(model, x, si, a=sd / si, b=1 - sd / si, d=su, noise=z1)
            # (2) Stage 2 from x with D_d = (1 - fac) D_1 + fac D_2 (fac = 1/(2r)), ancestral split si -> sn.
            sd, su = ancestral(si, sn, eta)
            z2 = draw(noise, x, si, sn) if su > 0 else None
            w = 1 - sd / si
            x_next, _ = step(model, x, sig_s, x_in=u, a=sd / si, b=w * fac, c=w * (1 - fac), d_prev=den,
                             d=su, noise=z2)
        report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """Heun++ (ComfyUI's heunpp2): three-stage Euler chains whose slopes are weighted by sigma / (3 sigma_max)."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    end = s[-1]
    for i in trange(len(s) - 1, disable=disable):
        si, s1 = s[i], s[i + 1]
        dt = s1 - si
        # (1) Euler from x: x_2 = x + dt d_1, d_1 = (x - D_1)/si. On the last step this is the update.
        x_2, den = step(model, x, si, a=s1 / si, b=1 - s1 / si)
        if s1 == end:
            x_next = x_2
        elif s[i + 2] == end:
            # (2) Heun with weights w2 = s1/(2 s_0), w1 = 1 - w2: x' = x + dt (w1 d_1 + w2 d_2).
            w2 = s1 / (2 * s[0])
            k1, k2 = dt * (1 - w2) / si, dt * w2 / s1
            hist = combine([(k2, x_2), (-k1, den)])
            x_next, _ = step(model, x, s1, x_in=x_2, a=1 + k1, b=-k2, c=1.0, d_prev=hist)
        else:
            # (3) Heun++: a second Euler step x_3 = x_2 + (s2 - s1) d_2, then x' = x + dt (w1 d_1 + w2 d_2 + w3 d_3)
            #     with w2 = s1/(3 s_0), w3 = s2/(3 s_0), w1 = 1 - w2 - w3.
            s2 = s[i + 2]
            x_3, den_2 = step(model, x_2, s1, a=s2 / s1, b=1 - s2 / s1)
            w2, w3 = s1 / (3 * s[0]), s2 / (3 * s[0])
            k1, k2, k3 = dt * (1 - w2 - w3) / si, dt * w2 / s1, dt * w3 / s2
            hist = combine([(-k1, den), (k2, x_2), (-k2, den_2), (k3, x_3)])
            x_next, _ = step(model, x, s2, x_in=x_3, a=1 + k1, b=-k3, c=1.0, d_prev=hist)
        report(callback, i, si, x, den)
        x = x_next
    return x


@torch.no_grad()
def sample_restart(model, x, sigmas, *, noise=None, callback=None, disable=None, s_noise: float = 1.0,
                   restart_list: dict | None = None):
    """Restart sampling (Xu et al. 2023, Alg. 1) as A1111 runs it: Heun steps, with restarts that jump back up.

    restart_list {sigma_min: [restart_steps, restart_times, sigma_max]}; by default (A1111's) a run of 20 or more
    steps spends 9 steps (36+: steps // 4, twice) on one restart interval [0.1, 2] and walks Karras sigmas.
    """
    model = as_denoiser(model)
    pairs = restart_plan(host_sigmas(sigmas), restart_list)
    last = None
    for i, (old, new) in enumerate(tqdm(pairs, disable=disable)):
        if last is not None and last < old:
            # (1) Alg. 1, line 7: forward to the restart level with fresh noise, x += sqrt(old^2 - last^2) z.
            x = x + draw(noise, x, old, last) * (s_noise * math.sqrt(old * old - last * last))
        x_next, den = _heun_step(model, x, old, new)
        report(callback, i, old, x, den)
        x, last = x_next, new
    return x


def restart_plan(s: list[float], restart_list: dict | None = None) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) steps of a restart run, with every restart interval spliced in (host floats)."""
    steps = len(s) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            grid = karras_sigmas(steps - restart_steps * restart_times, s[-2], s[0]).tolist()
            s = grid + [0.0]
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}

    def nearest(value):
        return min(range(len(s)), key=lambda j: (abs(s[j] - value), j))

    at = {nearest(k): v for k, v in restart_list.items()}
    plan = []
    for i in range(len(s) - 1):
        plan.append((s[i], s[i + 1]))
        if i + 1 in at:
            restart_steps, restart_times, restart_max = at[i + 1]
            lo, hi = i + 1, nearest(restart_max)
            if hi < lo:
                grid = karras_sigmas(restart_steps, s[lo], s[hi]).tolist()
                for _ in range(restart_times):
                    plan += list(zip(grid[:-1], grid[1:]))
    return plan


# ----------------------------------------------------------------------------------------------
# Names


SAMPLERS = {
    "euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "heun": sample_heun,
    "heunpp2": sample_heunpp2, "dpm_2": sample_dpm_2, "dpm_2_ancestral": sample_dpm_2_ancestral, "lms": sample_lms,
    "dpm_fast": sample_dpm_fast, "dpm_adaptive": sample_dpm_adaptive, "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde, "dpmpp_2m": sample_dpmpp_2m, "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun, "dpmpp_3m_sde": sample_dpmpp_3m_sde, "restart": sample_restart,
    "ddim": sample_ddim, "ddim_cfg_pp": sample_ddim_cfg_pp, "plms": sample_plms, "unipc": sample_unipc,
    "unipc_bh2": sample_unipc_bh2, "lcm": sample_lcm, "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp, "ipndm": sample_ipndm, "ipndm_v": sample_ipndm_v,
    "deis": sample_deis, "res_multistep": sample_res_multistep,
    "res_multistep_ancestral": sample_res_multistep_ancestral, "er_sde": sample_er_sde, "ddpm": sample_ddpm,
}
SAMPLER_NAMES = tuple(SAMPLERS)

# A1111's title of each sampler (its list, in its order, then the ones only ComfyUI has, by their ComfyUI names).
A1111_TITLES = {
    "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "euler_ancestral": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "restart": "Restart",
    "ddim": "DDIM", "ddim_cfg_pp": "DDIM CFG++", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
    "euler_cfg_pp": "euler_cfg_pp", "euler_ancestral_cfg_pp": "euler_ancestral_cfg_pp", "heunpp2": "heunpp2",
    "ipndm": "ipndm", "ipndm_v": "ipndm_v", "deis": "deis", "res_multistep": "res_multistep",
    "res_multistep_ancestral": "res_multistep_ancestral", "er_sde": "er_sde", "unipc_bh2": "uni_pc_bh2",
    "ddpm": "DDPM",
}

# A1111's "Automatic" schedule of each sampler (sd_samplers_kdiffusion's `scheduler` options; the timestep
# samplers DDIM / PLMS / UniPC and LCM walk their own discretizations); samplers A1111 lacks get its k-diffusion
# default, uniform.
A1111_AUTOMATIC = {
    "dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2s_ancestral": "karras", "dpm_2": "karras",
    "dpm_2_ancestral": "karras", "restart": "karras", "dpmpp_2m_sde": "exponential",
    "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential", "ddim": "a1111_timesteps",
    "ddim_cfg_pp": "a1111_timesteps", "plms": "a1111_timesteps", "unipc": "a1111_unipc", "unipc_bh2": "a1111_unipc",
    "lcm": "a1111_lcm",
}
# A1111 takes one more step and drops the next-to-last sigma for these (its discard_next_to_last_sigma option).
DISCARD_PENULTIMATE = ("dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde")
# These integrate from the first sigma to the last positive one and return the latent there, with no step to 0:
# their list ends at the model's smallest sigma whatever the schedule (as A1111's txt2img runs them), not at a
# schedule's last positive sigma (0.34 on SD 1.5's trailing 10 steps: visible noise left in the picture).
TO_SIGMA_MIN = ("dpm_fast", "dpm_adaptive")

# Other spellings, normalized by _norm (lowercase; spaces, '_' and '-' removed; '++' -> 'pp'): A1111 titles and
# aliases, ComfyUI names, diffusers scheduler class names (without 'Scheduler') and k-diffusion functions
# (without 'sample_').
_ALIASES = {
    **{n.replace("_", ""): n for n in SAMPLERS},
    "eulera": "euler_ancestral", "eulerdiscrete": "euler", "eulerancestraldiscrete": "euler_ancestral",
    "heundiscrete": "heun", "heunpp": "heunpp2", "kdpm2discrete": "dpm_2", "dpm2": "dpm_2", "dpm2a": "dpm_2_ancestral",
    "dpm2ancestral": "dpm_2_ancestral", "kdpm2ancestraldiscrete": "dpm_2_ancestral", "lmsdiscrete": "lms",
    "dpmad": "dpm_adaptive", "dpmpp2sa": "dpmpp_2s_ancestral", "dpmsolversde": "dpmpp_sde",
    "dpmsolvermultistep": "dpmpp_2m", "ddimcfgpp": "ddim_cfg_pp", "pndm": "plms", "unipcmultistep": "unipc",
    "unipcbh1": "unipc", "deismultistep": "deis", "lcm": "lcm", "euleracfgpp": "euler_ancestral_cfg_pp",
    "ddpm": "ddpm", "ddim": "ddim",
}
_DIFFUSERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
              "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "PNDMScheduler",
              "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, the sigma schedule its name implies, and its base name."""
    fn: Callable
    sigma_kind: str = "default"
    name: str = ""

    def schedule_kind(self, kind: str | None = None) -> str:
        """The schedule a run uses: `kind` if given, else the name's; 'automatic' is A1111's choice for it."""
        kind = self.sigma_kind if kind is None else resolve_schedule(kind)
        return A1111_AUTOMATIC.get(self.name, "uniform") if kind == "automatic" else kind

    def sigmas(self, schedule, steps: int, kind: str | None = None, **kw):
        """The (host, float64) sigmas of an n-step run: one more and the next-to-last dropped where A1111 does."""
        kind = self.schedule_kind(kind)
        if self.name in DISCARD_PENULTIMATE and not kind.startswith("a1111_"):
            s = sampling_sigmas(schedule, steps + 1, kind=kind, **kw)
            return torch.cat([s[:-2], s[-1:]])
        s = sampling_sigmas(schedule, steps, kind=kind, **kw)
        if self.name in TO_SIGMA_MIN and len(s) > 2 and s[-1] == 0:
            s = s.clone()
            s[-2] = min(float(s[-2]), float(schedule.sigmas.min()))
        return s

    def options(self, schedule) -> dict:
        """What the sampler needs from the model's schedule (LCM's boundary scalings)."""
        return {"boundary": lcm_boundary(schedule)} if self.name == "lcm" else {}

    def __call__(self, model, x, sigmas, **kw):
        return self.fn(model, x, sigmas, **kw)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower().replace("++", "pp") if ch not in " _-")


def _base(key: str) -> str | None:
    """Our base name for a normalized sampler name, or None."""
    for prefix, suffix in (("", ""), ("sample", ""), ("", "scheduler"), ("", "gpu")):
        if key.startswith(prefix) and key.endswith(suffix):
            core = key[len(prefix):len(key) - len(suffix)]
            if core in _ALIASES:
                return _ALIASES[core]
    return None


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by our name, an A1111 title (with a schedule as in "DPM++ 2M Karras"), a ComfyUI name,
    a diffusers class name or a k-diffusion function name."""
    key = _norm(name)
    legacy = name.strip().lower().startswith("k_")  # A1111's old aliases: k_euler_a, k_dpmpp_2m_ka
    if legacy:
        key = key[1:]
    base, kind = _base(key), "default"
    if base is None:
        suffixes = dict(SCHEDULE_SUFFIXES, **({"ka": "karras", "exp": "exponential"} if legacy else {}))
        for suffix in sorted(suffixes, key=len, reverse=True):
            if key.endswith(suffix) and _base(key[:-len(suffix)]):
                base, kind = _base(key[:-len(suffix)]), suffixes[suffix]
                break
    if base is None:
        raise ValueError(
            f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}, their A1111 titles "
            f"({', '.join(repr(t) for n, t in A1111_TITLES.items() if t != n)}) optionally followed by a schedule "
            f"('DPM++ 2M Karras'), diffusers classes {', '.join(_DIFFUSERS)} and k-diffusion functions sample_<name>")
    return SamplerSpec(SAMPLERS[base], kind, base)
