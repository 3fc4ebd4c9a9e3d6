"""The compiled extension latentdiff._C: it imports and registers every op for the devices it was built for.

CI sets LATENTDIFF_REQUIRE_EXT=1 (a missing or broken build fails instead of skipping) and
LATENTDIFF_REQUIRE_CUDA_EXT=1 (a CUDA compile problem, which leaves a CPU-only build, fails too).
"""
import os
import subprocess
import sys

import pytest
import torch

OPS = ("q_sample", "q_sample_into", "q_sample_target", "sampler_step")


def _import_extension():
    try:
        import latentdiff._C  # noqa: F401
    except ImportError as e:
        if os.environ.get("LATENTDIFF_REQUIRE_EXT") == "1" or os.environ.get("LATENTDIFF_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"latentdiff._C does not import ({e}); build it with pip install --no-build-isolation -e .")
        pytest.skip(f"latentdiff._C not built ({e})")


def test_extension_registers_cpu_kernels():
    _import_extension()
    from latentdiff.diffusion import ops

    assert ops.fused_available()
    for name in OPS:
        assert hasattr(torch.ops.latentdiff, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"latentdiff::{name}", "CPU"), name


def test_cuda_kernels_registered():
    _import_extension()
    has = {name: torch._C._dispatch_has_kernel_for_dispatch_key(f"latentdiff::{name}", "CUDA") for name in OPS}
    if os.environ.get("LATENTDIFF_REQUIRE_CUDA_EXT") == "1":
        assert all(has.values()), f"CUDA kernels missing for {[n for n, ok in has.items() if not ok]}: the CUDA part " \
                                  "of the extension did not build (check CUDA_HOME and the nvcc output)"
    elif not any(has.values()):
        pytest.skip("CPU-only build of latentdiff._C (set LATENTDIFF_REQUIRE_CUDA_EXT=1 to require CUDA kernels)")
    assert all(has.values()), f"only some ops have CUDA kernels: {has}"


def test_without_extension_torch_path_and_one_warning():
    """With _C unavailable every op still works on the PyTorch path, and says so once."""
    code = """
import sys, warnings
sys.modules["latentdiff._C"] = None  # makes `from . import _C` raise ImportError
import torch
from latentdiff.diffusion import ops
x, t = torch.randn(2, 3), torch.tensor([0, 1])
tab = torch.rand(10)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = ops.q_sample(x, x, t, tab, tab)
    b, _ = ops.sampler_step(x, x, p=0.0, q=1.0, a=0.5, b=0.5)
assert ops.backend() == "torch" and not ops.fused_available()
assert torch.equal(a, ops.q_sample_ref(x, x, t, tab, tab)) and torch.equal(b, x)
lines = [str(w.message) for w in caught if "latentdiff" in str(w.message)]
assert len(lines) == 1 and "using the PyTorch path" in lines[0], lines
print("ok")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LATENTDIFF_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_op_entry_points_format_no_numbers_with_iostream():
    """The ops' checks build their messages as strings (csrc/checks.h, LATENTDIFF_CHECK): no call from an op's entry
    point into iostream's number or shape printing, which crashed the process on the H200 image's toolchain."""
    import re
    import shutil

    _import_extension()
    import latentdiff._C as ext
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", ext.__file__], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    entry = re.compile(r"<latentdiff::\(anonymous namespace\)::(q_sample|q_sample_into|q_sample_target|sampler_step|"
                       r"q_sample_run_cpu)\(")
    printing = re.compile(r"_M_insert|ArrayRef<long>|operator<<|long const&")
    calls, current = [], None
    for line in asm.splitlines():
        if line.endswith(">:"):
            current = line if entry.search(line) else None
        elif current and "call" in line:
            calls.append(line)
    assert calls, "no op entry point found in the extension's disassembly"
    assert not [c for c in calls if printing.search(c)]
