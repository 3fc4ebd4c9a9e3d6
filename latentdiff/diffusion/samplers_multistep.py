"""Multistep samplers: each step reuses the denoised estimates (or slopes) of earlier steps.

Same signature and sigma space as samplers.py. The current step's model output still goes through one fused
`ops.sampler_step`; the weighted sum of the older estimates enters it as `d_prev`, summed in torch (no host
sync: every weight is a host float computed from the sigmas).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from latentdiff.diffusion.sampler_base import (Evaluation, ancestral, apply, as_denoiser, check_choice, combine,
                                               draw, host_sigmas, report, step)

# ----------------------------------------------------------------------------------------------
# Small host-side numerics


_GL_NODES = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
_GL_WEIGHTS = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)


def _integrate_poly(f, a: float, b: float) -> float:
    """Integral of f over [a, b] by 4-point Gauss-Legendre: exact for polynomials of degree <= 7."""
    mid, half = (a + b) / 2, (b - a) / 2
    return half * sum(w * f(mid + half * u) for u, w in zip(_GL_NODES, _GL_WEIGHTS))


def _lagrange(nodes, j):
    """The j-th Lagrange basis polynomial through `nodes`, as a function."""
    def basis(t):
        out = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                out *= (t - node) / (nodes[j] - node)
        return out
    return basis


def _solve(a, b):
    """Solve the small dense system a x = b (lists of floats) by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [list(row) + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [v - f * w for v, w in zip(m[r], m[col])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def _slope_step(model, x, si: float, coefs, history):
    """x' = x + c_0 d_0 + sum_k c_k d_-k with slopes d = (x - D)/sigma (history newest first): (x', D, d_0)."""
    c0 = coefs[0]
    hist = combine(zip(coefs[1:], history))
    x_next, den = step(model, x, si, a=1 + c0 / si, b=-c0 / si, c=1.0, d_prev=hist)
    return x_next, den, (x - den) / si


def _keep(history, item, size):
    """history with item in front, at most `size` long (newest first)."""
    return ([item] + history)[:size]


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ multistep (Lu et al. 2022)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep 2nd order in lambda = -log sigma."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
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
        x_next, den = step(model, x, si, a=a, b=b, c=c, d_prev=old if c != 0 else None)
        report(callback, i, si, x, den)
        x, old, h_last = x_next, den, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0,
                        solver: str = "midpoint"):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, the SDE variant of Algorithm 2), midpoint or heun correction."""
    check_choice("dpmpp_2m_sde solver", solver, ("midpoint", "heun"))
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    model, s = as_denoiser(model), host_sigmas(sigmas)
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
                z = draw(noise, x, si, sn)
        x_next, den = step(model, x, si, a=a, b=b, c=c, d=d, d_prev=old if c != 0 else None, noise=z)
        report(callback, i, si, x, den)
        x, old, h_last = x_next, den, h
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """SDE-DPM-Solver++(2M) with the heun correction (A1111's 'DPM++ 2M SDE Heun')."""
    return sample_dpmpp_2m_sde(model, x, sigmas, noise=noise, callback=callback, disable=disable, eta=eta,
                               solver="heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """SDE-DPM-Solver++(3M) (k-diffusion's sample_dpmpp_3m_sde): the 2M SDE step plus a second difference."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    hist, hs = [], []  # D and h of the last two steps, newest first
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        d, z, pairs = 0.0, None, []
        if sn == 0:
            a, b, h = 0.0, 1.0, (hs[0] if hs else None)
        else:
            h = math.log(si / sn)
            he = h * (eta + 1)
            # (1) The exponential integrator's linear part: x' = e^{-(1+eta) h}... = (sn/si) e^{-eta h} x + E D.
            a, E = math.exp(-he), -math.expm1(-he)
            phi2 = 1 - E / he
            b = E
            if len(hist) == 2:
                # (2) Third order: first and second divided differences of D over the last three lambdas,
                #     x += phi2 d1 - phi3 d2 with phi3 = phi2/he - 1/2, expanded onto D, D_-1, D_-2.
                r0, r1 = hs[0] / h, hs[1] / h
                phi3 = phi2 / he - 0.5
                k = r0 / (r0 + r1)
                A = phi2 * (1 + k) - phi3 / (r0 + r1)
                Bc = -phi2 * k + phi3 / (r0 + r1)
                b += A / r0
                pairs = [(-A / r0 + Bc / r1, hist[0]), (-Bc / r1, hist[1])]
            elif len(hist) == 1:
                # (3) Second order, as 2M SDE heun: x += phi2 (D - D_-1)/r.
                r = hs[0] / h
                b += phi2 / r
                pairs = [(-phi2 / r, hist[0])]
            if eta:
                d = sn * math.sqrt(-math.expm1(-2 * h * eta))
                z = draw(noise, x, si, sn)
        x_next, den = step(model, x, si, a=a, b=b, c=1.0, d_prev=combine(pairs), d=d, noise=z)
        report(callback, i, si, x, den)
        x, hist, hs = x_next, _keep(hist, den, 2), _keep(hs, h, 2)
    return x


# ----------------------------------------------------------------------------------------------
# Linear multistep on the slope d = (x - D)/sigma: LMS, iPNDM, DEIS, PLMS


@torch.no_grad()
def sample_lms(model, x, sigmas, *, noise=None, callback=None, disable=None, order: int = 4):
    """Linear multistep (k-diffusion's sample_lms): Adams-Bashforth in sigma with Lagrange weights of order <= 4."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    hist = []
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        k = min(i + 1, order)
        # c_j = integral from s_i to s_i+1 of the Lagrange basis through s_i, s_i-1, ..., s_i-k+1 (exact quadrature).
        nodes = [s[i - j] for j in range(k)]
        coefs = [_integrate_poly(_lagrange(nodes, j), si, sn) for j in range(k)]
        x_next, den, d0 = _slope_step(model, x, si, coefs, hist)
        report(callback, i, si, x, den)
        x, hist = x_next, _keep(hist, d0, order - 1)
    return x


_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_ipndm(model, x, sigmas, *, noise=None, callback=None, disable=None, max_order: int = 4):
    """Improved PNDM (Zhang & Chen 2023, DEIS paper, eq. 24): fixed-step Adams-Bashforth on d in sigma."""
    return _adams_bashforth(model, x, sigmas, callback, disable, max_order, lambda s, i, k: _AB[k])


def _adams_bashforth(model, x, sigmas, callback, disable, max_order: int, weights):
    """The iPNDM loop: x += (sigma_next - sigma) * sum_j w_j d_(i-j) over the last k <= max_order slopes, with
    `weights(sigmas, i, k)` giving step i's w; a plain denoised step into sigma 0."""
    model, s = as_denoiser(model), host_sigmas(sigmas)
    hist = []
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        if sn == 0:
            x_next, den = step(model, x, si, a=0.0, b=1.0)
            d0 = None
        else:
            k = min(max_order, i + 1)
            x_next, den, d0 = _slope_step(model, x, si, [(sn - si) * w for w in weights(s, i, k)], hist)
        report(callback, i, si, x, den)
        x, hist = x_next, _keep(hist, d0, max_order - 1)
    return x


def _ipndm_v_weights(h, k):
    """ComfyUI's variable-step iPNDM weights (from zju-pi/diff-sampler) for steps h = (h_n, h_n-1, ...)."""
    if k == 1:
        return [1.0]
    hn, h1 = h[0], h[1]
    w = [(2 + hn / h1) / 2, -(hn / h1) / 2]
    if k == 2:
        return w
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if k == 3:
        return [w[0] + t1, w[1] - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [w[0] + t1 + t2, w[1] - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
            t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2, -t2 * q * h1 / h2]


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, *, noise=None, callback=None, disable=None, max_order: int = 4):
    """iPNDM with variable step sizes (ComfyUI's ipndm_v): Adams-Bashforth weights for the actual sigma steps."""
    def weights(s, i, k):
        return _ipndm_v_weights([s[i + 1] - s[i]] + [s[i - j] - s[i - j - 1] for j in range(k - 1)], k)
    return _adams_bashforth(model, x, sigmas, callback, disable, max_order, weights)


def _log_poly_integral(coefs, a: float, b: float) -> float:
    """Integral over rho in [a, b] of sum_m coefs[m] (log rho)^m, in closed form.

    An antiderivative of (log rho)^m is rho * sum_{k<=m} (-1)^(m-k) m!/k! (log rho)^k.
    """
    def F(r):
        u, total = math.log(r), 0.0
        for m, c in enumerate(coefs):
            total += c * sum((-1) ** (m - k) * math.factorial(m) / math.factorial(k) * u ** k for k in range(m + 1))
        return r * total
    return F(b) - F(a)


def _poly_from_roots(roots, scale):
    """Coefficients (lowest first) of scale * prod (u - root)."""
    c = [scale]
    for r in roots:
        c = [(c[k - 1] if k > 0 else 0.0) - r * (c[k] if k < len(c) else 0.0) for k in range(len(c) + 1)]
    return c


@torch.no_grad()
def sample_deis(model, x, sigmas, *, noise=None, callback=None, disable=None, max_order: int = 3):
    """DEIS-k multistep (Zhang & Chen 2023, eq. 15; diffusers' DEISMultistepScheduler, 'logrho').

    The noise prediction eps = d is interpolated by a polynomial in log sigma through the last k steps and
    integrated exactly over sigma: x' = x + sum_j (integral of l_j(log rho) d rho from s_i to s_i+1) eps_j.
    Like diffusers, runs under 15 steps end in first then second order; a step to sigma 0 returns D.
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    n, hist = len(s) - 1, []
    for i in trange(n, disable=disable):
        si, sn = s[i], s[i + 1]
        k = min(max_order, i + 1)
        if n < 15:
            k = min(k, 1 if i == n - 1 else 2 if i == n - 2 else k)
        if sn == 0:
            x_next, den = step(model, x, si, a=0.0, b=1.0)
            d0 = None
        else:
            u = [math.log(s[i - j]) for j in range(k)]
            coefs = []
            for j in range(k):
                others = [u[m] for m in range(k) if m != j]
                scale = 1.0 / math.prod(u[j] - o for o in others) if others else 1.0
                coefs.append(_log_poly_integral(_poly_from_roots(others, scale), si, sn))
            x_next, den, d0 = _slope_step(model, x, si, coefs, hist)
        report(callback, i, si, x, den)
        x, hist = x_next, _keep(hist, d0, max_order - 1)
    return x


@torch.no_grad()
def sample_plms(model, x, sigmas, *, noise=None, callback=None, disable=None):
    """Pseudo linear multistep (Liu et al. 2022, PNDM eq. 12 with the PLMS warm-up of CompVis / A1111 / diffusers).

    In sigma space a DDIM step with noise estimate e is x' = x + (sn - si) e; PLMS feeds it the Adams-Bashforth
    combination of the last four e = d. The first step is the pseudo improved Euler (Heun) step.
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    hist = []
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        dt = sn - si
        if i == 0 and sn > 0:
            # (1) e' = (e(x, si) + e(x + dt e, sn)) / 2; only e(x, si) joins the history.
            x_e, den = step(model, x, si, a=sn / si, b=1 - sn / si)
            d0 = (x - den) / si
            k = dt / (2 * sn)
            x_next, _ = step(model, x, sn, x_in=x_e, a=1.0, b=-k, c=1.0, d_prev=combine([(dt / 2, d0), (k, x_e)]))
        else:
            # (2) Adams-Bashforth of order min(history + 1, 4) with fixed weights.
            x_next, den, d0 = _slope_step(model, x, si, [dt * w for w in _AB[min(len(hist) + 1, 4)]], hist)
        report(callback, i, si, x, den)
        x, hist = x_next, _keep(hist, d0, 3)
    return x


# ----------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023)


def _unipc_coefs(lams, h, order, variant, corrector):
    """UniPC's B(h), its phi weights on the divided differences, and rks (Zhao et al. 2023, Alg. 2-3).

    lams: lambda = -log sigma of the history points after the base point, newest first; h > 0 the step in lambda.
    Returns (B_h, rhos) with rhos[k] the weight of (D_k - D_base)/r_k, k over the history, and for the corrector
    a last weight for (D_new - D_base).
    """
    hh = -h  # data prediction: the integrator runs in -lambda
    B = hh if variant == "bh1" else math.expm1(hh)
    rks = [(lam - lams[0]) / h for lam in lams[1:order]] + [1.0]
    h_phi_k, fact, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / B)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R = [[r ** (k - 1) for r in rks] for k in range(1, order + 1)]
    if corrector:
        rhos = [0.5] if order == 1 else _solve(R, b)
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    return B, rks, rhos


@torch.no_grad()
def sample_unipc(model, x, sigmas, *, noise=None, callback=None, disable=None, order: int = 3, variant: str = "bh1"):
    """UniPC (Zhao et al. 2023): UniP-order multistep predictor and a UniC corrector that reuses each new D.

    Data prediction with B(h) = h (bh1, A1111's and ComfyUI's default) or e^h - 1 (bh2, diffusers' default);
    the order warms up from 1 and lowers again over the last steps, and the corrector is skipped after the last
    step, as in diffusers' UniPCMultistepScheduler and the reference code.
    """
    check_choice("unipc variant", variant, ("bh1", "bh2"))
    model, s = as_denoiser(model), host_sigmas(sigmas)
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    hist, x_c, last_order = [], None, 0  # D of earlier steps (newest first), last corrected sample
    for i in trange(n, disable=disable):
        si, sn = s[i], s[i + 1]
        ev = Evaluation(model, x, si)
        if i > 0:
            # (1) UniC (Alg. 3): correct x_i from x_{i-1} with the new D_i, by the order of the step that made x_i.
            h = lam[i] - lam[i - 1]
            B, rks, rhos = _unipc_coefs([lam[i - 1 - j] for j in range(last_order)], h, last_order, variant, True)
            m0 = hist[0]
            w0 = -math.expm1(-h) + B * rhos[-1] + B * sum(rho / r for rho, r in zip(rhos[:-1], rks))
            pairs = [(w0, m0)] + [(-B * rho / r, hist[k + 1]) for k, (rho, r) in enumerate(zip(rhos[:-1], rks))]
            x_c, den = apply(model, x_c, ev, a=si / s[i - 1], b=-B * rhos[-1], c=1.0, d_prev=combine(pairs))
        else:
            x_c = x
        order_i = min(order, n - i, i + 1)
        if sn == 0:
            x_next, den = apply(model, x_c, ev, a=0.0, b=1.0)  # the exact first-order step to sigma 0 is D
        else:
            # (2) UniP (Alg. 2): x' = (sn/si) x_c - expm1(-h) D_i - B(h) sum_k rho_k (D_-k - D_i)/r_k.
            h = lam[i + 1] - lam[i]
            B, rks, rhos = _unipc_coefs([lam[i - j] for j in range(order_i)], h, order_i, variant, False)
            w0 = -math.expm1(-h) + B * sum(rho / r for rho, r in zip(rhos, rks))
            pairs = [(-B * rho / r, hist[k]) for k, (rho, r) in enumerate(zip(rhos, rks))]
            x_next, den = apply(model, x_c, ev, a=sn / si, b=w0, c=1.0, d_prev=combine(pairs))
        report(callback, i, si, x, den)
        x, hist, last_order = x_next, _keep(hist, den, order), order_i
    return x


def sample_unipc_bh2(model, x, sigmas, *, noise=None, callback=None, disable=None, order: int = 3):
    """UniPC with B(h) = e^h - 1 (ComfyUI's uni_pc_bh2)."""
    return sample_unipc(model, x, sigmas, noise=noise, callback=callback, disable=disable, order=order,
                        variant="bh2")


# ----------------------------------------------------------------------------------------------
# RES multistep and ER-SDE (ComfyUI's)


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 0.0):
    """RES second-order multistep (Zhang et al. 2023, arXiv:2308.02157, eq. for the 2-stage exponential scheme).

    With eta > 0 each step goes to sigma_down and adds sigma_up of noise (ComfyUI's res_multistep_ancestral).
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    old, old_down = None, None
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        down, up = ancestral(si, sn, eta)
        z = draw(noise, x, si, sn) if sn > 0 and up > 0 else None
        if down == 0 or old is None:
            x_next, den = step(model, x, si, a=down / si, b=1 - down / si, d=up, noise=z)  # Euler
        else:
            # x' = e^-h x + h (b1 D + b2 D_old), h in lambda = -log sigma, with phi_1, phi_2 at -h and
            # c2 = (lambda_prev - lambda_old_down) / h the node of the older estimate.
            h = math.log(si / down)
            c2 = (math.log(old_down) - math.log(s[i - 1])) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1, b2 = (phi1 - phi2 / c2, phi2 / c2) if c2 != 0 else (phi1, 0.0)
            x_next, den = step(model, x, si, a=down / si, b=h * b1, c=h * b2, d_prev=old, d=up, noise=z)
        report(callback, i, si, x, den)
        x, old, old_down = x_next, den, down
    return x


def sample_res_multistep_ancestral(model, x, sigmas, *, noise=None, callback=None, disable=None, eta: float = 1.0):
    """RES multistep to sigma_down plus sigma_up of fresh noise (ComfyUI's res_multistep_ancestral)."""
    return sample_res_multistep(model, x, sigmas, noise=noise, callback=callback, disable=disable, eta=eta)


def _er_noise_scaler(v: float) -> float:
    return v * (math.exp(v ** 0.3) + 10.0)


@torch.no_grad()
def sample_er_sde(model, x, sigmas, *, noise=None, callback=None, disable=None, s_noise: float = 1.0,
                  max_stage: int = 3):
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169, Alg. 1; the VP noise scaler of ComfyUI / the paper's code).

    Over lambda = sigma, the first stage is exact for the scaled noise; stages 2 and 3 add the first and second
    divided differences of D with weights integrated numerically on 200 points, as the reference code does.
    """
    model, s = as_denoiser(model), host_sigmas(sigmas)
    hist, dd_old = [], None  # D (newest first) and the last first divided difference, as host-side weights
    for i in trange(len(s) - 1, disable=disable):
        si, sn = s[i], s[i + 1]
        stage = min(max_stage, i + 1)
        if sn == 0:
            x_next, den = step(model, x, si, a=0.0, b=1.0)
            dd = None
        else:
            r = _er_noise_scaler(sn) / _er_noise_scaler(si)
            b, pairs, dd = 1 - r, [], None
            if stage >= 2:
                dt = sn - si
                size = -dt / 200
                pos = [sn + k * size for k in range(200)]
                s1 = sum(1 / _er_noise_scaler(p) for p in pos) * size
                k2 = dt + s1 * _er_noise_scaler(sn)
                # Dd = (D - D_-1)/(s_i - s_i-1), kept as weights on (D, D_-1, ...) for the next step's difference.
                gap = si - s[i - 1]
                dd = [1 / gap, -1 / gap]
                if stage >= 3:
                    su = sum((p - si) / _er_noise_scaler(p) for p in pos) * size
                    k3 = (dt * dt / 2 + su * _er_noise_scaler(sn)) * 2 / (si - s[i - 2])
                    du = [dd[0], dd[1] - dd_old[0], -dd_old[1]]  # (Dd - Dd_old), onto D, D_-1, D_-2
                else:
                    k3, du = 0.0, [0.0, 0.0, 0.0]
                w = [k2 * dd[0] + k3 * du[0], k2 * dd[1] + k3 * du[1], k3 * du[2]]
                b += w[0]
                pairs = [(w[1], hist[0]), (w[2], hist[1] if len(hist) > 1 else None)]
            d = math.sqrt(max(sn * sn - si * si * r * r, 0.0)) * s_noise
            z = draw(noise, x, si, sn) if d > 0 else None
            x_next, den = step(model, x, si, a=r, b=b, c=1.0, d_prev=combine(pairs), d=d, noise=z)
        report(callback, i, si, x, den)
        x, hist = x_next, _keep(hist, den, 2)
        dd_old = dd if dd is not None else dd_old
    return x
