"""Short, fixed-time training races that compare emoji-model recipes on one CPU core (docs/experiments.md).

    python docs/experiments/race.py vae OUT.pt SECONDS [lr=1e-3]
    python docs/experiments/race.py unet NAME SECONDS --vae OUT.pt [key=value ...]

`vae` trains the f8, 32-channel VAE of configs/emoji.yaml on all rendered emoji (batch 8, L1 + 1e-6 KL, as the
trainer's VAE stage) for SECONDS and saves its weights. `unet` encodes N emoji (n=200, spread over the set) with
that VAE, trains a fresh U-Net + text encoder on them for SECONDS (batch 32, AdamW, no EMA), then generates each
emoji from its first caption ("a cat") and grades it by the nearest reference in 16x16 pixels, as
`python -m latentdiff.evaluate` does. It prints one RESULT line of JSON and writes a grid (references over
samples) to docs/experiments/race-NAME.png.

unet options: n, bs, lr, textlr (multiplier on the text encoder's lr; 0 freezes it), pred (epsilon | sample |
v_prediction), zsnr (1: zero-terminal SNR), bias (train.timestep_bias), pooled (1: also add the text encoder's
last-token state to the time embedding, as SDXL adds its pooled text embedding), unet.KEY=JSON (any UNetConfig
field), evals (comma-separated SAMPLER@GUIDANCE, default "DPM++ 2M@3").
Needs data/emoji (python -m latentdiff.data emoji --out data/emoji). Runs in one thread, so two races can share
the 2-core machine.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from latentdiff.io.checkpoint import Models
from latentdiff.io.config import ModelConfig, from_dict, load_yaml
from latentdiff.evaluate import features, load_reference, nearest_hits, uint8_batch
from latentdiff.pipeline import Pipeline
from latentdiff.io.images import image_grid, to_pil
from latentdiff.diffusion.schedule import Schedule
from latentdiff.models.text_encoder import TextEncoder
from latentdiff.train.losses import UNetLoss, VAELoss
from latentdiff.models.unet import UNetModel
from latentdiff.models.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "emoji"


def emoji_config(opts: dict) -> ModelConfig:
    raw = load_yaml(ROOT / "configs" / "emoji.yaml")["model"]
    raw["diffusion"].update(prediction=opts.get("pred", "v_prediction"), zero_terminal_snr=opts.get("zsnr") == "1")
    for k, v in opts.items():
        if k.startswith(("unet.", "text.")):
            section, key = k.split(".", 1)
            raw[section][key] = json.loads(v)
    return from_dict(ModelConfig, raw, "model")


def all_captions() -> dict[str, list[str]]:
    """name -> caption templates, read from the shards' json records."""
    rows = [json.loads(line) for line in (DATA / "index.jsonl").read_text().splitlines()]
    out = {}
    for shard in sorted({r["shard"] for r in rows}):
        with tarfile.open(DATA / shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[meta["name"]] = meta["captions"]
    return out


def race_vae(out: str, seconds: float, lr: float = 1e-3):
    cfg = emoji_config({}).vae
    x_all = load_reference(DATA)[2].float() / 127.5 - 1
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg)
    vae_loss = VAELoss(vae, kl_weight=1e-6)  # the trainer's VAE-stage loss
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    t0, step = time.time(), 0
    while time.time() - t0 < seconds:
        loss = vae_loss({"pixels": x_all[torch.randint(0, len(x_all), (8,), generator=gen)]}, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    vae.eval()
    with torch.no_grad():
        ref = x_all[::23]
        y = vae.decode(vae.encode(ref)).clamp(-1, 1)
    psnr = (10 * torch.log10(4 / (y - ref).square().flatten(1).mean(1))).mean().item()
    print("RESULT", json.dumps({"steps": step, "images": 8 * step, "psnr_db": round(psnr, 2)}), flush=True)
    torch.save(vae.state_dict(), out)


class PooledEmbedding(nn.Module):
    """time_embed(t) + label_emb(last context token): the text's final state conditions every ResBlock."""

    def __init__(self, time_embed: nn.Sequential, width: int, emb_dim: int):
        super().__init__()
        self.time_embed = time_embed
        self.label_emb = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.context = None

    def __getitem__(self, i):  # UNetModel reads time_embed[0].weight.dtype
        return self.time_embed[i]

    def forward(self, e):
        return self.time_embed(e) + self.label_emb(self.context[:, -1])


def add_pooled(unet: UNetModel, width: int):
    """The `pooled=1` variant, as a wrapper so the U-Net's own code stays SD's."""
    unet.time_embed = PooledEmbedding(unet.time_embed, width, unet.config.model_channels * 4)
    forward = unet.forward

    def with_context(x, t, context):
        unet.time_embed.context = context
        return forward(x, t, context)
    unet.forward = with_context


def race_unet(name: str, seconds: float, vae_path: str, opts: dict):
    n, bs, lr = int(opts.get("n", 200)), int(opts.get("bs", 32)), float(opts.get("lr", 1e-3))
    cfg = emoji_config(opts)
    names, prompts, images = load_reference(DATA)
    pick = torch.linspace(0, len(names) - 1, n).round().long().tolist()
    names, prompts, images = [names[i] for i in pick], [prompts[i] for i in pick], images[pick]
    captions = all_captions()
    captions = [captions[k] for k in names]

    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(torch.load(vae_path, weights_only=True))
    vae.eval()
    with torch.no_grad():
        z = vae.encode(images.float() / 127.5 - 1)  # emoji.yaml's stored factor is 1: raw latents
    scale = float(1 / z.std())
    z = z * scale
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scale_factor=scale))
    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(torch.load(vae_path, weights_only=True))

    torch.manual_seed(0)
    unet, text = UNetModel(cfg.unet), TextEncoder(cfg.text)
    if opts.get("pooled") == "1":
        add_pooled(unet, cfg.text.width)
    text_lr = lr * float(opts.get("textlr", 1))
    opt = torch.optim.AdamW([{"params": list(unet.parameters())},
                             {"params": list(text.parameters()), "lr": text_lr}], lr, weight_decay=0.0)
    params = list(unet.parameters()) + list(text.parameters())
    # the trainer's U-Net-stage loss: timesteps, noise, targets and MSE exactly as latentdiff.train computes them
    unet_loss = UNetLoss(Models(cfg, unet, vae, text), Schedule.from_config(cfg.diffusion), True, "simple", 5.0,
                         float(opts.get("bias", 0)))
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < seconds:
        idx = torch.randint(0, n, (bs,), generator=gen)
        caps = [rng.choice(captions[i]) if rng.random() >= 0.1 else "" for i in idx.tolist()]
        loss = unet_loss({"latents": z[idx], "tokens": text.tokenize(caps)}, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"{name} step {step} {time.time() - t0:.0f}s epochs {step * bs / n:.1f} "
                  f"loss {sum(losses[-100:]) / 100:.4f}", flush=True)

    unet.eval()
    text.eval()
    pipe = Pipeline(Models(cfg, unet, vae, text), "cpu", torch.float32)
    results = {}
    for spec in opts.get("evals", "DPM++ 2M@3").split(","):
        sampler, guidance = spec.split("@")
        out = []
        for i in range(0, n, 50):
            out += pipe(prompts[i:i + 50], steps=20, sampler=sampler, guidance=float(guidance), seed=i,
                        progress=False).images
        top1, top5, _ = nearest_hits(features(uint8_batch(out), 16), features(images, 16))
        results[spec] = {"top1": top1, "top5": top5}
        k = min(n, 24)
        image_grid(to_pil(images[:k].float() / 127.5 - 1) + out[:k], cols=k).save(
            Path(__file__).parent / f"race-{name}.png")
    print("RESULT", json.dumps({"name": name, "opts": opts, "steps": step, "epochs": round(step * bs / n, 1),
                                "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
                                "results": results}), flush=True)


def main(argv: list[str]):
    torch.set_num_threads(1)
    if len(argv) >= 3 and argv[0] == "vae":
        race_vae(argv[1], float(argv[2]), **{k: float(v) for k, v in (a.split("=", 1) for a in argv[3:])})
    elif len(argv) >= 5 and argv[0] == "unet" and argv[3] == "--vae":
        race_unet(argv[1], float(argv[2]), argv[4], dict(a.split("=", 1) for a in argv[5:]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
