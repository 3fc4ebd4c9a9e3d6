"""Schedules against diffusers (which builds betas in float32) and against float64 closed forms."""
import math

import pytest
import torch

from latentdiff.io.config import DiffusionConfig
from latentdiff.diffusion.schedule import (SCHEDULES, Schedule, beta_ppf, betas, exponential_sigmas, karras_sigmas,
                                          rescale_zero_terminal_snr, resolve_schedule, sampling_sigmas, timesteps)

diffusers = pytest.importorskip("diffusers")
# diffusers turns its float32 torch tables into numpy with np.array(tensor), which numpy 2 flags; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Our tables are float64; diffusers computes betas and cumprod in float32. A 1000-term float32 cumprod drifts by
# up to ~1000 ulp, so the float32 comparison allows 1e-4 relative; the float64 closed forms below allow 1e-12.
F32 = dict(rtol=1e-4, atol=1e-7)
F64 = dict(rtol=1e-12, atol=1e-15)
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear", "quadratic": "scaled_linear",
                  "cosine": "squaredcos_cap_v2"}


def sd_schedule(**kw):
    return Schedule.from_config(DiffusionConfig(**kw))


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "quadratic", "cosine"])
def test_tables_match_diffusers_ddpm(name, zero_snr):
    ours = sd_schedule(beta_schedule=name, zero_terminal_snr=zero_snr)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule=DIFFUSERS_NAME[name], rescale_betas_zero_snr=zero_snr)
    # zero-SNR betas are 1 - abar_t/abar_{t-1}: in float32 that cancellation costs a few ulp of 1 absolute
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-4, atol=5e-7 if zero_snr else 1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), **F32)
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 0


@pytest.mark.parametrize("zero_snr", [False, True])
def test_sigmas_match_diffusers_euler(zero_snr):
    ours = sd_schedule(zero_terminal_snr=zero_snr)
    ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           rescale_betas_zero_snr=zero_snr)
    # diffusers keeps its sigmas flipped (largest first); both put abar_T = 2^-24 where zero-SNR makes it 0
    torch.testing.assert_close(ours.sigmas.flip(0), ref.sigmas[:-1].double(), **F32)


def test_closed_forms_float64():
    n, b0, b1 = 1000, 0.00085, 0.012
    lin = [b0 + (b1 - b0) * i / (n - 1) for i in range(n)]
    sq = [(b0 ** 0.5 + (b1 ** 0.5 - b0 ** 0.5) * i / (n - 1)) ** 2 for i in range(n)]
    torch.testing.assert_close(betas("linear", n, b0, b1), torch.tensor(lin, dtype=torch.float64), **F64)
    torch.testing.assert_close(betas("scaled_linear", n, b0, b1), torch.tensor(sq, dtype=torch.float64), **F64)
    torch.testing.assert_close(betas("quadratic", n, b0, b1), torch.tensor(sq, dtype=torch.float64), **F64)

    # Nichol & Dhariwal eq. 17: abar_t = f(t)/f(0), exact wherever the 0.999 clip is inactive
    f = [math.cos(((i / n) + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    cos = Schedule(betas("cosine", n))
    unclipped = int((cos.betas < 0.999).sum())
    assert unclipped < n and bool((cos.betas <= 0.999).all())  # the clip is there and acts at the end
    abar = torch.tensor([f[i + 1] / f[0] for i in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(cos.alphas_cumprod[:unclipped], abar, **F64)

    # derived tables from scalar float64 loops
    s = Schedule(torch.tensor(sq, dtype=torch.float64))
    prod, ab = 1.0, []
    for beta in sq:
        prod *= 1 - beta
        ab.append(prod)
    ab_prev = [1.0] + ab[:-1]
    T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(s.alphas_cumprod, T(ab), **F64)
    torch.testing.assert_close(s.alphas_cumprod_prev, T(ab_prev), **F64)
    torch.testing.assert_close(s.sqrt_one_minus_alphas_cumprod, T([math.sqrt(1 - a) for a in ab]), **F64)
    var = [beta * (1 - ap) / (1 - a) for beta, a, ap in zip(sq, ab, ab_prev)]
    torch.testing.assert_close(s.posterior_variance, T(var), **F64)
    torch.testing.assert_close(s.posterior_log_variance_clipped, T([math.log(var[1])] + [math.log(v) for v in var[1:]]),
                               **F64)
    torch.testing.assert_close(s.posterior_mean_coef1, T([beta * math.sqrt(ap) / (1 - a)
                                                          for beta, a, ap in zip(sq, ab, ab_prev)]), **F64)
    torch.testing.assert_close(s.posterior_mean_coef2, T([(1 - ap) * math.sqrt(1 - beta) / (1 - a)
                                                          for beta, a, ap in zip(sq, ab, ab_prev)]), **F64)
    torch.testing.assert_close(s.log_snr, T([math.log(a / (1 - a)) for a in ab]), **F64)
    torch.testing.assert_close(s.sigmas, T([math.sqrt((1 - a) / a) for a in ab]), **F64)


def test_zero_terminal_snr_closed_form():
    b = betas("scaled_linear")
    ab = torch.cumprod(1 - b, 0).tolist()
    r0, rT = math.sqrt(ab[0]), math.sqrt(ab[-1])
    # Lin et al. 2023, Alg. 1: sqrt(abar) mapped affinely so that sqrt(abar_0) stays and sqrt(abar_T) -> 0
    want = [((math.sqrt(a) - rT) * r0 / (r0 - rT)) ** 2 for a in ab]
    s = Schedule(rescale_zero_terminal_snr(b))
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-18)
    assert s.alphas_cumprod[-1] == 0 and s.log_snr[-1] == -math.inf
    assert math.isclose(float(s.sigmas[-1]), math.sqrt((1 - 2 ** -24) / 2 ** -24), rel_tol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacing_matches_diffusers_euler(spacing, n):
    ours = sd_schedule()
    ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(n)
    torch.testing.assert_close(timesteps(ours, n, spacing, steps_offset=1), ref.timesteps.double(),
                               rtol=1e-6, atol=1e-4)
    sig = sampling_sigmas(ours, n, spacing=spacing, steps_offset=1)
    assert sig.dtype == torch.float64 and sig.shape == (n + 1,) and sig[-1] == 0
    torch.testing.assert_close(sig, ref.sigmas.double(), **F32)


def test_linspace_interpolates_sigma_linearly_like_diffusers():
    # With SD's 1000 steps neighbouring sigmas are too close to tell linear from log interpolation apart; a
    # 20-step schedule makes fractional timesteps matter.
    ours = Schedule(betas("linear", 20, 0.01, 0.3))
    ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=20, beta_start=0.01, beta_end=0.3,
                                           beta_schedule="linear", timestep_spacing="linspace")
    ref.set_timesteps(7)
    torch.testing.assert_close(sampling_sigmas(ours, 7, spacing="linspace"), ref.sigmas.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_integer_spacing_matches_diffusers_ddim(spacing):
    ours = sd_schedule()
    for n, offset in [(10, 1), (50, 0), (33, 1)]:
        ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        assert timesteps(ours, n, spacing, steps_offset=offset).long().tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("n", [5, 25])
def test_karras_and_exponential_match_diffusers(n):
    ours = sd_schedule()
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # Euler with linspace spacing spans the whole table, as k-diffusion's sigma_min/sigma_max do
    ref = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace", use_karras_sigmas=True, **kw)
    ref.set_timesteps(n)
    torch.testing.assert_close(sampling_sigmas(ours, n, "karras"), ref.sigmas.double(), **F32)
    ref = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, **kw)
    ref.set_timesteps(n)
    torch.testing.assert_close(sampling_sigmas(ours, n, "karras"), ref.sigmas.double(), **F32)
    ref = diffusers.EulerDiscreteScheduler(timestep_spacing="linspace", use_exponential_sigmas=True, **kw)
    ref.set_timesteps(n)
    torch.testing.assert_close(sampling_sigmas(ours, n, "exponential"), ref.sigmas.double(), **F32)


def test_karras_and_exponential_closed_form():
    k = karras_sigmas(12, 0.03, 15.0, rho=7.0)
    root = k ** (1 / 7)  # Karras eq. 5: evenly spaced in sigma^(1/rho)
    torch.testing.assert_close(root.diff(), torch.full((11,), (0.03 ** (1 / 7) - 15 ** (1 / 7)) / 11,
                                                       dtype=torch.float64), **F64)
    assert math.isclose(k[0], 15.0, rel_tol=1e-14) and math.isclose(k[-1], 0.03, rel_tol=1e-14)
    e = exponential_sigmas(12, 0.03, 15.0)
    torch.testing.assert_close(e.log().diff(), torch.full((11,), math.log(0.03 / 15) / 11, dtype=torch.float64),
                               **F64)


def test_sigma_t_interpolation():
    s = sd_schedule()
    for t in [0, 1, 10, 500, 999]:
        assert s.t_to_sigma(float(t)) == pytest.approx(float(s.sigmas[t]), rel=1e-14)
        assert s.sigma_to_t(float(s.sigmas[t])) == pytest.approx(t, abs=1e-9)
    # linear in log sigma: halfway between two timesteps is the geometric mean of their sigmas
    for t in [0, 3, 400, 998]:
        want = math.sqrt(float(s.sigmas[t]) * float(s.sigmas[t + 1]))
        assert s.t_to_sigma(t + 0.5) == pytest.approx(want, rel=1e-13)
        assert s.sigma_to_t(want) == pytest.approx(t + 0.5, abs=1e-9)
    tt = torch.tensor([0.25, 17.5, 998.9], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(tt)), tt, **F64)


def test_tables_cached_float32_per_device():
    s = sd_schedule()
    a, b = s.tables("cpu")
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert s.tables(torch.device("cpu"))[0] is a  # cached
    torch.testing.assert_close(a.double(), s.sqrt_alphas_cumprod, rtol=1e-7, atol=0)
    torch.testing.assert_close(b.double(), s.sqrt_one_minus_alphas_cumprod, rtol=1e-7, atol=0)


def test_bad_names_are_errors():
    with pytest.raises(ValueError, match="linear, scaled_linear, quadratic, cosine"):
        betas("sigmoidal")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        timesteps(sd_schedule(), 10, "uniform")
    with pytest.raises(ValueError, match="default, automatic, uniform, karras, exponential"):
        sampling_sigmas(sd_schedule(), 10, "cubic")
    with pytest.raises(ValueError, match="depends on the sampler"):
        sampling_sigmas(sd_schedule(), 10, "automatic")


# ----------------------------------------------------------------------------------------------
# A1111's and ComfyUI's schedules, against k-diffusion (which A1111 calls) and the formulas of their code,
# written out here in float64: A1111 modules/sd_schedulers.py, ComfyUI comfy/samplers.py.


def k_diffusion_parts():
    """k_diffusion.sampling and .external without the package's __init__ (training-only dependencies)."""
    from test_samplers import k_sampling
    ks = k_sampling()
    import k_diffusion.external as ke
    return ks, ke


STEPS = [1, 2, 7, 10, 11, 20, 33]


@pytest.fixture(scope="module")
def sd():
    return sd_schedule()


@pytest.fixture(scope="module")
def kd(sd):
    ks, ke = k_diffusion_parts()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    model = ke.DiscreteSchedule(sd.sigmas.clone(), quantize=False)  # A1111's CompVisDenoiser, in float64
    torch.set_default_dtype(old)
    return ks, model


def in_float64(fn, *args, **kw):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("n", STEPS)
def test_uniform_normal_sgm_uniform_match_k_diffusion(sd, kd, n):
    ks, model = kd
    smin, smax = float(sd.sigmas[0]), float(sd.sigmas[-1])
    # A1111 uniform: inner_model.get_sigmas(n); normal: t from sigma_to_t(sigma_max) to sigma_to_t(sigma_min),
    # n of them, + 0; sgm_uniform: the same with n + 1 and the last dropped. k-diffusion's t_to_sigma rounds t to
    # float32 (t.float()), so agreement is at that level; our float64 interpolation is test_sigma_t_interpolation's.
    f32 = dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sampling_sigmas(sd, n, "uniform"), in_float64(model.get_sigmas, n), **f32)
    start = model.sigma_to_t(torch.tensor(smax, dtype=torch.float64))
    end = model.sigma_to_t(torch.tensor(smin, dtype=torch.float64))
    normal = [float(model.t_to_sigma(t)) for t in torch.linspace(float(start), float(end), n, dtype=torch.float64)]
    grid = torch.linspace(float(start), float(end), n + 1, dtype=torch.float64)[:-1]
    sgm = [float(model.t_to_sigma(t)) for t in grid]
    torch.testing.assert_close(sampling_sigmas(sd, n, "normal"), torch.tensor(normal + [0.0], dtype=torch.float64),
                               **f32)
    torch.testing.assert_close(sampling_sigmas(sd, n, "sgm_uniform"), torch.tensor(sgm + [0.0], dtype=torch.float64),
                               **f32)


@pytest.mark.parametrize("n", STEPS)
def test_karras_exponential_polyexponential_match_k_diffusion(sd, kd, n):
    ks, _ = kd
    smin, smax = float(sd.sigmas[0]), float(sd.sigmas[-1])
    if n > 1:  # k-diffusion's ramps divide by n - 1
        for kind, fn in [("karras", ks.get_sigmas_karras), ("exponential", ks.get_sigmas_exponential),
                         ("polyexponential", ks.get_sigmas_polyexponential)]:
            torch.testing.assert_close(sampling_sigmas(sd, n, kind), in_float64(fn, n, smin, smax), **F64)


@pytest.mark.parametrize("n", STEPS)
def test_simple_ddim_uniform_beta_kl_optimal_linear_quadratic_formulas(sd, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    sig = sd.sigmas.tolist()  # ascending, index = timestep
    T, smin, smax = len(sig), sig[0], sig[-1]
    # simple: sigmas[-(1 + int(x * T / n))] for x < n, + 0 (A1111 and ComfyUI alike)
    simple = [sig[-(1 + int(x * (T / n)))] for x in range(n)] + [0.0]
    # ddim (A1111) = ddim_uniform (ComfyUI): every max(T // n, 1)-th sigma from t = 1, descending, + 0
    ddim = [sig[x] for x in range(1, T, max(T // n, 1))][::-1] + [0.0]
    # beta (A1111): Beta(0.6, 0.6) quantiles of 1 - linspace(0, 1, n), placed linearly from sigma_min to sigma_max
    beta = [smin + float(scipy_stats.beta.ppf(1 - (j / (n - 1) if n > 1 else 0.0), 0.6, 0.6)) * (smax - smin)
            for j in range(n)] + [0.0]
    # kl_optimal (A1111): tan of n + 1 points from atan(sigma_max) to atan(sigma_min), no trailing 0
    kl = [math.tan(k / n * math.atan(smin) + (1 - k / n) * math.atan(smax)) for k in range(n + 1)]
    # linear_quadratic (ComfyUI, from Mochi): threshold 0.025, linear over n // 2 steps, times sigma_max
    if n == 1:
        lq = [smax, 0.0]
    else:
        ls = n // 2
        d = ls - 0.025 * n
        qc, lc = d / (ls * (n - ls) ** 2), 0.025 / ls - 2 * d / (n - ls) ** 2
        ramp = [i * 0.025 / ls for i in range(ls)] + [qc * i * i + lc * i + qc * ls * ls for i in range(ls, n)] + [1.0]
        lq = [(1 - v) * smax for v in ramp]
    for kind, want in [("simple", simple), ("ddim_uniform", ddim), ("beta", beta), ("kl_optimal", kl),
                       ("linear_quadratic", lq)]:
        torch.testing.assert_close(sampling_sigmas(sd, n, kind), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12, msg=kind)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("sdxl", [False, True])
def test_align_your_steps_tables_and_interpolation(sd, n, sdxl):
    np = pytest.importorskip("numpy")
    table = ([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029] if sdxl else
             [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
    if n == len(table):
        want = table
    else:  # NVIDIA's loglinear_interp: np.interp of log sigma (reversed) on an even grid
        xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
        want = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].tolist()
    got = sampling_sigmas(sd, n, "align_your_steps", sdxl=sdxl)
    torch.testing.assert_close(got, torch.tensor(want + [0.0], dtype=torch.float64), rtol=1e-13, atol=0)


def test_beta_ppf_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (0.5, 0.7), (2.0, 5.0)]:
        for p in [0.0, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0]:
            assert beta_ppf(p, a, b) == pytest.approx(float(scipy_stats.beta.ppf(p, a, b)), abs=1e-13)


def test_schedule_names_and_labels():
    # A1111's labels and aliases and ComfyUI's names all resolve; the twelve of A1111 plus ComfyUI's
    # linear_quadratic are listed.
    assert set(SCHEDULES) == {"automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                              "kl_optimal", "align_your_steps", "simple", "normal", "ddim_uniform", "beta",
                              "linear_quadratic"}
    for name, label in SCHEDULES.items():
        assert resolve_schedule(name) == name == resolve_schedule(label) == resolve_schedule(label.upper())
    assert resolve_schedule("ddim") == "ddim_uniform" and resolve_schedule("SGMUniform") == "sgm_uniform"
    assert resolve_schedule("default") == "default"


@pytest.mark.parametrize("kind", [k for k in SCHEDULES if k != "automatic"])
def test_every_schedule_is_a_valid_run_on_zero_snr_too(kind):
    # Descending, starting at or below sigma_max, ending in 0 (kl_optimal: at sigma_min), for SD and a
    # zero-terminal-SNR schedule alike.
    for s in (sd_schedule(), sd_schedule(zero_terminal_snr=True)):
        for n in (1, 5, 30):
            sig = sampling_sigmas(s, n, kind)
            assert bool((sig[1:] < sig[:-1]).all()), (kind, n, sig)
            if kind != "align_your_steps":  # a fixed table, SD's 14.615 whatever the model
                assert float(sig[0]) <= float(s.sigmas[-1]) * (1 + 1e-12)
            assert float(sig[-1]) == (float(s.sigmas[0]) if kind == "kl_optimal" else 0.0)
