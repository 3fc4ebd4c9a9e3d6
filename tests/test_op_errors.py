"""Every error path of every fused op, on every device the kernels are built for: a user's mistake raises a
RuntimeError that names the problem, and never brings the process down.

The table runs in a child process (this file run as a script), so a crash in the extension (a segfault, an abort
from an exception that cannot unwind) fails the test with the signal named instead of killing pytest. Exact
overlaps (`out=x0`, `out=noise`) are allowed and must compute the reference values.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdiff.diffusion import ops

HERE = Path(__file__).resolve()
OVERLAP = "some elements of the input tensor and the written-to tensor refer to a single memory location"


def cases(dev: str):
    """(name, call, expected message fragment): valid inputs with one of them spoiled. The Python wrappers send
    what the kernels do not take (integer dtypes) to the PyTorch path, so those cases call the op itself."""
    cpu = torch.device("cpu")
    other = cpu if dev != "cpu" else None  # a second device to mix in (only when testing CUDA)

    def q(x0, noise, t, a, s, **kw):
        return lambda: ops.q_sample(x0, noise, t, a, s, backend="fused", **kw)

    def qt(x0, noise, t, a, s, prediction="epsilon"):
        return lambda: torch.ops.latentdiff.q_sample_target(x0, noise, t, a, s,
                                                           {"epsilon": 0, "bad": 5}[prediction])

    def step(x, out, **kw):
        return lambda: ops.sampler_step(x, out, p=1.0, q=-0.5, a=0.3, b=0.7, backend="fused", **kw)

    x0 = torch.randn(2, 4, 8, 8, device=dev)
    noise, t = torch.randn_like(x0), torch.tensor([3, 900], device=dev)
    a, s = torch.rand(1000, device=dev), torch.rand(1000, device=dev)
    base = torch.randn(x0.numel() + 1, device=dev)
    table = [
        ("q_sample: noise shape", q(x0, noise[:1], t, a, s), "noise has shape"),
        ("q_sample: noise dtype", q(x0, noise.half(), t, a, s), "noise is Half but x0 is Float"),
        ("q_sample: integer x0", lambda: torch.ops.latentdiff.q_sample(x0.long(), noise.long(), t, a, s),
         "x0 must be float32, float16 or bfloat16"),
        ("q_sample: 0-d x0", q(x0[0, 0, 0, 0], noise[0, 0, 0, 0], t[:0], a, s), "batch dimension"),
        ("q_sample: int32 t", q(x0, noise, t.int(), a, s), "t must be int64"),
        ("q_sample: t length", q(x0, noise, t[:1], a, s), "one timestep per batch row"),
        ("q_sample: float64 table", q(x0, noise, t, a.double(), s), "sqrt_ab must be a float32 table"),
        ("q_sample: 2-D table", q(x0, noise, t, a, s[None]), "sqrt_1m_ab must be 1-D"),
        ("q_sample: table lengths", q(x0, noise, t, a, s[:10]), "sqrt_ab has 1000 entries but sqrt_1m_ab has 10"),
        ("q_sample: empty tables", q(x0, noise, t, a[:0], s[:0]), "the schedule tables are empty"),
        ("q_sample_target: prediction", qt(x0, noise, t, a, s, "bad"), "prediction must be 0 (epsilon)"),
        ("q_sample_target: noise shape", qt(x0, noise[:, :2], t, a, s), "noise has shape"),
        ("q_sample out=: shape", q(x0, noise, t, a, s, out=torch.empty_like(x0)[:1]), "out has shape"),
        ("q_sample out=: dtype", q(x0, noise, t, a, s, out=torch.empty_like(x0).half()), "out is Half but x0 is Float"),
        ("q_sample out=: non-contiguous", q(x0, noise, t, a, s, out=torch.empty_like(x0).transpose(2, 3)),
         "out must be contiguous"),
        ("q_sample out=: partial overlap with x0", q(base[:-1].view_as(x0), noise, t, a, s, out=base[1:].view_as(x0)),
         OVERLAP),
        ("q_sample out=: partial overlap with noise", q(x0, base[1:].view_as(x0), t, a, s, out=base[:-1].view_as(x0)),
         OVERLAP),
        ("sampler_step: out shape", step(x0, x0[:1]), "pass guidance= if it stacks"),
        ("sampler_step: cfg out shape", step(x0, x0, guidance=5.0), "with guidance the model output must stack"),
        ("sampler_step: out dtype", step(x0, x0.bfloat16()), "the model output is BFloat16 but x is Float"),
        ("sampler_step: integer x", lambda: torch.ops.latentdiff.sampler_step(
            x0.long(), x0.long(), None, None, None, 1.0, 0.0, 0.0, False, 1.0, 0.0, 0.0, 0.0, 0.0),
         "x must be float32, float16 or bfloat16"),
        ("sampler_step: d_prev shape", step(x0, x0, d_prev=x0[:1], c=0.5), "d_prev has shape"),
        ("sampler_step: noise dtype", step(x0, x0, noise=noise.half(), d=0.5), "noise is Half but x is Float"),
        ("sampler_step: x_in shape", step(x0, x0, x_in=x0[:, :1]), "x_in has shape"),
    ]
    if dev == "cpu":  # on CUDA an out-of-range t is a device-side assert, read where the value is (no host sync)
        table += [("q_sample: t out of range", q(x0, noise, torch.tensor([0, 1000]), a, s),
                   "t[1] = 1000 is out of range for a schedule of 1000 steps")]
    if other is not None:
        table += [
            ("q_sample: t on another device", q(x0, noise, t.to(other), a, s), "t is on cpu but x0 is on cuda"),
            ("q_sample: noise on another device", q(x0, noise.to(other), t, a, s), "noise is on cpu but x0 is on cuda"),
            ("q_sample: table on another device", q(x0, noise, t, a.to(other), s), "sqrt_ab is on cpu but x0 is on cuda"),
            ("q_sample out=: on another device", q(x0, noise, t, a, s, out=torch.empty_like(x0, device=other)),
             "out is on cpu but x0 is on cuda"),
            ("sampler_step: out on another device", step(x0, x0.to(other)), "the model output is on cpu but x is on cuda"),
            ("sampler_step: noise on another device", step(x0, x0, noise=noise.to(other), d=0.5),
             "noise is on cpu but x is on cuda"),
        ]
    return table


def run_table(dev: str) -> list[dict]:
    results = []
    for name, call, want in cases(dev):
        try:
            call()
            results.append({"name": name, "raised": None, "message": "", "want": want})
        except Exception as e:  # noqa: BLE001 - the type is what is checked
            results.append({"name": name, "raised": type(e).__name__, "message": str(e).splitlines()[0],
                            "want": want})
        if dev != "cpu":
            torch.cuda.synchronize()  # a fault in a kernel that did launch would surface here, in this case
    # Exact overlap is allowed: x_t written over x0 or over the noise gives the reference values.
    x0 = torch.randn(3, 4, 9, 9, device=dev)
    noise, t = torch.randn_like(x0), torch.tensor([0, 500, 999], device=dev)
    a, s = torch.rand(1000, device=dev), torch.rand(1000, device=dev)
    want = ops.q_sample_ref(x0, noise, t, a, s)
    for which in ("x0", "noise"):
        x, n = x0.clone(), noise.clone()
        got = ops.q_sample(x, n, t, a, s, out=x if which == "x0" else n, backend="fused")
        err = (got - want).abs().max().item()
        results.append({"name": f"q_sample out={which} (exact overlap)", "raised": None, "error": err})
    return results


def run_child(dev: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(HERE), dev], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (f"the error table on {dev} ended with exit code {proc.returncode} "
                                  f"(a negative code is the signal that killed it):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in ops._KERNEL_DEVICES), reason="needs a CUDA device and the CUDA kernels")])]


@pytest.mark.skipif(not ops.fused_available(), reason="latentdiff._C not built")
@pytest.mark.parametrize("dev", DEVICES)
def test_every_bad_input_raises_a_runtime_error_naming_it(dev):
    results = run_child(dev)
    errors = [r for r in results if "want" in r]
    assert len(errors) == (25 if dev == "cpu" else 30)
    for r in errors:
        assert r["raised"] == "RuntimeError", r
        assert r["want"] in r["message"], r
    overlaps = [r for r in results if "error" in r]
    assert len(overlaps) == 2 and all(r["error"] < 1e-5 for r in overlaps), overlaps


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(run_table(sys.argv[1])))
