"""The diffusion ops every call site goes through: forward q-sample and the generic sampler step.

Two backends compute the same functions:
- `torch`: the eager reference right here, plain PyTorch, always available;
- `fused`: single-pass C++/CUDA kernels from `latentdiff._C`, registered as `torch.ops.latentdiff.*`.
Choose with the `backend=` argument or `LATENTDIFF_BACKEND=fused|torch`; `fused` is the default when built.
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


def q_sample_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with abar gathered per batch row by t."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = sqrt_ab.to(x0.device)[t].to(x0.dtype).view(shape)
    s = sqrt_1m_ab.to(x0.device)[t].to(x0.dtype).view(shape)
    return a * x0 + s * noise


def q_sample_target_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction: str):
    """q_sample plus the training target for `prediction` (epsilon, sample or v_prediction)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = sqrt_ab.to(x0.device)[t].to(x0.dtype).view(shape)
    s = sqrt_1m_ab.to(x0.device)[t].to(x0.dtype).view(shape)
    x_t = a * x0 + s * noise
    if prediction == "epsilon":
        target = noise.clone()
    elif prediction == "sample":
        target = x0.clone()
    elif prediction == "v_prediction":
        target = a * noise - s * x0  # v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022)
    else:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
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


def _load_extension() -> bool:
    if not _EXT["tried"]:
        _EXT["tried"] = True
        try:
            from . import _C  # noqa: F401  (registers torch.ops.latentdiff.*)
            _EXT["ok"] = hasattr(torch.ops.latentdiff, "q_sample")
        except ImportError as e:
            _EXT["error"] = str(e)
            _EXT["ok"] = False
    return _EXT["ok"]


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


def q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab, *, backend: str | None = None):
    """Forward process x_t for integer timesteps t (one per batch row)."""
    if _resolve(backend) == "fused":
        return torch.ops.latentdiff.q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab)
    return q_sample_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab)


def q_sample_target(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction: str, *, backend: str | None = None):
    """Forward process and training target in one pass; returns (x_t, target)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if _resolve(backend) == "fused":
        return torch.ops.latentdiff.q_sample_target(x0, noise, t, sqrt_ab, sqrt_1m_ab, PREDICTIONS.index(prediction))
    return q_sample_target_ref(x0, noise, t, sqrt_ab, sqrt_1m_ab, prediction)


def sampler_step(x, out, *, p: float, q: float, a: float, b: float, c: float = 0.0, d: float = 0.0,
                 d_prev=None, noise=None, x_in=None, guidance: float | None = None, clamp: float | None = None,
                 backend: str | None = None):
    """The generic reverse update (see sampler_step_ref); coefficients are host floats. Returns (x_next, D)."""
    if _resolve(backend) == "fused":
        return torch.ops.latentdiff.sampler_step(
            x, out, d_prev, noise, x_in, float(p), float(q),
            float(guidance) if guidance is not None else 0.0, guidance is not None,
            float(a), float(b), float(c), float(d), float(clamp or 0.0))
    return sampler_step_ref(x, out, d_prev, noise, x_in, p, q, guidance, a, b, c, d, clamp)
