"""`python -m latentdiff.generate "a cat"`: text to image from the command line.

Writes PNGs (parameters in an A1111-style `parameters` text chunk) and prints their paths.
Without --checkpoint it uses the small emoji model that ships with latentdiff.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from PIL import Image

from latentdiff import __version__
from latentdiff.cli import ArgumentParser, UsageError, check_sampler_and_guidance, output_paths, slug
from latentdiff.io.checkpoint import BUNDLED
from latentdiff.io.files import file_hash
from latentdiff.io.images import format_parameters, image_grid, parse_parameters, read_parameters, save_image


def params_from_png(path: str) -> dict:
    """generate's settings from the `parameters` chunk of a PNG made by latentdiff or A1111."""
    try:
        text = read_parameters(path)
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
    from latentdiff.diffusion.samplers import SAMPLER_NAMES
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


def read_prompts(args) -> list[str]:
    if args.from_file:
        try:
            prompts = [ln.strip() for ln in Path(args.from_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise UsageError(f"cannot read prompts file {args.from_file}: {e.strerror}") from None
        if not prompts:
            raise UsageError(f"prompts file {args.from_file} has no prompts")
        return prompts
    if args.prompt is None:
        raise UsageError('give a prompt, e.g. python -m latentdiff.generate "a cat", or --from-file / --from-png')
    return [args.prompt]


def check_args(args, given: set[str]):
    """The checks that need no model, as one-line usage errors."""
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


def read_init_image(path: str | None) -> Image.Image | None:
    if not path:
        return None
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --init-image {path}: {e}") from None
    return image


def checkpoint_path(checkpoint: str | None) -> str:
    """--checkpoint, or the bundled model."""
    if checkpoint is None:
        if not BUNDLED.exists():
            raise UsageError(f"the bundled emoji model {BUNDLED} is missing from this install: reinstall latentdiff "
                             "(pip install --no-build-isolation .), or pass --checkpoint FILE (an SD 1.x / 2.x / XL "
                             "or latentdiff checkpoint)")
        checkpoint = str(BUNDLED)
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} not found; pass an existing .safetensors or .ckpt file")
    return checkpoint


def load_pipeline(args, checkpoint: str):
    from latentdiff.io.checkpoint import CheckpointError
    from latentdiff.io.config import ConfigError, load_model_config
    from latentdiff.pipeline import Pipeline
    try:
        config = load_model_config(args.config) if args.config else None
        return Pipeline.from_checkpoint(checkpoint, device=args.device, dtype=args.dtype, config=config,
                                        prediction=args.prediction, ema=args.ema, compile=args.compile,
                                        cuda_graphs=not args.no_cuda_graphs)
    except (CheckpointError, ConfigError, ValueError) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:
        if "device" in str(e).lower() or "cuda" in str(e).lower():
            raise UsageError(f"device {args.device!r} is not usable here: {str(e).splitlines()[0]}") from None
        raise


def settings_for(pipe, args, init_image, seed: int, count: int) -> dict:
    """steps, sampler, guidance, height and width: the command line's, else the model's; checked against the model."""
    defaults = pipe.config.sampling
    settings = dict(steps=args.steps or defaults.steps, sampler=args.sampler or defaults.sampler,
                    guidance=defaults.guidance if args.guidance is None else args.guidance,
                    height=args.height or pipe.config.image_size, width=args.width or pipe.config.image_size)
    try:
        pipe.check(steps=settings["steps"], height=settings["height"], width=settings["width"],
                   guidance=settings["guidance"], strength=args.strength if init_image else None,
                   seed=seed, count=count)
    except ValueError as e:
        raise UsageError(str(e)) from None
    layers = pipe.config.text.layers
    if args.clip_skip is not None and not 1 <= args.clip_skip <= layers:
        raise UsageError(f"--clip-skip must be between 1 (the last layer) and {layers} for this model's text "
                         f"encoder (got {args.clip_skip})")
    return settings


def run(args, given: set[str] = frozenset()) -> list[Path]:
    """Generate and save; `given` names the options the user typed (they override --from-png)."""
    # --from-png supplies the settings; options given on the command line still win.
    if args.from_png:
        for key, value in params_from_png(args.from_png).items():
            if key not in given and hasattr(args, key):
                setattr(args, key, value)
    prompts = read_prompts(args)
    check_args(args, given)
    init_image = read_init_image(args.init_image)
    checkpoint = checkpoint_path(args.checkpoint)
    seed = args.seed if args.seed is not None else random.randrange(2**31 - 2**20)
    n_total = len(prompts) * args.num_images
    names = [f"{slug(prompts[k // args.num_images])}-{seed + k}" for k in range(n_total)]
    paths = output_paths(args.output, names)
    pipe = load_pipeline(args, checkpoint)
    settings = settings_for(pipe, args, init_image, seed, n_total)
    if args.seed is None:
        print(f"seed: {seed}", file=sys.stderr)
    result = pipe(prompts, args.negative, num_images=args.num_images, seed=seed, init_image=init_image,
                  strength=args.strength, clip_skip=args.clip_skip, guidance_rescale=args.guidance_rescale,
                  trajectory=args.trajectory, backend=args.backend, **settings)
    params = dict(negative=args.negative, model=Path(checkpoint).stem, model_hash=file_hash(checkpoint),
                  strength=args.strength if init_image else None, clip_skip=args.clip_skip,
                  guidance_rescale=args.guidance_rescale, prediction=args.prediction, **settings)
    written = [] if args.grid_only else save_images(result, paths, params, args.trajectory)
    if args.grid_only or (args.grid and len(result.images) > 1):
        grid_path = paths[0].with_name(f"grid-{slug(prompts[0])}-{seed}.png")
        if args.grid_only and args.output and args.output.lower().endswith(".png"):
            grid_path = Path(args.output)
        cols = args.grid_cols or (args.num_images if len(prompts) > 1 else None)
        save_image(image_grid(result.images, cols=cols), grid_path,
                   f"grid of {len(result.images)} images, seeds {seed}..{seed + n_total - 1}")
        written.append(grid_path)
    return written


def save_images(result, paths: list[Path], params: dict, trajectory: bool) -> list[Path]:
    """Each image with its `parameters` chunk (and its predicted-x0 strip and GIF with --trajectory)."""
    for k, (path, image, prompt, seed) in enumerate(zip(paths, result.images, result.prompts, result.seeds)):
        save_image(image, path, format_parameters(dict(params, prompt=prompt, seed=seed)))
        if trajectory:
            frames = result.trajectory[k]
            save_image(image_grid(frames, cols=len(frames)), path.with_name(path.stem + "-trajectory.png"))
            save_image(frames, path.with_name(path.stem + "-trajectory.gif"))
    return paths[:len(result.images)]


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
