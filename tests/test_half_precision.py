"""fp16 and bf16 on the CPU: every module, the pipeline, `generate` and the trainer's autocast steps.

The GPU runs models in fp16 by default, and a crash there once went unseen because no test ran a half-precision
model. These tests run the same code on the CPU: each half-precision result is compared with float32 on the same
weights and inputs, by the relative error ||half - fp32|| / ||fp32||. The bounds are a few times what was measured
(fp16 about 1-3e-3, bf16 about 1-2e-2, matching their 11- and 8-bit mantissas over a few dozen layers).
"""
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import build_models
from latentdiff.io.checkpoint import save_models
from latentdiff.io.config import load_model_config
from latentdiff.pipeline import Pipeline
from latentdiff.models.unet import GroupNorm32

ROOT = Path(__file__).resolve().parent.parent
HALF = [torch.float16, torch.bfloat16]
MODULE_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sd21_reduced():
    """The SD 2.x layout (linear proj_in, heads of fixed width, OpenCLIP text with a projection, penultimate layer),
    every width cut down; the full CLIP vocabulary stays so the real tokenizer's ids fit."""
    cfg = load_model_config(ROOT / "configs" / "sd21-base.yaml")
    return dataclasses.replace(
        cfg, image_size=64,
        unet=dataclasses.replace(cfg.unet, model_channels=32, context_dim=64, norm_groups=8, num_head_channels=8),
        vae=dataclasses.replace(cfg.vae, ch=16, norm_groups=8),
        text=dataclasses.replace(cfg.text, width=64, layers=3, heads=4, embed_dim=32))


CONFIGS = {"tiny": lambda: load_model_config(ROOT / "configs" / "tiny.yaml"), "sd21-reduced": sd21_reduced}


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    return build_models(CONFIGS[request.param]())


@pytest.mark.parametrize("dtype", HALF)
def test_group_norm_statistics_do_not_overflow(dtype):
    """Activations near 1000 over a 64x64 map: a sum of squares in fp16 would be inf; the result must match float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 64, 64, dtype=torch.float64) * 300 + 1000
    norm = GroupNorm32(32, 64).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        out = norm(x.to(dtype))
    want = F.group_norm(x.to(dtype).double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double() - want).abs().max().item() <= 4 * torch.finfo(dtype).eps * want.abs().max().item()


@pytest.mark.parametrize("dtype", HALF)
def test_every_module_runs_in_half_and_matches_float32(models, dtype):
    cfg = models.config
    torch.manual_seed(1)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = torch.randn(2, cfg.unet.in_channels, 8, 8)
    context = torch.randn(2, 77, cfg.unet.context_dim)
    t = torch.tensor([10, 700])
    tokens = models.text.tokenize(["a cat", "a photograph of an astronaut riding a horse"])
    half = copy.deepcopy(models)
    for m in (half.text, half.vae, half.unet):
        m.to(dtype)

    def run(m, cast):
        return {"text": m.text(tokens), "encode": m.vae.encode_posterior(cast(image)).mean,
                "decode": m.vae.decode(cast(latents[:, :cfg.vae.embed_dim])),
                "unet": m.unet(cast(latents), t, cast(context))}

    with torch.no_grad():
        want, got = run(models, lambda x: x), run(half, lambda x: x.to(dtype))
    for name in want:
        assert got[name].dtype == dtype, name  # the output dtype is the input's
        assert torch.isfinite(got[name]).all(), name
        assert rel(got[name], want[name]) <= MODULE_TOL[dtype], (name, rel(got[name], want[name]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        m = build_models(make())
        out[name] = tmp_path_factory.mktemp("half") / f"{name}.safetensors"
        save_models(out[name], m.config, m.unet, m.vae, m.text)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pipeline_in_half_matches_float32_on_the_same_noise(checkpoints, name):
    """Three DPM++ 2M steps with CFG from the same seeds: the final latents agree within the stated bounds."""
    final = {}
    for dtype in ("fp32", "fp16", "bf16"):
        pipe = Pipeline.from_checkpoint(checkpoints[name], device="cpu", dtype=dtype)
        res = pipe(["a cat", "a red bicycle"], negative_prompt="blurry", steps=3, sampler="DPM++ 2M", guidance=5.0,
                   seed=11, return_latents=True, progress=False)
        assert len(res.images) == 2 and res.images[0].size == (64, 64)
        final[dtype] = res.latents
    assert rel(final["fp16"], final["fp32"]) <= 1e-2
    assert rel(final["bf16"], final["fp32"]) <= 5e-2


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_generate_end_to_end_in_half(tmp_path, capsys, checkpoints, dtype):
    from latentdiff.generate import main
    out = tmp_path / f"{dtype}.png"
    rc = main(["a cat", "--checkpoint", str(checkpoints["sd21-reduced"]), "--device", "cpu", "--dtype", dtype,
               "--steps", "2", "--seed", "3", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()


def test_an_unsupported_dtype_is_one_line_before_loading(tmp_path, capsys, checkpoints, monkeypatch):
    """Where a device lacks a half-precision kernel, generate names the dtype and the fix, and loads nothing."""
    real = F.conv2d

    def no_half(x, *args, **kw):
        if x.dtype == torch.float16:
            raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
        return real(x, *args, **kw)

    monkeypatch.setattr(F, "conv2d", no_half)
    loads = []
    import latentdiff.pipeline as pipeline_mod
    monkeypatch.setattr(pipeline_mod, "load_models", lambda *a, **k: loads.append(a))
    from latentdiff.generate import main
    rc = main(["a cat", "--checkpoint", str(checkpoints["tiny"]), "--device", "cpu", "--dtype", "fp16",
               "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "fp16 is not supported on cpu" in err[0] and "--dtype fp32" in err[0]
    assert not loads and not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from test_train import write_shards
    return write_shards(tmp_path_factory.mktemp("shards"), 2, 4, corrupt=False)


@pytest.mark.parametrize("stage", ["unet", "vae"])
def test_trainer_steps_under_bf16_autocast_on_cpu(shards, tmp_path, stage):
    """The same three steps with and without bf16 autocast: finite losses that agree, weights stored in float32."""
    from latentdiff.train import __main__ as train_main
    from test_train import CONFIG, common_args, complete_checkpoints, read_csv
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        train_main.main(["--config", str(CONFIG), *common_args(shards, out, stage=stage, steps=3, lr="1e-3",
                                                          mixed_precision=precision),
                    "--data.num_workers=0", "--data.caption_dropout=0"])
        losses[precision] = torch.tensor([r["loss"] for r in read_csv(out)])
        state = torch.load(complete_checkpoints(out)[3] / "state.pt", weights_only=True)
        weights = [v for module in state["model"].values() for v in module.values() if v.is_floating_point()]
        assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    assert torch.isfinite(losses["bf16"]).all() and len(losses["bf16"]) == 3
    assert rel(losses["bf16"], losses["no"]) <= 5e-2, losses
    assert "bf16 autocast" in (tmp_path / "bf16" / "train.log").read_text()
