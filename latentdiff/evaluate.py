"""`python -m latentdiff.evaluate`: how well a model draws the images its captions name.

- Prompt fidelity: for each reference image (e.g. every emoji) generate from its caption and find the nearest
  reference images; top-1 / top-5 accuracy of hitting the one the caption names.
- Fidelity, stricter than top-1 in 16x16: each generation's PSNR at 64x64 against the image its caption names,
  reported as the median and the share above PSNR_THRESHOLD_DB.
- A Frechet distance between generated and reference images, and the VAE's reconstruction PSNR.
- Wall time of `python -m latentdiff.generate "a cat"` (with start-up), and images/s for a batch.

Feature space: reference images are drawn centred at one scale on a white background, so their downsampled
pixels identify them; a pixel space also keeps the metric independent of the model under test (its own VAE
latents would grade it by its own ruler). Nearest neighbours use 16x16 RGB; the Frechet distance uses 8x8 RGB
(192 dimensions, so ~1,400 samples estimate the covariance well). It is not an FID: no Inception network.
"""
from __future__ import annotations

import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from latentdiff.io.checkpoint import BUNDLED, CheckpointError
from latentdiff.io.config import ConfigError
from latentdiff.io.files import atomic_write
from latentdiff.cli import ArgumentParser, UsageError, check_sampler_and_guidance

# Calibrated by eye on 60 emoji drawn by a 98.5%-top-1 model and a 41.7% one: above 15 dB a generation is, in most
# cases, a drawing a person names as the emoji (59 of the good model's 60; about half of the weak model's 16 above
# it, the rest mostly-white images that score on their background); below it the weak model's are blobs in the
# right colours (its median is 13.2 dB, the good model's 18.6 dB).
PSNR_THRESHOLD_DB = 15.0


def reference_shards(data: str) -> list[str] | None:
    """--data: None for an emoji-style folder (index.jsonl), else the shards to read captions and images from (a
    folder of make-shards output, or the --data.shards value make-shards printed)."""
    if (Path(data) / "index.jsonl").is_file():
        return None
    from latentdiff.data.loader import DataError, expand_shards
    hint = (f"--data {data}: give a folder with index.jsonl (python -m latentdiff.data emoji --out DIR) or the "
            f"shards python -m latentdiff.data make-shards wrote (the folder, or the --data.shards= value it printed)")
    if not Path(data).exists() and not any(c in data for c in "{*?:"):
        raise UsageError(f"{hint}; {data} does not exist")
    try:
        found = [p for p in expand_shards(data) if "://" not in p]
    except DataError as e:
        raise UsageError(f"{hint}; {e}") from None
    if not found:
        raise UsageError(f"{hint}; {data} holds no .tar shards")
    return found


def load_reference(data_dir: str | Path, resolution: int | None = None, limit: int | None = None,
                   shards: list[str] | None = None):
    """(names, prompts, images) from an emoji-style folder: index.jsonl + the shards it names (or those of them
    whose file names are in `shards`: a model trained on part of the set is graded on that part); or from
    make-shards output, each sample's caption naming its image.

    images: uint8 (N, 3, R, R); prompts: the first caption template of each (e.g. "a cat").
    """
    found = reference_shards(str(data_dir))
    if found is not None:
        return load_captioned_shards(found, resolution, limit, shards)
    data_dir = Path(data_dir)
    index = data_dir / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    if shards is not None:
        keep = {Path(p).name for p in shards}
        rows = [r for r in rows if Path(r["shard"]).name in keep]
        if not rows:
            raise UsageError(f"no reference in {index} comes from the shards given")
    if limit:
        step = max(1, len(rows) // limit)  # spread over the whole set rather than its first block
        rows = rows[::step][:limit]
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    found: dict[str, tuple[Image.Image, list[str]]] = {}
    for shard, items in by_shard.items():
        with tarfile.open(data_dir / shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for r in items:
                img_name = next(n for n in (f"{r['key']}.png", f"{r['key']}.jpg") if n in members)
                image = Image.open(io.BytesIO(tar.extractfile(members[img_name]).read())).convert("RGB")
                meta = json.loads(tar.extractfile(members[f"{r['key']}.json"]).read())
                found[r["key"]] = (image, meta.get("captions") or [r["name"]])
    names, prompts, images = [], [], []
    for r in rows:
        image, captions = found[r["key"]]
        if resolution and image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.LANCZOS)
        names.append(r["name"])
        prompts.append(captions[0])
        images.append(image)
    return names, prompts, uint8_batch(images)


def load_captioned_shards(paths: list[str], resolution: int | None, limit: int | None,
                          shards: list[str] | None):
    """(names, prompts, images) from image shards with captions (make-shards output): every sample with an image
    and a caption, the image resized and center-cropped to `resolution` as the trainer sees it."""
    from latentdiff.io.images import load_image
    if shards is not None:
        keep = {Path(p).name for p in shards}
        paths = [p for p in paths if Path(p).name in keep]
    rows = []
    for path in paths:
        with tarfile.open(path) as tar:
            files: dict[str, dict[str, bytes]] = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if m.isfile():
                    files.setdefault(key, {})[ext.lower()] = tar.extractfile(m).read()
        for key, f in files.items():
            data = next((f[e] for e in ("png", "jpg", "jpeg", "webp") if e in f), None)
            caption = f["txt"].decode("utf-8", "replace").strip() if "txt" in f else \
                (json.loads(f["json"]).get("captions") or [""])[0] if "json" in f else ""
            if data is not None and caption:
                rows.append((caption, data))
    if limit:
        rows = rows[::max(1, len(rows) // limit)][:limit]
    captions, images = [], []
    for caption, data in rows:
        try:  # the size the trainer crops to: the model's, else the image's own short side
            image = load_image(data, resolution or min(Image.open(io.BytesIO(data)).size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # an undecodable sample, as the loader skips it
        captions.append(caption)
        images.append(image)
    if not images:
        raise UsageError("no captioned images in the shards given (make them with python -m latentdiff.data "
                         "make-shards)" if shards is None else "no reference comes from the shards given")
    return captions, captions, uint8_batch(images)


def uint8_batch(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> uint8 (N, 3, H, W)."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


def features(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0,1] (N, 3, H, W) -> (N, 3*size*size) float64 area-averaged pixels in [0, 1]."""
    x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
    return F.adaptive_avg_pool2d(x, size).flatten(1)


def nearest_hits(gen_feats: torch.Tensor, ref_feats: torch.Tensor, k: int = 5) -> tuple[float, float, torch.Tensor]:
    """Generated row i should be nearest to reference row i: (top-1, top-k accuracy, the k nearest per row)."""
    d = torch.cdist(gen_feats, ref_feats)  # (N, M) Euclidean
    nearest = d.topk(k, largest=False).indices
    target = torch.arange(len(gen_feats)).unsqueeze(1)
    top1 = (nearest[:, :1] == target).any(1).double().mean().item()
    topk = (nearest == target).any(1).double().mean().item()
    return top1, topk, nearest


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix.
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root_a @ s_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt)


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 64, device="cpu", dtype=torch.float32) -> float:
    """Mean PSNR (dB, peak 1 on [0,1] pixels) of decode(encode(x)) with the posterior mode."""
    psnrs = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, dtype) / 127.5 - 1
        y = vae.decode(vae.encode(x)).float().clamp(-1, 1)
        psnrs += psnr_db((y - x.float()) / 2).tolist()
    return statistics.fmean(psnrs)


def psnr_db(err: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of per-image errors given in [0, 1] pixel units (peak 1); MSE floored at 1e-10."""
    mse = err.square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def generate_all(pipe, prompts: list[str], *, steps, sampler, guidance, seed=0, batch_size=32) -> torch.Tensor:
    """uint8 (N, 3, H, W): one image per prompt, prompt i with seed + i."""
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        res = pipe(prompts[i:i + batch_size], steps=steps, sampler=sampler, guidance=guidance, seed=seed + i,
                   progress=False)
        out += res.images
    return uint8_batch(out)


@torch.no_grad()
def denoise_from(pipe, prompts: list[str], images: torch.Tensor, t: int, steps: int | None, *, sampler, guidance,
                 seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Noise each reference image's latent to timestep t and bring it back: uint8 (N, 3, H, W).

    steps None: one step, the model's own x0 estimate at t. Otherwise the sampler runs `steps` steps on Karras
    sigmas from sigma_t down to the schedule's smallest sigma. Same latents and noise in both cases.
    """
    from latentdiff.diffusion import ops
    from latentdiff.io.images import to_pil
    from latentdiff.diffusion.samplers import NoiseSampler, get_sampler, sample_euler
    from latentdiff.diffusion.schedule import karras_sigmas

    s = pipe.schedule
    sigma_t = float(s.sigmas[t])
    spec = get_sampler(sampler)
    sqrt_ab, sqrt_1m_ab = s.tables(pipe.device)
    out = []
    for i in range(0, len(prompts), batch_size):
        x = images[i:i + batch_size].to(pipe.device, pipe.dtype) / 127.5 - 1
        x0 = pipe.vae.encode(x).float()
        gens = [torch.Generator(pipe.device).manual_seed(seed + i + j) for j in range(len(x0))]
        noise = NoiseSampler(gens)
        ts = torch.full((len(x0),), t, device=pipe.device, dtype=torch.int64)
        x_t = ops.q_sample(x0, noise(x0), ts, sqrt_ab, sqrt_1m_ab) * math.sqrt(1.0 + sigma_t ** 2)  # sigma space
        chunk = prompts[i:i + batch_size]
        den = pipe.denoiser(chunk, [""] * len(chunk), guidance)
        if steps is None:  # an Euler step from sigma_t to 0 lands on D(x_t, sigma_t): the x0 estimate
            sigmas, fn = torch.tensor([sigma_t, 0.0], dtype=torch.float64), sample_euler
        else:
            sig = karras_sigmas(steps, float(s.sigmas[0]), sigma_t)
            sigmas, fn = torch.cat([sig, sig.new_zeros(1)]), spec.fn
        x0_hat = fn(den, x_t, sigmas, noise=noise, disable=True)
        out += to_pil(pipe.decode(x0_hat))
    return uint8_batch(out)


def fidelity_psnr(generated: torch.Tensor, reference: torch.Tensor, size: int = 64) -> torch.Tensor:
    """(N,) PSNR (dB) of generation i against reference i (the image its caption names), both at size x size."""
    def at(x):
        x = x.double() / 255
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x
    return psnr_db(at(generated) - at(reference))


def psnr_summary(psnrs: torch.Tensor, threshold: float) -> dict:
    """Median PSNR and the share of generations above the threshold."""
    return {"median_db": statistics.median(psnrs.tolist()), "threshold_db": threshold,
            "share_above": float((psnrs > threshold).double().mean())}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) between two uint8 batches."""
    return float(psnr_db((a.double() - b.double()) / 255).mean())


def command_seconds(checkpoint: str | None, runs: int = 5, prompt: str = "a cat") -> list[float]:
    """Wall time of the real command, start-up included (a fresh interpreter each run)."""
    cmd = [sys.executable, "-m", "latentdiff.generate", prompt, "--seed", "0", "-o", "/tmp/latentdiff-speed.png"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def side_by_side(generated: torch.Tensor, reference: torch.Tensor, nearest: torch.Tensor, n: int = 32) -> Image.Image:
    """Rows of (target reference, generated, its 3 nearest references): a picture of what the numbers mean."""
    idx = torch.linspace(0, len(generated) - 1, min(n, len(generated))).round().long()
    tiles = []
    for i in idx:
        row = [reference[i], generated[i]] + [reference[j] for j in nearest[i, :3]]
        tiles.append(torch.cat(row, dim=2))
    sheet = torch.cat(tiles, dim=1).permute(1, 2, 0).numpy()
    return Image.fromarray(sheet)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m latentdiff.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="model to evaluate (default: the bundled emoji model)")
    p.add_argument("--data", required=True,
                   help="references: a folder with index.jsonl (python -m latentdiff.data emoji), or captioned image "
                        "shards from make-shards (their folder, or the --data.shards= value it printed)")
    p.add_argument("--shards", help="only the references from these shards of --data (brace pattern, e.g. "
                                    "'emoji-{000000..000002}.tar'): for a model trained on them")
    p.add_argument("--limit", type=int, help="evaluate on this many references, spread over the set")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", help="sampler (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--speed", action="store_true", help="also time the generate command (5 runs) and a batch")
    p.add_argument("--out", help="write the numbers as JSON here")
    p.add_argument("--sheet", help="write a PNG of references, generations and their nearest neighbours here")
    p.add_argument("--psnr-threshold", type=float, default=PSNR_THRESHOLD_DB,
                   help=f"fidelity: the share of generations above this PSNR (dB, 64x64) is reported "
                        f"(default {PSNR_THRESHOLD_DB:g})")
    p.add_argument("--denoise-from", metavar="T,T,...",
                   help="also noise each reference to these timesteps and denoise it in one step (the model's x0 "
                        "estimate) and iteratively (the sampler with --steps); PSNR to the reference and top-1")
    args = p.parse_args(argv)
    try:
        return run(args)
    except (UsageError, CheckpointError, ConfigError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    """The evaluation of main's arguments: every argument is checked before the model is loaded."""
    from latentdiff.pipeline import Pipeline
    timesteps = []
    if args.denoise_from:
        try:
            timesteps = [int(v) for v in args.denoise_from.split(",")]
        except ValueError:
            raise UsageError(f"--denoise-from takes timesteps like 200,500 (got {args.denoise_from!r})") from None
    for name, value, low in (("--limit", args.limit, 5), ("--batch-size", args.batch_size, 1),
                             ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be at least {low} (got {value})"
                             + ("; top-5 needs 5 references" if name == "--limit" else ""))
    check_sampler_and_guidance(args.sampler, args.guidance)
    for name, path in (("--out", args.out), ("--sheet", args.sheet)):
        if path and not (Path(path).parent.is_dir() and os.access(Path(path).parent, os.W_OK)):
            raise UsageError(f"{name} {path}: its folder does not exist or is not writable")
    reference_shards(args.data)
    checkpoint = args.checkpoint or str(BUNDLED)
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} not found" if args.checkpoint else
                         "no bundled model in this installation; pass --checkpoint FILE")
    pipe = Pipeline.from_checkpoint(checkpoint, device=args.device)
    for t in timesteps:
        if not 1 <= t < pipe.schedule.num_timesteps:
            raise UsageError(f"--denoise-from {t} is outside 1..{pipe.schedule.num_timesteps - 1}")
    d = pipe.config.sampling
    steps, sampler = args.steps or d.steps, args.sampler or d.sampler
    guidance = d.guidance if args.guidance is None else args.guidance
    shards = None
    if args.shards:
        import braceexpand
        shards = list(braceexpand.braceexpand(args.shards))
    names, prompts, ref = load_reference(args.data, pipe.config.image_size, args.limit, shards)
    gen = generate_all(pipe, prompts, steps=steps, sampler=sampler, guidance=guidance, seed=args.seed,
                       batch_size=args.batch_size)
    top1, top5, nearest = nearest_hits(features(gen, 16), features(ref, 16))
    report = {"checkpoint": checkpoint, "references": len(ref), "steps": steps, "sampler": sampler,
              "guidance": guidance, "top1": top1, "top5": top5,
              "psnr64": psnr_summary(fidelity_psnr(gen, ref), args.psnr_threshold),
              "frechet_pix8": frechet_distance(features(gen, 8), features(ref, 8)),
              "frechet_pix8_floor": None,
              "vae_psnr_db": reconstruction_psnr(pipe.vae, ref, device=pipe.device, dtype=pipe.dtype)}
    # The same distance between two halves of the reference set: what "indistinguishable" scores.
    half = len(ref) // 2
    if half > 10:
        report["frechet_pix8_floor"] = frechet_distance(features(ref[:half], 8), features(ref[half:2 * half], 8))
    if args.speed:
        times = command_seconds(args.checkpoint)
        report["generate_cmd_s_median"] = statistics.median(times)
        report["generate_cmd_s_runs"] = times
        t0 = time.perf_counter()
        pipe(["a cat"] * 16, steps=steps, sampler=sampler, guidance=guidance, seed=0, progress=False)
        report["batch16_images_per_s"] = 16 / (time.perf_counter() - t0)
    if timesteps:
        ref_feats = features(ref, 16)
        for t in timesteps:
            for label, n in (("one_step", None), ("iterative", steps)):
                out = denoise_from(pipe, prompts, ref, t, n, sampler=sampler, guidance=guidance, seed=args.seed,
                                   batch_size=args.batch_size)
                hit, _, _ = nearest_hits(features(out, 16), ref_feats)
                report[f"denoise_t{t}_{label}"] = {"psnr_db": psnr(out, ref), "top1": hit}
    misses = [(names[i], names[int(nearest[i, 0])]) for i in range(len(names)) if int(nearest[i, 0]) != i]
    report["first_misses"] = misses[:20]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with atomic_write(args.out) as tmp:
            tmp.write_text(text)
    if args.sheet:
        with atomic_write(args.sheet) as tmp:
            side_by_side(gen, ref, nearest).save(tmp, format="PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
