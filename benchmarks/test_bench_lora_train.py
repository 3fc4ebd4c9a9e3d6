"""train.lora against full fine-tuning on the same SD 1.5-layout U-Net and batch: parameters trained, optimizer
state bytes, step time (forward, backward, AdamW step) and, on a GPU, peak memory, as ratios in one run.

    OMP_NUM_THREADS=2 pytest -q -s benchmarks/test_bench_lora_train.py

On a GPU the U-Net is configs/sd15.yaml's (random weights, 64x64 latents = 512 px, batch 1, bf16 autocast). On the
CPU that is minutes per full step and ~14 GB of AdamW state, so the CPU run keeps the layout (levels, blocks,
attention, heads, 768-wide context) at model_channels 64 (a fifth of the width) and 32x32 latents: say so when
quoting it. `LATENTDIFF_FULL_SIZE=1` runs the full-width U-Net on the CPU too, at 16x16 latents (~16 GB of RAM).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from latentdiff.io.config import load_model_config
from latentdiff.models.lora_train import LoraNetwork
from latentdiff.models.unet import UNetModel

ROOT = Path(__file__).resolve().parent.parent


def one_step(unet, opt, x, t, ctx, autocast):
    with autocast:
        loss = (unet(x, t, ctx).float() - x.float()).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(unet, params, x, t, ctx, device, steps=2):
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one_step(unet, opt, x, t, ctx, autocast)  # warm-up, and Adam's state exists from here on
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        one_step(unet, opt, x, t, ctx, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return {"params": sum(p.numel() for p in params), "optimizer_bytes": state_bytes, "step_s": min(times),
            "peak_bytes": peak}


def test_lora_against_full_fine_tuning():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_model_config(ROOT / "configs" / "sd15.yaml").unet
    side = 64
    if device.type == "cpu" and os.environ.get("LATENTDIFF_FULL_SIZE") == "1":
        side = 16
    elif device.type == "cpu":
        cfg, side = dataclasses.replace(cfg, model_channels=64, norm_groups=32), 32
    torch.manual_seed(0)
    unet = UNetModel(cfg).to(device)
    x = torch.randn(1, cfg.in_channels, side, side, device=device)
    t, ctx = torch.tensor([500], device=device), torch.randn(1, 77, cfg.context_dim, device=device)

    full = measure(unet, [p for p in unet.parameters()], x, t, ctx, device)
    unet.requires_grad_(False)
    network = LoraNetwork(unet, None, rank=16, alpha=16)  # kohya's default network: attn, ff, proj
    lora = measure(unet, list(network.parameters()), x, t, ctx, device)
    network.remove()

    print(f"\nU-Net: SD 1.5 layout, model_channels {cfg.model_channels}, {side}x{side} latents, batch 1, {device}")
    print(f"{'':22}{'full':>14}{'LoRA r16':>14}{'LoRA / full':>14}")
    for key in ("params", "optimizer_bytes", "step_s", "peak_bytes"):
        print(f"{key:22}{full[key]:>14.4g}{lora[key]:>14.4g}{lora[key] / full[key]:>14.4f}")
    # Adam's two fp32 moments per factor element and a step counter per factor tensor, and nothing else
    assert lora["optimizer_bytes"] == 2 * 4 * lora["params"] + 4 * len(list(network.parameters()))
    assert lora["params"] < 0.05 * full["params"]
