"""What a run shows and keeps: the progress bar, log.csv, train.log, TensorBoard, and sample grids."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from latentdiff.data.loader import DataConfig
from latentdiff.io.checkpoint import Models
from latentdiff.io.files import atomic_write
from latentdiff.io.images import image_grid, to_pil
from latentdiff.pipeline import Pipeline
from latentdiff.train.config import TrainConfig
from latentdiff.train.dist import Dist
from latentdiff.train.losses import EMA


class Logger:
    """Rank 0 only: tqdm progress bar, log.csv, train.log, TensorBoard when installed."""

    FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "nonfinite_steps", "skipped_samples", "elapsed_s"]

    def __init__(self, out_dir: Path, d: Dist, start: int, total: int):
        self.d, self.out_dir = d, out_dir
        self.bar = self.tb = None
        if not d.main:
            return
        self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, disable=None)
        path = out_dir / "log.csv"
        new = not path.exists()
        self.csv_file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.FIELDS)
        if new:
            self.csv.writeheader()
        self.text = open(out_dir / "train.log", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def info(self, message: str):
        if self.d.main:
            tqdm.write(message, file=sys.stderr)
            self.text.write(message + "\n")
            self.text.flush()

    def metrics(self, row: dict):
        if not self.d.main:
            return
        self.csv.writerow(row)
        self.csv_file.flush()
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.1f}")
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "images_per_s"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.d.main and not self.csv_file.closed:
            self.bar.close()
            self.csv_file.close()
            self.text.close()
            if self.tb is not None:
                self.tb.close()


@torch.no_grad()
def save_samples(path: Path, models: Models, ema: EMA, cfg: TrainConfig, data_cfg: DataConfig, device,
                 fixed_batch: dict | None):
    """A grid from the EMA weights: prompts for the U-Net stage, originals over reconstructions for the VAE."""
    if cfg.stage == "unet":
        m = Models(models.config, ema.modules.get("unet", models.unet), models.vae,
                   ema.modules.get("text", models.text))
        live = ema.source.get("lora")  # train.lora: the EMA factors go into the live layers for the grid
        raw = {k: v.clone() for k, v in live.state_dict().items()} if live is not None else None
        if live is not None:
            live.load_state_dict(ema.modules["lora"].state_dict())
        training = {k: getattr(m, k).training for k in ("unet", "vae", "text")}
        dtypes = {k: next(getattr(m, k).parameters()).dtype for k in ("unet", "vae", "text")}
        # Eager: a CUDA graph per grid would be captured once and thrown away, with its memory pool, while the
        # loader's threads may be calling CUDA (a capture fails on their work).
        pipe = Pipeline(m, device=device, dtype=torch.float32, cuda_graphs=False)
        images = pipe(list(cfg.sample_prompts), steps=cfg.sample_steps, sampler=cfg.sample_sampler,
                      guidance=cfg.sample_guidance, seed=cfg.seed, height=data_cfg.resolution,
                      width=data_cfg.resolution, progress=False).images
        for k, was in training.items():  # the Pipeline casts to fp32 in place: a bf16 LoRA base goes back, exactly
            getattr(m, k).train(was).to(dtypes[k])
        if live is not None:
            live.load_state_dict(raw)
        rows = [images]
    else:
        vae = ema.modules["vae"]
        x = fixed_batch["pixels"][:8].to(device)
        rows = [to_pil(x), to_pil(vae.decode(vae.encode(x)))]
    grid = image_grid([im for row in rows for im in row], cols=len(rows[0]))  # rows are of equal length
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")
