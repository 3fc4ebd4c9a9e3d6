"""The fused ops against eager PyTorch and torch.compile of the same eager function, and against copy bandwidth.

    pytest -q benchmarks/test_bench_ops.py -s

Times are medians after warm-up (torch.utils.benchmark on CPU with 2 threads, CUDA events on GPU). GB/s counts
the minimal traffic: every input read once, every output written once (q_sample: x0, noise -> x_t; sampler
step: x, out (2B rows with CFG), d_prev -> x_next, D). "% copy" compares with `dst.copy_(src)` of the same
bytes per element measured in the same run on the same device.

Two memory regimes are reported apart, because on the CPU they differ by up to 5x at large sizes:
- functional (the ops as the samplers and trainer call them): every call returns fresh outputs. A fresh
  buffer above glibc's mmap threshold (32 MiB at most) is new virtual memory, and its first write faults in
  every 4 KiB page, which costs more than the arithmetic. Its fair copy baseline is `src.clone()`.
- into a reused buffer (`ops.q_sample(..., out=buf)`): no page faults, so the kernel runs at memory speed.
  Its fair baselines are `dst.copy_(src)` and torch.compile of the same eager function writing into `buf`.
Only a floor that cannot flake is asserted (fused faster than eager at 2^24 elements); targets are reported.
"""
from __future__ import annotations

import pytest
import torch

from latentdiff.diffusion.process import ops

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason="latentdiff._C not built")

LATENT_SHAPES = [(1, 4, 64, 64), (4, 4, 64, 64), (16, 4, 64, 64)]
BANDWIDTH_SHAPE = (16, 4, 512, 512)  # 2^24 elements
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in ops._KERNEL_DEVICES else [])


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _tables(device):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)


def _cases(shape, dtype, device):
    """(op name, eager fn, fused fn, args, elements moved per output element) for one shape."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(device)  # noqa: E731
    sqrt_ab, sqrt_1m_ab = _tables(device)
    x0, noise, x, d_prev = rnd(shape), rnd(shape), rnd(shape), rnd(shape)
    t = torch.randint(0, 1000, (shape[0],), generator=gen).to(device)
    out, out_cfg = rnd(shape), rnd((2 * shape[0], *shape[1:]))
    # A DPM++ 2M step's coefficients (epsilon prediction): D = x - sigma eps, multistep term from D_prev.
    coefs = dict(p=1.0, q=-1.3, a=0.62, b=0.5, c=-0.12, d=0.0)

    def step_ref(x, out, d_prev, guidance):
        return ops.sampler_step_ref(x, out, d_prev, None, None, coefs["p"], coefs["q"], guidance, coefs["a"],
                                    coefs["b"], coefs["c"], coefs["d"], None)

    def step_fused(x, out, d_prev, guidance):
        return ops.sampler_step(x, out, d_prev=d_prev, guidance=guidance, backend="fused", **coefs)

    return [
        ("q_sample", ops.q_sample_ref, lambda *a: ops.q_sample(*a, backend="fused"),
         (x0, noise, t, sqrt_ab, sqrt_1m_ab), 3),
        ("sampler_step", step_ref, step_fused, (x, out, d_prev, None), 5),
        ("sampler_step+cfg", step_ref, step_fused, (x, out_cfg, d_prev, 7.5), 6),
    ]


def _copy_gbs(shape, dtype, device, timed):
    """Bandwidth of dst.copy_(src) into a reused buffer, in GB/s."""
    src = torch.randn(shape).to(dtype).to(device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / timed(lambda: dst.copy_(src)) / 1e9


def _compiled(fn):
    # One static graph per shape (dynamic=False), the best case for torch.compile on a pointwise op.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _row(name, shape, dtype, device, times, moved, copy_gbs, **extra):
    nbytes = moved * _numel(shape) * torch.empty((), dtype=dtype).element_size()
    fused = times["fused"]
    row = {"op": name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "device": device,
           "bytes": nbytes, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
           "fused_gbs": nbytes / fused / 1e9, "copy_gbs": copy_gbs,
           "pct_copy": 100 * nbytes / fused / 1e9 / copy_gbs,
           "x_eager": times["eager"] / fused, "x_compile": times["compile"] / fused}
    row.update(extra)
    return row


def _print_table(title, rows, cols):
    print(f"\n{title}")
    widths = [max(len(c[0]), *(len(c[1](r)) for r in rows)) for c in cols]
    print("  ".join(c[0].ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(c[1](r).ljust(w) for c, w in zip(cols, widths)))


@pytest.mark.parametrize("device", DEVICES)
def test_bench_ops(device, cpu_threads, bench):
    median_seconds, machine, write_json = bench.median_seconds, bench.machine, bench.write_json
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    timed = lambda fn: median_seconds(fn, device, min_run_time=0.3)  # noqa: E731  (CPU only; CUDA uses events)
    rows = []
    for dtype in dtypes:
        for shape in [*LATENT_SHAPES, BANDWIDTH_SHAPE]:
            copy_gbs = _copy_gbs(shape, dtype, device, timed)
            for name, eager, fused, args, moved in _cases(shape, dtype, device):
                compiled = _compiled(eager)
                if dtype == torch.float32:  # timing the right function (tests/test_ops.py checks every dtype)
                    as_tuple = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
                    for w, g in zip(as_tuple(eager(*args)), as_tuple(fused(*args))):
                        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
                times = {"eager": timed(lambda: eager(*args)), "compile": timed(lambda: compiled(*args)),
                         "fused": timed(lambda: fused(*args))}
                rows.append(_row(name, shape, dtype, device, times, moved, copy_gbs))

    _print_table(f"ops on {device} ({machine(device)['name']}, {cpu_threads if device == 'cpu' else ''} threads): "
                 "functional calls, fresh outputs; % copy = fused GB/s over dst.copy_(src) of the same size", rows, [
        ("op", lambda r: r["op"]), ("shape", lambda r: "x".join(map(str, r["shape"]))), ("dtype", lambda r: r["dtype"]),
        ("device", lambda r: r["device"]), ("eager ms", lambda r: f"{r['eager_ms']:.3f}"),
        ("compile ms", lambda r: f"{r['compile_ms']:.3f}"), ("fused ms", lambda r: f"{r['fused_ms']:.3f}"),
        ("fused GB/s", lambda r: f"{r['fused_gbs']:.1f}"), ("copy GB/s", lambda r: f"{r['copy_gbs']:.1f}"),
        ("% copy", lambda r: f"{r['pct_copy']:.0f}"), ("x eager", lambda r: f"{r['x_eager']:.2f}"),
        ("x compile", lambda r: f"{r['x_compile']:.2f}")])
    path = write_json(f"ops-{device}", {"machine": machine(device), "rows": rows})
    print(f"written to {path}")
    for r in rows:  # the floor: generous, so a noisy shared machine cannot flake it
        if r["shape"] == list(BANDWIDTH_SHAPE):
            assert r["fused_ms"] < r["eager_ms"], r


@pytest.mark.parametrize("device", DEVICES)
def test_bench_q_sample_bandwidth(device, cpu_threads, bench):
    """q_sample at 2^24 fp32 in both memory regimes, beside the copy baselines of each."""
    median_seconds, machine, write_json = bench.median_seconds, bench.machine, bench.write_json
    shape, dtype = BANDWIDTH_SHAPE, torch.float32
    name, eager, fused, args, moved = _cases(shape, dtype, device)[0]
    buf = torch.empty(shape, dtype=dtype, device=device)

    def eager_into(*a):
        return buf.copy_(eager(*a))

    compiled, compiled_into = _compiled(eager), torch.compile(eager_into, dynamic=False)
    compiled_into(*args)
    torch.testing.assert_close(buf, eager(*args))
    ops.q_sample(*args, out=buf, backend="fused")
    torch.testing.assert_close(buf, eager(*args))
    src, dst = args[0], torch.empty_like(args[0])
    nbytes = moved * _numel(shape) * 4
    copy_bytes = 2 * _numel(shape) * 4
    entries = [  # (what, regime, seconds, bytes)
        ("copy: dst.copy_(src)", "reused", median_seconds(lambda: dst.copy_(src), device), copy_bytes),
        ("copy: src.clone()", "fresh", median_seconds(lambda: src.clone(), device), copy_bytes),
        ("eager q_sample_ref", "fresh", median_seconds(lambda: eager(*args), device), nbytes),
        ("torch.compile", "fresh", median_seconds(lambda: compiled(*args), device), nbytes),
        ("fused q_sample", "fresh", median_seconds(lambda: fused(*args), device), nbytes),
        ("torch.compile into buf", "reused", median_seconds(lambda: compiled_into(*args), device), nbytes),
        ("fused q_sample(out=buf)", "reused",
         median_seconds(lambda: ops.q_sample(*args, out=buf, backend="fused"), device), nbytes),
    ]
    copy_gbs = {regime: b / s / 1e9 for what, regime, s, b in entries if what.startswith("copy")}
    rows = [{"what": what, "regime": regime, "ms": s * 1e3, "gbs": b / s / 1e9,
             "pct_copy": 100 * (b / s / 1e9) / copy_gbs["reused"],
             "pct_same_regime_copy": 100 * (b / s / 1e9) / copy_gbs[regime]} for what, regime, s, b in entries]
    ms = {r["what"]: r["ms"] for r in rows}
    summary = {
        "fused_fresh_x_eager": ms["eager q_sample_ref"] / ms["fused q_sample"],
        "fused_fresh_x_compile": ms["torch.compile"] / ms["fused q_sample"],
        "fused_out_x_eager": ms["eager q_sample_ref"] / ms["fused q_sample(out=buf)"],
        "fused_out_x_compile_fresh": ms["torch.compile"] / ms["fused q_sample(out=buf)"],
        "fused_out_x_compile_into": ms["torch.compile into buf"] / ms["fused q_sample(out=buf)"],
    }
    _print_table(f"q_sample, {'x'.join(map(str, shape))} fp32 on {device}: memory regimes (GB/s = minimal traffic; "
                 "% copy = of dst.copy_(src); % same = of the copy in the same regime)", rows, [
        ("what", lambda r: r["what"]), ("output", lambda r: r["regime"]), ("ms", lambda r: f"{r['ms']:.2f}"),
        ("GB/s", lambda r: f"{r['gbs']:.1f}"), ("% copy", lambda r: f"{r['pct_copy']:.0f}"),
        ("% same", lambda r: f"{r['pct_same_regime_copy']:.0f}")])
    print("  ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    path = write_json(f"ops-bandwidth-{device}", {"machine": machine(device), "rows": rows, "summary": summary})
    print(f"written to {path}")
    assert ms["fused q_sample"] < ms["eager q_sample_ref"]
    assert ms["fused q_sample(out=buf)"] < ms["eager q_sample_ref"]


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")
def test_bench_sampler_step_latency_gpu(bench):
    """One DPM++-style step with CFG at batch 1 (1x4x64x64 fp16): called from Python one by one (the host's dispatch
    cost, what a sampler loop pays), and 25 steps replayed from one CUDA graph (the kernel alone). Target: <= 10 us."""
    x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    out = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    d_prev = torch.randn_like(x)

    def step(x):
        return ops.sampler_step(x, out, p=1.0, q=-0.5, a=0.9, b=0.1, c=0.05, d_prev=d_prev, guidance=7.5)[0]

    def loop(n):
        y = x
        for _ in range(n):
            y = step(y)
        return y

    per_call = bench.median_seconds(lambda: loop(100), "cuda") / 100
    raw = bench.median_seconds(lambda: torch.ops.latentdiff.sampler_step(
        x, out, d_prev, None, None, 1.0, -0.5, 7.5, True, 0.9, 0.1, 0.05, 0.0, 0.0), "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(25)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop(25)
    per_graph_step = bench.median_seconds(graph.replay, "cuda") / 25
    rows = {"python_wrapper_us": per_call * 1e6, "raw_op_us": raw * 1e6, "cuda_graph_step_us": per_graph_step * 1e6}
    print("\nsampler step, batch 1, 1x4x64x64 fp16 with CFG: " + "  ".join(f"{k} {v:.2f}" for k, v in rows.items()))
    bench.write_json("sampler-step-latency-cuda", {"machine": bench.machine("cuda"), "rows": rows})
    assert per_graph_step < per_call


@pytest.mark.parametrize("device", DEVICES)
def test_bench_samplers_fused_vs_pytorch(device, cpu_threads, bench):
    """Every sampler's loop, 10 Karras steps on a 4x4x64x64 batch with CFG, on the fused sampler step against the
    PyTorch path (ops.use_backend("torch")), with a denoiser that costs one multiply-add (a Gaussian's exact one),
    so the time is the samplers' own: their fused updates, and the torch sums of older estimates multistep ones
    feed into them. DPM adaptive is left out: it decides its steps on the host from an error norm."""
    from latentdiff.diffusion.samplers import SAMPLER_NAMES, Denoiser, NoiseSampler, get_sampler
    from latentdiff.diffusion.schedule import Schedule, sampling_sigmas
    from latentdiff.io.config import DiffusionConfig

    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16]
    sig = sampling_sigmas(Schedule.from_config(DiffusionConfig()), 10, "karras")
    rows = []
    for dtype in dtypes:
        x = torch.randn(4, 4, 64, 64, device=device).to(dtype) * float(sig[0])

        def halves(x, s):  # eps of two Gaussian data models, [uncond; cond]: 0.5 / (0.25 + s^2) x ... per half
            return torch.cat([x * (s / (0.25 + s * s)), x * (s / (0.36 + s * s))])

        model = Denoiser(halves, coefs=lambda s: (1.0, -s), guidance=5.0)
        for name in SAMPLER_NAMES:
            if name == "dpm_adaptive":
                continue
            fn = get_sampler(name).fn

            def run(backend):
                noise = NoiseSampler.from_seed(0, x.shape[0], device)
                with ops.use_backend(backend):
                    return fn(model, x, sig, noise=noise, disable=True)

            if dtype == torch.float32:
                torch.testing.assert_close(run("fused"), run("torch"), rtol=1e-4, atol=1e-4)
            times = {b: median_seconds_of(bench, lambda b=b: run(b), device) for b in ("fused", "torch")}
            rows.append({"sampler": name, "dtype": str(dtype).removeprefix("torch."), "device": device,
                         "fused_ms": times["fused"] * 1e3, "torch_ms": times["torch"] * 1e3,
                         "x_torch": times["torch"] / times["fused"]})
    _print_table(f"samplers on {device}: 10 steps, 4x4x64x64 with CFG, fused sampler step vs the PyTorch path", rows,
                 [("sampler", lambda r: r["sampler"]), ("dtype", lambda r: r["dtype"]),
                  ("fused ms", lambda r: f"{r['fused_ms']:.2f}"), ("torch ms", lambda r: f"{r['torch_ms']:.2f}"),
                  ("x torch", lambda r: f"{r['x_torch']:.2f}")])
    path = bench.write_json(f"samplers-{device}", {"machine": bench.machine(device), "rows": rows})
    print(f"written to {path}")
    assert sum(r["fused_ms"] for r in rows) < sum(r["torch_ms"] for r in rows)  # the floor, summed over samplers


def median_seconds_of(bench, fn, device):
    return bench.median_seconds(fn, device, min_run_time=0.2)
