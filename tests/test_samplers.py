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
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]

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

    def __call__(self, like, sigma=None, sigma_next=None):
        z = self.inner(like)
        self.draws.append(z.clone())
        return z


class SeededDraws:
    """One seeded standard normal draw for the whole batch per call, counted."""

    def __init__(self, seed):
        self.gen, self.draws = torch.Generator().manual_seed(seed), 0

    def __call__(self, like, sigma=None, sigma_next=None):
        self.draws += 1
        return torch.randn(like.shape, generator=self.gen, dtype=like.dtype)


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
        noise = SeededDraws(3)
        out = get_sampler(name).fn(EPS_MODEL, x, sig, noise=noise, disable=True, **kw)
        # The SDE samplers take every draw from the stream they are given, one per step but the last (to sigma 0);
        # the ODE samplers draw nothing.
        assert noise.draws == (steps - 1 if name in ("euler_ancestral", "dpmpp_2m_sde", "ddpm") else 0), noise.draws
        return float((out.sort().values - q).abs().mean())

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



# ----------------------------------------------------------------------------------------------
# Against k-diffusion's sampling.py (PyPI k-diffusion, the code A1111 and ComfyUI call or copy)


def k_sampling():
    """k_diffusion.sampling without the package's __init__, which imports training-only dependencies."""
    import importlib.util
    import sys
    import types
    if "k_diffusion.sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion") if "k_diffusion" not in sys.modules else None
        if spec is None and "k_diffusion" not in sys.modules:
            pytest.skip("k-diffusion is not installed (pip install k-diffusion --no-deps torchsde torchdiffeq scipy)")
        if "k_diffusion" not in sys.modules:
            pkg = types.ModuleType("k_diffusion")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__ = spec
            sys.modules["k_diffusion"] = pkg
        pytest.importorskip("torchsde")
        pytest.importorskip("torchdiffeq")
        pytest.importorskip("scipy")
    import k_diffusion.sampling as ks
    return ks


def keyed_noise(shape):
    """A noise function of the step alone, (sigma, sigma_next) -> z: both samplers see the same z for a step
    whatever order or count they draw in (8 significant digits absorb last-bit differences in the sigmas)."""
    def z(sigma, sigma_next):
        key = f"{float(sigma):.8e},{float(sigma_next):.8e}".encode()
        seed = int.from_bytes(__import__("hashlib").sha256(key).digest()[:7], "little")
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z


def k_model(x, sigma, **kw):
    return toy_denoise(x, float(sigma[0]))


K_CASES = [  # our name, k-diffusion function, its options, ours
    ("euler", "sample_euler", {}, {}), ("euler_ancestral", "sample_euler_ancestral", {}, {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.5}, {"eta": 0.5}), ("heun", "sample_heun", {}, {}),
    ("dpm_2", "sample_dpm_2", {}, {}), ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}, {}),
    ("lms", "sample_lms", {}, {}), ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}, {}),
    ("dpmpp_sde", "sample_dpmpp_sde", {}, {}), ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, {}), ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, {}),
    ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}, {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}, {"eta": 0.0}),
    ("dpm_fast", "sample_dpm_fast", {"eta": 0.0}, {"eta": 0.0}), ("dpm_fast", "sample_dpm_fast", {"eta": 1.0}, {}),
    ("dpm_adaptive", "sample_dpm_adaptive", {"eta": 0.0}, {"eta": 0.0}),
    ("dpm_adaptive", "sample_dpm_adaptive", {"eta": 1.0}, {}),
]


def k_run(ks, fname, x, sig, kkw, z):
    """k-diffusion's sampler in float64 (its DPM-Solver builds tensors in the default dtype); final x only."""
    import inspect
    fn = getattr(ks, fname)
    params = inspect.signature(fn).parameters
    kw = dict(kkw, disable=True, **({"noise_sampler": z} if z is not None and "noise_sampler" in params else {}))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if "sigma_min" in params:  # DPM fast / adaptive take the ends, as A1111 passes them
            extra = [len(sig) - 1] if "n" in params else []
            return fn(k_model, x.clone(), float(sig[sig > 0].min()), float(sig[0]), *extra, **kw)
        traj = []
        out = fn(k_model, x.clone(), sig.clone(), callback=lambda d: traj.append(d["x"]), **kw)
        return traj + [out]
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("kind,steps", [("karras", 12), ("default", 10), ("exponential", 7)])
@pytest.mark.parametrize("name,fname,kkw,okw", K_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in K_CASES])
def test_matches_k_diffusion(sd, name, fname, kkw, okw, kind, steps):
    # Same start, sigmas and noise (a keyed function of the step, or k-diffusion's Brownian tree below), float64.
    ks = k_sampling()
    sig = sampling_sigmas(sd, steps, kind)
    x = start((4, 24), seed=11) * math.sqrt(1 + float(sig[0]) ** 2)
    z = keyed_noise(x.shape)
    theirs = k_run(ks, fname, x, sig, kkw, z)
    ours = []
    out = get_sampler(name).fn(EPS_MODEL, x.clone(), sig.clone(), disable=True, noise=lambda like, a, b: z(a, b),
                               callback=lambda d: ours.append(d["x"]), **okw)
    ours.append(out)
    if isinstance(theirs, torch.Tensor):  # DPM fast / adaptive: k-diffusion reports its own internal steps
        ours, theirs = [out], [theirs]
    assert len(ours) == len(theirs)
    err = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    assert err <= 1e-5, f"max abs trajectory difference {err:.2e}"  # measured: <= 4e-13 (dpm_fast eta=1: 3e-9,
    # k-diffusion's last ancestral step adds noise of the rounding error between its t grid and t_end)


@pytest.mark.parametrize("name,fname,kkw", [("dpmpp_sde", "sample_dpmpp_sde", {}),
                                            ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}),
                                            ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {})])
def test_brownian_noise_matches_k_diffusion_tree(sd, name, fname, kkw):
    # k-diffusion's default for its SDE samplers (and A1111's brownian_noise option): a seeded Brownian tree per
    # image. Ours, BrownianNoise, seeded alike, gives the same draws and so the same trajectory.
    ks = k_sampling()
    from latentdiff.diffusion.samplers import BrownianNoise
    sig = sampling_sigmas(sd, 10, "karras")
    x = start((3, 16), seed=5) * math.sqrt(1 + float(sig[0]) ** 2)
    smin, smax = sig[sig > 0].min(), sig.max()
    tree = ks.BrownianTreeNoiseSampler(x, smin, smax, seed=[7, 8, 9])
    theirs = k_run(ks, fname, x, sig, dict(kkw, noise_sampler=tree), None)
    ours = []
    noise = BrownianNoise(x, float(smin), float(smax), [7, 8, 9])
    out = get_sampler(name).fn(EPS_MODEL, x.clone(), sig, noise=noise, disable=True,
                               callback=lambda d: ours.append(d["x"]))
    err = max(float((a - b).abs().max()) for a, b in zip(ours + [out], theirs))
    assert len(ours) + 1 == len(theirs) and err <= 1e-5, err  # measured <= 1e-14


# ----------------------------------------------------------------------------------------------
# Against diffusers where k-diffusion has none: UniPC, DEIS, PLMS (PNDM), LCM


def unipc_cases():
    for variant in ("bh1", "bh2"):
        for order in (1, 2, 3):
            for steps in (8, 20):
                yield variant, order, steps


@pytest.mark.parametrize("variant,order,steps", list(unipc_cases()))
def test_unipc_matches_diffusers(sd, variant, order, steps):
    # UniPCMultistepScheduler (predict_x0, lower_order_final). bh2 runs Karras sigmas to 0; bh1 ends at sigma_min,
    # because diffusers' bh1 computes -inf * 0 = nan on a step to sigma 0 (ours returns D there, the exact limit).
    final = "zero" if variant == "bh2" else "sigma_min"
    sched = diffusers.UniPCMultistepScheduler(**SD, solver_order=order, solver_type=variant, lower_order_final=True,
                                              use_karras_sigmas=variant == "bh2", final_sigmas_type=final)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    sigmas = sched.sigmas.clone()
    x_vp = start()
    ours = to_vp(run_ours(samplers.sample_unipc, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, order=order,
                          variant=variant), sigmas)
    theirs = vp_loop(sched, x_vp, lambda i, t: float(sigmas[i]))
    assert_traj_close(ours, theirs)  # measured: max abs difference 6e-15


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [8, 14, 20])
def test_deis_matches_diffusers(sd, order, steps):
    # DEISMultistepScheduler ('deis', 'logrho'), its own linspace spacing ending at sigma_min; under 15 steps
    # it lowers the order of the last two steps, as ours does.
    sched = diffusers.DEISMultistepScheduler(**SD, solver_order=order)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    sigmas = sched.sigmas.clone()
    x_vp = start()
    ours = to_vp(run_ours(samplers.sample_deis, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas,
                          max_order=order), sigmas)
    assert_traj_close(ours, vp_loop(sched, x_vp, lambda i, t: float(sigmas[i])))  # measured <= 4e-13


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
def test_plms_matches_diffusers_pndm(sd, steps):
    # PNDMScheduler(skip_prk_steps) is PLMS: its timesteps repeat the second one, for the pseudo improved Euler
    # step; its first call is that step's Euler predictor, which we do not report.
    sched = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1)
    float64_tables(sched, sd)
    sched.set_timesteps(steps)
    unique = list(dict.fromkeys(sched.timesteps.tolist()))
    sigmas = torch.cat([sd.sigmas[torch.tensor(unique)], torch.zeros(1, dtype=torch.float64)])
    x_vp = start()
    ours = to_vp(run_ours(samplers.sample_plms, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas), sigmas)
    theirs = vp_loop(sched, x_vp, lambda i, t: float(sd.sigmas[t]))
    assert_traj_close(ours, theirs if steps == 1 else [theirs[0]] + theirs[2:])  # measured <= 1e-14


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(sd, monkeypatch, steps):
    # LCMScheduler: D with the boundary scalings c_skip, c_out, then renoise to the next timestep; diffusers'
    # scalings come out in float32 (integer timesteps), so agreement is at float32 level (measured <= 7e-8).
    sched = diffusers.LCMScheduler(**SD)
    float64_tables(sched, sd)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    sigmas = torch.cat([sd.sigmas[sched.timesteps], torch.zeros(1, dtype=torch.float64)])
    x_vp = start()
    rec = Recorder(x_vp.shape[0])
    spec = get_sampler("LCM")
    ours = to_vp(run_ours(spec.fn, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, noise=rec,
                          **spec.options(sd)), sigmas)
    draws = iter(rec.draws)
    monkeypatch.setattr(diffusers.schedulers.scheduling_lcm, "randn_tensor", lambda shape, **kw: next(draws))
    theirs = vp_loop(sched, x_vp, lambda i, t: float(sd.sigmas[t]))
    assert len(rec.draws) == steps - 1
    assert_traj_close(ours, theirs)


# ----------------------------------------------------------------------------------------------
# The rest against their papers' update rules, written out plainly here in float64, on the exact denoiser of
# Gaussian data, D(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu), whose probability-flow ODE has the solution
# x(sigma) = mu + (x(sigma_0) - mu) sqrt((s^2 + sigma^2)/(s^2 + sigma_0^2)).

MU, SIG = 0.5, 0.7


def gauss_denoise(x, sigma):
    return MU + SIG ** 2 / (SIG ** 2 + float(sigma) ** 2) * (x - MU)


def gauss_solution(x, s0, s1):
    return MU + (x - MU) * math.sqrt((SIG ** 2 + s1 ** 2) / (SIG ** 2 + s0 ** 2))


GAUSS = samplers.Denoiser(lambda x, s: (x - gauss_denoise(x, s)) / s, coefs=lambda s: (1.0, -s))


def slope(x, s):
    return (x - gauss_denoise(x, s)) / s


def ref_ipndm(x, s, z, variable=False):
    """Zhang & Chen 2023, iPNDM: Adams-Bashforth on d in sigma, warming up from order 1; the step to 0 is D.
    variable=True: the variable-step weights of zju-pi/diff-sampler's ipndm_v (ComfyUI's)."""
    ds = []
    for i in range(len(s) - 1):
        d = slope(x, s[i])
        h = s[i + 1] - s[i]
        k = min(4, i + 1)
        if s[i + 1] == 0:
            x_new = gauss_denoise(x, s[i])
        elif not variable or k == 1:
            c = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}[k]
            x_new = x + h * sum(cj * dj for cj, dj in zip(c, [d] + ds)) / {1: 1, 2: 2, 3: 12, 4: 24}[k]
        else:
            hs = [h] + [s[i - j] - s[i - j - 1] for j in range(k - 1)]
            a = hs[0] / hs[1]
            w = [(2 + a) / 2, -a / 2]
            if k >= 3:
                t1 = (1 - hs[0] / (3 * (hs[0] + hs[1])) * (hs[0] * (hs[0] + hs[1])) / (hs[1] * (hs[1] + hs[2]))) / 2
                w = [w[0] + t1, w[1] - (1 + hs[1] / hs[2]) * t1, t1 * hs[1] / hs[2]]
                if k == 4:
                    g = (hs[0] + hs[1])
                    t2 = ((1 - hs[0] / (3 * g)) / 2 + (1 - hs[0] / (2 * g)) * hs[0] / (6 * (g + hs[2]))) \
                        * (hs[0] * g * (g + hs[2])) / (hs[1] * (hs[1] + hs[2]) * (hs[1] + hs[2] + hs[3]))
                    q = hs[1] * (hs[1] + hs[2]) / (hs[2] * (hs[2] + hs[3]))
                    w = [w[0] + t2, w[1] - (1 + hs[1] / hs[2] + q) * t2,
                         w[2] + (hs[1] / hs[2] + q * (1 + hs[2] / hs[3])) * t2, -t2 * q * hs[1] / hs[2]]
            x_new = x + h * sum(wj * dj for wj, dj in zip(w, [d] + ds))
        ds = ([d] + ds)[:3]
        x = x_new
    return x


def ref_heunpp2(x, s, z):
    """Heun++ as ComfyUI's heunpp2: Euler, Heun or a three-slope average weighted by sigma / (k sigma_0)."""
    for i in range(len(s) - 1):
        d = slope(x, s[i])
        dt = s[i + 1] - s[i]
        if s[i + 1] == s[-1]:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = slope(x2, s[i + 1])
        if s[i + 2] == s[-1]:
            w2 = s[i + 1] / (2 * s[0])
            x = x + ((1 - w2) * d + w2 * d2) * dt
        else:
            x3 = x2 + d2 * (s[i + 2] - s[i + 1])
            d3 = slope(x3, s[i + 2])
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def ref_res_multistep(x, s, z, eta=0.0):
    """RES 2-stage multistep (arXiv:2308.02157) with phi functions, as ComfyUI's res_multistep(_ancestral)."""
    old = old_down = None
    for i in range(len(s) - 1):
        den = gauss_denoise(x, s[i])
        up = min(s[i + 1], eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)) if eta else 0.0
        down = math.sqrt(s[i + 1] ** 2 - up ** 2)
        if down == 0 or old is None:
            x = x + (x - den) / s[i] * (down - s[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (s[i], old_down, down, s[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            x = math.exp(-h) * x + h * ((phi1 - phi2 / c2) * den + phi2 / c2 * old)
        if s[i + 1] > 0 and up:
            x = x + z(s[i], s[i + 1]) * up
        old, old_down = den, down
    return x


def ref_er_sde(x, s, z):
    """ER-SDE-Solver-3 (Cui et al. 2023, Alg. 1) with the reference code's VP noise scaler and 200-point sums."""
    ns = lambda v: v * (math.exp(v ** 0.3) + 10.0)  # noqa: E731
    old = old_dd = None
    for i in range(len(s) - 1):
        den = gauss_denoise(x, s[i])
        stage = min(3, i + 1)
        if s[i + 1] == 0:
            x = den
        else:
            ls, lt = s[i], s[i + 1]
            r = ns(lt) / ns(ls)
            x = r * x + (1 - r) * den
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200
                pos = [lt + k * step for k in range(200)]
                dd = (den - old) / (ls - s[i - 1])
                x = x + (dt + sum(1 / ns(p) for p in pos) * step * ns(lt)) * dd
                if stage >= 3:
                    du = (dd - old_dd) / ((ls - s[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + sum((p - ls) / ns(p) for p in pos) * step * ns(lt)) * du
                old_dd = dd
            x = x + z(s[i], s[i + 1]) * math.sqrt(max(lt ** 2 - ls ** 2 * r ** 2, 0.0))
        old = den
    return x


def ref_restart(x, s, z):
    """Restart sampling (Xu et al. 2023) with A1111's defaults: Karras main steps, one or two restarts of the
    interval [0.1, 2] (sigmas nearest to them) with restart_steps Karras steps, Heun everywhere."""
    n = len(s) - 1
    plan_s = list(s)
    restart = None
    if n >= 20:
        rs, rt = (n // 4, 2) if n >= 36 else (9, 1)
        m = n - rs * rt
        lo, hi = s[-2] ** (1 / 7), s[0] ** (1 / 7)
        plan_s = [(hi + k / (m - 1) * (lo - hi)) ** 7 for k in range(m)] + [0.0]
        restart = (rs + 1, rt)
    near = lambda v: min(range(len(plan_s)), key=lambda j: abs(plan_s[j] - v))  # noqa: E731
    steps = []
    for i in range(len(plan_s) - 1):
        steps.append((plan_s[i], plan_s[i + 1]))
        if restart and i + 1 == near(0.1) and near(2) < i + 1:
            k, a, b = restart[0], plan_s[i + 1], plan_s[near(2)]
            grid = [(b ** (1 / 7) + j / (k - 1) * (a ** (1 / 7) - b ** (1 / 7))) ** 7 for j in range(k)]
            steps += list(zip(grid[:-1], grid[1:])) * restart[1]
    last = None
    for old_s, new_s in steps:
        if last is not None and last < old_s:
            x = x + z(old_s, last) * math.sqrt(old_s ** 2 - last ** 2)
        d = slope(x, old_s)
        if new_s == 0:
            x = x + d * (new_s - old_s)
        else:
            x2 = x + d * (new_s - old_s)
            x = x + (d + slope(x2, new_s)) / 2 * (new_s - old_s)
        last = new_s
    return x


PAPER_CASES = [("ipndm", ref_ipndm, {}), ("ipndm_v", lambda x, s, z: ref_ipndm(x, s, z, variable=True), {}),
               ("heunpp2", ref_heunpp2, {}), ("res_multistep", ref_res_multistep, {}),
               ("res_multistep_ancestral", lambda x, s, z: ref_res_multistep(x, s, z, eta=1.0), {}),
               ("er_sde", ref_er_sde, {}), ("restart", ref_restart, {})]


@pytest.mark.parametrize("steps", [8, 24, 40])
@pytest.mark.parametrize("name,ref,kw", PAPER_CASES, ids=[c[0] for c in PAPER_CASES])
def test_matches_the_papers_update_written_out(sd, name, ref, kw, steps):
    sig = sampling_sigmas(sd, steps, "karras")
    x = start((4, 24), seed=3) * math.sqrt(1 + float(sig[0]) ** 2)
    z = keyed_noise(x.shape)
    ours = get_sampler(name).fn(GAUSS, x.clone(), sig, noise=lambda like, a, b: z(a, b), disable=True, **kw)
    theirs = ref(x.clone(), sig.tolist(), z)
    err = float((ours - theirs).abs().max())
    assert err <= 1e-10, err  # measured <= 3e-14


CONVERGENCE = [  # sampler, grid, least slope; fixed-weight Adams-Bashforth (ipndm, plms) needs even steps in sigma
    ("lms", "karras", 3.3), ("deis", "karras", 2.6), ("unipc", "karras", 2.0), ("dpm_2", "karras", 1.8),
    ("dpmpp_2m", "karras", 1.8), ("heun", "karras", 1.8), ("res_multistep", "karras", 1.8),
    ("ipndm", "even", 3.2), ("plms", "even", 3.2), ("ipndm", "karras", 1.8), ("plms", "karras", 1.8),
    ("heunpp2", "karras", 0.9), ("euler", "karras", 0.9), ("dpm_fast", "karras", 1.4)]


@pytest.mark.parametrize("name,grid,order", CONVERGENCE, ids=[f"{c[0]}-{c[1]}" for c in CONVERGENCE])
def test_deterministic_solvers_converge_on_the_gaussian_ode(name, grid, order):
    # The exact solution at sigma_min is known; over a grid ending there (no final jump to 0) the error falls like
    # steps^-order. Measured slopes (log2 of the error ratio from 40 to 80 steps): lms 3.7, deis 3.1, unipc 2.3,
    # dpm_2 / dpmpp_2m / heun / res_multistep 2.1, ipndm and plms 3.6 on even steps (2.1 on Karras steps), dpm_fast
    # (eta 0, its last step of order 1 or 2 dominates) 1.6, heunpp2 and euler 1.0 (Heun++'s sigma-weighted slopes
    # make it first order).
    smin, smax = 0.05, 14.0
    x = start((64,), seed=2) * smax

    def err(n):
        g = karras_grid(n, smin, smax) if grid == "karras" else [smax + (smin - smax) * k / (n - 1) for k in range(n)]
        kw = {"eta": 0.0} if name == "dpm_fast" else {}
        out = get_sampler(name).fn(GAUSS, x.clone(), torch.tensor(g, dtype=torch.float64), disable=True, **kw)
        return float((out - gauss_solution(x, smax, smin)).abs().max())

    e1, e2 = err(40), err(80)
    assert math.log2(e1 / e2) >= order - 0.001, (e1, e2, math.log2(e1 / e2))


def test_ipndm_v_weights_and_convergence():
    # ComfyUI's ipndm_v weights (zju-pi/diff-sampler), reproduced as they are: up to order 3 they sum to 1 and,
    # from order 2, integrate linear slopes exactly; at order 4 they sum to 1 + t2 q (h2/h3 - h1/h2), 1 only on
    # grids with a constant step ratio, so the method is not consistent on others. On Karras steps the error still
    # falls (measured 4e-3 at 20 steps, 4e-4 at 80) but without a clean order.
    from latentdiff.diffusion.samplers_multistep import _ipndm_v_weights
    s = karras_grid(12, 0.05, 14.0)
    i = 6
    for k in (1, 2, 3, 4):
        h = [s[i + 1] - s[i]] + [s[i - j] - s[i - j - 1] for j in range(k - 1)]
        w = _ipndm_v_weights(h, k)
        if k < 4:
            assert sum(w) == pytest.approx(1.0, abs=1e-12)
        else:
            hn, h1, h2, h3 = h
            q = h1 * (h1 + h2) / (h2 * (h2 + h3))
            t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
                * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
            assert sum(w) == pytest.approx(1 + t2 * q * (h2 / h3 - h1 / h2), abs=1e-12)
            geometric = [-0.3 * 0.8 ** j for j in range(4)]
            assert sum(_ipndm_v_weights(geometric, 4)) == pytest.approx(1.0, abs=1e-12)
        if 2 <= k < 4:
            got = h[0] * sum(wj * s[i - j] for j, wj in enumerate(w))
            assert got == pytest.approx((s[i + 1] ** 2 - s[i] ** 2) / 2, rel=1e-12)
    x = start((64,), seed=2) * 14.0

    def err(n):
        out = get_sampler("ipndm_v").fn(GAUSS, x.clone(), torch.tensor(karras_grid(n, 0.05, 14.0),
                                                                        dtype=torch.float64), disable=True)
        return float((out - gauss_solution(x, 14.0, 0.05)).abs().max())
    assert err(80) < err(20) / 5


def karras_grid(n, lo, hi, rho=7.0):
    return [(hi ** (1 / rho) + k / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for k in range(n)]


@pytest.mark.parametrize("name", ["er_sde", "res_multistep_ancestral", "euler_ancestral_cfg_pp", "dpmpp_sde",
                                  "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_3m_sde", "dpmpp_2m_sde", "restart",
                                  "dpm_fast", "ddpm"])
def test_stochastic_samplers_reach_the_data_distribution(sd, name):
    # Gaussian data N(mu, s^2), started from the exact marginal at sigma_max: after 40 Karras steps the samples'
    # mean and standard deviation are near mu and s (1e5 samples; measured |mean - mu| <= 0.003, std 0.64 (the
    # first-order ancestral samplers) to 0.71). A wrong noise or drift coefficient lands far outside. (LCM is
    # left out: with a posterior-mean denoiser instead of a consistency model its samples shrink by design.)
    sig = sampling_sigmas(sd, 40, "karras")
    x = MU + start((100_000,), seed=9) * math.sqrt(SIG ** 2 + float(sig[0]) ** 2)
    gen = torch.Generator().manual_seed(0)
    out = get_sampler(name).fn(GAUSS, x, sig, noise=lambda like, a, b: torch.randn(like.shape, generator=gen,
                                                                                     dtype=like.dtype), disable=True)
    assert abs(float(out.mean()) - MU) < 0.01 and abs(float(out.std()) - SIG) < 0.07, (float(out.mean()),
                                                                                        float(out.std()))


# ----------------------------------------------------------------------------------------------
# CFG++: steps along the unconditional prediction


OTHER = dict(w=(0.6, 0.2, 0.2), m=(0.5, -0.7, 2.0), s=(0.3, 0.2, 0.5))


def cfg_halves(x, s):
    return torch.cat([toy_eps(x, s), (x - toy_denoise(x, s, **OTHER)) / s])


@pytest.mark.parametrize("name,eta,scale", [("euler_cfg_pp", 0.0, 1.0), ("euler_ancestral_cfg_pp", 1.0, 1.0),
                                            ("ddim_cfg_pp", 0.0, 1 / 12.5)])
def test_cfg_pp_written_out(sd, name, eta, scale):
    # CFG++ (Chung et al. 2024): x' = D_cfg + sigma_down (x - D_u)/sigma + sigma_up z, with the CFG scale
    # (A1111's DDIM CFG++: divided by 12.5), in the VP form A1111 writes DDIM CFG++ in for the last one.
    g = 6.0
    model = samplers.Denoiser(cfg_halves, coefs=lambda s: (1.0, -s), guidance=g)
    sig = sampling_sigmas(sd, 9, "karras")
    x = start((4, 8)) * math.sqrt(1 + float(sig[0]) ** 2)
    z = keyed_noise((4, 8))
    ours = get_sampler(name).fn(model, x.clone(), sig, noise=lambda like, a, b: z(a, b), disable=True)
    s, y = sig.tolist(), x.clone()
    for i in range(len(s) - 1):
        e_u, e_c = cfg_halves(y, s[i]).chunk(2)
        e = e_u + g * scale * (e_c - e_u)
        if name == "ddim_cfg_pp":  # A1111: x_t = sqrt(a) x, pred_x0 = (x_t - sqrt(1-a) e)/sqrt(a), a = 1/(1+s^2)
            a, a_prev = 1 / (1 + s[i] ** 2), 1 / (1 + s[i + 1] ** 2)
            x_t = y * math.sqrt(a)
            pred = (x_t - math.sqrt(1 - a) * e) / math.sqrt(a)
            y = (math.sqrt(a_prev) * pred + math.sqrt(1 - a_prev) * e_u) / math.sqrt(a_prev)
            continue
        den, den_u = y - s[i] * e, y - s[i] * e_u
        if s[i + 1] == 0:
            y = den
            continue
        up = min(s[i + 1], eta * s[i + 1] * math.sqrt(s[i] ** 2 - s[i + 1] ** 2) / s[i])
        down = math.sqrt(s[i + 1] ** 2 - up ** 2)
        y = den + down * (y - den_u) / s[i] + (z(s[i], s[i + 1]) * up if up else 0)
    assert float((ours - y).abs().max()) <= 1e-10


def test_cfg_pp_without_a_cfg_batch_is_euler(sd):
    sig = sampling_sigmas(sd, 9, "karras")
    x = start((4, 8)) * math.sqrt(1 + float(sig[0]) ** 2)
    a = get_sampler("euler_cfg_pp").fn(EPS_MODEL, x, sig, disable=True)
    b = get_sampler("euler").fn(EPS_MODEL, x, sig, disable=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Fused, graph-safe loops; batches; names


def count_model_calls(model):
    calls = []

    def fn(x, s):
        calls.append(s)
        return model(x, s)
    return samplers.Denoiser(fn, coefs=model.coefs, guidance=model.guidance), calls


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_each_model_output_goes_through_the_fused_step_with_host_floats(sd, name, monkeypatch):
    # Every model call's output is consumed by ops.sampler_step with host-float coefficients, and no sampler but
    # DPM adaptive reads a device value on the host (its step control must), so the loop can be graph-captured.
    calls = []
    real = ops.sampler_step

    def spy(x, out, **kw):
        for k in ("p", "q", "a", "b", "c", "d"):
            assert type(kw.get(k, 0.0)) is float, (k, type(kw.get(k)))
        calls.append(out)
        return real(x, out, **kw)

    def no_sync(*a, **k):
        raise AssertionError("a sampler read a tensor value on the host")

    monkeypatch.setattr(ops, "sampler_step", spy)
    sig = sampling_sigmas(sd, 24, "karras")
    x = start((2, 8), seed=3).float() * 15
    model, evals = count_model_calls(samplers.Denoiser(lambda x, s: (x - toy_denoise(x, s)) / s, lambda s: (1.0, -s)))
    with monkeypatch.context() as m:
        if name != "dpm_adaptive":
            for attr in ("item", "__float__", "__int__", "__bool__"):
                m.setattr(torch.Tensor, attr, no_sync)
        get_sampler(name).fn(model, x, sig, noise=NoiseSampler.from_seed(0, 2), disable=True)
    assert len(evals) >= 1 and len(calls) >= len(evals)
    assert {id(o) for o in calls} >= set()  # every update above ran through the spy


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n != "dpm_adaptive"])
def test_fused_kernel_equals_the_pytorch_path(sd, name):
    # The same float32 run on the fused CPU kernel and on the eager reference (the CUDA kernel is checked the
    # same way by test_ops and the benchmarks on a GPU machine).
    if not ops.fused_available():
        pytest.skip("extension not built")
    # Two Gaussian-data denoisers as the CFG halves: linear, so float32 rounding does not grow along the run.
    sig = sampling_sigmas(sd, 10, "karras")
    x = start((2, 4, 8, 8), seed=4).float() * math.sqrt(1 + float(sig[0]) ** 2)
    cfg = samplers.Denoiser(lambda x, s: torch.cat([slope(x, s), (x - 0.2 - 0.25 / (0.25 + s * s) * (x - 0.2)) / s]),
                            coefs=lambda s: (1.0, -s), guidance=4.0)
    runs = []
    for backend in ("fused", "torch"):
        with ops.use_backend(backend):
            runs.append(get_sampler(name).fn(cfg, x.clone(), sig, noise=NoiseSampler.from_seed(1, 2), disable=True))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                  "dpmpp_3m_sde", "lcm", "er_sde", "res_multistep_ancestral", "restart", "dpm_fast"])
def test_new_noisy_samplers_are_batch_invariant(sd, name):
    sig = sampling_sigmas(sd, 24, "karras")
    model = as_denoiser(toy_denoise)

    def run(seeds):
        ns = NoiseSampler([torch.Generator().manual_seed(s) for s in seeds])
        x = ns(torch.empty(len(seeds), 1, 4, 4)) * math.sqrt(1 + float(sig[0]) ** 2)
        return get_sampler(name).fn(model, x, sig, noise=ns, disable=True)

    batch = run([5, 6, 7])
    for i in range(3):
        assert torch.equal(batch[i], run([5 + i])[0])


A1111_NAMES = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
               "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
               "PLMS", "UniPC", "LCM"]
COMFY_NAMES = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
               "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
               "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
               "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
               "res_multistep_ancestral", "er_sde", "ddim", "uni_pc", "uni_pc_bh2"]


def test_every_a1111_and_comfyui_name_resolves():
    titles = {get_sampler(n).name for n in A1111_NAMES}
    assert len(titles) == 20  # twenty distinct samplers
    for n in COMFY_NAMES:
        spec = get_sampler(n)
        assert spec.sigma_kind == "default", n
    ks = k_sampling()
    for fname in (f for f in dir(ks) if f.startswith("sample_")):
        assert get_sampler(fname).name == fname[len("sample_"):], fname
    for cls in samplers._DIFFUSERS:
        assert hasattr(diffusers, cls)
        get_sampler(cls)


@pytest.mark.parametrize("alias,base,kind", [
    ("Euler a", "euler_ancestral", "default"), ("euler_a", "euler_ancestral", "default"),
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"), ("DDIM", "ddim", "default"),
    ("Heun", "heun", "default"), ("DDPMScheduler", "ddpm", "default"),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", "default"),
    ("EulerDiscreteScheduler", "euler", "default"), ("HeunDiscreteScheduler", "heun", "default"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "default"), ("sample_dpmpp_2m", "dpmpp_2m", "default"),
    ("sample_dpmpp_2m_sde", "dpmpp_2m_sde", "default"), ("sample_euler_ancestral", "euler_ancestral", "default"),
    ("dpmpp_2m_karras", "dpmpp_2m", "karras"), ("  dpm++ 2m  KARRAS ", "dpmpp_2m", "karras"),
    ("DPM++ 2M SDE Heun Exponential", "dpmpp_2m_sde_heun", "exponential"), ("LMS Karras", "lms", "karras"),
    ("DPM2 a Karras", "dpm_2_ancestral", "karras"), ("Euler SGM Uniform", "euler", "sgm_uniform"),
    ("Euler Uniform", "euler", "uniform"), ("UniPC Align Your Steps", "unipc", "align_your_steps"),
    ("DPM++ 2M KL Optimal", "dpmpp_2m", "kl_optimal"), ("Euler a Beta", "euler_ancestral", "beta"),
    ("Heun++ Simple", "heunpp2", "simple"), ("LCM Normal", "lcm", "normal"), ("DDIM DDIM", "ddim", "ddim_uniform"),
    ("euler_linear_quadratic", "euler", "linear_quadratic"), ("Euler Polyexponential", "euler", "polyexponential"),
    ("k_dpmpp_2m_sde_ka", "dpmpp_2m_sde", "karras"), ("k_dpmpp_2m_sde_heun_exp", "dpmpp_2m_sde_heun", "exponential"),
    ("k_lms", "lms", "default"), ("k_dpm_ad", "dpm_adaptive", "default"), ("PNDMScheduler", "plms", "default"),
    ("UniPCMultistepScheduler", "unipc", "default"), ("LCMScheduler", "lcm", "default"),
    ("Euler Automatic", "euler", "automatic")])
def test_get_sampler_aliases(sd, alias, base, kind):
    spec = get_sampler(alias)
    assert spec.name == base and spec.fn is samplers.SAMPLERS[base] and spec.sigma_kind == kind


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_sampler("Euler Sideways")
    msg = str(e.value)
    assert "'Euler Sideways'" in msg and all(n in msg for n in SAMPLER_NAMES) and "DPM++ 2M" in msg
    for n in SAMPLER_NAMES:
        assert get_sampler(n).fn is samplers.SAMPLERS[n]


@pytest.mark.parametrize("name,kind", [("DPM++ 2M", "karras"), ("DPM++ SDE", "karras"), ("DPM++ 2M SDE", "exponential"),
                                       ("DPM++ 2M SDE Heun", "exponential"), ("DPM++ 2S a", "karras"),
                                       ("DPM++ 3M SDE", "exponential"), ("Euler a", "uniform"), ("Euler", "uniform"),
                                       ("LMS", "uniform"), ("Heun", "uniform"), ("DPM2", "karras"),
                                       ("DPM2 a", "karras"), ("Restart", "karras"), ("euler_cfg_pp", "uniform")])
def test_automatic_is_a1111s_schedule_for_the_sampler(sd, name, kind):
    # A1111's sd_samplers_kdiffusion options; DPM2, DPM2 a and DPM++ 3M SDE take one more step and drop the
    # next-to-last sigma.
    spec = get_sampler(name)
    got = spec.sigmas(sd, 10, "automatic")
    want = sampling_sigmas(sd, 11 if spec.name in ("dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde") else 10, kind)
    if spec.name in ("dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"):
        want = torch.cat([want[:-2], want[-1:]])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert get_sampler(f"{name} Karras").sigmas(sd, 10).shape == want.shape


def test_automatic_for_a1111s_own_discretizations(sd):
    # DDIM / PLMS / DDIM CFG++: timesteps range(0, 1000, 1000 // n) + 1 walked from the top to t = 1 (A1111's
    # timestep samplers run len - 1 steps and stop there); UniPC: n + 1 times evenly spaced in [1/N, 1], log alpha
    # interpolated (its NoiseScheduleVP); LCM: its 50-step grid 19, 39, ..., 999.
    ab = sd.alphas_cumprod
    for n in (10, 7):
        ts = [min(t + 1, 999) for t in range(0, 1000, 1000 // n)][::-1]
        want = torch.tensor([math.sqrt((1 - float(ab[t])) / float(ab[t])) for t in ts], dtype=torch.float64)
        for name in ("DDIM", "PLMS", "DDIM CFG++"):
            torch.testing.assert_close(get_sampler(name).sigmas(sd, n, "automatic"), want, rtol=1e-12, atol=0)
        got = get_sampler("UniPC").sigmas(sd, n, "automatic")
        for k, tau in enumerate(torch.linspace(999, 0, n + 1, dtype=torch.float64).tolist()):
            lo, w = int(math.floor(tau)), tau - math.floor(tau)
            la = (1 - w) * 0.5 * math.log(float(ab[lo])) + w * 0.5 * math.log(float(ab[min(lo + 1, 999)]))
            assert got[k] == pytest.approx(math.sqrt(math.exp(-2 * la) - 1), rel=1e-12)
    # one step: A1111 runs none and returns the noise; ours steps once from t = 1 to 0
    assert get_sampler("DDIM").sigmas(sd, 1, "automatic").tolist() == [float(sd.sigmas[1]), 0.0]
    grid = [math.log(math.sqrt((1 - float(ab[19 + 20 * k])) / float(ab[19 + 20 * k]))) for k in range(50)]
    got = get_sampler("LCM").sigmas(sd, 4, "automatic")
    for k, t in enumerate([999, 999 - 980 / 3, 999 - 2 * 980 / 3, 19]):
        u = (t - 19) / 20
        lo = min(int(math.floor(u)), 48)
        assert got[k] == pytest.approx(math.exp(grid[lo] + (u - lo) * (grid[lo + 1] - grid[lo])), rel=1e-12)
    assert got[-1] == 0


def test_restart_plan_follows_a1111(sd):
    # Under 20 steps no restart; from 20, 9 restart steps once; from 36, steps // 4 restart steps twice.
    from latentdiff.diffusion.samplers import restart_plan
    for n, evals in [(10, 10), (20, 11 + 9), (40, 40 - 20 + 2 * 10)]:
        plan = restart_plan(sampling_sigmas(sd, n, "karras").tolist())
        assert len(plan) == evals, (n, len(plan))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in ops._KERNEL_DEVICES,
                    reason="needs a CUDA GPU and the CUDA kernels")
@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if n != "dpm_adaptive"])
def test_every_sampler_loop_runs_without_a_host_sync_on_cuda(sd, name):
    # torch.cuda.set_sync_debug_mode("error") raises on any host-device sync, so the loop can be captured whole
    # in a CUDA graph (DPM adaptive is left out: it reads its error norm on the host by design).
    sig = sampling_sigmas(sd, 12, "karras")
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    x = x * math.sqrt(1 + float(sig[0]) ** 2)
    model = samplers.Denoiser(lambda x, s: torch.cat([x * (s / (0.25 + s * s)), x * (s / (0.36 + s * s))]),
                              coefs=lambda s: (1.0, -s), guidance=5.0)
    noise = NoiseSampler([torch.Generator("cuda").manual_seed(k) for k in range(2)])
    fn = get_sampler(name).fn
    with torch.no_grad():
        fn(model, x, sig, noise=noise, disable=True)  # warm-up: lazy initialization may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fn(model, x, sig, noise=noise, disable=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert bool(torch.isfinite(out).all())


def test_the_servers_name_lists_are_the_samplers_and_schedules():
    # serve/a1111.py repeats the names so that importing the server does not import torch: they must agree.
    from latentdiff.diffusion.schedule import SCHEDULES
    from latentdiff.serve import a1111
    assert a1111.SAMPLER_TITLES == samplers.A1111_TITLES
    assert {k: v[0] for k, v in a1111.SCHEDULERS.items() if k != "default"} == SCHEDULES
    for name, alias in a1111.K_NAMES.items():
        assert get_sampler(alias).name == name


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
@pytest.mark.parametrize("kind", [None, "uniform", "karras", "exponential", "sgm_uniform", "simple", "normal",
                                  "ddim_uniform", "beta", "kl_optimal", "linear_quadratic", "align_your_steps"])
def test_dpm_fast_and_adaptive_run_down_to_the_models_smallest_sigma(sd, name, kind):
    # They stop at their list's last positive sigma with no step to 0, so the list ends there at the model's
    # smallest sigma, whatever the schedule (A1111's txt2img). With a denoiser that says D = 0 the probability-flow
    # ODE is dx/dsigma = x / sigma: x(sigma_min) = x * sigma_min / sigma_0 exactly, and DPM-Solver is exact on it.
    # (KL-optimal ends at the smallest sigma with no 0 after it; Align Your Steps' table ends at 0.029, a little
    # below SD 1.5's 0.02917: both are kept.)
    spec = get_sampler(name)
    s = spec.sigmas(sd, 10, kind)
    last = float(s[s > 0][-1])
    assert last == pytest.approx(float(sd.sigmas.min()), rel=0.01)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(s[0])
    out = spec.fn(as_denoiser(lambda x, sigma: torch.zeros_like(x)), x.clone(), s, disable=True, eta=0.0)
    assert torch.allclose(out, x * last / float(s[0]), rtol=1e-9, atol=0)
