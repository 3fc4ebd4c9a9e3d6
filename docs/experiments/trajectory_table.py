"""Trajectory error of every sampler and schedule on an SD 1.5-size U-Net with random weights.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
        MALLOC_TOP_PAD_=1073741824 python docs/experiments/trajectory_table.py --out trajectory.json --deadline 55
    python docs/experiments/trajectory_table.py --report --out trajectory.json

(The malloc settings keep glibc from unmapping oneDNN's per-call weight buffers: on one core a batch-16 call
spent about 0.9 s of 4.5 in page faults without them, and took 2.8 s with them.)

The full SD 1.5 U-Net (configs/sd15.yaml) with seeded random weights, float32 on the CPU, one 1x4xSxS latent, a
fixed random 77x768 context and no CFG, seen through the pipeline's epsilon denoiser and SD 1.5's scaled-linear
schedule. Every run starts from the same unit Gaussian times sqrt(1 + sigma_0^2), as the pipeline starts, and
its final latent x is compared with a reference x_ref: relative error ||x - x_ref|| / ||x_ref||.

References (--ref-steps 1000): runs that draw no noise are compared with one DPM++ 2M run on the default schedule
(every training sigma, then 0); its convergence check is the same at half the steps. Every run is given one
seeded Brownian tree over a fixed sigma interval, so runs that draw noise see the same path at any step count:
the ancestral / SDE samplers at eta 1 all discretize one reverse SDE and share one limit, DPM++ 2M SDE's (checked
against Euler ancestral's and its own half-step run); ER-SDE (another SDE) and Restart (Heun with noise jumps
at fixed levels) are compared with themselves at the reference length (Restart at half of it: two model calls a
step). LCM is compared with the ODE reference: it has no limit as steps grow (each step jumps to D and renoises).

Model calls from many runs are batched: each run is a thread, and one U-Net call serves all waiting runs, each
row at its own sigma. Runs that compute the same thing (DDIM at eta 0 and Euler, equal schedules) are found on a
cheap stand-in model and run once. --out keeps the rows as JSON and --latents (default: beside --out) every final
latent, both after each run; a rerun skips what it finds. --plan prints the runs, their model calls and a time
estimate; --report prints the tables of --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import threading
import time
from pathlib import Path

import torch

# Which reference a run that draws noise is compared with (a run that draws none: "ode").
SDE_FAMILY = ("euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
              "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "res_multistep_ancestral", "ddpm", "dpm_fast",
              "dpm_adaptive")
OWN = ("er_sde", "restart")  # their own limit, at the reference length
TWO_CALLS = ("restart",)  # references run at half the steps: two model calls a step
NO_LIMIT = ("lcm",)


def build_unet(seed: int, out_gain: float):
    """SD 1.5's U-Net with every parameter random: weights N(0, 1/fan_in) (the output conv out_gain^2/fan_in),
    norm scales N(1, 0.1^2), biases N(0, 0.02^2)."""
    from latentdiff.io.config import CONFIG_DIR, load_model_config
    from latentdiff.models.unet import UNetModel

    cfg = load_model_config(CONFIG_DIR / "sd15.yaml")
    with torch.device("meta"):
        unet = UNetModel(cfg.unet)
    unet = unet.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if p.dim() >= 2:  # the output conv is zero in a fresh model: a random one makes eps depend on x
            p.normal_(0, (out_gain if name.startswith("out.") else 1.0) / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith(".weight"):
            p.normal_(1, 0.1, generator=g)
        else:
            p.normal_(0, 0.02, generator=g)
    return unet, cfg


class Batcher:
    """Runs sampler threads in lockstep: each model call waits until every live run waits, then one U-Net call
    takes all of them, row i at its own sigma (c_in and t per row, as UNetDenoiser does for one)."""

    def __init__(self, unet, schedule, context):
        self.unet, self.schedule, self.context = unet, schedule, context
        self.cv = threading.Condition()
        self.pending: list[dict] = []
        self.live = 0
        self.calls = self.rows = 0

    def evaluate(self, xs, sigmas):
        c_in = torch.tensor([1 / math.sqrt(1 + s * s) for s in sigmas]).view(-1, 1, 1, 1)
        t = torch.tensor([float(self.schedule.sigma_to_t(s)) for s in sigmas], dtype=torch.float32)
        x = torch.cat(xs) * c_in
        with torch.no_grad():
            out = self.unet(x, t, self.context.expand(len(xs), -1, -1)).float()
        return list(out.split(1))

    def __call__(self, x, sigma: float):
        slot = {"x": x, "sigma": float(sigma), "out": None}
        with self.cv:
            self.pending.append(slot)
            self.cv.notify_all()
            self.cv.wait_for(lambda: slot["out"] is not None)
        return slot["out"]

    def serve(self):
        """Answer batched calls until no run is live."""
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.live == 0 or len(self.pending) == self.live)
                if self.live == 0:
                    return
                batch, self.pending = self.pending, []
            outs = self.evaluate([s["x"] for s in batch], [s["sigma"] for s in batch])
            self.calls, self.rows = self.calls + 1, self.rows + len(batch)
            with self.cv:
                for s, o in zip(batch, outs):
                    s["out"] = o
                self.cv.notify_all()


class Counted:
    """A model or noise source that counts its calls and keeps the sigma of each."""

    def __init__(self, fn, coefs=None):
        self.fn, self._coefs, self.guidance, self.n, self.sigmas = fn, coefs, None, 0, []

    def __call__(self, x, sigma, *rest):
        self.n += 1
        self.sigmas.append(float(sigma))
        return self.fn(x, sigma, *rest)

    def coefs(self, sigma):
        return self._coefs(sigma)


def eps_coefs(sigma: float):
    return 1.0, -sigma  # UNetDenoiser.coefs for epsilon prediction: D = x - sigma * eps


def run_one(job, model, start, schedule, brownian):
    """One sampler run as the pipeline makes it: (final latent, model calls, noise draws, model sigmas)."""
    from latentdiff.diffusion.samplers import get_sampler

    sampler, kind, steps = job
    spec = get_sampler(sampler)
    sigmas = spec.sigmas(schedule, steps, None if kind == "default" else kind)
    x = start * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    m, noise = Counted(model, eps_coefs), Counted(brownian())
    out = spec.fn(m, x, sigmas, noise=noise, disable=True, **spec.options(schedule))
    return out, m.n, noise.n, m.sigmas


def probe(jobs, start, schedule, brownian):
    """Each run on a cheap nonlinear stand-in model: its model calls, noise draws, and a signature that is equal
    for two runs exactly when they compute the same thing (wrappers like DDIM at eta 0 = Euler, equal schedules)."""
    g = torch.Generator().manual_seed(123)
    w = torch.randn(4, 4, generator=g) / 2

    def stand_in(x, sigma):
        x_in = x / math.sqrt(1 + sigma * sigma)
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x_in) + math.sin(3 * math.log(sigma)))

    info = {}
    for job in jobs:
        out, calls, draws, sig = run_one(job, stand_in, start, schedule, brownian)
        h = hashlib.sha256(out.numpy().tobytes() + repr(sig).encode()).hexdigest()[:16]
        info[job] = {"calls": calls, "draws": draws, "sig": h}
    return info


def reference_of(sampler: str, stochastic: bool, ref_steps: int):
    """The job whose final latent a run is compared with."""
    if not stochastic or sampler in NO_LIMIT:
        return ("dpmpp_2m", "default", ref_steps)
    if sampler in OWN:
        return (sampler, "default", ref_steps // 2 if sampler in TWO_CALLS else ref_steps)
    if sampler in SDE_FAMILY:
        return ("dpmpp_2m_sde", "default", ref_steps)
    raise ValueError(f"{sampler} draws noise but has no reference family; add it to SDE_FAMILY or OWN")


def key(job) -> str:
    return "|".join(map(str, job))


def rel(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def main(argv=None) -> int:
    from latentdiff.diffusion.sampler_base import BrownianNoise
    from latentdiff.diffusion.samplers import SAMPLER_NAMES
    from latentdiff.diffusion.schedule import SCHEDULES, Schedule
    from latentdiff.io.files import atomic_write
    from latentdiff.pipeline import UNetDenoiser

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=8, help="latent side (8: 64x64 pixels)")
    p.add_argument("--steps", default="5,10,20,40", help="step counts on each sampler's default schedule")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="schedules run at --schedule-steps")
    p.add_argument("--schedule-steps", default="10,20",
                   help="step counts for the other schedules ('' for none); counts after the first run last, "
                        "sampler by sampler, so a --deadline leaves whole rows")
    p.add_argument("--deadline", type=float, help="minutes after which no new run starts")
    p.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--workers", type=int, default=16, help="runs in flight (the U-Net batch)")
    p.add_argument("--seed", type=int, default=0, help="weights; seed+1 the context, seed+2 the start noise")
    p.add_argument("--noise-seed", type=int, default=7, help="the Brownian tree")
    p.add_argument("--out-gain", type=float, default=2.0, help="std of the output conv, times 1/sqrt(fan_in)")
    p.add_argument("--out", help="rows as JSON, written after each run; a rerun keeps the runs it finds")
    p.add_argument("--latents", help="final latents (default: --out with .pt)")
    p.add_argument("--plan", action="store_true", help="print the runs and a time estimate, run nothing")
    p.add_argument("--report", action="store_true", help="print the tables of --out, run nothing")
    args = p.parse_args(argv)
    samplers = args.samplers.split(",")
    counts = [int(s) for s in args.steps.split(",")]
    sched_counts = [int(s) for s in args.schedule_steps.split(",") if s]
    if args.report:
        if not args.out:
            p.error("--report reads the JSON of --out; pass --out FILE")
        report(json.loads(Path(args.out).read_text())["rows"], counts, sched_counts, args.schedules.split(","),
               samplers)
        return 0
    torch.set_num_threads(1)

    unet, cfg = build_unet(args.seed, args.out_gain)
    schedule = Schedule.from_config(cfg.diffusion)
    context = torch.randn(1, 77, cfg.unet.context_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    start = torch.randn(1, cfg.unet.in_channels, args.side, args.side,
                        generator=torch.Generator().manual_seed(args.seed + 2))
    lo, hi = float(schedule.sigmas[0]) / 2, float(schedule.sigmas[-1]) * 1.5  # holds every schedule's sigmas

    def brownian():
        return BrownianNoise(start, lo, hi, args.noise_seed)

    grid = [(s, "default", n) for s in samplers for n in counts]
    grid += [(s, k, n) for n in sched_counts for k in args.schedules.split(",") for s in samplers]
    refs = [("dpmpp_2m", "default", args.ref_steps), ("dpmpp_2m", "default", args.ref_steps // 2),
            ("dpmpp_2m_sde", "default", args.ref_steps), ("dpmpp_2m_sde", "default", args.ref_steps // 2),
            ("euler_ancestral", "default", args.ref_steps), ("er_sde", "default", args.ref_steps),
            ("restart", "default", args.ref_steps // 2)]
    info = probe(refs + grid, start, schedule, brownian)
    canon: dict[str, tuple] = {}  # signature -> the first run that computes it
    for job in refs + grid:
        canon.setdefault(info[job]["sig"], job)
    unique = list(dict.fromkeys(canon[info[j]["sig"]] for j in refs + grid))

    out_path = Path(args.out) if args.out else None
    lat_path = Path(args.latents) if args.latents else out_path.with_suffix(".pt") if out_path else None
    store = torch.load(lat_path) if lat_path and lat_path.exists() else {}
    later = [j for j in unique if j[1] != "default" and j[2] in sched_counts[1:]]
    first = sorted((j for j in unique if j not in later), key=lambda j: -info[j]["calls"])
    later.sort(key=lambda j: samplers.index(j[0]))
    todo = [j for j in first + later if key(j) not in store]
    work = sum(info[j]["calls"] for j in todo)
    print(f"{len(refs + grid)} runs, {len(unique)} distinct, {len(todo)} to do: {work} model calls "
          f"(dpm_adaptive's count is the stand-in model's), longest {info[todo[0]]['calls'] if todo else 0}",
          flush=True)

    # The batched call against the pipeline's denoiser, and the U-Net's time per call.
    batcher = Batcher(unet, schedule, context)
    den = UNetDenoiser(unet, schedule, "epsilon", context)
    xs = [start * 3, start.flip(-1)]
    with torch.no_grad():
        single = [den(x, s) for x, s in zip(xs, (14.6, 0.05))]
    batched = batcher.evaluate(xs, [14.6, 0.05])
    check = max(rel(b, s) for b, s in zip(batched, single))
    eps_std = {s: float(den(start * math.sqrt(1 + s * s), s).std()) for s in (14.6146, 3.0, 1.0, 0.3, 0.03)}
    print(f"batched call against UNetDenoiser: max relative difference {check:.1e}; eps std by sigma: "
          + ", ".join(f"{s:g}: {v:.2f}" for s, v in eps_std.items()), flush=True)
    timing = {}
    for b in (1, args.workers):
        batcher.evaluate([start] * b, [1.0] * b)
        t0 = time.perf_counter()
        batcher.evaluate([start] * b, [1.0] * b)
        timing[b] = time.perf_counter() - t0
    longest = max((info[j]["calls"] for j in todo), default=0)
    estimate = max(work * timing[args.workers] / args.workers, longest * timing[args.workers])
    print(f"one U-Net call: {timing[1]:.2f} s at batch 1, {timing[args.workers]:.2f} s at batch {args.workers} "
          f"({timing[args.workers] / args.workers:.3f} s per row); estimate {estimate / 60:.0f} min", flush=True)
    if args.plan:
        for j in todo:
            print(f"  {key(j):40s} {info[j]['calls']:5d} calls  {info[j]['draws']:5d} draws")
        return 0

    meta = {"model": "SD 1.5 U-Net (configs/sd15.yaml), random weights", "seed": args.seed,
            "noise_seed": args.noise_seed, "out_gain": args.out_gain, "latent": list(start.shape),
            "dtype": "float32", "guidance": None, "brownian_interval": [lo, hi], "ref_steps": args.ref_steps,
            "batched_vs_denoiser": check, "eps_std": eps_std, "seconds_per_call": timing, "workers": args.workers}
    lock = threading.Lock()
    t_start = time.perf_counter()

    def rows():
        out = []
        for job in refs + grid:
            c = canon[info[job]["sig"]]
            if key(c) not in store:
                continue
            sampler, kind, steps = job
            stochastic = info[job]["draws"] > 0
            ref = reference_of(sampler, stochastic, args.ref_steps)
            r = store.get(key(ref))
            x = store[key(c)]["x"]
            out.append({"sampler": sampler, "schedule": kind, "steps": steps, "calls": store[key(c)]["calls"],
                        "noise_draws": store[key(c)]["draws"], "same_as": None if c == job else key(c),
                        "reference": key(ref), "rel_error": None if r is None else rel(x, r["x"]),
                        "norm_ratio": None if r is None else float(x.norm() / r["x"].norm())})
        return out

    ode, sde = key(refs[0]), key(refs[2])
    pairs = {"ode: half vs full": (key(refs[1]), ode), "sde: half vs full": (key(refs[3]), sde),
             "sde: euler_ancestral vs dpmpp_2m_sde": (key(refs[4]), sde), "sde ref vs ode ref": (sde, ode)}
    pairs.update({f"lcm: {a} vs {b} steps": (key(("lcm", "default", a)), key(("lcm", "default", b)))
                  for a, b in zip(counts, counts[1:])})

    def checks():
        out = {name: rel(store[a]["x"], store[b]["x"]) for name, (a, b) in pairs.items() if a in store and b in store}
        out.update({f"rms of {k}": float(store[k]["x"].pow(2).mean().sqrt()) for k in (ode, sde) if k in store})
        return out

    def save():
        if lat_path:
            with atomic_write(lat_path) as tmp:
                torch.save(store, tmp)
        if out_path:
            doc = dict(meta, calls_done=batcher.rows, batches=batcher.calls, seconds=time.perf_counter() - t_start,
                       checks=checks(), rows=rows())
            with atomic_write(out_path) as tmp:
                tmp.write_text(dump(doc))

    queue = list(todo)

    def worker():
        try:
            while True:
                with lock:
                    if not queue or args.deadline and time.perf_counter() - t_start > 60 * args.deadline:
                        return
                    job = queue.pop(0)
                t0 = time.perf_counter()
                try:
                    x, calls, draws, _ = run_one(job, batcher, start, schedule, brownian)
                except Exception as e:  # keep the others going; the run stays missing
                    print(f"{key(job)} failed: {e!r}", flush=True)
                    continue
                with lock:
                    store[key(job)] = {"x": x, "calls": calls, "draws": draws}
                    save()
                    print(f"{key(job):40s} {calls:5d} calls {draws:5d} draws  {time.perf_counter() - t0:7.1f} s  "
                          f"[{len(store)} done, {batcher.rows} calls in {batcher.calls} batches, "
                          f"{(time.perf_counter() - t_start) / 60:.1f} min]", flush=True)
        finally:
            with batcher.cv:
                batcher.live -= 1
                batcher.cv.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(args.workers, len(todo)))]
    batcher.live = len(threads)
    for t in threads:
        t.start()
    batcher.serve()
    with lock:
        save()
    for name, v in checks().items():
        print(f"{name}: {v:.2e}")
    report(rows(), counts, sched_counts, args.schedules.split(","), samplers)
    return 0


def dump(doc: dict) -> str:
    """JSON with one row a line and 4 significant digits in the rows."""
    def row(r):
        return json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()})
    head = json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1)
    return head[:-2] + ',\n "rows": [\n  ' + ",\n  ".join(map(row, doc["rows"])) + "\n ]\n}\n"


def compact(v) -> str:
    """3.1e-2, 1.2, 3.9e2: two digits, exponent without padding."""
    if v is None:
        return "-"
    m, e = f"{v:.1e}".split("e")
    return m if int(e) == 0 else f"{m}e{int(e)}"


def report(rows, counts, sched_counts, schedules, samplers):
    """Markdown tables: samplers by step count on the default schedule, and by schedule at each schedule count."""
    cell = {(r["sampler"], r["schedule"], r["steps"]): r for r in rows}
    names = {"dpmpp_2m": "ODE", "dpmpp_2m_sde": "SDE"}

    def get(s, k, n):
        r = cell.get((s, k, n))
        return None if r is None else r["rel_error"]

    print("\n| sampler | reference | " + " | ".join(f"{n} steps" for n in counts) + " | model calls |")
    print("|---|---|" + "---|" * len(counts) + "---|")
    for s in samplers:
        got = [cell.get((s, "default", n)) for n in counts]
        refs = dict.fromkeys(names.get(r["reference"].split("|")[0], "own " + r["reference"].split("|")[2])
                             for r in got if r)
        calls = "/".join(str(r["calls"]) if r else "-" for r in got)
        print(f"| {s} | {', '.join(refs)} | " + " | ".join(compact(get(s, "default", n)) for n in counts)
              + f" | {calls} |")
    kinds = ["default"] + [k for k in schedules if k != "default"]
    for n in sched_counts:
        print(f"\n| {n} steps | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for s in samplers:
            print(f"| {s} | " + " | ".join(compact(get(s, k, n)) for k in kinds) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
