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
from latentdiff.io.images import image_grid, image_hash, parse_parameters, read_parameters, save_image


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
            "Model hash": ("model_hash", str), "Model": ("model", str), "Dtype": ("dtype", str),
            "Init image hash": ("init_image_hash", str), "Lora hashes": ("lora_hashes", str),
            "Prompt syntax": ("no_prompt_syntax", lambda v: v.strip().lower() == "off"), "Noise": ("noise", noise_kind)}
    convert_png_values(raw, conv, out, path)
    if "Size" in raw:
        size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", raw["Size"])
        if size is None:
            raise UsageError(f"{path}: bad 'Size' value {raw['Size']!r} in its parameters (expected WIDTHxHEIGHT)")
        out["width"], out["height"] = int(size[1]), int(size[2])
    return mask_and_hires_from_png(raw, out, path)


def noise_kind(value: str) -> str:
    """--noise's value from a PNG's 'Noise' (written capitalized); a ValueError for one the pipeline does not know."""
    from latentdiff.pipeline import NOISE_KINDS
    kind = value.strip().lower()
    if kind not in NOISE_KINDS:
        raise ValueError(value)
    return kind


# ----------------------------------------------------------------------------------------------
# Inpainting, outpainting and the hires fix

# A1111's infotext keys -> (generate's option, type); "Denoising strength" is the hires pass's when a Hires key is there
PNG_KEYS = {"Masked content": ("inpainting_fill", str), "Masked area padding": ("inpaint_full_res_padding", int),
            "Noise multiplier": ("noise_multiplier", float), "Mask hash": ("mask_hash", str),
            "Outpaint": ("outpaint", str), "Hires upscale": ("hires", float), "Hires resize": ("hires_resize", str),
            "Hires steps": ("hires_steps", int), "Hires upscaler": ("hires_upscaler", str),
            "Hires sampler": ("hires_sampler", str), "Hires prompt": ("hires_prompt", str),
            "Hires negative prompt": ("hires_negative", str)}


def add_mask_and_hires_arguments(p: argparse.ArgumentParser):
    p.add_argument("--mask", help="inpainting: repaint where this picture is white (an RGBA picture: where it is "
                                  "opaque); with --init-image. A mask of another size is resized to the picture's")
    p.add_argument("--mask-blur", default="4", metavar="N|X,Y", help="blur the mask's edge by a Gaussian of N "
                                                                     "pixels (X across, Y down); default 4")
    p.add_argument("--inpainting-fill", default="original", type=str.lower,
                   choices=["fill", "original", "latent noise", "latent nothing"],
                   help="what the masked area starts from: the picture (original, the default), colours from around "
                        "it (fill), noise (latent noise) or zeros (latent nothing)")
    p.add_argument("--inpaint-full-res", action="store_true",
                   help="repaint only a crop around the mask, at --width x --height, and paste it back (A1111's "
                        "'Only masked'): small areas get the model's full resolution")
    p.add_argument("--inpaint-full-res-padding", type=int, default=32, metavar="PX",
                   help="with --inpaint-full-res, pixels of context kept around the mask (default 32)")
    p.add_argument("--invert-mask", action="store_true", help="repaint where the mask is black instead")
    p.add_argument("--noise-multiplier", type=float, default=1.0,
                   help="inpainting: scale the noise added to the start (A1111's initial noise multiplier)")
    p.add_argument("--outpaint", metavar="L,R,T,B", help="with --init-image: extend the canvas by these pixels on "
                                                         "the left, right, top and bottom and paint the new area")
    p.add_argument("--hires", type=float, metavar="SCALE", help="hires fix: a second pass at SCALE x the size")
    p.add_argument("--hires-resize", metavar="WxH", help="hires fix to this size instead of --hires SCALE (0 for "
                                                         "one side keeps the aspect ratio; both crop to theirs)")
    p.add_argument("--hires-steps", type=int, default=0, help="the second pass's steps (default: --steps)")
    p.add_argument("--hires-strength", type=float, default=0.7, help="the second pass's denoising strength")
    p.add_argument("--hires-upscaler", default="Latent", metavar="NAME|FILE",
                   help="Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), Latent "
                        "(nearest), Latent (nearest-exact), Lanczos, Nearest, or an ESRGAN-family .pth/.safetensors")
    p.add_argument("--hires-sampler", help="the second pass's sampler (default: --sampler)")
    p.add_argument("--hires-prompt", help="the second pass's prompt (default: the prompt)")
    p.add_argument("--hires-negative", help="the second pass's negative prompt (default: --negative)")
    p.set_defaults(mask_hash=None)


def convert_png_values(raw: dict, keys: dict, out: dict, path: str):
    """out[name] = typ(raw[key]) for each key present; a value that does not convert is a one-line UsageError."""
    for key, (name, typ) in keys.items():
        if key in raw:
            try:
                out[name] = typ(raw[key])
            except ValueError:
                raise UsageError(f"{path}: bad {key!r} value {raw[key]!r} in its parameters") from None


def mask_and_hires_from_png(raw: dict, out: dict, path: str) -> dict:
    """The inpainting and hires settings of a parsed `parameters` text, added to params_from_png's."""
    convert_png_values(raw, PNG_KEYS, out, path)
    blur = [raw.get(k) for k in ("Mask blur", "Mask blur x", "Mask blur y")]
    if any(blur):
        out["mask_blur"] = blur[0] or f"{blur[1]},{blur[2]}"
    if raw.get("Inpaint area") == "Only masked":
        out["inpaint_full_res"] = True
    if raw.get("Mask mode") == "Inpaint not masked":
        out["invert_mask"] = True
    if any(k in out for k in ("hires", "hires_resize", "hires_upscaler", "hires_steps")):
        out.setdefault("hires", 2.0)  # a resize without a scale: the scale is then not used
        if "strength" in out:
            out["hires_strength"] = out.pop("strength")
    return out


def number_list(text: str, n: int, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, n) or min(values, default=-1) < 0:
        raise UsageError(f"{option} must be {n} whole numbers >= 0 separated by commas (got {text!r})")
    return values * n if len(values) == 1 else values


def mask_and_hires(args, given: set[str], init_image, multiple: int):
    """(mask, InpaintOptions, Hires, outpaint sides) for the pipeline from the command line (the pipeline builds
    --outpaint's canvas and its mask); with a mask or --outpaint and no -W/-H, the size is the picture's (the
    canvas's), rounded down to the model's multiple."""
    from latentdiff.io.masks import InpaintOptions, MaskError, outpaint_size
    from latentdiff.pipeline import Hires
    mask = read_image_option(args.mask, "--mask")
    outpaint, size = None, init_image.size if init_image is not None else None
    if args.outpaint:
        outpaint = tuple(number_list(args.outpaint, 4, "--outpaint"))
        if sum(outpaint) == 0:
            raise UsageError("--outpaint needs at least one side above 0 pixels (L,R,T,B)")
        size = outpaint_size(init_image.size, outpaint, multiple)
    if (mask is not None or outpaint) and not (args.width or args.height):
        args.width, args.height = (max(multiple, v // multiple * multiple) for v in size)
    try:
        blur = number_list(args.mask_blur, 2, "--mask-blur")
        options = InpaintOptions(blur_x=blur[0], blur_y=blur[1], fill=args.inpainting_fill,
                                 full_res=args.inpaint_full_res, padding=args.inpaint_full_res_padding,
                                 invert=args.invert_mask, noise_multiplier=args.noise_multiplier)
    except MaskError as e:
        raise UsageError(str(e)) from None
    hires = None
    if args.hires is not None or args.hires_resize:
        rx, ry = number_list(args.hires_resize, 2, "--hires-resize") if args.hires_resize else (0, 0)
        hires = Hires(scale=2.0 if args.hires is None else args.hires, resize_x=rx, resize_y=ry,
                      steps=args.hires_steps, strength=args.hires_strength, upscaler=hires_upscaler(args),
                      sampler=args.hires_sampler, prompt=args.hires_prompt, negative_prompt=args.hires_negative)
    return mask, options if mask is not None or outpaint else None, hires, outpaint


def hires_upscaler(args):
    """--hires-upscaler: a built-in name, or a network file loaded now (by its stem in the PNG's infotext)."""
    from latentdiff.models.upscalers import BUILT_IN
    name = args.hires_upscaler
    if name in BUILT_IN:
        return name
    if not Path(name).suffix:
        raise UsageError(f"unknown --hires-upscaler {name!r}: choose one of {', '.join(BUILT_IN)}, or pass an "
                         f"upscaler network file (.pth / .safetensors{f' named {name}' if args.from_png else ''})")
    from latentdiff.io.upscalers import UpscalerError, load_upscaler
    try:
        return load_upscaler(name)
    except UpscalerError as e:
        raise UsageError(str(e)) from None


def check_mask_and_hires_args(args, given: set[str]):
    """The checks of the inpainting and hires options that need no model."""
    masked = args.mask or args.outpaint
    if masked and not args.init_image:
        raise UsageError(f"{'--mask' if args.mask else '--outpaint'} needs the picture to paint on: add --init-image "
                         "FILE")
    if args.mask and args.outpaint:
        raise UsageError("--outpaint makes its own mask (the new border): drop --mask, or --outpaint")
    inpaint_only = ["mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "invert_mask",
                    "noise_multiplier"]
    stray = [n for n in inpaint_only if n in given]
    if stray and not masked:
        raise UsageError(f"--{stray[0].replace('_', '-')} only applies to inpainting: add --mask FILE (or --outpaint)")
    hires_only = ["hires_steps", "hires_strength", "hires_upscaler", "hires_sampler", "hires_prompt", "hires_negative"]
    stray = [n for n in hires_only if n in given]
    if stray and args.hires is None and not args.hires_resize:
        raise UsageError(f"--{stray[0].replace('_', '-')} only applies to the hires fix: add --hires SCALE")
    if (args.hires is not None or args.hires_resize) and args.init_image:
        raise UsageError("--hires is a second pass of text-to-image: drop --init-image, or ask for the larger size "
                         "with -W/-H")
    if args.hires_sampler:
        check_sampler_and_guidance(args.hires_sampler, None)


def check_mask_and_hires(pipe, init_image, mask, inpaint, hires, settings):
    """The mask and the hires size against the picture and the model, before anything is generated."""
    from latentdiff.io.masks import InpaintOptions, read_mask
    try:
        if mask is not None:
            read_mask(mask, init_image.size, (inpaint or InpaintOptions()).invert)
        pipe.hires_sizes(hires, settings["width"], settings["height"], init_image, settings["steps"],
                         settings["guidance"], None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_mask(args, mask):
    """--from-png of an inpainting PNG regenerates it only with the mask it was made with."""
    recorded = args.mask_hash
    if args.outpaint or not args.from_png:
        return
    if mask is None and recorded:
        raise UsageError(f"{args.from_png} was made by inpainting: pass its mask with --mask FILE")
    if mask is not None and recorded and image_hash(mask) != recorded:
        raise UsageError(f"--mask {args.mask} is not the mask {args.from_png} was made with (its pixels hash to "
                         f"{image_hash(mask)}, the PNG records {recorded}); pass that mask")


# ----------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    from latentdiff.diffusion.samplers import SAMPLER_NAMES
    from latentdiff.diffusion.schedule import SCHEDULES
    from latentdiff.pipeline import NOISE_KINDS
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
    p.add_argument("--seed", type=int, help="random seed; without it, or -1 (A1111's convention), a random one is "
                                            "drawn, printed and recorded in the PNG")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLER_NAMES)}; A1111 / ComfyUI / diffusers / k-diffusion "
                                     "names are accepted, optionally followed by a schedule as A1111 writes it: "
                                     f"'DPM++ 2M Karras', 'Euler SGM Uniform' (schedules: {', '.join(SCHEDULES)}) "
                                     "(default: the model's)")
    p.add_argument("--guidance", "--cfg-scale", type=float, dest="guidance", help="classifier-free guidance scale")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2023)")
    p.add_argument("--negative", "--negative-prompt", default="", dest="negative", help="negative prompt")
    p.add_argument("-W", "--width", type=int, help="width in pixels (default: the model's size)")
    p.add_argument("-H", "--height", type=int, help="height in pixels (default: the model's size)")
    p.add_argument("--checkpoint", help="a .safetensors / .ckpt file (SD 1.x, SD 2.x, SDXL base or latentdiff)")
    p.add_argument("--config", help="a model config YAML to use instead of the one the checkpoint implies")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction", "sample"],
                   help="the model's prediction type (SD 2.x 768-v: v_prediction)")
    p.add_argument("--ema", action="store_true",
                   help="SD training files that keep EMA copies beside the raw weights (model_ema.*, e.g. "
                        "sd-v1-4-full-ema.ckpt): use the EMA copies. Not for -emaonly files or latentdiff training "
                        "checkpoints, which hold EMA weights already")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--backend", choices=["fused", "torch"], help="diffusion kernels (default: fused when built)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, launch the U-Net's kernels one by one instead of replaying a CUDA graph")
    p.add_argument("--from-file", help="a text file with one prompt per line; with -n N, prompt i's images get "
                                       "seeds seed + i*N .. seed + i*N + N-1 (printed)")
    p.add_argument("--from-png", help="regenerate from the parameters stored in a PNG made by latentdiff or A1111")
    p.add_argument("--grid", action="store_true", help="also write one grid image of all outputs")
    p.add_argument("--grid-only", action="store_true",
                   help="write only the grid (a row per prompt), to -o when it is a .png path")
    p.add_argument("--grid-cols", type=int, help="images per grid row (default: -n with several prompts, else square)")
    p.add_argument("--trajectory", action="store_true",
                   help="also write the predicted x0 at every step, as a strip PNG and a GIF, per image")
    p.add_argument("--no-prompt-syntax", action="store_true",
                   help="encode the prompt exactly as written: no (emphasis:1.2), BREAK, [prompt:editing:0.5] or "
                        "[alter|nation] (A1111's syntax, read by default)")
    p.add_argument("--noise", default="gaussian", type=str.lower, choices=NOISE_KINDS,
                   help="the sampler's per-step noise: gaussian (the default; each image's seeded stream) or "
                        "brownian (a Brownian tree seeded with the image's seed, as k-diffusion and A1111 draw "
                        "the SDE samplers' noise: the same seed follows the same path at any step count; needs "
                        "torchsde). The starting noise is the same for both")
    p.add_argument("--clip-skip", type=int, help="use the output of this many layers from the end (1 = last)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W]",
                   help="apply a LoRA / LyCORIS / diffusers LoRA file with multiplier W (default 1); repeatable. "
                        "Recorded in the PNG as <lora:NAME:W> with its hash, as A1111 does")
    p.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="where <lora:NAME:W> in a prompt finds NAME.safetensors (subfolders too); repeatable")
    p.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="textual-inversion embeddings (.pt / .safetensors), used by file name in the prompt")
    p.set_defaults(lora_hashes=None)  # read from --from-png, to tell whether the same LoRA files are used
    p.add_argument("--init-image", help="image-to-image: start from this picture")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change the picture (0..1]")
    add_mask_and_hires_arguments(p)
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
    if args.seed is not None and args.seed < -1:
        raise UsageError(f"--seed must be in 0..{2**64 - 1}, or -1 for a random seed (got {args.seed})")
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
    if args.noise == "brownian":
        from latentdiff.diffusion.samplers import BrownianNoise
        try:
            BrownianNoise.torchsde()
        except ValueError:
            raise UsageError("--noise brownian needs torchsde (for the Brownian tree): pip install torchsde") from None


def check_init_image(args, init_image: Image.Image | None):
    """--from-png of an image-to-image PNG regenerates it only from the picture it started from."""
    recorded = args.init_image_hash
    if init_image is None and (recorded or "strength" in args.from_png_keys):
        raise UsageError(f"{args.from_png} was made by image-to-image (denoising strength {args.strength}): pass "
                         f"the picture it started from with --init-image FILE")
    if init_image is not None and recorded and image_hash(init_image) != recorded:
        raise UsageError(f"--init-image {args.init_image} is not the picture {args.from_png} was made from (its "
                         f"pixels hash to {image_hash(init_image)}, the PNG records {recorded}); pass that picture")


def read_image_option(path: str | None, option: str) -> Image.Image | None:
    """The picture an option names (None without one); a one-line UsageError naming the option when unreadable."""
    if not path:
        return None
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {option} {path}: {e}") from None
    return image


def checkpoint_path(checkpoint: str | None) -> str:
    """--checkpoint, or the bundled model."""
    if checkpoint is None:
        if not BUNDLED.exists():
            raise UsageError(f"the bundled emoji model {BUNDLED} is missing from this install: reinstall latentdiff "
                             "(pip install --no-build-isolation .), or pass --checkpoint FILE (an SD 1.x / 2.x / XL "
                             "or latentdiff checkpoint)")
        checkpoint = str(BUNDLED)
    if not Path(checkpoint).is_file() and not (Path(checkpoint) / "model_index.json").is_file():
        raise UsageError(f"checkpoint {checkpoint} not found; pass an existing .safetensors or .ckpt file, or a "
                         "diffusers model folder (with model_index.json)")
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


def lora_option(value: str) -> tuple[Path, float]:
    """--lora FILE[:W] -> (FILE, W); W defaults to 1."""
    path, sep, weight = value.rpartition(":")
    try:
        if sep and path:
            return Path(path), float(weight)
    except ValueError:
        pass
    return Path(value), 1.0


def use_adapters(pipe, args, prompts: list[str]) -> list[str]:
    """--lora files become <lora:NAME:W> tags (so the PNG records them, as A1111 does), --lora-dir and the files'
    folders are where tags are found, --embeddings-dir is read; everything is checked now, in one line each."""
    import warnings
    from latentdiff.io.adapters import AdapterError, extract_loras
    files = [lora_option(v) for v in args.lora]
    for path, _ in files:
        if not path.is_file():
            raise UsageError(f"--lora {path} not found; pass an existing .safetensors (or .pt / .ckpt) file")
    pipe.loras.dirs = [Path(d) for d in args.lora_dir] + list(dict.fromkeys(p.parent for p, _ in files))
    tagged = []
    try:
        for prompt in prompts:
            named = {name for name, *_ in extract_loras(prompt)[1]}
            tagged.append(prompt + "".join(f" <lora:{p.stem}:{w:g}>" for p, w in files if p.stem not in named))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.set_embeddings_dirs(args.embeddings_dir)
            _, hashes = pipe.loras.activate(tagged)
    except (AdapterError, ValueError) as e:
        raise UsageError(str(e)) from None
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    recorded = getattr(args, "lora_hashes", None)
    if recorded and hashes and set(recorded.split(", ")) != set(hashes.split(", ")):
        print(f"warning: the LoRA files found now ({hashes}) are not those {args.from_png} records ({recorded}): "
              "the image will differ", file=sys.stderr)
    return tagged


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
        png = params_from_png(args.from_png)
        args.from_png_keys = set(png)
        args.init_image_hash = png.get("init_image_hash")
        for key, value in png.items():
            if key not in given and hasattr(args, key):
                setattr(args, key, value)
    prompts = read_prompts(args)
    check_args(args, given)
    check_mask_and_hires_args(args, given)
    init_image = read_image_option(args.init_image, "--init-image")
    if args.from_png:
        check_init_image(args, init_image)
    checkpoint = checkpoint_path(args.checkpoint)
    seed = args.seed if args.seed not in (None, -1) else random.randrange(2**31 - 2**20)
    n_total = len(prompts) * args.num_images
    names = [f"{slug(prompts[k // args.num_images])}-{seed + k}" for k in range(n_total)]
    paths = output_paths(args.output, names)
    pipe = load_pipeline(args, checkpoint)
    mask, inpaint, hires, outpaint = mask_and_hires(args, given, init_image, pipe.size_multiple)
    check_mask(args, mask)
    settings = settings_for(pipe, args, init_image, seed, n_total)
    check_mask_and_hires(pipe, init_image, mask, inpaint, hires, settings)
    prompts = use_adapters(pipe, args, prompts)
    if len(prompts) > 1:  # which seed drew what: prompt i's images start at seed + i * num_images
        n = args.num_images
        for i, prompt in enumerate(prompts):
            first = seed + i * n
            print(f"seed {first}{f'..{first + n - 1}' if n > 1 else ''}: {prompt}", file=sys.stderr)
    elif args.seed in (None, -1):
        print(f"seed: {seed}", file=sys.stderr)
    try:
        result = pipe(prompts, args.negative, num_images=args.num_images, seed=seed, init_image=init_image,
                      strength=args.strength, clip_skip=args.clip_skip, guidance_rescale=args.guidance_rescale,
                      trajectory=args.trajectory, backend=args.backend, mask=mask, inpaint=inpaint, hires=hires,
                      outpaint=outpaint, prompt_syntax=not args.no_prompt_syntax, noise=args.noise, **settings)
    except ValueError as e:  # the mask (io.masks.MaskError) and the hires settings, checked against the model
        raise UsageError(str(e)) from None
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    written = [] if args.grid_only else save_images(result, paths, args.trajectory)
    if args.grid_only or (args.grid and len(result.images) > 1):
        grid_path = paths[0].with_name(f"grid-{slug(prompts[0])}-{seed}.png")
        if args.grid_only and args.output and args.output.lower().endswith(".png"):
            grid_path = Path(args.output)
        cols = args.grid_cols or (args.num_images if len(prompts) > 1 else None)
        save_image(image_grid(result.images, cols=cols), grid_path,
                   f"grid of {len(result.images)} images, seeds {seed}..{seed + n_total - 1}")
        written.append(grid_path)
    return written


def save_images(result, paths: list[Path], trajectory: bool) -> list[Path]:
    """Each image with its `parameters` chunk (and its predicted-x0 strip and GIF with --trajectory)."""
    for k, path in enumerate(paths[:len(result.images)]):
        result.save(path, k)
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
