"""`python -m latentdiff.checkpoint SRC OUT [--dtype fp16] [--set KEY=VALUE ...] [--vae FILE]`: convert any
checkpoint the loader reads (SD 1.x / 2.x / SDXL or latentdiff, .safetensors or .ckpt) into a latentdiff file."""
from __future__ import annotations

import os
import sys

import torch

from latentdiff.cli import ArgumentParser
from latentdiff.io.checkpoint import (CONFIG_KEY, CheckpointError, ModelConfig, config_problem, first_line,
                                      load_file, load_models, save_models, state_dict_for, swap_vae)
from latentdiff.io.config import ConfigError, from_dict, merge, parse_overrides, to_dict


def main(argv=None) -> int:
    """`python -m latentdiff.checkpoint SRC OUT`: any checkpoint we load -> one of our .safetensors files."""
    p = ArgumentParser(prog="python -m latentdiff.checkpoint",
                       description="Convert a checkpoint (SD 1.x / 2.x / SDXL or latentdiff, .safetensors or "
                                   ".ckpt) into a latentdiff .safetensors file, e.g. fp16 for shipping.")
    p.add_argument("src")
    p.add_argument("out", help="output .safetensors path (written atomically)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--ema", action="store_true", help="take the U-Net's EMA weights (model_ema.*) from SD files")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change the stored config, e.g. --set sampling.guidance=3 sampling.steps=20")
    p.add_argument("--vae", metavar="FILE",
                   help="take the VAE from this checkpoint instead, e.g. one whose decoder was fine-tuned "
                        "(train.vae_trainable=decoder); its encoder must be SRC's, so the latents are the same")
    args = p.parse_args(argv)
    try:
        _, metadata = load_file(args.src)
        models = load_models(args.src, ema=args.ema)
        if args.vae:
            models = swap_vae(models, load_models(args.vae), args.src, args.vae)
        config = models.config
        if args.set:
            over = parse_overrides(["--" + s.lstrip("-") for s in args.set])
            config = from_dict(ModelConfig, merge(to_dict(config), over), "config")
            problem = config_problem(config, state_dict_for(models))
            if problem:
                raise CheckpointError(f"--set: {problem}")
        kept = {k: v for k, v in metadata.items() if k != CONFIG_KEY}
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        try:
            save_models(args.out, config, models.unet, models.vae, models.text, dtype=dtype, extra_metadata=kept)
        except OSError as e:
            raise CheckpointError(f"cannot write {args.out}: {e.strerror or e}; choose another path") from None
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {first_line(e, named=False)}", file=sys.stderr)  # our messages name the problem
        return 2
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB, {args.dtype}, {config.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
