"""`python -m latentdiff.data`: the shard tools' command line.

    python -m latentdiff.data make-shards SRC --out DIR         images + captions -> tar shards (shards.py)
    python -m latentdiff.data encode-shards 'DIR/x-{000000..000009}.tar' --out LATDIR --checkpoint CKPT  (encode.py)
    python -m latentdiff.data emoji --out DIR                   the Noto Color Emoji set (emoji.py)
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from latentdiff.cli import ArgumentParser
from latentdiff.data.emoji import EMOJI_CREDIT, make_emoji_shards
from latentdiff.data.encode import encode_shards
from latentdiff.data.loader import MAX_RESOLUTION, DataError
from latentdiff.data.shards import make_shards, shards_pattern


def _print_summary(what: str, summary: dict, t0: float):
    shards = summary["shards"]
    where = os.path.dirname(shards[0]) if shards else "-"
    print(f"{what}: wrote {summary['written']} samples in {len(shards)} shard(s) to {where} "
          f"in {time.time() - t0:.1f} s")
    skipped = summary["skipped"]
    if skipped:
        print(f"skipped {sum(skipped.values())}:")
        for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
            example = summary.get("examples", {}).get(reason)
            print(f"  {n:6d}  {reason}" + (f"  (e.g. {example})" if example else ""))
    else:
        print("skipped 0")
    if shards and what != "emoji":
        latents = " --data.latents=true" if what == "encode-shards" else ""
        print(f"train on them with: --data.shards={shlex.quote(shards_pattern(shards))}{latents}")



def main(argv=None):
    p = ArgumentParser(prog="python -m latentdiff.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Train on the result with data.shards: 'DIR/PREFIX-{000000..00000N}.tar'.")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-shards", help="a folder of images (+ sidecar .txt captions, or a CSV/JSONL) -> shards")
    m.add_argument("src", help="folder of images with NAME.txt captions beside them, or a .csv/.jsonl of path,caption")
    m.add_argument("--out", required=True, help="output folder for PREFIX-000000.tar, ...")
    m.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    m.add_argument("--captions", help="CSV (columns path,caption) or JSONL; paths relative to SRC")
    m.add_argument("--prefix", default="data", help="shard file name prefix (default data)")
    m.add_argument("--overwrite", action="store_true", help="replace shards of the same prefix in --out")

    e = sub.add_parser("encode-shards", help="image shards -> VAE latent shards (posterior mode), for U-Net training")
    e.add_argument("src", help="input shards: brace pattern, folder or glob")
    e.add_argument("--out", required=True, help="output folder; shards keep their file names")
    e.add_argument("--checkpoint", required=True, help="checkpoint with the VAE (any file latentdiff loads)")
    e.add_argument("--resolution", type=int, help="pixels before encoding (default: the checkpoint's image_size)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--hflip", action="store_true", help="also store latents of the mirrored image (data.hflip)")
    e.add_argument("--overwrite", action="store_true")

    j = sub.add_parser("emoji", help="render Noto Color Emoji to shards + index.jsonl (the bundled model's data)")
    j.add_argument("--out", required=True)
    j.add_argument("--resolution", type=int, default=64)
    j.add_argument("--per-shard", type=int, default=100, help="samples per shard (default 100: 14 shards)")
    j.add_argument("--font", help="path to NotoColorEmoji.ttf (default: the fonts-noto-color-emoji location)")
    j.add_argument("--sequences", action="store_true", help="also skin-tone and ZWJ sequences (needs `emoji`)")
    j.add_argument("--overwrite", action="store_true")

    args = p.parse_args(argv)

    t0 = time.time()
    try:
        if getattr(args, "per_shard", 1) < 1:
            raise DataError(f"--per-shard must be >= 1, got {args.per_shard}")
        if args.cmd == "make-shards":
            _print_summary("make-shards", make_shards(args.src, args.out, args.per_shard, args.captions, args.prefix,
                                                      args.overwrite), t0)
        elif args.cmd == "encode-shards":
            if args.batch_size < 1:
                raise DataError("--batch-size must be >= 1")
            if args.resolution is not None and not 8 <= args.resolution <= MAX_RESOLUTION:
                raise DataError(f"--resolution must be in 8..{MAX_RESOLUTION}")
            _print_summary("encode-shards", encode_shards(args.src, args.out, args.checkpoint, args.resolution,
                                                          args.batch_size, args.device, args.hflip, args.overwrite),
                           t0)
        else:
            if not 8 <= args.resolution <= 1024:  # the font's bitmaps are 136 pixels: more only blurs
                raise DataError("--resolution must be in 8..1024")
            s = make_emoji_shards(args.out, args.resolution, args.per_shard, args.font, args.sequences, args.overwrite)
            _print_summary("emoji", s, t0)
            print(f"index: {Path(args.out) / 'index.jsonl'}; font: {s['font']} ({EMOJI_CREDIT}); aliases from the "
                  f"`emoji` package: {'yes' if s['aliases'] else 'no (pip install emoji)'}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
