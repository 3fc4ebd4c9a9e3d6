"""Draw the training curves of the shipped emoji model from the trainer's CSV logs, with PIL only.

    python docs/experiments/plot_logs.py [LOG_DIR] [OUT.png]

Defaults: docs/experiments/emoji-logs and docs/experiments/emoji-curves.png. One panel per run: loss (the mean over
each logging window, as the trainer writes it) against step, and the images/s range of the run in its title.
"""
from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent
# (log file, title, what the loss is)
PANELS = [
    ("log-vae.csv", "Stage 1, H200: VAE, all weights, batch 32 (70 s)", "L1 + 1e-6 KL, summed per image"),
    ("log-dec.csv", "Stage 1, H200: VAE decoder only, batch 32 (165 s)", "L1 + 1e-6 KL, summed per image"),
    ("log-unetB.csv", "Stage 1, H200: U-Net + text encoder, batch 256 (165 s)", "MSE on v"),
    ("log-unet-cpu.csv", "Stage 2, 2-core CPU: U-Net + text encoder, batch 64 (68 min)", "MSE on v"),
]
W, H = 640, 400  # one panel
LEFT, RIGHT, TOP, BOTTOM = 80, 24, 62, 52  # plot margins inside a panel


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2 or 5 times a power of ten apart) covering lo..hi."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or v == 0 else f"{v:.3g}"


def panel(rows: list[dict], title: str, ylabel: str, font, small) -> Image.Image:
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    steps = [float(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    speed = [float(r["images_per_s"]) for r in rows]
    # Axes from 0 steps, the loss from 0 so that the relative fall reads off the height.
    x0, x1, y0, y1 = 0.0, max(steps), 0.0, max(loss) * 1.05
    px = lambda s: LEFT + (s - x0) / (x1 - x0) * (W - LEFT - RIGHT)  # noqa: E731
    py = lambda v: H - BOTTOM - (v - y0) / (y1 - y0) * (H - TOP - BOTTOM)  # noqa: E731
    for t in ticks(x0, x1):
        d.line([(px(t), TOP), (px(t), H - BOTTOM)], fill=(232, 232, 232))
        d.text((px(t), H - BOTTOM + 6), label(t), fill="black", font=small, anchor="ma")
    for t in ticks(y0, y1):
        d.line([(LEFT, py(t)), (W - RIGHT, py(t))], fill=(232, 232, 232))
        d.text((LEFT - 6, py(t)), label(t), fill="black", font=small, anchor="rm")
    d.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    d.line([(px(s), py(v)) for s, v in zip(steps, loss)], fill=(31, 90, 180), width=2)
    d.text((W // 2, 8), title, fill="black", font=font, anchor="ma")
    note = (f"loss: {ylabel};  {min(speed):,.0f}-{max(speed):,.0f} images/s (median {statistics.median(speed):,.0f});  "
            f"last {label(loss[-1])} at step {steps[-1]:,.0f}")
    d.text((W // 2, 34), note, fill=(80, 80, 80), font=small, anchor="ma")
    d.text((W // 2 + LEFT // 2, H - 18), "step", fill="black", font=small, anchor="ma")
    return img


def main(argv: list[str]) -> int:
    logs = Path(argv[0]) if argv else HERE / "emoji-logs"
    out = Path(argv[1]) if len(argv) > 1 else HERE / "emoji-curves.png"
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    sheet = Image.new("RGB", (2 * W, 2 * H), "white")
    for i, (name, title, ylabel) in enumerate(PANELS):
        with open(logs / name, newline="") as f:
            rows = list(csv.DictReader(f))
        sheet.paste(panel(rows, title, ylabel, font, small), ((i % 2) * W, (i // 2) * H))
    sheet.save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
