"""The forward process, training targets, loss weightings and the Gaussian KL of the ELBO.

Notation (Ho et al. 2020): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; write a = sqrt(abar_t),
s = sqrt(1 - abar_t), so a^2 + s^2 = 1. The v target is v = a eps - s x0 (Salimans & Ho 2022).
"""
from __future__ import annotations

import functools

import torch

from latentdiff.diffusion import ops
from latentdiff.diffusion.schedule import Schedule

PREDICTIONS = ops.PREDICTIONS
LOSS_WEIGHTS = ("simple", "min_snr", "vlb")


def q_sample(x0, t, noise, schedule: Schedule):
    """x_t ~ q(x_t | x0) for integer timesteps t (one per batch row), Ho et al. 2020, eq. 4."""
    sqrt_ab, sqrt_1m_ab = schedule.tables(x0.device)
    return ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab)


def training_batch(x0, t, noise, schedule: Schedule, prediction: str):
    """(x_t, target) for one training step: the target is eps, x0 or v depending on `prediction`."""
    sqrt_ab, sqrt_1m_ab = schedule.tables(x0.device)
    return ops.q_sample_target(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction)


def _coefs(schedule: Schedule, t, like):
    """a = sqrt(abar_t), s = sqrt(1 - abar_t) per row, shaped to broadcast over `like` (float64 for float64 data)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    sqrt_ab, sqrt_1m_ab = schedule.tables(like.device, dtype)
    t = torch.as_tensor(t, device=like.device)
    return ops.row_coefs(t, sqrt_ab, like), ops.row_coefs(t, sqrt_1m_ab, like)


def predict_x0_eps(pred, x_t, t, schedule: Schedule, prediction: str):
    """(x0, eps) implied by a network output of type `prediction` at x_t."""
    ops.check_prediction(prediction)
    a, s = _coefs(schedule, t, x_t)
    if prediction == "epsilon":
        return (x_t - s * pred) / a, pred
    if prediction == "sample":
        return pred, (x_t - a * pred) / s
    # v = a eps - s x0 and x_t = a x0 + s eps invert to x0 = a x_t - s v, eps = s x_t + a v since a^2 + s^2 = 1.
    return a * x_t - s * pred, s * x_t + a * pred


def convert(pred, x_t, t, schedule: Schedule, src: str, dst: str):
    """Re-express a prediction of type `src` at x_t as one of type `dst`."""
    ops.check_prediction(dst)
    x0, eps = predict_x0_eps(pred, x_t, t, schedule, src)
    if dst == "epsilon":
        return eps
    if dst == "sample":
        return x0
    a, s = _coefs(schedule, t, x_t)
    return a * eps - s * x0


def loss_weight(t, schedule: Schedule, kind: str = "simple", prediction: str = "epsilon", gamma: float = 5.0,
                dtype: torch.dtype = torch.float32):
    """Per-row weight w_t for the MSE between `prediction` and its target.

    simple:  1 (Ho et al. 2020, eq. 14).
    min_snr: w_t ||target - pred||^2 = min(SNR_t, gamma) ||x0 - x0_hat||^2 (Hang et al. 2023), which is
             min(SNR, gamma)/SNR for epsilon, min(SNR, gamma) for sample and min(SNR, gamma)/(SNR + 1) for v.
    vlb:     w_t ||target - pred||^2 = L_{t-1} = ||tilde-mu - mu_theta||^2 / (2 sigma_t^2) (Ho et al. 2020,
             eq. 8 and 12), with sigma_t^2 = tilde-beta_t. For epsilon this is beta_t^2/(2 sigma_t^2 alpha_t
             (1 - abar_t)); for sample coef1_t^2/(2 sigma_t^2); for v (1 - abar_t) coef1_t^2/(2 sigma_t^2).
             At t = 0, tilde-beta_0 = 0, so sigma_0^2 is the clipped tilde-beta_1 (posterior_log_variance_clipped):
             the weight is then exactly that of the Gaussian decoder NLL -log N(x0; mu_theta, tilde-beta_1) of L_0.
    """
    ops.check_prediction(prediction)
    t = torch.as_tensor(t)
    # Gather from a per-device table so a GPU t never travels to the host.
    return _weight_table(schedule, kind, prediction, float(gamma), str(t.device), dtype)[t]


@functools.lru_cache(maxsize=64)
def _weight_table(schedule: Schedule, kind: str, prediction: str, gamma: float, device: str, dtype):
    """loss_weight for every timestep, computed in float64 on the host, then copied to `device` once."""
    idx = torch.arange(schedule.num_timesteps)
    if kind == "simple":
        w = torch.ones(idx.shape, dtype=torch.float64)
    elif kind == "min_snr":
        ab = schedule.alphas_cumprod[idx]
        snr = ab / (1 - ab)
        if prediction == "epsilon":
            w = (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma)/SNR, finite (1) where SNR = 0
        elif prediction == "sample":
            w = snr.clamp(max=gamma)
        else:
            w = snr.clamp(max=gamma) / (snr + 1)
    elif kind == "vlb":
        var = schedule.posterior_log_variance_clipped[idx].exp()
        c1 = schedule.posterior_mean_coef1[idx]
        if prediction == "epsilon":
            b, al, ab = schedule.betas[idx], schedule.alphas[idx], schedule.alphas_cumprod[idx]
            w = b ** 2 / (2 * var * al * (1 - ab))
        elif prediction == "sample":
            w = c1 ** 2 / (2 * var)
        else:
            w = (1 - schedule.alphas_cumprod[idx]) * c1 ** 2 / (2 * var)
    else:
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of {', '.join(LOSS_WEIGHTS)}")
    if not torch.isfinite(w).all():
        # Epsilon VLB at a zero-SNR step: alpha_T = 0, and an epsilon error means an unbounded x0 error there.
        raise ValueError(f"loss weighting {kind} with {prediction} prediction is infinite at the zero-SNR last step "
                         f"of this schedule; use v_prediction (Lin et al. 2023) or loss_weighting min_snr")
    return w.to(device=device, dtype=dtype)


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    args = (mean1, logvar1, mean2, logvar2)
    ref = next((x for x in args if isinstance(x, torch.Tensor)), torch.zeros((), dtype=torch.float64))
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in args)
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def guidance_rescale(cfg, cond, phi: float = 0.7):
    """Lin et al. 2023, Sec. 3.4: scale the guided output to the conditional output's std, then mix by phi."""
    dims = tuple(range(1, cfg.dim()))
    rescaled = cfg * (cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * cfg
