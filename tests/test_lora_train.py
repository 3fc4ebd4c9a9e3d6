"""train.lora: LoRA / LoCon factors trained by the trainer on a frozen base, saved as kohya files.

References: diffusers' own `load_lora_weights` + `fuse_lora` on the base converted by diffusers' single-file
converter (its kohya-name conversion is independent of ours), and latentdiff's loader (models/lora.py) against the
training-time model with its LoRA layers; resume and torchrun follow tests/test_train.py's patterns.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from latentdiff.io.adapters import read_lora
from latentdiff.io.checkpoint import load_models
from latentdiff.models.lora import Patcher
from latentdiff.models.lora_train import LoraNetwork
from latentdiff.train import __main__ as train_main
from latentdiff.train.config import process as diffusion
from latentdiff.data.shards import write_tar
from test_lora import diffusers_pipe, rel
from test_sdxl import bpe_files  # noqa: F401 - a fixture
from test_train import CONFIG, common_args, finish, load_state, refused, synthetic_image, \
    torchrun, write_shards

ALL = "[attn,ff,proj,resblock]"


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("clean"), 2, 4, corrupt=False)


def lora_args(shards, out, init, **train):
    return ["--config", str(CONFIG), *common_args(shards, out, init=init, **train), "--data.num_workers=0",
            "--train.lora.rank=4", "--train.lora.alpha=2", "--train.lora.text_encoder=true",
            f"--train.lora.targets={ALL}"]


@pytest.fixture(scope="module")
def lora_run(clean_shards, tiny_checkpoint, tmp_path_factory):
    """Two steps at a high learning rate with ema_decay 0 (the EMA, which is exported, equals the raw factors)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train_main.main(lora_args(clean_shards, out, tiny_checkpoint, steps=2, lr="3e-2", ema_decay=0.0)) == 0
    return out


def test_only_the_factors_train_and_the_checkpoint_holds_only_them(lora_run, tiny_checkpoint):
    folder = lora_run / "ckpt-00000002"
    assert sorted(p.name for p in folder.iterdir()) == ["lora.safetensors", "state.pt"]
    state = load_state(folder)
    assert set(state["model"]) == {"lora"} and set(state["ema"]["modules"]) == {"lora"}
    factors = state["model"]["lora"]
    n_params = sum(v.numel() for k, v in factors.items() if k.endswith("weight"))
    moments = [s for s in state["optimizer"]["state"].values()]
    assert sum(s["exp_avg"].numel() for s in moments) == n_params  # Adam's state covers the factors, nothing else
    assert all(float(s["step"]) == 2 for s in moments)
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in factors.items())  # up left zero
    assert (lora_run / "lora.safetensors").read_bytes() == (folder / "lora.safetensors").read_bytes()
    with safe_open(str(folder / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 2.0 and meta["ss_base_model_version"] == "latentdiff_tiny"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon on a 3x3 conv
    assert {k for k in keys if k.endswith(".alpha")} and all(k.rsplit(".", 2)[-2] in ("lora_down", "lora_up")
                                                            for k in keys if k.endswith(".weight"))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 64, generator=g),
            torch.randint(0, 49000, (2, 77), generator=g))


def test_the_file_loads_in_latentdiff_and_diffusers_as_it_trained(lora_run, tiny_checkpoint, bpe_files):
    """The U-Net and text outputs of (a) the base with its training-time LoRA layers holding the saved factors,
    (b) the base with the file applied by latentdiff's loader, (c) diffusers' converted base with
    load_lora_weights + fuse_lora: all the same, and not the base's."""
    x, t, ctx, tokens = _inputs()
    live = load_models(tiny_checkpoint)
    with torch.no_grad():
        base_u, base_t = live.unet(x, t, ctx), live.text(tokens)
    network = LoraNetwork(live.unet, live.text, 4, 2.0, ("attn", "ff", "proj", "resblock"))
    network.load_state_dict(load_state(lora_run / "ckpt-00000002")["ema"]["modules"]["lora"])
    with torch.no_grad():
        train_u, train_t = live.unet(x, t, ctx), live.text(tokens)
    assert rel(train_u, base_u) > 1e-3 and rel(train_t, base_t) > 1e-3

    path = lora_run / "lora.safetensors"
    loaded = load_models(tiny_checkpoint)
    pipe = diffusers_pipe(loaded, bpe_files)  # converted before the adapter is applied to ours
    Patcher(loaded.unet, loaded.text).apply([(read_lora(path, loaded.unet, loaded.text), 1.0, 1.0)])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    with torch.no_grad():
        ours_u, ours_t = loaded.unet(x, t, ctx), loaded.text(tokens)
        theirs_u = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        theirs_t = pipe.text_encoder(tokens).last_hidden_state
    assert rel(ours_u, train_u) <= 1e-5 and rel(ours_t, train_t) <= 1e-5
    assert rel(theirs_u, train_u) <= 1e-4 and rel(theirs_t, train_t) <= 1e-4


def test_resume_after_sigterm_continues_the_factors_ema_and_adam(clean_shards, tiny_checkpoint, tmp_path,
                                                                  monkeypatch, capsys):
    """SIGTERM in step 2 saves step 2; a resume at lr 0 keeps the factors bit for bit, continues Adam's step count
    and moves the EMA by its closed form, exactly as a full fine-tuning resume does (test_train.py)."""
    calls, real = [0], diffusion.training_batch

    def preempted(*args):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(diffusion, "training_batch", preempted)
    out = tmp_path / "run"
    assert train_main.main(lora_args(clean_shards, out, tiny_checkpoint, steps=50, lr="1e-2", ema_decay=0.9)) == 0
    saved = load_state(out / "ckpt-00000002")
    monkeypatch.setattr(diffusion, "training_batch", real)
    assert train_main.main(lora_args(clean_shards, out, tiny_checkpoint, steps=4, lr=0.0, ema_decay=0.9,
                                     lr_schedule="constant") + ["--resume", "auto"]) == 0
    final = load_state(out / "ckpt-00000004")
    assert "resumed from ckpt-00000002 at step 2" in (out / "train.log").read_text()
    for k, v in saved["model"]["lora"].items():
        assert torch.equal(final["model"]["lora"][k], v), k
    for s0, s1 in zip(saved["optimizer"]["state"].values(), final["optimizer"]["state"].values()):
        assert float(s1["step"]) == float(s0["step"]) + 2
    n0 = saved["ema"]["updates"]
    keep = 1.0
    for n in range(n0, n0 + 2):
        keep *= min(0.9, (1 + n) / (10 + n))
    for k, w in saved["model"]["lora"].items():
        expect = w.double() + keep * (saved["ema"]["modules"]["lora"][k].double() - w.double())
        torch.testing.assert_close(final["ema"]["modules"]["lora"][k].double(), expect, rtol=1e-5, atol=1e-7)
    # A resume onto another base is refused before anything is written.
    other = tmp_path / "other.safetensors"
    base = load_models(tiny_checkpoint)
    from latentdiff.io.checkpoint import save_models
    import dataclasses
    save_models(other, dataclasses.replace(base.config, name="other"), base.unet, base.vae, base.text)
    refused(capsys, "holds LoRA factors for another base model",
            lora_args(clean_shards, out, other, steps=6) + ["--resume", "auto"])
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]


def test_bad_lora_configs_are_one_line_and_write_nothing(clean_shards, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "never"
    base = lora_args(clean_shards, out, tiny_checkpoint, steps=1)
    refused(capsys, r"train.lora.rank must be at least 1 \(got 0\)", base + ["--train.lora.rank=0"])
    refused(capsys, r"train.lora: rank 999 must be between 1 and the narrowest targeted layer's width, 32",
            base + ["--train.lora.rank=999"])
    refused(capsys, r"train.lora.targets: bogus; use some of attn, ff, proj, resblock",
            base + ["--train.lora.targets=[attn,bogus]"])
    refused(capsys, r"train.lora.targets: none given", base + ["--train.lora.targets=[]"])
    refused(capsys, r"train.lora .*needs train.stage=unet, not the VAE stage", base + ["--train.stage=vae"])
    refused(capsys, r"base_dtype=bfloat16 .* cannot be used with train.mixed_precision=no",
            base + ["--train.lora.base_dtype=bfloat16", "--train.mixed_precision=no"])
    refused(capsys, r"train.lora.base_dtype", base + ["--train.lora.base_dtype=float16"])
    assert not out.exists()


def test_a_bf16_base_halves_the_frozen_weights_and_trains_the_fp32_factors_alike(lora_run, clean_shards,
                                                                                   tiny_checkpoint, tmp_path):
    """train.lora.base_dtype=bfloat16: the U-Net and text encoder are stored in bf16 (the VAE, factors, moments and
    EMA in fp32), a sample grid in the middle of the run leaves them bf16, and the factors after the same two steps
    are the fp32 base run's within bf16 rounding (and not equal to them: the base really ran in bf16)."""
    from latentdiff.train.config import LoraConfig, TrainConfig
    from latentdiff.train.loop import trained_modules

    models = load_models(tiny_checkpoint, device="cpu", dtype=torch.float32)
    fp32_bytes = sum(p.numel() * p.element_size() for m in (models.unet, models.text) for p in m.parameters())
    trained, _ = trained_modules(models, TrainConfig(lora=LoraConfig(rank=4, base_dtype="bfloat16")))
    assert {p.dtype for m in (models.unet, models.text) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in models.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in trained["lora"].parameters()} == {torch.float32}
    assert sum(p.numel() * p.element_size() for m in (models.unet, models.text) for p in m.parameters()) \
        == fp32_bytes // 2

    out = tmp_path / "bf16"
    args = lora_args(clean_shards, out, tiny_checkpoint, steps=2, lr="3e-2", ema_decay=0.0, sample_every=1,
                     sample_steps=2)
    assert train_main.main(args + ["--train.lora.base_dtype=bfloat16"]) == 0
    assert "bf16 base" in (out / "train.log").read_text()
    assert (out / "samples" / "step-00000001.png").is_file()  # a grid drawn mid-run, before step 2
    ours, fp32 = (load_state(run / "ckpt-00000002")["model"]["lora"] for run in (out, lora_run))
    ups = [k for k in ours if k.endswith("lora_up.weight")]
    assert all(ours[k].dtype == torch.float32 for k in ours)
    a, b = torch.cat([ours[k].flatten() for k in ups]), torch.cat([fp32[k].flatten() for k in ups])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert 0.95 < cos < 1.0, cos  # 0.991 measured; Adam's first steps move each weight by about lr * sign(grad)
    losses = [[float(r["loss"]) for r in csv.DictReader(open(run / "log.csv"))] for run in (out, lora_run)]
    assert losses[0] != losses[1]
    assert all(abs(x - y) < 2e-3 * abs(y) for x, y in zip(*losses)), losses  # 3e-4 measured


LORA_IN_STEP = """
import sys, torch
from latentdiff.train import __main__ as train_main, losses
from latentdiff.train.config import process

# Timesteps and noise as functions of each sample: a rank draws its stream in another shape than one process does.
losses.sample_timesteps = lambda n, T, bias, gen, device: torch.full((n,), 400, device=device)
real = process.training_batch
process.training_batch = lambda x0, t, noise, *rest: real(x0, t, torch.sin(7.0 * x0 + 1.0) * 1.3, *rest)
sys.exit(train_main.main(sys.argv[1:]))
"""


@pytest.mark.slow  # a torchrun launch: ~30 s on 2 cores
def test_two_ranks_train_the_same_factors_as_one_process(tiny_checkpoint, tmp_path):
    """One image and caption repeated, so any split of the global batch of 4 holds the same samples: 2 gloo ranks
    of 2 and one process of 4 take the same steps."""
    folder = tmp_path / "same"
    folder.mkdir()
    for k in range(2):
        write_tar(folder / f"s-{k:06d}.tar", [(f"{k}{i}", {"png": synthetic_image("red", "circle"),
                                                           "txt": b"a red circle"}) for i in range(4)])
    shards = str(folder / "s-{000000..000001}.tar")
    script = tmp_path / "patched.py"
    script.write_text(LORA_IN_STEP)
    # Adam's eps well above the gradients' rounding: with 1e-8, an element whose gradient is rounding noise still
    # moves by about lr, in a direction the summation order decides.
    common = ["--data.caption_dropout=0", "--train.lora.dropout=0", "--train.adam_eps=1e-4"]
    one = lora_args(shards, tmp_path / "one", tiny_checkpoint, steps=3, lr="1e-2")[2:] + common
    root = Path(__file__).resolve().parent.parent
    finish(subprocess.Popen([sys.executable, str(script), "--config", str(CONFIG), *one, "--data.batch_size=4"],
                            cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    two = lora_args(shards, tmp_path / "two", tiny_checkpoint, steps=3, lr="1e-2")[2:] + common
    finish(torchrun([*two, "--data.batch_size=2"], program=(str(script),)))
    s1, s2 = (load_state(tmp_path / run / "ckpt-00000003") for run in ("one", "two"))
    assert s2["world_size"] == 2
    for k, v in s1["model"]["lora"].items():
        torch.testing.assert_close(s2["model"]["lora"][k], v, rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 1e-3 for k, v in s1["model"]["lora"].items() if "lora_up" in k)


@pytest.mark.slow  # 40 emoji rendered, 4 training steps, one generation: ~7 s on 2 cores
def test_readme_lora_recipe_runs_as_written(tmp_path, capsys, monkeypatch):
    """The README's LoRA recipe from the clone's root, its folders in tmp_path and 4 steps instead of 400: the style
    folder, make-shards, train.lora with configs/lora-emoji.yaml, and generate with the file it wrote."""
    from latentdiff.data import __main__ as data_main
    from latentdiff.data.emoji import find_emoji_font
    from latentdiff.data.loader import DataError
    from latentdiff.generate import main as generate_main
    from latentdiff.io.images import parse_parameters
    from PIL import Image
    from test_first_hour import ROOT, printed_shards, readme_command

    try:
        find_emoji_font()
    except DataError as e:
        pytest.skip(str(e))
    monkeypatch.chdir(ROOT)  # train.init in the config is a path from the clone's root
    folders = {"ink/": str(tmp_path / "ink"), "ink-shards/": str(tmp_path / "shards")}
    data = readme_command("python docs/experiments/lora_style.py data")
    assert subprocess.run([sys.executable] + [folders.get(a, a) for a in data[1:]], check=True).returncode == 0
    assert len(list((tmp_path / "ink").glob("*.png"))) == len(list((tmp_path / "ink").glob("*.txt"))) == 40
    data_main.main([folders.get(a, a) for a in readme_command("python -m latentdiff.data make-shards ink/")[3:]])
    shards = printed_shards(capsys.readouterr().out)
    command = readme_command("python -m latentdiff.train --config configs/lora-emoji.yaml")
    args = [a for a in command[3:] if not a.startswith("--data.shards=")] + [f"--data.shards={shards}"]
    out = tmp_path / "run"
    assert train_main.main(args + [f"--train.out_dir={out}", "--train.steps=4", "--train.checkpoint_every=4"]) == 0
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "8" and meta["ss_base_model_version"] == "latentdiff_emoji", meta
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # U-Net only, as the config says
    gen = readme_command("python -m latentdiff.generate --lora runs/lora-emoji/lora.safetensors")
    gen = [a.replace("runs/lora-emoji/", f"{out}/") for a in gen[3:]]
    assert generate_main(gen + ["--steps", "2", "-o", str(tmp_path / "cat.png")]) == 0
    params = parse_parameters(Image.open(tmp_path / "cat.png").info["parameters"])
    assert "<lora:lora:0.8>" in params["prompt"] and "lora:" in params["Lora hashes"], params
