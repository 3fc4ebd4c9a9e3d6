"""The diffusion ops every call site goes through: forward q-sample and the generic sampler step.

Two backends compute the same functions:
- `torch`: the eager reference right here, plain PyTorch, always available;
- `fused`: single-pass C++/CUDA kernels from `latentdiff._C`, registered as `torch.ops.latentdiff.*`.
Choose with the `backend=` argument or `LATENTDIFF_BACKEND=fused|torch`; `fused` is the default when built.
The kernels take fp32/fp16/bf16 (float32 math inside); float64 inputs, or a device without kernels, take the
reference path. The fused ops have fake kernels (torch.compile, meta tensors) and q_sample / q_sample_target
have autograd; sampler_step is for inference only.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

PREDICTIONS = ("epsilon", "sample", "v_prediction")
BACKENDS = ("fused", "torch")

# ----------------------------------------------------------------------------------------------
# Eager references (float math in the input dtype, exactly as a user would write it)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def row_coefs(t, table, like):
    """table[t] as a (B, 1, ..., 1) tensor on like's device and in its dtype, ready to broadcast over a batch."""
    return table.to(like.device)[t].to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def q_sample_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with abar gathered per batch row by t."""
    return row_coefs(t, sqrt_ab, x0) * x0 + row_coefs(t, sqrt_1m_ab, x0) * noise


def q_sample_target_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction: str):
    """q_sample plus the training target for `prediction` (epsilon, sample or v_prediction)."""
    a, s = row_coefs(t, sqrt_ab, x0), row_coefs(t, sqrt_1m_ab, x0)
    x_t = a * x0 + s * noise
    if prediction == "epsilon":
        target = noise.clone()
    elif prediction == "sample":
        target = x0.clone()
    else:
        check_prediction(prediction)
        target = a * noise - s * x0  # v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)
    return x_t, target


def sampler_step_ref(x, out, d_prev, noise, x_in, p, q, guidance, a, b, c, d, clamp):
    """One reverse step as a single linear combination; returns (x_next, denoised).

    g = out                             if guidance is None
      = u + guidance * (k - u)          with (u, k) = out.chunk(2): classifier-free guidance
    D = p * x_in + q * g                the denoised estimate for the prediction type
    D = D.clamp(-clamp, clamp)          if clamp
    x_next = a * x + b * D + c * d_prev + d * noise
    """
    if guidance is not None:
        u, k = out.chunk(2)
        g = u + guidance * (k - u)
    else:
        g = out
    D = p * (x if x_in is None else x_in) + q * g
    if clamp is not None and clamp > 0:
        D = D.clamp(-clamp, clamp)
    x_next = a * x + b * D
    if c != 0 and d_prev is not None:
        x_next = x_next + c * d_prev
    if d != 0 and noise is not None:
        x_next = x_next + d * noise
    return x_next, D


# ----------------------------------------------------------------------------------------------
# Backend choice


def fused_available() -> bool:
    """True when the compiled extension latentdiff._C imported and registered its ops."""
    return _load_extension()


_EXT = {"tried": False, "ok": False}
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_DEVICES: set[str] = set()  # device types with compiled kernels ("cpu", and "cuda" in a CUDA build)


def _load_extension() -> bool:
    if not _EXT["tried"]:
        _EXT["tried"] = True
        try:
            from latentdiff import _C  # noqa: F401  (registers torch.ops.latentdiff.*)
            _EXT["ok"] = hasattr(torch.ops.latentdiff, "q_sample")
        except ImportError as e:
            _EXT["error"] = str(e)
            _EXT["ok"] = False
        if _EXT["ok"]:
            for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
                if torch._C._dispatch_has_kernel_for_dispatch_key("latentdiff::q_sample", key):
                    _KERNEL_DEVICES.add(device)
            _register_fake_and_autograd()
    return _EXT["ok"]


def _fused_for(x) -> bool:
    """The kernels take fp32/fp16/bf16 on a device they were built for; anything else (float64, MPS, a CPU-only
    build given CUDA tensors) runs the reference, which computes the same function."""
    return x.dtype in _FUSED_DTYPES and x.device.type in _KERNEL_DEVICES


_OVERRIDE: list[str] = []
_WARNED = {"missing": False}


def backend() -> str:
    """The backend in force: a `use_backend` context, else LATENTDIFF_BACKEND, else fused when built."""
    want = _OVERRIDE[-1] if _OVERRIDE else os.environ.get("LATENTDIFF_BACKEND", "").strip().lower() or None
    if want is not None and want not in BACKENDS:
        raise ValueError(f"unknown backend {want!r} (LATENTDIFF_BACKEND or --backend): choose fused or torch")
    if want == "torch":
        return "torch"
    if fused_available():
        return "fused"
    if not _WARNED["missing"]:
        _WARNED["missing"] = True
        why = _EXT.get("error", "extension not built")
        warnings.warn(f"latentdiff: fused kernels unavailable ({why}); using the PyTorch path", stacklevel=3)
    return "torch"


@contextlib.contextmanager
def use_backend(name: str | None):
    """Scope a backend choice: `with ops.use_backend("torch"): ...`. None leaves it as is."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose fused or torch")
    if name is None:
        yield
        return
    _OVERRIDE.append(name)
    try:
        yield
    finally:
        _OVERRIDE.pop()


def _resolve(backend_arg: str | None) -> str:
    if backend_arg is None:
        return backend()
    with use_backend(backend_arg):
        return backend()


# ----------------------------------------------------------------------------------------------
# Public ops


def q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, *, backend: str | None = None, out=None):
    """Forward process x_t for integer timesteps t (one per batch row); `out` reuses a buffer shaped like x0."""
    if _resolve(backend) == "fused" and _fused_for(x0):
        if out is not None:
            torch.ops.latentdiff.q_sample_into(x0, noise, t, sqrt_ab, sqrt_1m_ab, out)
            return out
        return torch.ops.latentdiff.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab)
    x_t = q_sample_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab)
    if out is None:
        return x_t
    if out.shape != x0.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but x0 has {tuple(x0.shape)}; they must match")
    return out.copy_(x_t)


def q_sample_target(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction: str, *, backend: str | None = None):
    """Forward process and training target in one pass; returns (x_t, target)."""
    check_prediction(prediction)
    if _resolve(backend) == "fused" and _fused_for(x0):
        return torch.ops.latentdiff.q_sample_target(x0, noise, t, sqrt_ab, sqrt_1m_ab, PREDICTIONS.index(prediction))
    return q_sample_target_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction)


def sampler_step(x, out, *, p: float, q: float, a: float, b: float, c: float = 0.0, d: float = 0.0,
                 d_prev=None, noise=None, x_in=None, guidance: float | None = None, clamp: float | None = None,
                 backend: str | None = None):
    """The generic reverse update (see sampler_step_ref); coefficients are host floats. Returns (x_next, D)."""
    if _resolve(backend) == "fused" and _fused_for(x):
        return torch.ops.latentdiff.sampler_step(
            x, out, d_prev, noise, x_in, float(p), float(q),
            float(guidance) if guidance is not None else 0.0, guidance is not None,
            float(a), float(b), float(c), float(d), float(clamp or 0.0))
    return sampler_step_ref(x, out, d_prev, noise, x_in, p, q, guidance, a, b, c, d, clamp)


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes for torch.compile and meta tensors) and autograd for the fused ops


def _table_grad(table, t, *pairs):
    """d loss / d table[j]: the sum over rows b with t_b = j of sign * sum(grad_b * x_b), for each (grad, x, sign)."""
    rows = sum((g.float() * x.float()).flatten(1).sum(1) * sign for g, x, sign in pairs)
    return torch.zeros_like(table).index_add_(0, t, rows.to(table.dtype))


def _register_fake_and_autograd():
    def check_q_sample_fake(x0, noise, t):
        torch._check(noise.shape == x0.shape, lambda: f"noise has shape {noise.shape} but x0 has {x0.shape}")
        torch._check(t.shape == (x0.shape[0],), lambda: f"t must have shape ({x0.shape[0]},), got {t.shape}")

    @torch.library.register_fake("latentdiff::q_sample")
    def _(x0, noise, t, sqrt_ab, sqrt_1m_ab):
        check_q_sample_fake(x0, noise, t)
        return x0.new_empty(x0.shape)

    @torch.library.register_fake("latentdiff::q_sample_into")
    def _(x0, noise, t, sqrt_ab, sqrt_1m_ab, out):
        check_q_sample_fake(x0, noise, t)

    @torch.library.register_fake("latentdiff::q_sample_target")
    def _(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction):
        check_q_sample_fake(x0, noise, t)
        return x0.new_empty(x0.shape), x0.new_empty(x0.shape)

    @torch.library.register_fake("latentdiff::sampler_step")
    def _(x, out, d_prev, noise, x_in, p, q, guidance, cfg, a, b, c, d, clamp):
        rows = 2 * x.shape[0] if cfg else x.shape[0]
        torch._check(out.shape == (rows, *x.shape[1:]), lambda: f"model output has shape {out.shape}, x {x.shape}")
        return x.new_empty(x.shape), x.new_empty(x.shape)

    # x_t is linear in x0, noise and the two table entries, so each gradient is one gather and multiply.
    def setup_q_sample(ctx, inputs, output):
        x0, noise, t, sqrt_ab, sqrt_1m_ab = inputs[:5]
        ctx.prediction = inputs[5] if len(inputs) > 5 else None
        tables = sqrt_ab.requires_grad or sqrt_1m_ab.requires_grad
        ctx.save_for_backward(t, sqrt_ab, sqrt_1m_ab, x0 if tables else None, noise if tables else None)

    def backward_q_sample(ctx, grad):
        t, sqrt_ab, sqrt_1m_ab, x0, noise = ctx.saved_tensors
        a, s = row_coefs(t, sqrt_ab, grad), row_coefs(t, sqrt_1m_ab, grad)
        need = ctx.needs_input_grad
        return (grad * a if need[0] else None, grad * s if need[1] else None, None,
                _table_grad(sqrt_ab, t, (grad, x0, 1)) if need[3] else None,
                _table_grad(sqrt_1m_ab, t, (grad, noise, 1)) if need[4] else None)

    def backward_q_sample_target(ctx, grad_xt, grad_target):
        t, sqrt_ab, sqrt_1m_ab, x0, noise = ctx.saved_tensors
        a, s = row_coefs(t, sqrt_ab, grad_xt), row_coefs(t, sqrt_1m_ab, grad_xt)
        need, pred = ctx.needs_input_grad, ctx.prediction
        gx0, gnoise = grad_xt * a, grad_xt * s
        if pred == 0:  # target = eps
            gnoise = gnoise + grad_target
        elif pred == 1:  # target = x0
            gx0 = gx0 + grad_target
        else:  # target = v = sqrt(abar) eps - sqrt(1 - abar) x0
            gx0, gnoise = gx0 - s * grad_target, gnoise + a * grad_target
        v = pred == 2
        g_ab = _table_grad(sqrt_ab, t, (grad_xt, x0, 1), *[(grad_target, noise, 1)] * v) if need[3] else None
        g_1m = _table_grad(sqrt_1m_ab, t, (grad_xt, noise, 1), *[(grad_target, x0, -1)] * v) if need[4] else None
        return gx0 if need[0] else None, gnoise if need[1] else None, None, g_ab, g_1m, None

    torch.library.register_autograd("latentdiff::q_sample", backward_q_sample, setup_context=setup_q_sample)
    torch.library.register_autograd("latentdiff::q_sample_target", backward_q_sample_target,
                                    setup_context=setup_q_sample)


# Load now, so torch.ops.latentdiff.* have their fake and autograd kernels however they are reached.
_load_extension()
