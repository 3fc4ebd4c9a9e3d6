"""Forward process, targets, loss weights and KL against float64 closed forms and a simulated Markov chain."""
import math

import numpy as np
import pytest
import torch

from latentdiff.io.config import DiffusionConfig
from latentdiff.diffusion.process import convert, gaussian_kl, guidance_rescale, loss_weight, predict_x0_eps, q_sample, training_batch
from latentdiff.diffusion.schedule import Schedule

PREDICTIONS = ("epsilon", "sample", "v_prediction")
F64 = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def sched():
    return Schedule.from_config(DiffusionConfig())


def closed(s, t):
    return float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t])


def test_iterated_chain_matches_closed_form(sched):
    # Ho et al. 2020, Sec. 2: iterating x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps from a fixed x0 gives
    # q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I). Check both moments at 6 standard errors on 100k chains.
    N, x0 = 100_000, 1.5
    g = torch.Generator().manual_seed(0)
    x = torch.full((N,), x0, dtype=torch.float64)
    checks = {0: None, 49: None, 149: None, 299: None}
    for t in range(300):
        b = float(sched.betas[t])
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(N, generator=g, dtype=torch.float64)
        if t in checks:
            checks[t] = (float(x.mean()), float(x.var()))

    def z_scores(t, mean, var):
        a, s = closed(sched, t)
        return abs(mean - a * x0) / (s / math.sqrt(N)), abs(var - s * s) / (s * s * math.sqrt(2 / (N - 1)))

    for t, (mean, var) in checks.items():
        zm, zv = z_scores(t, mean, var)
        assert zm < 6 and zv < 6, (t, zm, zv)
    # the bound has power: the closed form 10 steps off is rejected
    assert max(z_scores(289, *checks[299])) > 6 and max(z_scores(39, *checks[49])) > 6

    # and our q_sample, fed fresh noise, has the same moments as the simulated chain (two-sample test)
    t = torch.full((N,), 299, dtype=torch.long)
    xt = q_sample(torch.full((N, 1), x0, dtype=torch.float64), t, torch.randn(N, 1, generator=g, dtype=torch.float64),
                  sched)[:, 0]
    mean, var = checks[299]
    s2 = 1 - float(sched.alphas_cumprod[299])
    assert abs(float(xt.mean()) - mean) < 6 * math.sqrt(2 * s2 / N)
    assert abs(float(xt.var()) - var) < 6 * s2 * math.sqrt(4 / (N - 1))


def test_q_sample_and_targets_per_row(sched):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    a = sched.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = sched.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    want = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
    tol = dict(rtol=1e-6, atol=1e-6)  # the kernel gathers from float32 tables
    torch.testing.assert_close(q_sample(x0, t, eps, sched), a * x0 + s * eps, **tol)
    for p in PREDICTIONS:
        x_t, target = training_batch(x0, t, eps, sched, p)
        torch.testing.assert_close(x_t, a * x0 + s * eps, **tol)
        torch.testing.assert_close(target, want[p], **tol)
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        training_batch(x0, t, eps, sched, "score")


def test_conversions_round_trip_float64(sched):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 900, 999])
    a = sched.sqrt_alphas_cumprod[t].view(-1, 1, 1)
    s = sched.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1)
    x_t = a * x0 + s * eps
    targets = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}
    for src, pred in targets.items():
        x0_hat, eps_hat = predict_x0_eps(pred, x_t, t, sched, src)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-10, atol=1e-10)
        for dst, want in targets.items():
            torch.testing.assert_close(convert(pred, x_t, t, sched, src, dst), want, rtol=1e-10, atol=1e-10)


def test_gaussian_kl_closed_form():
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    want = []
    for a, b, c, d in zip(m1.tolist(), lv1.tolist(), m2.tolist(), lv2.tolist()):
        s1, s2 = math.exp(b / 2), math.exp(d / 2)
        want.append(math.log(s2 / s1) + (s1 ** 2 + (a - c) ** 2) / (2 * s2 ** 2) - 0.5)
    kl = gaussian_kl(m1, lv1, m2, lv2)
    torch.testing.assert_close(kl, torch.tensor(want, dtype=torch.float64), **F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (lv1 / 2).exp()),
                                            torch.distributions.Normal(m2, (lv2 / 2).exp()))
    torch.testing.assert_close(kl, ref, **F64)
    assert float(gaussian_kl(torch.tensor(0.3), 0.0, torch.tensor(0.3), 0.0)) == 0.0


def test_min_snr_weights(sched):
    t = torch.tensor([0, 5, 50, 100, 300, 600, 999])
    ab = sched.alphas_cumprod[t]
    snr = ab / (1 - ab)
    gamma = 5.0
    want = {"epsilon": [min(v, gamma) / v for v in snr.tolist()],
            "sample": [min(v, gamma) for v in snr.tolist()],
            "v_prediction": [min(v, gamma) / (v + 1) for v in snr.tolist()]}
    for p in PREDICTIONS:
        w = loss_weight(t, sched, "min_snr", p, gamma=gamma, dtype=torch.float64)
        torch.testing.assert_close(w, torch.tensor(want[p], dtype=torch.float64), **F64)
    assert loss_weight(t, sched, "simple", "epsilon").tolist() == [1.0] * len(t)
    # every prediction type weighs the same x0 error the same: w ||target - pred||^2 = min(SNR, gamma) ||x0 - x0_hat||^2
    g = torch.Generator().manual_seed(4)
    x0, eps, x0_hat = (torch.randn(len(t), 16, generator=g, dtype=torch.float64) for _ in range(3))
    a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    x_t = a * x0 + s * eps
    eps_hat = (x_t - a * x0_hat) / s
    diffs = {"epsilon": eps - eps_hat, "sample": x0 - x0_hat,
             "v_prediction": (a * eps - s * x0) - (a * eps_hat - s * x0_hat)}
    want = snr.clamp(max=gamma) * ((x0 - x0_hat) ** 2).sum(1)
    for p, d in diffs.items():
        got = loss_weight(t, sched, "min_snr", p, dtype=torch.float64) * (d ** 2).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_min_snr_zero_terminal_snr_is_finite():
    s = Schedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    w = loss_weight(torch.tensor([998, 999]), s, "min_snr", "epsilon", dtype=torch.float64)
    assert torch.isfinite(w).all() and float(w[1]) == 1.0


def test_vlb_weights(sched):
    t = torch.arange(0, 1000, 37)
    # Ho et al. 2020, eq. 12: beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) with sigma_t^2 = tilde-beta_t,
    # computed here from scalar loops; t = 0 uses tilde-beta_1 (documented in loss_weight).
    b = sched.betas.tolist()
    ab, prod = [], 1.0
    for beta in b:
        prod *= 1 - beta
        ab.append(prod)
    tb = [b[i] * (1 - (ab[i - 1] if i else 1.0)) / (1 - ab[i]) for i in range(1000)]
    want = [b[i] ** 2 / (2 * tb[max(i, 1)] * (1 - b[i]) * (1 - ab[i])) for i in t.tolist()]
    w = loss_weight(t, sched, "vlb", "epsilon", dtype=torch.float64)
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)

    # For every prediction type, w ||target - pred||^2 is the ELBO term: for t >= 1 the KL between the true
    # posterior q(x_{t-1} | x_t, x0) and the model's N(tilde-mu(x_t, x0_hat), tilde-beta_t); for t = 0 the
    # x0-dependent part of the Gaussian decoder NLL, (x0 - x0_hat)^2 / (2 tilde-beta_1).
    g = torch.Generator().manual_seed(5)
    x0, eps, x0_hat = (torch.randn(len(t), 16, generator=g, dtype=torch.float64) for _ in range(3))
    abt = sched.alphas_cumprod[t]
    a, s = abt.sqrt()[:, None], (1 - abt).sqrt()[:, None]
    x_t = a * x0 + s * eps
    eps_hat = (x_t - a * x0_hat) / s
    c1, c2 = sched.posterior_mean_coef1[t][:, None], sched.posterior_mean_coef2[t][:, None]
    logvar = sched.posterior_log_variance_clipped[t][:, None].expand_as(x0)
    kl = gaussian_kl(c1 * x0 + c2 * x_t, logvar, c1 * x0_hat + c2 * x_t, logvar).sum(1)
    kl[0] = (((x0 - x0_hat) ** 2).sum(1) / (2 * tb[1]))[0]
    diffs = {"epsilon": eps - eps_hat, "sample": x0 - x0_hat,
             "v_prediction": (a * eps - s * x0) - (a * eps_hat - s * x0_hat)}
    for p, d in diffs.items():
        got = loss_weight(t, sched, "vlb", p, dtype=torch.float64) * (d ** 2).sum(1)
        torch.testing.assert_close(got, kl, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="simple, min_snr, vlb"):
        loss_weight(t, sched, "p2")


def test_loss_weight_dtype_device(sched):
    w = loss_weight(torch.tensor([3, 700]), sched, "min_snr", "v_prediction")
    assert w.dtype == torch.float32 and w.shape == (2,)


def test_guidance_rescale():
    g = torch.Generator().manual_seed(6)
    cond = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    cfg = 3.0 * torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) + 0.5
    phi = 0.7
    out = guidance_rescale(cfg, cond, phi)
    c, k = cfg.numpy().reshape(3, -1), cond.numpy().reshape(3, -1)
    # Lin et al. 2023, eq. 15-16, with the per-sample (unbiased) std over all non-batch dims
    ratio = k.std(axis=1, ddof=1, keepdims=True) / c.std(axis=1, ddof=1, keepdims=True)
    want = phi * c * ratio + (1 - phi) * c
    np.testing.assert_allclose(out.numpy().reshape(3, -1), want, rtol=1e-12, atol=1e-12)
    # phi = 1 gives exactly the conditional std per sample; phi = 0 changes nothing
    np.testing.assert_allclose(guidance_rescale(cfg, cond, 1.0).numpy().reshape(3, -1).std(axis=1, ddof=1),
                               k.std(axis=1, ddof=1), rtol=1e-12)
    torch.testing.assert_close(guidance_rescale(cfg, cond, 0.0), cfg, **F64)


def test_vlb_epsilon_zero_terminal_snr_is_refused():
    """With SNR = 0 at the last step, the epsilon VLB weight beta^2 / (2 sigma^2 alpha (1 - abar)) divides by
    alpha_T = 0: an infinite weight. Refused with a message naming the way out; v and x0 stay finite."""
    s = Schedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    t = torch.arange(s.num_timesteps)
    with pytest.raises(ValueError, match="v_prediction"):
        loss_weight(t, s, "vlb", "epsilon", dtype=torch.float64)
    for p in ("v_prediction", "sample"):
        assert torch.isfinite(loss_weight(t, s, "vlb", p, dtype=torch.float64)).all()
