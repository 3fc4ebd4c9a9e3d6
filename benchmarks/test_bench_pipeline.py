"""Pipeline speed: U-Net iterations/s, seconds per image end to end and peak memory, ours beside diffusers'
UNet2DConditionModel and its scheduler loop on the same weights, in the same run. Ours is the pipeline as it
runs (the U-Net replayed from CUDA graphs on CUDA); the eager U-Net's it/s is reported beside it.

CPU: the tiny config (64x64). GPU (when present): the SD 2.1-base architecture at 512x512 fp16 with CFG, and
SDXL base at 1024x1024 fp16 with CFG (VAE in fp32 on both sides, as diffusers' force_upcast), random weights
(speed does not depend on weight values). Targets are reported, not asserted; the only
assertion is a floor that cannot flake.
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.utils.benchmark as tb

from latentdiff.io.checkpoint import build_models
from latentdiff.io.config import CONFIG_DIR, load_model_config
from latentdiff.pipeline import Pipeline
from latentdiff.models.unet import micro_conditioning

RESULTS = Path(os.environ.get("LATENTDIFF_BENCH_DIR", Path(__file__).parent / "results"))


def diffusers_pair(models, dtype, device):
    """diffusers' U-Net, VAE and scheduler built from our weights by diffusers' own single-file converters."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    cfg = models.config
    u = cfg.unet
    depth = u.transformer_depth if isinstance(u.transformer_depth, int) else list(u.transformer_depth)
    params = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                  channel_mult=list(u.channel_mult), num_res_blocks=u.num_res_blocks,
                  attention_resolutions=list(u.attention_resolutions), transformer_depth=depth,
                  context_dim=u.context_dim, use_linear_in_transformer=u.use_linear_in_transformer)
    if u.adm_in_channels:  # SDXL: diffusers infers addition_embed_type="text_time" from this and context_dim 2048
        params.update(num_classes="sequential", adm_in_channels=u.adm_in_channels)
    params.update(num_heads=u.num_heads) if u.num_head_channels == -1 else params.update(num_head_channels=u.num_head_channels)
    v = cfg.vae
    dd = dict(ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, in_channels=v.in_channels,
              out_ch=v.out_ch, z_channels=v.z_channels, resolution=v.resolution, attn_resolutions=list(v.attn_resolutions),
              double_z=True, dropout=0.0)
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": dd, "embed_dim": v.embed_dim}},
                                     "scale_factor": v.scale_factor}}}
    ckpt = {"model.diffusion_model." + k: t for k, t in models.unet.state_dict().items()}
    ckpt.update({"first_stage_model." + k: t for k, t in models.vae.state_dict().items()})
    ucfg = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=cfg.image_size // models.vae.latent_factor)
    vcfg = create_vae_diffusers_config_from_ldm(original, ckpt, image_size=cfg.image_size)
    vcfg["norm_num_groups"] = v.norm_groups
    with torch.device("meta"):  # built empty, then given our tensors: no second initialisation of 2.6B weights
        unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True, assign=True)
    d = cfg.diffusion
    sched = DPMSolverMultistepScheduler(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start,
                                        beta_end=d.beta_end, beta_schedule=d.beta_schedule, use_karras_sigmas=True,
                                        final_sigmas_type="zero", prediction_type=d.prediction)
    vae_dtype = torch.float32 if v.force_upcast and dtype == torch.float16 else dtype
    return unet.to(device, dtype).eval(), vae.to(device, vae_dtype).eval(), sched


def timeit(fn, device, min_run_time=1.0, samples=10):
    """Median seconds per call: torch.utils.benchmark on CPU, CUDA events on GPU (both after warm-up)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(samples):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]
    return tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def peak_memory(fn, device):
    if device.type != "cuda":
        return None  # the CPU allocator keeps no high-water mark of its own; RSS would mix in everything else
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def run_case(name, config, device, dtype, steps=20, size=None, build_on=None, image_samples=10):
    """build_on: where the random weights are made (SDXL's 3.5B are made on the GPU, in `dtype`, in seconds)."""
    torch.manual_seed(0)
    models = build_models(config) if build_on is None else build_models(config, device=build_on, dtype=dtype)
    with torch.no_grad():  # non-zero weights everywhere, as a trained model has
        for m in (models.unet, models.vae, models.text):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    d_unet, d_vae, d_sched = diffusers_pair(models, dtype, device)
    pipe = Pipeline(models, device=device, dtype=dtype)
    size = size or config.image_size
    f = models.vae.latent_factor
    x = torch.randn(2, config.unet.in_channels, size // f, size // f, device=device, dtype=dtype)  # CFG batch of 1
    t = torch.full((2,), 500.0, device=device)

    def condition():
        """Our text encoders for both sides; SDXL adds the pooled text and the size micro-conditioning."""
        ctx, pooled = pipe.encode_prompts_pooled(["a cat"], [""])
        if pooled is None:
            return ctx.to(dtype), (), {}
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=torch.float32)
        y = micro_conditioning(pooled, time_ids).to(dtype)
        return ctx.to(dtype), (y,), {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids}}

    ctx, ours_extra, theirs_extra = condition()
    with torch.no_grad():
        ours_unet = timeit(lambda: pipe.unet_call(x, t, ctx, *ours_extra), device)  # CUDA graphs on CUDA
        eager_unet = timeit(lambda: pipe.unet(x, t, ctx, *ours_extra), device)
        theirs_unet = timeit(lambda: d_unet(x, t, encoder_hidden_states=ctx, **theirs_extra).sample, device)

    def ours_image():
        pipe("a cat", steps=steps, sampler="DPM++ 2M Karras", guidance=7.5, width=size, height=size, progress=False)

    @torch.no_grad()
    def diffusers_image():  # diffusers' own loop, as StableDiffusionPipeline runs it, on the same text context
        d_sched.set_timesteps(steps, device=device)
        lat = torch.randn(1, config.unet.in_channels, size // f, size // f, device=device, dtype=dtype)
        lat = lat * d_sched.init_noise_sigma
        c, _, extra = condition()
        for ts in d_sched.timesteps:
            inp = d_sched.scale_model_input(torch.cat([lat] * 2), ts)
            u, k = d_unet(inp, ts, encoder_hidden_states=c, **extra).sample.chunk(2)
            lat = d_sched.step(u + 7.5 * (k - u), ts, lat).prev_sample
        d_vae.decode((lat / config.vae.scale_factor).to(d_vae.dtype)).sample

    ours_s = timeit(ours_image, device, min_run_time=2.0, samples=image_samples)
    theirs_s = timeit(diffusers_image, device, min_run_time=2.0, samples=image_samples)
    row = dict(case=name, device=str(device), dtype=str(dtype).replace("torch.", ""), size=size, steps=steps,
               unet_its_ours=1 / ours_unet, unet_its_eager=1 / eager_unet, unet_its_diffusers=1 / theirs_unet,
               unet_ratio=theirs_unet / ours_unet,
               image_s_ours=ours_s, image_s_diffusers=theirs_s, image_ratio=theirs_s / ours_s,
               peak_gib_ours=peak_memory(ours_image, device), peak_gib_diffusers=peak_memory(diffusers_image, device))
    return row


def report(rows, name):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                      "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\n{'case':<16}{'device':<8}{'dtype':<9}{'size':>5}{'unet it/s':>11}{'eager':>8}{'diffusers':>11}{'ratio':>7}"
          f"{'s/image':>9}{'diffusers':>11}{'ratio':>7}{'peak GiB':>10}{'diffusers':>11}")
    for r in rows:
        mem = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
        print(f"{r['case']:<16}{r['device']:<8}{r['dtype']:<9}{r['size']:>5}{r['unet_its_ours']:>11.1f}"
              f"{r['unet_its_eager']:>8.1f}"
              f"{r['unet_its_diffusers']:>11.1f}{r['unet_ratio']:>7.2f}{r['image_s_ours']:>9.3f}"
              f"{r['image_s_diffusers']:>11.3f}{r['image_ratio']:>7.2f}{mem(r['peak_gib_ours']):>10}"
              f"{mem(r['peak_gib_diffusers']):>11}")


def test_pipeline_tiny_cpu():
    rows = [run_case("tiny", load_model_config(CONFIG_DIR / "tiny.yaml"), torch.device("cpu"), torch.float32)]
    report(rows, "pipeline-cpu")
    # Floor only: our U-Net is the same network, so it must not be far slower than diffusers' on the same weights.
    assert rows[0]["unet_ratio"] > 0.5 and rows[0]["image_ratio"] > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipeline_sd21_base_gpu():
    """Targets on H100: U-Net it/s >= 1.2x diffusers eager, 20-step DPM++ 2M image <= 0.3 s, peak memory <= diffusers'."""
    cfg = load_model_config(CONFIG_DIR / "sd21-base.yaml")
    rows = [run_case("sd21-base", cfg, torch.device("cuda"), torch.float16, size=512)]
    report(rows, "pipeline-gpu")
    assert rows[0]["unet_ratio"] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipeline_sdxl_base_gpu():
    """SDXL base 1024x1024 fp16 with CFG, 10 steps, 3 timed images a side (about a minute on an H200)."""
    cfg = load_model_config(CONFIG_DIR / "sdxl-base.yaml")
    rows = [run_case("sdxl-base", cfg, torch.device("cuda"), torch.float16, steps=10, size=1024,
                     build_on="cuda", image_samples=3)]
    report(rows, "pipeline-gpu-sdxl")
    assert rows[0]["unet_ratio"] > 0.5 and rows[0]["image_ratio"] > 0.5
