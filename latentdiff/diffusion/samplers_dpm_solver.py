"""DPM-Solver (Lu et al. 2022) as k-diffusion drives it: DPM fast (fixed orders) and DPM adaptive (step control).

Both work in t = -log sigma on the noise prediction eps = (x - D)/sigma and use only the first and last positive
sigma of the schedule they are given (and its length, for DPM fast: one model call per step). DPM fast is a fixed
plan of fused updates; DPM adaptive accepts or rejects each step by an error norm it reads on the host, so it
synchronizes with the device every step and cannot be captured in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from latentdiff.diffusion.sampler_base import ancestral, as_denoiser, combine, draw, host_sigmas, report, step


class _Solver:
    """DPM-Solver-1/2/3 steps (Lu et al. 2022, Alg. 4-6 in t = -log sigma) with eps kept per step."""

    def __init__(self, model, callback=None):
        self.model, self.callback, self.calls = model, callback, 0

    def eval_into(self, x, u, sig_u, weights, eps_hist):
        """x + sum_k weights[k] eps_k + w_new eps(u, sig_u), as one fused update: (result, eps(u), D(u)).

        weights: host floats for the eps already known (eps_hist) and, last, the one of the new eps.
        """
        w_new = weights[-1]
        rest = combine([(w, e) for w, e in zip(weights[:-1], eps_hist)] + [(w_new / sig_u, u)])
        out, den = step(self.model, x, sig_u, x_in=u, a=1.0, b=-w_new / sig_u, c=1.0, d_prev=rest)
        self.calls += 1
        return out, (u - den) / sig_u, den

    def solve(self, x, t, t_next, order, r1=None):
        """One DPM-Solver-`order` step from t to t_next; returns (x_order, x_low, eps0, D0).

        x_low is the order-2 result with r1 = 1/3 that the adaptive driver compares with order 3 (None else).
        """
        sig = lambda v: math.exp(-v)  # noqa: E731
        h = t_next - t
        s_t, s_n = sig(t), sig(t_next)
        # (1) eps at (x, t), and DPM-Solver-1: x_1 = x - sigma_next expm1(h) eps.
        w1 = -s_n * math.expm1(h)
        if order == 1:
            x1, eps0, den = self.eval_into(x, x, s_t, [w1], [])
            return x1, None, eps0, den
        r1 = (1 / 2 if order == 2 else 1 / 3) if r1 is None else r1
        s1 = t + r1 * h
        u1, eps0, den = self.eval_into(x, x, s_t, [-sig(s1) * math.expm1(r1 * h)], [])
        if order == 2:
            # (2) Alg. 5: x_2 = x - s_n expm1(h) eps - s_n/(2 r1) expm1(h) (eps_r1 - eps).
            c = -s_n / (2 * r1) * math.expm1(h)
            x2, _, _ = self.eval_into(x, u1, sig(s1), [w1 - c, c], [eps0])
            return x2, None, eps0, den
        # (3) Alg. 6 (r1 = 1/3, r2 = 2/3): u2 from eps and eps_r1, then x_3 from eps and eps_r2.
        r2 = 2 / 3
        s2 = t + r2 * h
        c2 = -sig(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
        u2, eps1, _ = self.eval_into(x, u1, sig(s1), [-sig(s2) * math.expm1(r2 * h) - c2, c2], [eps0])
        c_low = -s_n / (2 * r1) * math.expm1(h)  # DPM-Solver-2 with the same r1, for the error estimate
        x_low = combine([(1.0, x), (w1 - c_low, eps0), (c_low, eps1)])
        c3 = -s_n / r2 * (math.expm1(h) / h - 1)
        x3, _, _ = self.eval_into(x, u2, sig(s2), [w1 - c3, c3], [eps0])
        return x3, x_low, eps0, den


def _ends(s):
    """(sigma_min, sigma_max): the last positive sigma and the first."""
    positive = [v for v in s if v > 0]
    if len(positive) < 2:
        raise ValueError("DPM fast / adaptive need a schedule with two positive sigmas (sigma_max > sigma_min > 0)")
    return positive[-1], s[0]


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): len(sigmas) - 1 model calls spent on order-3 steps uniform in
    t = -log sigma, from sigmas[0] to the last positive sigma. eta > 0 adds ancestral noise per step (A1111 runs it
    with its ancestral eta, 1; k-diffusion's and ComfyUI's default is 0)."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    sigma_min, sigma_max = _ends(s)
    nfe = len(s) - 1
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = nfe // 3 + 1
    ts = [t_start + (t_end - t_start) * k / m for k in range(m + 1)]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    solver = _Solver(model)
    for i, order in enumerate(tqdm(orders, disable=disable)):
        t, t_next = ts[i], ts[i + 1]
        su, t_to = 0.0, t_next
        if eta:
            # The ancestral split of sigma(t) -> sigma(t_next); the deterministic part stops at sigma_down.
            sd, _ = ancestral(math.exp(-t), math.exp(-t_next), eta)
            t_to = min(t_end, -math.log(sd))
            su = math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * t_to), 0.0))
        x_prev = x
        x, _, _, den = solver.solve(x, t, t_to, order)
        report(callback, i, math.exp(-t), x_prev, den)
        if su:
            x = x + draw(noise, x, math.exp(-t), math.exp(-t_next)) * su
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, *, noise=None, callback=None, disable=None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                        icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 1.0):
    """DPM-Solver-23 (or -12) with adaptive steps (Lu et al. 2022, Sec. 4.2; k-diffusion's PID control) from
    sigmas[0] to the last positive sigma. Host-deciding: one device sync per step for the error norm. eta as in
    sample_dpm_fast."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    model, s = as_denoiser(model), host_sigmas(sigmas)
    sigma_min, sigma_max = _ends(s)
    t, t_end = -math.log(sigma_max), -math.log(sigma_min)
    ctl = _PID(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    solver, x_prev, i = _Solver(model), x, 0
    with tqdm(disable=disable) as bar:
        while t < t_end - 1e-5:
            t_next = min(t_end, t + ctl.h)
            su, t_to = 0.0, t_next
            if eta:
                sd, _ = ancestral(math.exp(-t), math.exp(-t_next), eta)
                t_to = min(t_end, -math.log(sd))
                su = math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * t_to), 0.0))
            if order == 2:
                x_low, _, _, den = solver.solve(x, t, t_to, 1)
                x_high, _, _, _ = solver.solve(x, t, t_to, 2)
            else:
                x_high, x_low, _, den = solver.solve(x, t, t_to, 3)
            delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
            if ctl.propose(error):
                report(callback, i, math.exp(-t), x, den)
                x_prev = x_low
                x = x_high + draw(noise, x, math.exp(-t), math.exp(-t_next)) * su if su else x_high
                t, i = t_next, i + 1
            bar.update()
    return x


class _PID:
    """k-diffusion's PID step-size controller (Soderlind 2003) on the inverse error."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept
