"""Shared helpers for `pytest benchmarks`: a median timer (torch.utils.benchmark on CPU, CUDA events on GPU),
where results go, and a short description of the machine and code for every JSON file."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch
import torch.utils.benchmark as benchmark

RESULTS = Path(os.environ.get("LATENTDIFF_BENCH_DIR", Path(__file__).parent / "results"))
CPU_THREADS = int(os.environ.get("LATENTDIFF_BENCH_THREADS", "2"))  # the targets are for 2 CPU threads


def median_seconds(fn, device: str, min_run_time: float = 0.4) -> float:
    """Median seconds per call of fn() after warm-up."""
    if device == "cuda":
        return _cuda_median(fn)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    timer.timeit(1)  # warm-up (first-touch of outputs, caches)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _cuda_median(fn, samples: int = 25) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # Enough calls per sample that one sample lasts >= 1 ms, so event resolution does not matter.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(1, min(1000, int(1.0 / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def machine(device: str) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "uncommitted"
        if commit != "uncommitted" and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit, "device": device, "name": name,
            "torch": torch.__version__, "threads": torch.get_num_threads() if device == "cpu" else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores visible"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(name: str, payload: dict) -> Path:
    """Writes RESULTS/name.json atomically and returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


@pytest.fixture
def bench():
    """The helpers above, as a fixture: benchmark files get them without importing conftest by name."""
    return types.SimpleNamespace(median_seconds=median_seconds, machine=machine, write_json=write_json)


@pytest.fixture
def cpu_threads():
    """Runs the test with CPU_THREADS torch threads, then restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield CPU_THREADS
    torch.set_num_threads(before)
