"""`python -m latentdiff.generate "a cat"`: text to image from the command line.

Writes PNGs (parameters in an A1111-style `parameters` text chunk) and prints their paths.
Without --checkpoint it uses the small emoji model that ships with latentdiff.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import __version__
from .files import atomic_write

BUNDLED = Path(__file__).resolve().parent / "weights" / "emoji.safetensors"


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block above them), exit code 2; every command uses it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------
# Files: names, hashes, atomic writes, PNG metadata


def slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "image"


def file_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    return file_sha256(path)[:10]


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 in hex, cached by path, size and mtime (checkpoints are gigabytes)."""
    path = Path(path).resolve()
    st = path.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentdiff" / "sha256.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        try:
            with atomic_write(cache_file) as tmp:
                tmp.write_text(json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs a re-hash next time
    return cache[key]


def save_image(image: Image.Image | list[Image.Image], path: Path, parameters: str | None = None) -> None:
    """Write a PNG (or a GIF for a list of frames) atomically: a crash never leaves half a file."""
    with atomic_write(path) as tmp:
        if isinstance(image, list):  # animation frames
            image[0].save(tmp, format="GIF", save_all=True, append_images=image[1:], duration=120, loop=0)
        else:
            info = PngImagePlugin.PngInfo()
            if parameters:
                info.add_text("parameters", parameters)
            image.save(tmp, format="PNG", pnginfo=info)


def format_parameters(p: dict) -> str:
    """The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value, ...`."""
    lines = [p["prompt"]]
    if p.get("negative"):
        lines.append(f"Negative prompt: {p['negative']}")
    fields = [("Steps", p["steps"]), ("Sampler", p["sampler"]), ("CFG scale", p["guidance"]),
              ("Seed", p["seed"]), ("Size", f"{p['width']}x{p['height']}"),
              ("Model hash", p.get("model_hash")), ("Model", p.get("model")),
              ("Denoising strength", p.get("strength")), ("Clip skip", p.get("clip_skip")),
              ("Guidance rescale", p.get("guidance_rescale") or None), ("Prediction", p.get("prediction")),
              ("Version", f"latentdiff {__version__}")]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Inverse of format_parameters (also reads A1111's own files for the keys we know)."""
    lines = text.strip().split("\n")
    settings = lines[-1] if re.match(r"^\s*Steps:\s", lines[-1]) else ""
    body = lines[:-1] if settings else lines
    prompt, negative, neg_started = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            neg_started = True
            line = line[len("Negative prompt:"):].strip()
        (negative if neg_started else prompt).append(line)
    out = {"prompt": "\n".join(prompt), "negative": "\n".join(negative)}
    # values may be quoted and contain commas: "Key: "a, b", Key2: v"
    for key, value in re.findall(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', settings):
        value = value.strip().strip('"')
        out[key.strip()] = value
    return out


def params_from_png(path: str) -> dict:
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not text:
        raise UsageError(f"{path} has no 'parameters' text chunk to regenerate from")
    raw = parse_parameters(text)
    out = {"prompt": raw["prompt"], "negative": raw["negative"]}
    conv = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("guidance", float),
            "Seed": ("seed", int), "Clip skip": ("clip_skip", int), "Denoising strength": ("strength", float),
            "Guidance rescale": ("guidance_rescale", float), "Prediction": ("prediction", str),
            "Model hash": ("model_hash", str), "Model": ("model", str)}
    for key, (name, typ) in conv.items():
        if key in raw:
            try:
                out[name] = typ(raw[key])
            except ValueError:
                raise UsageError(f"{path}: bad {key!r} value {raw[key]!r} in its parameters") from None
    if "Size" in raw:
        size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", raw["Size"])
        if size is None:
            raise UsageError(f"{path}: bad 'Size' value {raw['Size']!r} in its parameters (expected WIDTHxHEIGHT)")
        out["width"], out["height"] = int(size[1]), int(size[2])
    return out


# ----------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLER_NAMES
    p = ArgumentParser(
        prog="python -m latentdiff.generate",
        description="Generate images from text. Prompts longer than CLIP's 77-token window are encoded in "
                    "75-token chunks and concatenated (as A1111 does), not cut.",
        epilog="Without --checkpoint the bundled emoji model is used. SD 1.x / 2.x / SDXL single-file checkpoints "
               "(.safetensors, or .ckpt read with torch.load(weights_only=True)) work with --checkpoint; "
               "SD 2.x 768-v files need --prediction v_prediction.")
    p.add_argument("prompt", nargs="?", help="the text prompt")
    p.add_argument("-o", "--output", help="a .png file, or a directory (default: outputs/)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt; image i uses seed + i")
    p.add_argument("--seed", type=int, help="random seed (random when not given, and then printed)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLER_NAMES)}; A1111 / diffusers / k-diffusion names "
                                     "like 'DPM++ 2M Karras' are accepted (default: the model's)")
    p.add_argument("--guidance", "--cfg-scale", type=float, dest="guidance", help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2023)")
    p.add_argument("--negative", "--negative-prompt", default="", dest="negative", help="negative prompt")
    p.add_argument("-W", "--width", type=int, help="width in pixels (default: the model's size)")
    p.add_argument("-H", "--height", type=int, help="height in pixels (default: the model's size)")
    p.add_argument("--checkpoint", help="a .safetensors / .ckpt file (SD 1.x, SD 2.x, SDXL base or latentdiff)")
    p.add_argument("--config", help="a model config YAML to use instead of the one the checkpoint implies")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction", "sample"],
                   help="the model's prediction type (SD 2.x 768-v: v_prediction)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights stored in the checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--backend", choices=["fused", "torch"], help="diffusion kernels (default: fused when built)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch the U-Net's kernels one by one instead of replaying a CUDA graph")
    p.add_argument("--from-file", help="a text file with one prompt per line")
    p.add_argument("--from-png", help="regenerate from the parameters stored in a PNG made by latentdiff or A1111")
    p.add_argument("--grid", action="store_true", help="also write one grid image of all outputs")
    p.add_argument("--grid-only", action="store_true",
                   help="write only the grid (a row per prompt), to -o when it is a .png path")
    p.add_argument("--grid-cols", type=int, help="images per grid row (default: -n with several prompts, else square)")
    p.add_argument("--trajectory", action="store_true",
                   help="also write the predicted x0 at every step, as a strip PNG and a GIF, per image")
    p.add_argument("--clip-skip", type=int, help="use the output of this many layers from the end (1 = last)")
    p.add_argument("--init-image", help="image-to-image: start from this picture")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change the picture (0..1]")
    p.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    return p


def check_sampler_and_guidance(sampler: str | None, guidance: float | None):
    """--sampler and --guidance of generate and evaluate (None: the model's), as one-line usage errors."""
    from .samplers import get_sampler
    if sampler is not None:
        try:
            get_sampler(sampler)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if guidance is not None and not math.isfinite(guidance):
        raise UsageError(f"--guidance must be a finite number (got {guidance})")


def output_paths(output: str | None, names: list[str]) -> list[Path]:
    """One path per image: -o x.png (x-0.png, x-1.png ... for several), -o DIR, or outputs/ named by prompt and seed."""
    if output and output.lower().endswith(".png"):
        base = Path(output)
        folder = base.parent
        paths = [base] if len(names) == 1 else [folder / f"{base.stem}-{i}.png" for i in range(len(names))]
    else:
        folder = Path(output or "outputs")
        paths = []
        for name in names:
            path, k = folder / f"{name}.png", 1
            while path.exists() or path in paths:
                path, k = folder / f"{name}-{k}.png", k + 1
            paths.append(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".latentdiff-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write to output folder {folder}: {e.strerror or e}; choose another with -o") from None
    return paths


def run(args, given: set[str] = frozenset()) -> list[Path]:
    """Generate and save; `given` names the options the user typed (they override --from-png)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError, load_model_config
    from .pipeline import Pipeline, image_grid

    # --from-png supplies the settings; options given on the command line still win.
    if args.from_png:
        for key, value in params_from_png(args.from_png).items():
            if key not in given and hasattr(args, key):
                setattr(args, key, value)
    prompts = []
    if args.from_file:
        try:
            prompts = [ln.strip() for ln in Path(args.from_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise UsageError(f"cannot read prompts file {args.from_file}: {e.strerror}") from None
        if not prompts:
            raise UsageError(f"prompts file {args.from_file} has no prompts")
    elif args.prompt is not None:
        prompts = [args.prompt]
    if not prompts:
        raise UsageError('give a prompt, e.g. python -m latentdiff.generate "a cat", or --from-file / --from-png')
    if args.grid_cols is not None and args.grid_cols < 1:
        raise UsageError(f"--grid-cols must be at least 1 (got {args.grid_cols})")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1 (got {args.num_images})")
    check_sampler_and_guidance(args.sampler, args.guidance)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {args.steps})")
    for name, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and value < 1:  # 0 would silently mean the model's size
            raise UsageError(f"{name} must be a positive number of pixels (got {value})")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UsageError(f"--guidance-rescale must be in [0, 1] (got {args.guidance_rescale})")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UsageError(f"--clip-skip must be at least 1, the last layer (got {args.clip_skip})")
    if "strength" in given and not args.init_image:
        raise UsageError("--strength only applies to image-to-image: add --init-image FILE, or drop --strength")
    init_image = None
    if args.init_image:
        try:
            init_image = Image.open(args.init_image)
            init_image.load()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --init-image {args.init_image}: {e}") from None

    checkpoint = args.checkpoint
    if checkpoint is None:
        if not BUNDLED.exists():
            raise UsageError(f"the bundled emoji model {BUNDLED} is missing from this install: reinstall latentdiff "
                             "(pip install --no-build-isolation .), or pass --checkpoint FILE (an SD 1.x / 2.x / XL "
                             "or latentdiff checkpoint)")
        checkpoint = str(BUNDLED)
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} not found; pass an existing .safetensors or .ckpt file")

    seed = args.seed if args.seed is not None else random.randrange(2**31 - 2**20)
    n_total = len(prompts) * args.num_images
    names = [f"{slug(prompts[k // args.num_images])}-{seed + k}" for k in range(n_total)]
    paths = output_paths(args.output, names)

    try:
        config = load_model_config(args.config) if args.config else None
        pipe = Pipeline.from_checkpoint(checkpoint, device=args.device, dtype=args.dtype, config=config,
                                        prediction=args.prediction, ema=args.ema, compile=args.compile,
                                        cuda_graphs=not args.no_cuda_graphs)
    except (CheckpointError, ConfigError, ValueError) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:
        if "device" in str(e).lower() or "cuda" in str(e).lower():
            raise UsageError(f"device {args.device!r} is not usable here: {str(e).splitlines()[0]}") from None
        raise

    defaults = pipe.config.sampling
    settings = dict(steps=args.steps or defaults.steps, sampler=args.sampler or defaults.sampler,
                    guidance=defaults.guidance if args.guidance is None else args.guidance,
                    height=args.height or pipe.config.image_size, width=args.width or pipe.config.image_size)
    try:
        pipe.check(steps=settings["steps"], height=settings["height"], width=settings["width"],
                   guidance=settings["guidance"], strength=args.strength if init_image else None,
                   seed=seed, count=n_total)
    except ValueError as e:
        raise UsageError(str(e)) from None
    layers = pipe.config.text.layers
    if args.clip_skip is not None and not 1 <= args.clip_skip <= layers:
        raise UsageError(f"--clip-skip must be between 1 (the last layer) and {layers} for this model's text "
                         f"encoder (got {args.clip_skip})")

    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    result = pipe(prompts, args.negative, num_images=args.num_images, seed=seed, init_image=init_image,
                  strength=args.strength, clip_skip=args.clip_skip, guidance_rescale=args.guidance_rescale,
                  trajectory=args.trajectory, backend=args.backend, **settings)

    model_hash = file_hash(checkpoint)
    model_name = Path(checkpoint).stem
    written = []
    for path, image, prompt, s, k in zip(paths, result.images, result.prompts, result.seeds, range(n_total)):
        if args.grid_only:
            break
        params = dict(prompt=prompt, negative=args.negative, seed=s, model=model_name, model_hash=model_hash,
                      strength=args.strength if init_image else None, clip_skip=args.clip_skip,
                      guidance_rescale=args.guidance_rescale, prediction=args.prediction, **settings)
        save_image(image, path, format_parameters(params))
        written.append(path)
        if args.trajectory:
            frames = result.trajectory[k]
            save_image(image_grid(frames, cols=len(frames)), path.with_name(path.stem + "-trajectory.png"))
            save_image(frames, path.with_name(path.stem + "-trajectory.gif"))
    if args.grid_only or (args.grid and len(result.images) > 1):
        grid_path = paths[0].with_name(f"grid-{slug(prompts[0])}-{seed}.png")
        if args.grid_only and args.output and args.output.lower().endswith(".png"):
            grid_path = Path(args.output)
        cols = args.grid_cols or (args.num_images if len(prompts) > 1 else None)
        save_image(image_grid(result.images, cols=cols), grid_path,
                   f"grid of {len(result.images)} images, seeds {seed}..{seed + n_total - 1}")
        written.append(grid_path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = build_parser()
    typed.set_defaults(**{a.dest: None for a in typed._actions if a.dest != "help"})
    given = {k for k, v in vars(typed.parse_args(argv)).items() if v is not None}
    try:
        for path in run(args, given):
            print(path)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
