"""Samplers against diffusers' schedulers on the exact denoiser of a 1-D Gaussian mixture.

The toy data: x0 ~ sum_k w_k N(m_k, s_k^2), each element independent. For x = x0 + sigma eps the posterior
mean E[x0 | x] has a closed form, so every sampler is driven by a deterministic, exact float64 denoiser.
Both sides see the same starting point, the same sigmas and the same noise draws; diffusers' toy model takes
the scheduler's own sigma for the step, so the rounding of its timesteps plays no part.
"""
import math

import pytest
import torch

from latentdiff.diffusion import ops
from latentdiff.diffusion import samplers
from latentdiff.io.config import DiffusionConfig
from latentdiff.diffusion.samplers import NoiseSampler, SAMPLER_NAMES, as_denoiser, get_sampler
from latentdiff.diffusion.schedule import Schedule, sampling_sigmas

diffusers = pytest.importorskip("diffusers")
# diffusers turns its float32 torch tables into numpy with np.array(tensor), which numpy 2 flags; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

W, M, S = (0.3, 0.5, 0.2), (-1.5, 0.3, 1.2), (0.25, 0.4, 0.15)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def toy_denoise(x, sigma, w=W, m=M, s=S):
    """E[x0 | x0 + sigma eps = x] for the mixture: responsibilities times per-component Gaussian posteriors."""
    sigma = float(sigma)
    logits, means = [], []
    for wk, mk, sk in zip(w, m, s):
        v = sk * sk + sigma * sigma
        logits.append(math.log(wk) - 0.5 * math.log(v) - (x - mk) ** 2 / (2 * v))
        means.append(mk + (sk * sk / v) * (x - mk))
    top = torch.maximum(torch.maximum(logits[0], logits[1]), logits[2])
    e = [torch.exp(lg - top) for lg in logits]
    return (e[0] * means[0] + e[1] * means[1] + e[2] * means[2]) / (e[0] + e[1] + e[2])


def toy_eps(x, sigma):
    sigma = float(sigma)
    return (x - toy_denoise(x, sigma)) / sigma


# Our side: an epsilon-predicting model, D = x - sigma * eps, so coefs = (1, -sigma).
EPS_MODEL = samplers.Denoiser(toy_eps, coefs=lambda s: (1.0, -s))


class Recorder:
    """Per-image noise streams that also keep every draw, to replay them to diffusers."""

    def __init__(self, batch, seed=0):
        self.inner = NoiseSampler.from_seed(seed, batch)
        self.draws = []

    def __call__(self, like):
        z = self.inner(like)
        self.draws.append(z.clone())
        return z


def run_ours(fn, x, sigmas, **kw):
    traj = []
    out = fn(EPS_MODEL, x, sigmas, callback=lambda d: traj.append(d["x"]), disable=True, **kw)
    return traj + [out]


def assert_traj_close(ours, theirs, rtol=1e-5):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = float((a - b).abs().max()) / float(b.abs().max())
        assert err <= rtol, f"step {i}: relative error {err:.2e} > {rtol}"


def float64_tables(sched, ours: Schedule):
    """diffusers builds its tables in float32; give it the same float64 betas and cumprod as ours."""
    sched.betas, sched.alphas = ours.betas.clone(), ours.alphas.clone()
    sched.alphas_cumprod = ours.alphas_cumprod.clone()


@pytest.fixture(scope="module")
def sd():
    return Schedule.from_config(DiffusionConfig())


def start(shape=(16, 32), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Trajectories against diffusers


def vp_loop(sched, x_vp, sigma_at, step_kw=lambda i: {}):
    """diffusers' DDPM/DDIM/DPM-Solver work on x_t = x / sqrt(1 + sigma^2); the toy is defined on x."""
    traj = [x_vp]
    for i, t in enumerate(sched.timesteps):
        sigma = sigma_at(i, t)
        eps = toy_eps(x_vp * math.sqrt(1 + sigma * sigma), sigma)
        x_vp = sched.step(eps, t, x_vp, **step_kw(i)).prev_sample
        traj.append(x_vp)
    return traj


def to_vp(traj, sigmas):
    return [x / math.sqrt(1 + float(s) ** 2) for x, s in zip(traj, sigmas)]


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_diffusers(sd, monkeypatch, variance):
    # DDPMScheduler, SD betas, no clipping, leading spacing with steps_offset=0 so the last timestep is t=0:
    # then diffusers, like Algorithm 2, adds no noise on the final step. Noise is replayed from our draws.
    n = 20
    sched = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type=f"fixed_{variance}",
                                    timestep_spacing="leading", steps_offset=0)
    float64_tables(sched, sd)
    sched.set_timesteps(n)
    t = sched.timesteps
    sigmas = torch.cat([sd.sigmas[t], torch.zeros(1, dtype=torch.float64)])
    x_vp = start()
    rec = Recorder(x_vp.shape[0])
    ours = to_vp(run_ours(samplers.sample_ddpm, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
                          noise=rec, variance=variance), sigmas)
    draws = iter(rec.draws)
    monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda shape, **kw: next(draws))
    theirs = vp_loop(sched, x_vp, lambda i, t: float(sd.sigmas[t]))
    assert len(rec.draws) == n - 1 and next(draws, None) is None  # every draw used, in the same order
    assert_traj_close(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers(sd, eta):
    # DDIMScheduler, SD's leading spacing with steps_offset=1, set_alpha_to_one=True so the last step lands on
    # abar = 1 (sigma = 0), no clipping. Noise goes in through step(variance_noise=...).
    n = 20
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                    timestep_spacing="leading")
    float64_tables(sched, sd)
    sched.set_timesteps(n)
    t = sched.timesteps
    sigmas = torch.cat([sd.sigmas[t], torch.zeros(1, dtype=torch.float64)])
    x_vp = start()
    rec = Recorder(x_vp.shape[0])
    ours = to_vp(run_ours(samplers.sample_ddim, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
                          noise=rec, eta=eta), sigmas)
    # our last step has sigma_up = 0 and draws nothing; diffusers multiplies a draw by 0 there
    zeros = torch.zeros_like(x_vp)
    kw = (lambda i: {"eta": eta, "variance_noise": rec.draws[i] if i < len(rec.draws) else zeros}) if eta else \
        (lambda i: {"eta": 0.0})
    theirs = vp_loop(sched, x_vp, lambda i, t: float(sd.sigmas[t]), kw)
    assert len(rec.draws) == (n - 1 if eta else 0)
    assert_traj_close(ours, theirs)


def k_loop(sched, x, step_kw=lambda: {}):
    """Euler-family schedulers step on x in sigma space; the toy gets sigmas[step_index] of this step."""
    traj = [x]
    for t in sched.timesteps:
        sched.scale_model_input(x, t)  # sets step_index; the toy takes x unscaled
        x = sched.step(toy_eps(x, sched.sigmas[sched.step_index]), t, x, **step_kw()).prev_sample
        traj.append(x)
    return traj


def test_euler_matches_diffusers(sd):
    # EulerDiscreteScheduler, trailing spacing, final sigma 0. Its step upcasts to float32 (not float64), so
    # agreement is at float32 level, inside the 1e-5 bound.
    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    sched.set_timesteps(15)
    sched.sigmas = sched.sigmas.double()
    x = start() * math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    assert_traj_close(run_ours(samplers.sample_euler, x, sched.sigmas.clone()), k_loop(sched, x))


def test_euler_ancestral_matches_diffusers(sd, monkeypatch):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")
    sched.set_timesteps(15)
    sched.sigmas = sched.sigmas.double()
    x = start() * math.sqrt(1 + float(sched.sigmas[0]) ** 2)
    rec = Recorder(x.shape[0])
    ours = run_ours(samplers.sample_euler_ancestral, x, sched.sigmas.clone(), noise=rec)
    draws = list(rec.draws)
    # diffusers draws on every step; on the last, sigma_up = 0, we draw nothing and it gets zeros
    monkeypatch.setattr(diffusers.schedulers.scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda shape, **kw: draws.pop(0) if draws else torch.zeros(shape, dtype=torch.float64))
    theirs = k_loop(sched, x)
    assert len(rec.draws) == 14 and not draws
    assert_traj_close(ours, theirs)


def test_heun_matches_diffusers(sd):
    # HeunDiscreteScheduler with Karras sigmas: its sigmas are [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0], one entry per
    # model call; the completed steps are every second output, and the last step to 0 is Euler on both sides.
    n = 10
    sched = diffusers.HeunDiscreteScheduler(**SD, use_karras_sigmas=True)
    sched.set_timesteps(n)
    sched.sigmas = sched.sigmas.double()
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1:-1:2], sched.sigmas[-1:]])
    assert len(sigmas) == n + 1
    x = start() * math.sqrt(1 + float(sigmas[0]) ** 2)
    theirs = k_loop(sched, x)
    theirs = [theirs[0]] + theirs[2::2] + [theirs[-1]]  # start, completed Heun steps, final Euler step
    assert_traj_close(run_ours(samplers.sample_heun, x, sigmas), theirs)


@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_2m_karras_matches_diffusers(sd, sde):
    # DPMSolverMultistepScheduler(solver_order=2, midpoint, Karras sigmas, final sigma 0, so the last step is
    # first order as in k-diffusion); algorithm_type dpmsolver++ for DPM++ 2M, sde-dpmsolver++ for 2M SDE (eta=1).
    n = 15
    sched = diffusers.DPMSolverMultistepScheduler(
        **SD, solver_order=2, use_karras_sigmas=True, final_sigmas_type="zero", solver_type="midpoint",
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
    sched.set_timesteps(n)
    sched.sigmas = sched.sigmas.double()
    sigmas = sched.sigmas.clone()
    x_vp = start()
    rec = Recorder(x_vp.shape[0])
    fn = samplers.sample_dpmpp_2m_sde if sde else samplers.sample_dpmpp_2m
    ours = to_vp(run_ours(fn, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
                          **({"noise": rec} if sde else {})), sigmas)
    zeros = torch.zeros_like(x_vp)
    kw = (lambda i: {"variance_noise": rec.draws[i] if i < len(rec.draws) else zeros}) if sde else (lambda i: {})
    theirs = vp_loop(sched, x_vp, lambda i, t: float(sigmas[i]), kw)
    assert len(rec.draws) == (n - 1 if sde else 0)
    assert_traj_close(ours, theirs)


# ----------------------------------------------------------------------------------------------
# Convergence, batch invariance, guidance, the one-op-per-update rule


def mixture_quantiles(u):
    """Inverse CDF of the mixture at probabilities u, by bisection in float64."""
    lo, hi = torch.full_like(u, -10.0), torch.full_like(u, 10.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        cdf = sum(w * 0.5 * (1 + torch.erf((mid - m) / (s * math.sqrt(2)))) for w, m, s in zip(W, M, S))
        below = cdf < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("name,kw", [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("euler_ancestral", {}),
                                     ("dpmpp_2m_sde", {}), ("ddpm", {"variance": "small"})])
def test_more_steps_converge_to_the_mixture(sd, name, kw):
    # Karras sigmas end at sigma_min = 0.029 and the last step returns D there, a slightly shrunk posterior mean,
    # so even 200 steps sit at W1 ~ 0.01-0.018 (an exact 20k-sample draw scores ~0.004). 5 steps score 0.1-0.37.
    N = 20_000
    q = mixture_quantiles((torch.arange(N, dtype=torch.float64) + 0.5) / N)

    def w1(steps):  # 1-D Wasserstein-1 between the samples and the mixture
        sig = sampling_sigmas(sd, steps, "karras")
        x = start((N,), seed=7) * math.sqrt(1 + float(sig[0]) ** 2)
        out = get_sampler(name).fn(EPS_MODEL, x, sig, noise=NoiseSampler.from_seed(3, 1) if False else None,
                                   disable=True, **kw)
        return float((out.sort().values - q).abs().mean())

    torch.manual_seed(0)
    coarse, fine = w1(5), w1(50)
    assert fine < 0.5 * coarse, (coarse, fine)
    assert fine < 0.05, fine


@pytest.mark.parametrize("name,kw", [("euler_ancestral", {}), ("ddpm", {"variance": "large"}), ("ddim", {"eta": 1.0}),
                                     ("dpmpp_2m_sde", {})])
def test_image_i_of_a_batch_equals_single_run_with_seed_plus_i(sd, name, kw):
    sig = sampling_sigmas(sd, 8, "karras")
    scale = math.sqrt(1 + float(sig[0]) ** 2)
    model = as_denoiser(toy_denoise)
    fn = get_sampler(name).fn

    def run(seeds):
        ns = NoiseSampler([torch.Generator().manual_seed(s) for s in seeds])
        x = ns(torch.empty(len(seeds), 1, 8, 8, dtype=torch.float32)) * scale  # initial latents from the same streams
        return fn(model, x, sig, noise=ns, disable=True, **kw)

    batch = run([100, 101, 102, 103])
    for i in range(4):
        single = run([100 + i])
        assert torch.equal(batch[i], single[0]), f"image {i} differs from its single run"
    assert not torch.equal(batch[0], batch[1])


def test_noise_sampler_needs_one_generator_per_image():
    with pytest.raises(ValueError, match="one generator per image"):
        NoiseSampler.from_seed(0, 2)(torch.empty(3, 4))


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_guidance_is_fused_into_the_step(sd, name):
    # A CFG model returns [uncond; cond] eps; the sampler must combine them with model.guidance.
    g = 3.0
    other = dict(w=(0.6, 0.2, 0.2), m=(0.5, -0.7, 2.0), s=(0.3, 0.2, 0.5))

    def halves(x, s):
        return torch.cat([toy_eps(x, s), (x - toy_denoise(x, s, **other)) / s])

    cfg = samplers.Denoiser(halves, coefs=lambda s: (1.0, -s), guidance=g)

    def guided(x, s):  # the same thing written out: D = x - sigma (u + g (k - u))
        u, k = halves(x, s).chunk(2)
        return x - s * (u + g * (k - u))

    sig = sampling_sigmas(sd, 6, "karras")
    x = start((4, 8)) * math.sqrt(1 + float(sig[0]) ** 2)
    fn = get_sampler(name).fn
    a = fn(cfg, x, sig, noise=NoiseSampler.from_seed(5, 4), disable=True)
    b = fn(as_denoiser(guided), x, sig, noise=NoiseSampler.from_seed(5, 4), disable=True)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_update_is_one_sampler_step_with_host_floats(sd, name, monkeypatch):
    calls = []
    real = ops.sampler_step

    def spy(x, out, **kw):
        for k in ("p", "q", "a", "b", "c", "d"):
            assert type(kw.get(k, 0.0)) is float, (k, type(kw.get(k)))
        calls.append(kw)
        return real(x, out, **kw)

    def no_sync(*a, **k):
        raise AssertionError("a sampler read a tensor value on the host")

    monkeypatch.setattr(ops, "sampler_step", spy)
    sig = sampling_sigmas(sd, 7, "karras")
    x = start((2, 8), seed=3).float() * 15
    model = as_denoiser(lambda x, s: toy_denoise(x, s))
    with monkeypatch.context() as m:
        for attr in ("item", "__float__", "__int__", "__bool__"):
            m.setattr(torch.Tensor, attr, no_sync)
        get_sampler(name).fn(model, x, sig, noise=NoiseSampler.from_seed(0, 2), disable=True)
    assert len(calls) == (2 * 7 - 1 if name == "heun" else 7)


@pytest.mark.parametrize("alias,base,kind", [
    ("Euler a", "euler_ancestral", "default"), ("euler_a", "euler_ancestral", "default"),
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"), ("DDIM", "ddim", "default"),
    ("Heun", "heun", "default"), ("DDPMScheduler", "ddpm", "default"),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", "default"),
    ("EulerDiscreteScheduler", "euler", "default"), ("HeunDiscreteScheduler", "heun", "default"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "default"), ("sample_dpmpp_2m", "dpmpp_2m", "default"),
    ("sample_dpmpp_2m_sde", "dpmpp_2m_sde", "default"), ("sample_euler_ancestral", "euler_ancestral", "default"),
    ("dpmpp_2m_karras", "dpmpp_2m", "karras"), ("  dpm++ 2m  KARRAS ", "dpmpp_2m", "karras")])
def test_get_sampler_aliases(sd, alias, base, kind):
    spec = get_sampler(alias)
    assert spec.name == base and spec.fn is samplers.SAMPLERS[base] and spec.sigma_kind == kind
    torch.testing.assert_close(spec.sigmas(sd, 9), sampling_sigmas(sd, 9, kind), rtol=0, atol=0)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_sampler("LMS Karras")
    msg = str(e.value)
    assert "'LMS Karras'" in msg and all(n in msg for n in SAMPLER_NAMES) and "DPM++ 2M Karras" in msg
    for n in SAMPLER_NAMES:
        assert get_sampler(n).fn.__name__ == f"sample_{n}"
