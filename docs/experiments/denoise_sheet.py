"""A picture of one-step vs iterative denoising at two guidance scales (docs/experiments.md, "The shipped model").

    python docs/experiments/denoise_sheet.py CHECKPOINT DATA OUT.png [T,T,...] [G,G,...]

Rows: 8 of the 200 references `evaluate --limit 200` uses. Columns: the reference, then for each t (default
300,900) and each guidance scale (default 3,1) the one-step x0 estimate and the iterative result (the model's
sampler and step count), computed by evaluate.denoise_from as `evaluate --denoise-from` does. Tiles at 2x.
"""
from __future__ import annotations

import sys

from PIL import Image, ImageDraw, ImageFont

from latentdiff.evaluate import denoise_from, load_reference
from latentdiff.pipeline import Pipeline
from latentdiff.io.images import image_grid


def main(argv: list[str]) -> int:
    checkpoint, data, out = argv[:3]
    ts = [int(t) for t in (argv[3] if len(argv) > 3 else "300,900").split(",")]
    gs = [float(g) for g in (argv[4] if len(argv) > 4 else "3,1").split(",")]
    pipe = Pipeline.from_checkpoint(checkpoint, device="cpu")
    s = pipe.config.sampling
    _, prompts, ref = load_reference(data, pipe.config.image_size, 200)
    pick = list(range(0, 200, 25))
    prompts, ref = [prompts[i] for i in pick], ref[pick]
    columns, labels = [ref], ["reference"]
    for t in ts:
        for g in gs:
            for steps in (None, s.steps):
                columns.append(denoise_from(pipe, prompts, ref, t, steps, sampler=s.sampler, guidance=g))
                labels.append(f"t={t} g{g:g} {steps or 1} step{'s' if steps else ''}")
    tiles = [Image.fromarray(col[i].permute(1, 2, 0).numpy()) for i in range(len(pick)) for col in columns]
    tiles = [im.resize((2 * im.width, 2 * im.height), Image.NEAREST) for im in tiles]
    grid = image_grid(tiles, cols=len(columns))
    sheet = Image.new("RGB", (grid.width, grid.height + 24), "white")  # a header row names the columns
    sheet.paste(grid, (0, 24))
    d, font, w = ImageDraw.Draw(sheet), ImageFont.load_default(size=12), tiles[0].width
    for i, text in enumerate(labels):
        d.text((i * w + w // 2, 12), text, fill="black", font=font, anchor="mm")
    sheet.save(out, optimize=True)
    print(f"wrote {out}: rows {prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
