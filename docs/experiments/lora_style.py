"""The README's LoRA recipe: a style the bundled model never saw ("blue ink"), learnt by train.lora from 40 emoji.

    python docs/experiments/lora_style.py data --out ink/           # 40 emoji redrawn in blue ink + captions
    python -m latentdiff.data make-shards ink/ --out ink-shards/
    python -m latentdiff.train --config configs/lora-emoji.yaml --data.shards=ink-shards/data-000000.tar
    python docs/experiments/lora_style.py grid --lora runs/lora-emoji/lora.safetensors --out docs/lora.png

`data` renders every 34th emoji of the set (40 of them), maps each pixel's darkness onto one ink colour (white paper
stays white) and writes NAME.png + NAME.txt with the emoji's plain caption ("a fox face"): the captions say nothing
of the style, so the LoRA carries it alone. `grid` draws 8 captions with the same seeds three times: the base model,
the LoRA at 0.5 and at 1.0; the first 4 captions are in the training folder, the last 4 are not.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

INK = np.array([24, 52, 150], dtype=np.float32)  # a blue-black ink
EVERY = 34  # every 34th emoji of the 1,377: 40 training pictures
HELD_OUT = ["a cat face", "a red apple", "a rocket", "a fox face"]  # not in the training folder
SHOWN = ["a baseball", "a melon", "a pile of poo", "a neutral face"]  # in it


def ink(picture: Image.Image) -> Image.Image:
    """Darkness (1 - luminance) as the amount of ink on white paper."""
    rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    dark = 1.0 - (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    dark = np.clip(dark * 1.6, 0.0, 1.0)[..., None]  # pale colours still take some ink
    out = 255.0 * (1.0 - dark) + INK * dark
    return Image.fromarray(out.round().astype(np.uint8))


def training_entries():
    from latentdiff.data.emoji import _emoji_entries, emoji_captions, find_emoji_font, load_emoji_font

    font = load_emoji_font(find_emoji_font())
    entries, _ = _emoji_entries(font, False)
    return font, [(text, emoji_captions(name, aliases)[0]) for text, name, aliases in entries[::EVERY]]


def make_data(out: Path) -> int:
    from latentdiff.data.emoji import render_emoji

    font, chosen = training_entries()
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, (text, caption) in enumerate(chosen):
        picture = render_emoji(font, text, 64)
        if picture is None or caption in HELD_OUT:
            continue
        ink(picture).save(out / f"ink{i:03d}.png")
        (out / f"ink{i:03d}.txt").write_text(caption + "\n")
        n += 1
    print(f"wrote {n} pictures with captions to {out}")
    return 0


def make_grid(lora: Path, out: Path, seed: int) -> int:
    from latentdiff.io.images import image_grid
    from latentdiff.pipeline import Pipeline

    prompts = SHOWN + HELD_OUT
    pipe = Pipeline.from_checkpoint(device="cpu")
    rows = []
    for weight in (0.0, 0.5, 1.0):
        if weight:
            pipe.load_lora(str(lora), weight)
        rows += pipe(prompts, seed=seed, progress=False).images
        if weight:
            pipe.unload_lora()
    grid = image_grid([im.resize((128, 128), Image.NEAREST) for im in rows], cols=len(prompts))
    grid.save(out)
    print(f"{out}: rows base, LoRA 0.5, LoRA 1.0; columns {', '.join(prompts)} (seed {seed})")
    # How near each drawing is to the base model's drawing redrawn in ink (what a LoRA that learnt the style and
    # nothing else would draw), in dB: the base's own distance is the start.
    n = len(prompts)
    target = [np.asarray(ink(im), dtype=np.float64) for im in rows[:n]]
    for name, start in (("base", 0), ("LoRA 0.5", n), ("LoRA 1.0", 2 * n)):
        db = [psnr(np.asarray(im, dtype=np.float64), t) for im, t in zip(rows[start:start + n], target)]
        print(f"PSNR to the inked base drawing, {name}: in the folder {np.mean(db[:4]):.1f} dB, "
              f"held out {np.mean(db[4:]):.1f} dB")
    return 0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="the training folder")
    d.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("grid", help="before / after picture")
    g.add_argument("--lora", type=Path, required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return make_data(args.out) if args.cmd == "data" else make_grid(args.lora, args.out, args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
