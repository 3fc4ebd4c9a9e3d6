"""`python -m latentdiff.info`: versions, devices and kernel backends, for bug reports."""
from __future__ import annotations

import platform

import torch

from latentdiff import __version__
from latentdiff.diffusion import ops


def kernel_backends() -> dict[str, str]:
    """Which implementation each backend and device has: 'fused (CPU, CUDA)', 'torch'."""
    out = {"torch": "available (eager PyTorch reference)"}
    if ops.fused_available():
        devices = [key for key in ("CPU", "CUDA")
                   if torch._C._dispatch_has_kernel_for_dispatch_key("latentdiff::q_sample", key)]
        out["fused"] = f"available ({', '.join(devices)} kernels)"
    else:
        out["fused"] = f"not built ({ops._EXT.get('error', 'latentdiff._C not found')})"
    return out


def report() -> str:
    lines = [f"latentdiff {__version__}",
             f"python {platform.python_version()} on {platform.machine()} {platform.system()}",
             f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}), "
             f"{torch.get_num_threads()} CPU threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("device cuda: none seen")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("device mps: available")
    lines.append("device cpu: available")
    for name, state in kernel_backends().items():
        lines.append(f"backend {name}: {state}")
    lines.append(f"backend in use: {ops.backend()}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
