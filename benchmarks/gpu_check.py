"""The GPU check: one prepared run for a session lent a GPU machine (README, "Benchmarks").

    python benchmarks/gpu_check.py --out gpu-check/ [--work DIR] [--budget 540] [--only build,cuda-tests]

Builds the extension for the visible GPU, runs every CUDA test (and the op-error table under compute-sanitizer),
`generate` end to end in fp16 and bf16 on a tiny checkpoint and on a random SD 2.1-base checkpoint at 512x512,
the op, pipeline (SD 2.1 and SDXL against diffusers) and training benchmarks, and, when the emoji data is there,
the emoji model's second training stage on the in-memory fast path (LATENTDIFF_EMOJI_INIT: stage 1's
file; data/emoji-latents, and data/emoji for its evaluation). Each part runs as its own process under its
own time limit (clipped to what is left of --budget), so one hang cannot eat the run. Logs, the benchmarks' JSON,
the images, the emoji run's log.csv and evaluation, and summary.json go to --out, all small enough to bring back
from a lent machine; the large files (the random checkpoints, the emoji run's checkpoints and exported model) go to
--work (default: OUT-work beside it). The last thing printed is one table: pass / fail / timeout / skip per part,
and the numbers that matter. Without a GPU every CUDA part is skipped, so the script's logic can be checked on a
CPU machine.
Wheels for packages the GPU image lacks are taken from .whl/ (../shared/device/wheels.sh) when present.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = shlex.quote(sys.executable)

# A random SD 2.1-base checkpoint at full size (fp16 on the GPU), and a tiny one, for `generate`.
MAKE_CHECKPOINTS = """
import sys, torch
from latentdiff.io.checkpoint import build_models, save_models
from latentdiff.io.config import CONFIG_DIR, load_model_config
out = sys.argv[1]
for name in ("tiny", "sd21-base"):
    torch.manual_seed(0)
    m = build_models(load_model_config(CONFIG_DIR / f"{name}.yaml"), device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for mod in (m.unet, m.vae, m.text):
            for p in mod.parameters():
                p.copy_(torch.randn_like(p) * 0.02)
    save_models(f"{out}/{name}.safetensors", m.config, m.unet, m.vae, m.text)
"""

# Peak memory of one SD 2.1 image against the pipeline's own estimate (the estimate must not be below it).
MEMORY_ESTIMATE = """
import json, sys, torch
from latentdiff.pipeline import Pipeline
pipe = Pipeline.from_checkpoint(sys.argv[1], device="cuda", dtype="fp16")
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
pipe("a cat", steps=2, width=512, height=512, progress=False)
peak = torch.cuda.max_memory_allocated() - base
est = pipe.image_bytes(512, 512, 7.5)
print(json.dumps({"estimate_gib": est / 2**30, "measured_gib": peak / 2**30, "ok": est >= peak}))
"""


def parts(out: Path, work: Path) -> list[tuple[str, str, int]]:
    """(name, shell command run from the repository root, seconds allowed)."""
    logs = out / "logs"
    bench = f"LATENTDIFF_BENCH_DIR={shlex.quote(str(out / 'bench'))}"
    ck = shlex.quote(str(work / "ckpt"))
    run = shlex.quote(str(work / "emoji"))
    gen = f"{PY} -m latentdiff.generate --device cuda --seed 1 -o {shlex.quote(str(out / 'images'))}/"
    emoji = os.environ.get("LATENTDIFF_EMOJI_INIT", "")
    return [
        ("build", "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(" + PY + " -c \"import torch; "
         "print('%d.%d' % torch.cuda.get_device_capability())\")} MAX_JOBS=${MAX_JOBS:-8} "
         f"{PY} setup.py build_ext --inplace && {PY} -m latentdiff.info", 240),
        ("cuda-tests", f"LATENTDIFF_REQUIRE_EXT=1 {PY} -m pytest -q -p no:cacheprovider tests/test_ops.py "
         "tests/test_op_errors.py tests/test_extension.py -k 'cuda or gpu or sync or registered' && "
         f"{PY} -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_pipeline.py -m gpu", 150),
        ("generate", f"mkdir -p {ck} && {PY} -c {shlex.quote(MAKE_CHECKPOINTS)} {ck} && "
         f"{gen} --checkpoint {ck}/tiny.safetensors --dtype fp16 'a cat' && "
         f"{gen} --checkpoint {ck}/tiny.safetensors --dtype bf16 'a cat' && "
         f"{gen} --checkpoint {ck}/sd21-base.safetensors --dtype fp16 -W 512 -H 512 --steps 20 'a cat' && "
         f"{gen} --checkpoint {ck}/sd21-base.safetensors --dtype bf16 -W 512 -H 512 --steps 20 'a cat' && "
         f"{PY} -c {shlex.quote(MEMORY_ESTIMATE)} {ck}/sd21-base.safetensors", 150),
        ("emoji-stage2", (f"STAGE2_ARGS='--data.in_memory=true' bash docs/experiments/emoji-recipe.sh stage2 "
                          f"{shlex.quote(emoji)} {run} && cp {run}/run/log.csv {shlex.quote(str(logs))}/emoji-log.csv && "
                          f"{{ [ ! -d data/emoji ] || {PY} -m latentdiff.evaluate --checkpoint {run}/emoji.safetensors "
                          f"--data data/emoji --device cuda --out {shlex.quote(str(logs))}/emoji-evaluate.json; }}"
                          if emoji else ""), 240),
        ("bench-pipeline", f"{bench} {PY} -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_pipeline.py "
         "-k sd21", 180),
        ("bench-train-emoji", f"{bench} {PY} -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_train.py -k 'emoji and gpu'", 180),
        ("bench-ops", f"{bench} {PY} -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_ops.py "
         "-k 'latency or bandwidth and cuda'", 120),
        ("sanitizer", f"compute-sanitizer --tool memcheck --error-exitcode 1 {PY} tests/test_op_errors.py cuda "
         f"> {shlex.quote(str(logs / 'sanitizer-table.json'))}", 120),
        ("bench-sdxl", f"{bench} {PY} -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_pipeline.py "
         "-k sdxl", 180),
        ("bench-train-sd21", f"{bench} {PY} -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_train.py -k 'sd21 and gpu'", 150),
    ]


def cuda_visible() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def run_part(name: str, cmd: str, limit: int, logs: Path) -> dict:
    log = logs / f"{name}.log"
    start = time.time()
    with open(log, "w") as f:
        f.write(f"$ {cmd}\n\n")
        f.flush()
        # A process group of its own, so the time limit ends everything the part started.
        proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable))
        try:
            rc = proc.wait(timeout=limit)
            status = "pass" if rc == 0 else "fail"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc, status = None, "timeout"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {"part": name, "status": status, "rc": rc, "seconds": round(time.time() - start, 1), "last": tail[0][:150]}


def numbers(out: Path) -> dict:
    """The figures the issues ask for, read back from the benchmarks' JSON files."""
    found = {}
    for path in sorted((out / "bench").glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text()).get("rows")
        except (OSError, ValueError):
            pass
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for logs, benchmark JSON and summary.json (small files)")
    p.add_argument("--work", help="folder for checkpoints and training runs (default: OUT-work)")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run; parts are cut to fit")
    p.add_argument("--only", help="comma-separated part names to run (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.with_name(out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    deadline = time.time() + args.budget
    gpu = cuda_visible()
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, cmd, limit in parts(out, work):
        left = int(deadline - time.time())
        if only is not None and name not in only:
            continue
        if not gpu:
            rows.append({"part": name, "status": "skip", "rc": None, "seconds": 0, "last": "no CUDA device"})
        elif not cmd:
            rows.append({"part": name, "status": "skip", "rc": None, "seconds": 0, "last": "no input given"})
        elif left < 20:
            rows.append({"part": name, "status": "skip", "rc": None, "seconds": 0, "last": "out of budget"})
        else:
            rows.append(run_part(name, cmd, min(limit, left), out / "logs"))
        print(f"gpu_check: {rows[-1]['part']}: {rows[-1]['status']} ({rows[-1]['seconds']} s)", flush=True)
    summary = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu, "parts": rows, "numbers": numbers(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'part':<20}{'status':<9}{'seconds':>8}  last line")
    for r in rows:
        print(f"{r['part']:<20}{r['status']:<9}{r['seconds']:>8}  {r['last']}")
    return 0 if all(r["status"] in ("pass", "skip") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
