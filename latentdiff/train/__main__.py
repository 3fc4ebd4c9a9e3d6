"""`python -m latentdiff.train --config FILE [--resume auto] [--section.key=value ...]`, alone or under torchrun."""
from __future__ import annotations

import sys

from latentdiff.cli import ArgumentParser
from latentdiff.data.loader import DataError
from latentdiff.io.checkpoint import CheckpointError
from latentdiff.io.config import ConfigError, parse_overrides
from latentdiff.train.config import load_config
from latentdiff.train.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m latentdiff.train",
        description="Train the VAE or the latent U-Net on webdataset shards (run under torchrun for DDP).",
        epilog="Any config key can be overridden: --train.lr=1e-4 --data.batch_size=16 --model.unet.model_channels=64")
    parser.add_argument("--config", required=True, help="training config YAML (model:, data:, train:)")
    parser.add_argument("--resume", default=None,
                        help="'auto': continue from the newest complete checkpoint in train.out_dir (a fresh start "
                             "when there is none); or a ckpt-* directory")
    args, rest = parser.parse_known_args(argv)
    try:
        model_cfg, data_cfg, cfg = load_config(args.config, parse_overrides(rest))
        train(model_cfg, data_cfg, cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def one_line(e: BaseException) -> str:
    """The message of a user error; one raised in a loader worker arrives wrapped in the worker's traceback."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].partition(": ")[2] or lines[-1]
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
