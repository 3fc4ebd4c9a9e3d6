"""The fused ops (torch.ops.latentdiff.*) against their eager references, computed in float64.

Every comparison draws fresh random inputs, runs the op in the storage dtype, and measures its error against the
reference evaluated in float64 on the same (rounded) inputs. For fp16/bf16 the fused op may be at most 2x as far
off as the eager op in that dtype, plus a tiny floor; in fp32 both sit at float32 rounding.
"""
import importlib.util
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from latentdiff.diffusion import ops

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason="latentdiff._C not built (tests/test_extension.py "
                                "fails in CI when LATENTDIFF_REQUIRE_EXT=1)")

HAS_CUDA = torch.cuda.is_available() and "cuda" in ops._KERNEL_DEVICES
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes (no multiple of any vector width), batch 1 and many, one aligned latent-like shape.
SHAPES = [(1, 3, 5, 7), (7, 4, 13, 11), (2, 4, 16, 16), (5, 33)]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA kernels")


def tables(device, n=1000):
    """sqrt(abar), sqrt(1 - abar) of the SD scaled-linear schedule, float32 as the kernels take them."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)


def randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def seed(*key):
    return zlib.crc32(repr(key).encode())


def f64(*tensors):
    return [None if x is None else x.double() for x in tensors]


def assert_as_accurate(fused, eager, exact, dtype):
    """Fused error vs float64 is at most 2x the eager op's own error, plus a tiny floor."""
    err_fused = (fused.double() - exact).abs().max().item()
    err_eager = (eager.double() - exact).abs().max().item()
    floor = 1e-2 * torch.finfo(dtype).eps * max(exact.abs().max().item(), 1.0)
    assert err_fused <= 2 * err_eager + floor, (err_fused, err_eager, dtype)
    # And both are at the dtype's rounding level, so the check above is not vacuous.
    assert err_fused <= 8 * torch.finfo(dtype).eps * max(exact.abs().max().item(), 1.0)


# ----------------------------------------------------------------------------------------------
# q_sample / q_sample_target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_matches_reference(device, dtype, shape):
    gen = torch.Generator().manual_seed(seed(shape, dtype))
    sqrt_ab, sqrt_1m_ab = tables(device)
    x0, noise = randn(shape, dtype, device, gen), randn(shape, dtype, device, gen)
    t = torch.randint(0, 1000, (shape[0],), generator=gen).to(device)
    fused = ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, backend="fused")
    eager = ops.q_sample_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab)
    exact = ops.q_sample_ref(*f64(x0, noise), t, sqrt_ab, sqrt_1m_ab)
    assert fused.dtype == dtype and fused.shape == x0.shape and fused.is_contiguous()
    assert_as_accurate(fused, eager, exact, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction", ops.PREDICTIONS)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (6, 4, 16, 16)])
def test_q_sample_target_matches_reference(device, dtype, prediction, shape):
    gen = torch.Generator().manual_seed(len(prediction) + shape[0])
    sqrt_ab, sqrt_1m_ab = tables(device)
    x0, noise = randn(shape, dtype, device, gen), randn(shape, dtype, device, gen)
    t = torch.randint(0, 1000, (shape[0],), generator=gen).to(device)
    fused = ops.q_sample_target(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction, backend="fused")
    eager = ops.q_sample_target_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction)
    exact = ops.q_sample_target_ref(*f64(x0, noise), t, sqrt_ab, sqrt_1m_ab, prediction)
    for f, e, x in zip(fused, eager, exact):
        assert f.dtype == dtype and f.shape == x0.shape
        assert_as_accurate(f, e, x, dtype)
    if prediction != "v_prediction":  # the target is a copy of an input: exact
        torch.testing.assert_close(fused[1], noise if prediction == "epsilon" else x0, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_q_sample_out_reuses_buffer(device):
    gen = torch.Generator().manual_seed(3)
    sqrt_ab, sqrt_1m_ab = tables(device)
    x0, noise = randn((3, 4, 9, 9), torch.float32, device, gen), randn((3, 4, 9, 9), torch.float32, device, gen)
    t = torch.tensor([0, 500, 999], device=device)
    buf = torch.full_like(x0, float("nan"))
    got = ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, out=buf, backend="fused")
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf, ops.q_sample_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab))
    with pytest.raises(RuntimeError, match="out has shape"):
        ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, out=buf[:2], backend="fused")
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, out=buf.transpose(2, 3), backend="fused")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_misaligned_inputs(device):
    """Views (transposed, offset by one element so 16-byte loads do not apply) give the same values."""
    gen = torch.Generator().manual_seed(4)
    sqrt_ab, sqrt_1m_ab = tables(device)
    base = randn((2 * 4 * 8 * 8 + 1,), torch.float16, device, gen)
    x0 = base[1:].view(2, 4, 8, 8)  # contiguous, storage offset 1: not 16-byte aligned
    noise = randn((2, 4, 8, 8), torch.float16, device, gen).transpose(2, 3)  # not contiguous
    t = torch.tensor([10, 900], device=device)
    got = ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, backend="fused")
    want = ops.q_sample(x0.clone(), noise.contiguous(), t, sqrt_ab, sqrt_1m_ab, backend="fused")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    out = torch.cat([x0, noise.contiguous()])
    got = ops.sampler_step(x0, out, p=1.0, q=-0.5, a=0.3, b=0.7, d=0.5, noise=noise, guidance=5.0, backend="fused")
    want = ops.sampler_step(x0.clone(), out, p=1.0, q=-0.5, a=0.3, b=0.7, d=0.5, noise=noise.contiguous(),
                            guidance=5.0, backend="fused")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_q_sample_errors_name_the_problem():
    sqrt_ab, sqrt_1m_ab = tables("cpu")
    x0 = torch.randn(2, 3, 4, 4)
    q = torch.ops.latentdiff.q_sample
    with pytest.raises(RuntimeError, match=r"t\[1\] = 1000 is out of range for a schedule of 1000 steps"):
        q(x0, x0, torch.tensor([0, 1000]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match=r"t\[0\] = -1 is out of range"):
        q(x0, x0, torch.tensor([-1, 0]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="t must be int64"):
        q(x0, x0, torch.tensor([0, 1], dtype=torch.int32), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="one timestep per batch row"):
        q(x0, x0, torch.tensor([0, 1, 2]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="noise has shape"):
        q(x0, x0[:, :2], torch.tensor([0, 1]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="noise is Half but x0 is Float"):
        q(x0, x0.half(), torch.tensor([0, 1]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="sqrt_ab must be a float32 table"):
        q(x0, x0, torch.tensor([0, 1]), sqrt_ab.double(), sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="x0 must be float32, float16 or bfloat16"):
        q(x0.double(), x0.double(), torch.tensor([0, 1]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="prediction must be 0"):
        torch.ops.latentdiff.q_sample_target(x0, x0, torch.tensor([0, 1]), sqrt_ab, sqrt_1m_ab, 3)
    with pytest.raises(ValueError, match="unknown prediction 'eps'"):
        ops.q_sample_target(x0, x0, torch.tensor([0, 1]), sqrt_ab, sqrt_1m_ab, "eps")


@gpu
def test_device_mismatch_is_reported():
    sqrt_ab, sqrt_1m_ab = tables("cuda")
    x0 = torch.randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="t is on cpu but x0 is on cuda"):
        torch.ops.latentdiff.q_sample(x0, x0, torch.tensor([0, 1]), sqrt_ab, sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="sqrt_ab is on cpu but x0 is on cuda"):
        torch.ops.latentdiff.q_sample(x0, x0, torch.tensor([0, 1], device="cuda"), sqrt_ab.cpu(), sqrt_1m_ab)
    with pytest.raises(RuntimeError, match="noise is on cpu but x is on cuda"):
        ops.sampler_step(x0, x0, p=0, q=1, a=0, b=1, d=1.0, noise=x0.cpu(), backend="fused")


def test_float64_takes_the_reference_path():
    sqrt_ab, sqrt_1m_ab = tables("cpu")
    x0, t = torch.randn(2, 5, dtype=torch.float64), torch.tensor([3, 4])
    with RecordOps() as rec:
        got = ops.q_sample(x0, x0, t, sqrt_ab, sqrt_1m_ab, backend="fused")
    assert not any(name.startswith("latentdiff.") for name in rec.names)
    torch.testing.assert_close(got, ops.q_sample_ref(x0, x0, t, sqrt_ab, sqrt_1m_ab), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# sampler_step

# (cfg, d_prev, noise, x_in, clamp) with coefficients like those of real steps, and some arbitrary ones.
STEP_CASES = {
    "euler": dict(p=1.0, q=-2.5, a=0.6, b=0.4, c=0.0, d=0.0),  # D = x - sigma eps; x + dt (x - D) / sigma
    "cfg_dpmpp_2m": dict(p=0.2, q=-0.9, a=0.6, b=0.55, c=-0.15, d=0.0, guidance=7.5, d_prev=True),
    "cfg_all_terms": dict(p=0.7, q=-1.3, a=0.8, b=0.3, c=0.2, d=0.45, guidance=4.0, d_prev=True, noise=True,
                          x_in=True, clamp=1.0),
    "sde_noise": dict(p=0.0, q=1.0, a=0.5, b=0.4, c=0.0, d=0.3, noise=True, d_prev=True),  # d_prev unused: c = 0
}


def step_inputs(case, shape, dtype, device, gen):
    opts = dict(STEP_CASES[case])
    x = randn(shape, dtype, device, gen, scale=3.0)
    rows = 2 * shape[0] if "guidance" in opts else shape[0]
    out = randn((rows, *shape[1:]), dtype, device, gen)
    extra = {k: randn(shape, dtype, device, gen) if opts.pop(k, False) else None for k in ("d_prev", "noise", "x_in")}
    return x, out, extra, opts


def call_ref(x, out, extra, opts):
    return ops.sampler_step_ref(x, out, extra["d_prev"], extra["noise"], extra["x_in"], opts["p"], opts["q"],
                                opts.get("guidance"), opts["a"], opts["b"], opts["c"], opts["d"], opts.get("clamp"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sampler_step_matches_reference(device, dtype, case, shape):
    gen = torch.Generator().manual_seed(seed(case, shape, dtype))
    x, out, extra, opts = step_inputs(case, shape, dtype, device, gen)
    fused = ops.sampler_step(x, out, **extra, **opts, backend="fused")
    eager = call_ref(x, out, extra, opts)
    exact = call_ref(x.double(), out.double(), dict(zip(extra, f64(*extra.values()))), opts)
    for f, e, xx in zip(fused, eager, exact):
        assert f.dtype == dtype and f.shape == x.shape
        assert_as_accurate(f, e, xx, dtype)
    if opts.get("clamp"):
        assert fused[1].abs().max() <= opts["clamp"]


def test_baseline_cpu_kernels_match_reference():
    """The CPU kernels exist twice (baseline x86-64 and AVX2 + FMA, picked at run time): this machine runs the
    AVX2 copy in the tests above, so check the baseline copy with the same tests in a process that forces it."""
    env = dict(os.environ, LATENTDIFF_CPU_ISA="base", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "matches_reference and cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:]


def test_sampler_step_skips_terms_with_zero_coefficient():
    """As the reference: d_prev is not read when c = 0, nor noise when d = 0 (NaNs there do not leak)."""
    x, out = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    nan = torch.full_like(x, float("nan"))
    got = ops.sampler_step(x, out, p=0.5, q=1.0, a=0.9, b=0.1, c=0.0, d=0.0, d_prev=nan, noise=nan, backend="fused")
    want = ops.sampler_step_ref(x, out, nan, nan, None, 0.5, 1.0, None, 0.9, 0.1, 0.0, 0.0, None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_sampler_step_errors_name_the_problem():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="with guidance the model output must stack"):
        ops.sampler_step(x, x, p=0, q=1, a=0, b=1, guidance=7.5, backend="fused")
    with pytest.raises(RuntimeError, match="pass guidance= if it stacks"):
        ops.sampler_step(x, torch.cat([x, x]), p=0, q=1, a=0, b=1, backend="fused")
    with pytest.raises(RuntimeError, match="d_prev has shape"):
        ops.sampler_step(x, x, p=0, q=1, a=0, b=1, c=0.5, d_prev=x[:1], backend="fused")
    with pytest.raises(RuntimeError, match="the model output is BFloat16 but x is Float"):
        ops.sampler_step(x, x.bfloat16(), p=0, q=1, a=0, b=1, backend="fused")


# ----------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, autograd, backend switch


def opcheck_cases(device):
    gen = torch.Generator().manual_seed(5)
    sqrt_ab, sqrt_1m_ab = tables(device)
    x0, noise = randn((3, 4, 5, 7), torch.float32, device, gen), randn((3, 4, 5, 7), torch.float32, device, gen)
    t = torch.tensor([1, 500, 999], device=device)
    g = lambda: x0.clone().requires_grad_()  # noqa: E731
    h = randn((2, 4, 8, 8), torch.float16, device, gen)
    lib = torch.ops.latentdiff
    return [
        (lib.q_sample.default, (g(), noise.clone().requires_grad_(), t, sqrt_ab, sqrt_1m_ab), {}),
        (lib.q_sample.default, (h, h, t[:2], sqrt_ab, sqrt_1m_ab), {}),
        (lib.q_sample_into.default, (x0, noise, t, sqrt_ab, sqrt_1m_ab, torch.empty_like(x0)), {}),
        (lib.q_sample_target.default, (g(), noise, t, sqrt_ab, sqrt_1m_ab, 2), {}),
        (lib.q_sample_target.default, (x0, noise.clone().requires_grad_(), t, sqrt_ab, sqrt_1m_ab, 0), {}),
        (lib.sampler_step.default, (x0, noise, None, None, None, 1.0, -0.3, 0.0, False, 1.0, 0.2, 0.0, 0.0, 0.0), {}),
        (lib.sampler_step.default, (x0, torch.cat([noise, x0]), noise, x0, noise, 0.5, -0.3, 7.5, True, 0.9, 0.2,
                                    0.1, 0.3, 1.0), {}),
        (lib.sampler_step.default, (h, torch.cat([h, h]), None, h, None, 0.0, 1.0, 3.0, True, 0.5, 0.5, 0.0, 0.2,
                                    0.0), {}),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in opcheck_cases(device):
        torch.library.opcheck(op, args, kwargs)


def test_torch_compile_fullgraph():
    """One compiled function through the public wrappers: no graph breaks, same values as eager."""
    sqrt_ab, sqrt_1m_ab = tables("cpu")

    def step(x0, noise, t, model_out):
        x_t = ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab)
        x_next, denoised = ops.sampler_step(x_t, model_out, p=1.0, q=-0.8, a=0.5, b=0.5, guidance=3.0, clamp=2.0)
        return x_next * 2, denoised

    gen = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    model_out, t = torch.randn(4, 4, 6, 6, generator=gen), torch.tensor([20, 700])
    with RecordOps() as rec:
        want = step(x0, noise, t, model_out)
    assert "latentdiff.sampler_step.default" in rec.names
    got = torch.compile(step, fullgraph=True, dynamic=False)(x0, noise, t, model_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.filterwarnings("ignore:Input #")  # gradcheck prefers float64; the kernels take float32 at most
@pytest.mark.parametrize("prediction", [None, *ops.PREDICTIONS])
def test_autograd_matches_reference(prediction):
    """Gradients through the fused op equal those of the eager reference (float64), for x0, noise and tables."""
    gen = torch.Generator().manual_seed(7)
    sqrt_ab, sqrt_1m_ab = tables("cpu")
    x0, noise = torch.randn(3, 2, 5, generator=gen), torch.randn(3, 2, 5, generator=gen)
    t = torch.tensor([4, 4, 999])  # a repeated timestep: its table gradient sums two rows
    weights = [torch.randn(3, 2, 5, generator=gen) for _ in range(2)]

    def grads(fn, dtype):
        leaves = [v.to(dtype).requires_grad_() for v in (x0, noise, sqrt_ab, sqrt_1m_ab)]
        x, e, a, s = leaves
        outs = fn(x, e, t, a, s) if prediction is None else fn(x, e, t, a, s, prediction)
        outs = (outs,) if prediction is None else outs
        loss = sum((o * w.to(dtype)).sum() for o, w in zip(outs, weights))
        return torch.autograd.grad(loss, leaves)

    got = grads(ops.q_sample if prediction is None else ops.q_sample_target, torch.float32)
    want = grads(ops.q_sample_ref if prediction is None else ops.q_sample_target_ref, torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    # gradcheck on the op itself: it is linear, so float32 finite differences are accurate at this tolerance.
    fn = (lambda x, e: torch.ops.latentdiff.q_sample(x, e, t, sqrt_ab, sqrt_1m_ab)) if prediction is None else \
        (lambda x, e: torch.ops.latentdiff.q_sample_target(x, e, t, sqrt_ab, sqrt_1m_ab,
                                                           ops.PREDICTIONS.index(prediction)))
    assert torch.autograd.gradcheck(fn, (x0.clone().requires_grad_(), noise.clone().requires_grad_()),
                                    eps=1e-2, atol=1e-3, rtol=1e-3)


class RecordOps(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_backend_switch_routes(monkeypatch):
    sqrt_ab, sqrt_1m_ab = tables("cpu")
    x0, t = torch.randn(2, 5), torch.tensor([1, 2])

    def called():
        with RecordOps() as rec:
            ops.q_sample(x0, x0, t, sqrt_ab, sqrt_1m_ab)
            ops.sampler_step(x0, x0, p=0.0, q=1.0, a=0.5, b=0.5)
        return {n for n in rec.names if n.startswith("latentdiff.")}

    fused = {"latentdiff.q_sample.default", "latentdiff.sampler_step.default"}
    monkeypatch.delenv("LATENTDIFF_BACKEND", raising=False)
    assert ops.backend() == "fused" and called() == fused
    monkeypatch.setenv("LATENTDIFF_BACKEND", "torch")
    assert ops.backend() == "torch" and called() == set()
    with ops.use_backend("fused"):
        assert called() == fused
    monkeypatch.setenv("LATENTDIFF_BACKEND", "fused")
    with ops.use_backend("torch"):
        assert called() == set()
    with RecordOps() as rec:
        ops.q_sample(x0, x0, t, sqrt_ab, sqrt_1m_ab, backend="torch")
    assert not any(n.startswith("latentdiff.") for n in rec.names)
    monkeypatch.setenv("LATENTDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.backend()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ops.use_backend("fast"):
            pass


# ----------------------------------------------------------------------------------------------
# Whole sampling loops


class ToyDenoiser:
    """An epsilon-prediction 'network' eps(x) = tanh(W x) per pixel, optionally with CFG halves (samplers API)."""

    def __init__(self, channels, guidance=None, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(2, channels, channels, generator=gen) / channels ** 0.5
        self.guidance = guidance

    def coefs(self, sigma):
        return 1.0, -float(sigma)  # D = x - sigma * eps (Karras et al. 2022, eq. 7 for VE form)

    def __call__(self, x, sigma):
        scaled = x / math.sqrt(1 + float(sigma) ** 2)
        halves = [torch.tanh(torch.einsum("oc,bchw->bohw", w.to(x), scaled)) for w in self.w]
        return torch.cat(halves) if self.guidance is not None else halves[1]


SAMPLERS = ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde"]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("guidance", [None, 6.0])
def test_full_sampling_loop_same_images_fused_and_torch(name, guidance):
    from latentdiff.diffusion import samplers

    model = ToyDenoiser(4, guidance)
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.03), 12, dtype=torch.float64)),
                        torch.zeros(1, dtype=torch.float64)])
    x_init = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(8)) * math.sqrt(1 + 14.6 ** 2)
    run = getattr(samplers, f"sample_{name}")
    images = {}
    for backend in ("fused", "torch"):
        noise = samplers.NoiseSampler([torch.Generator().manual_seed(100 + i) for i in range(2)])
        with RecordOps() as rec, ops.use_backend(backend):
            images[backend] = run(model, x_init.clone(), sigmas, noise=noise, disable=True)
        assert ("latentdiff.sampler_step.default" in rec.names) == (backend == "fused")
    assert torch.isfinite(images["torch"]).all()
    torch.testing.assert_close(images["fused"], images["torch"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# GPU only: CUDA graphs and no hidden synchronisation


def sampling_loop(x, out_fn, noises, steps=25):
    """A DPM++ 2M SDE-shaped loop: CFG, previous denoised, noise, clamp; host-side float coefficients only."""
    d_prev = torch.zeros_like(x)
    for i in range(steps):
        sigma = 10.0 * (1 - i / steps) + 0.1
        x, d_prev = ops.sampler_step(x, out_fn(x), p=1.0, q=-sigma, a=0.9, b=0.08, c=0.02 * (i > 0), d=0.05,
                                     d_prev=d_prev, noise=noises[i], guidance=5.0, clamp=4.0, backend="fused")
    return x


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_of_25_steps_matches_eager(dtype):
    gen = torch.Generator().manual_seed(9)
    x0 = randn((2, 4, 64, 64), dtype, "cuda", gen)
    noises = [randn((2, 4, 64, 64), dtype, "cuda", gen) for _ in range(25)]
    out_fn = lambda x: torch.cat([torch.tanh(x), torch.tanh(0.5 * x)])  # noqa: E731
    want = sampling_loop(x0.clone(), out_fn, noises)
    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture, as CUDA graphs require
        sampling_loop(static_x, out_fn, noises)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sampling_loop(static_x, out_fn, noises)
    static_x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, want, rtol=0, atol=0)


@gpu
def test_no_host_sync_inside_the_loop():
    gen = torch.Generator().manual_seed(10)
    x0 = randn((2, 4, 32, 32), torch.float16, "cuda", gen)
    noises = [randn((2, 4, 32, 32), torch.float16, "cuda", gen) for _ in range(25)]
    sqrt_ab, sqrt_1m_ab = tables("cuda")
    t = torch.tensor([3, 900], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sampling_loop(x0, lambda x: torch.cat([x, 0.5 * x]), noises)
        ops.q_sample_target(x, noises[0], t, sqrt_ab, sqrt_1m_ab, "v_prediction", backend="fused")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------
# The fused path against closed forms computed here, in numpy float64 (not through ops.*_ref): the comparisons
# above take float64 through the reference, so a mistake shared by a kernel and its reference would pass them.


def np64(x):
    return None if x is None else x.detach().double().cpu().numpy()


def closed_form_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, row by row, with the op's own (float32) table entries."""
    x0, eps, a, s = np64(x0), np64(noise), np64(sqrt_ab), np64(sqrt_1m_ab)
    out = np.empty_like(x0)
    for row, step in enumerate(t.tolist()):
        out[row] = a[step] * x0[row] + s[step] * eps[row]
    return torch.from_numpy(out)


def closed_form_step(x, out, p, q, a, b, c=0.0, d=0.0, d_prev=None, noise=None, x_in=None, guidance=None,
                     clamp=None):
    """The reverse update from its definition: g = (1 - w) u + w k under CFG, D = p x_in + q g clipped to
    [-clamp, clamp], x_next = a x + b D + c d_prev + d noise."""
    x, out = np64(x), np64(out)
    if guidance is not None:
        uncond, cond = out[:len(x)], out[len(x):]
        out = (1.0 - guidance) * uncond + guidance * cond
    denoised = p * (x if x_in is None else np64(x_in)) + q * out
    unclamped = denoised
    if clamp:
        denoised = np.clip(denoised, -clamp, clamp)
    x_next = a * x + b * denoised
    if c:
        x_next = x_next + c * np64(d_prev)
    if d:
        x_next = x_next + d * np64(noise)
    return torch.from_numpy(x_next), torch.from_numpy(denoised), torch.from_numpy(unclamped)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 4, 13, 11), (3, 33)])
def test_fused_q_sample_against_the_closed_form(device, dtype, shape):
    gen = torch.Generator().manual_seed(seed("closed q", shape, dtype))
    sqrt_ab, sqrt_1m_ab = tables(device)
    x0, noise = randn(shape, dtype, device, gen), randn(shape, dtype, device, gen)
    t = torch.tensor([0, 999, 500, 17][:shape[0]], device=device)  # both ends of the schedule
    with RecordOps() as rec:
        fused = ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, backend="fused")
    assert "latentdiff.q_sample.default" in rec.names  # the kernel ran, not the reference
    eager = ops.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, backend="torch")
    assert_as_accurate(fused.cpu(), eager.cpu(), closed_form_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab), dtype)


CLOSED_STEPS = {  # the clamp set where it cuts a good share of D, under CFG and with every term
    "cfg": dict(p=0.3, q=-0.8, a=0.7, b=0.45, guidance=7.5),
    "cfg_clamp_all_terms": dict(p=0.7, q=-1.3, a=0.8, b=0.3, c=0.2, d=0.45, guidance=4.0, clamp=1.0,
                                d_prev=True, noise=True, x_in=True),
    "clamp": dict(p=1.0, q=-0.6, a=0.5, b=0.5, clamp=1.5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CLOSED_STEPS)
def test_fused_sampler_step_against_the_closed_form(device, dtype, case):
    gen = torch.Generator().manual_seed(seed("closed step", case, dtype))
    opts = dict(CLOSED_STEPS[case])
    shape = (3, 4, 9, 7)
    x = randn(shape, dtype, device, gen, scale=3.0)
    out = randn((2 * shape[0] if "guidance" in opts else shape[0], *shape[1:]), dtype, device, gen)
    extra = {k: randn(shape, dtype, device, gen) if opts.pop(k, False) else None for k in ("d_prev", "noise", "x_in")}
    with RecordOps() as rec:
        fused = ops.sampler_step(x, out, **extra, **opts, backend="fused")
    assert "latentdiff.sampler_step.default" in rec.names
    eager = ops.sampler_step(x, out, **extra, **opts, backend="torch")
    x_next, denoised, unclamped = closed_form_step(x, out, **extra, **opts)
    for f, e, exact in zip(fused, eager, (x_next, denoised)):
        assert f.dtype == dtype and f.shape == x.shape
        assert_as_accurate(f.cpu(), e.cpu(), exact, dtype)
    if opts.get("clamp"):
        cut = unclamped.abs() > opts["clamp"] * 1.01
        assert 0.1 < cut.double().mean().item() < 0.9  # the clamp is exercised, not vacuous
        assert torch.equal(fused[1].cpu().double()[cut], denoised[cut])  # exactly +-clamp where it cuts
