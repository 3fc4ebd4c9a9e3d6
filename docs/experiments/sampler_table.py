"""The bundled emoji model's fidelity for every sampler at a few step counts: which sampler to pick.

    python docs/experiments/sampler_table.py --data data/emoji --limit 200 --steps 5,10,20,40 --out table.json

For each sampler (its default schedule, or --schedule for all) and step count: evaluate's top-1 (the generation's
nearest reference at 16x16 pixels is its own emoji) and median PSNR at 64x64 against the named emoji, over the
first --limit emoji evaluate picks (spread over the set), one seed per image (seed + i), and seconds per image.
Prints a Markdown table; --out keeps the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from latentdiff.evaluate import features, fidelity_psnr, generate_all, load_reference, nearest_hits


def main(argv=None) -> int:
    from latentdiff.diffusion.samplers import SAMPLER_NAMES
    from latentdiff.io.checkpoint import BUNDLED
    from latentdiff.io.files import atomic_write
    from latentdiff.pipeline import Pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the emoji set (python -m latentdiff.data emoji --out DIR)")
    p.add_argument("--checkpoint", default=str(BUNDLED))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--steps", default="5,10,20,40", help="comma-separated step counts")
    p.add_argument("--samplers", default=",".join(SAMPLER_NAMES), help="comma-separated sampler names")
    p.add_argument("--schedule", help="a schedule for every sampler (A1111 label or name); default: the name's")
    p.add_argument("--guidance", type=float)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the rows as JSON here (after each row; a rerun keeps the rows it finds)")
    args = p.parse_args(argv)

    pipe = Pipeline.from_checkpoint(args.checkpoint, device=args.device)
    guidance = pipe.config.sampling.guidance if args.guidance is None else args.guidance
    names, prompts, ref = load_reference(args.data, pipe.config.image_size, args.limit)
    ref_feats = features(ref, 16)
    rows = json.loads(Path(args.out).read_text())["rows"] if args.out and Path(args.out).exists() else []

    def save():
        if args.out:
            with atomic_write(args.out) as tmp:
                tmp.write_text(json.dumps({"checkpoint": args.checkpoint, "guidance": guidance,
                                           "references": len(prompts), "rows": rows}, indent=1))

    for sampler in args.samplers.split(","):
        name = f"{sampler} {args.schedule}" if args.schedule else sampler
        for steps in (int(s) for s in args.steps.split(",")):
            if any(r["sampler"] == name and r["steps"] == steps for r in rows):
                continue
            t0 = time.perf_counter()
            gen = generate_all(pipe, prompts, steps=steps, sampler=name, guidance=guidance,
                               batch_size=args.batch_size)
            seconds = (time.perf_counter() - t0) / len(prompts)
            top1, _, _ = nearest_hits(features(gen, 16), ref_feats)
            psnr = statistics.median(fidelity_psnr(gen, ref).tolist())
            rows.append({"sampler": name, "steps": steps, "top1": top1, "psnr64_median_db": psnr,
                         "seconds_per_image": seconds, "images": len(prompts)})
            save()
            print(f"{name:32s} {steps:3d} steps  top-1 {top1:6.1%}  PSNR {psnr:5.2f} dB  {seconds:.3f} s/image",
                  flush=True)
    step_counts = sorted({r["steps"] for r in rows})
    print("\n| sampler | " + " | ".join(f"{s} steps: top-1 / PSNR dB / s per image" for s in step_counts) + " |")
    print("|---|" + "---|" * len(step_counts))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        cells = []
        for s in step_counts:
            r = next(r for r in rows if r["sampler"] == sampler and r["steps"] == s)
            cells.append(f"{r['top1']:.0%} / {r['psnr64_median_db']:.1f} / {r['seconds_per_image']:.2f}")
        print(f"| {sampler} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
