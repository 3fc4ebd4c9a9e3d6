"""The trainer: torchrun DDP on gloo, checkpoints and resume, latent shards, non-finite losses, config errors.

Everything runs the tiny model on 32x32 synthetic shards on the CPU. The torchrun runs are real subprocesses
(`python -m torch.distributed.run --nproc_per_node=2 -m latentdiff.train ...`).
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from latentdiff.train.config import process as diffusion
from latentdiff.train import config as train_config, loop as train_loop, losses as train_losses, __main__ as train_main
from latentdiff.io.checkpoint import load_models
from latentdiff.data.shards import write_tar
from test_data import read_tar

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train-tiny.yaml"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 20)}
SHAPES = ("square", "circle", "triangle")


def synthetic_image(color: str, shape: str, res: int = 32) -> bytes:
    img = Image.new("RGB", (res, res), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    box = (res // 4, res // 4, 3 * res // 4, 3 * res // 4)
    if shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.polygon([(res // 2, res // 4), (res // 4, 3 * res // 4), (3 * res // 4, 3 * res // 4)], fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out: Path, n_shards: int, per_shard: int, corrupt: bool) -> str:
    """Synthetic captioned shapes written with latentdiff.data's tar writer; optionally one undecodable image."""
    out.mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    i = 0
    for k in range(n_shards):
        samples = []
        for _ in range(per_shard):
            color, shape = combos[i % len(combos)]
            files = {"png": synthetic_image(color, shape), "txt": f"a {color} {shape}".encode()}
            if corrupt and i == 1:
                files = {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": b"a broken image"}
            samples.append((f"{i:06d}", files))
            i += 1
        write_tar(out / f"s-{k:06d}.tar", samples)
    return str(out / f"s-{{000000..{n_shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 3 samples, one of them corrupt: 11 good images the tiny model can memorise."""
    return write_shards(tmp_path_factory.mktemp("shards"), 4, 3, corrupt=True)


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("clean"), 2, 4, corrupt=False)


def common_args(shards: str, out: Path, **train) -> list[str]:
    args = [f"--data.shards={shards}", "--data.resolution=32", "--data.batch_size=4", f"--train.out_dir={out}",
            "--train.warmup_steps=0", "--train.log_every=1"]
    return args + [f"--train.{k}={v}" for k, v in train.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], program: tuple[str, ...] = ("-m", "latentdiff.train"), **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *program, "--config", str(CONFIG), *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    assert proc.returncode == 0, out[-4000:]
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in its own session, so a process group is not enough)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen):
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def read_csv(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def complete_checkpoints(out: Path) -> dict[int, Path]:
    """Independent of the trainer's own listing: ckpt-N directories holding both files."""
    found = {}
    for p in out.glob("ckpt-*"):
        if (p / "state.pt").is_file() and (p / "model.safetensors").is_file():
            found[int(p.name.split("-")[1])] = p
    return found


def load_state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # two torchrun launches' worth of imports: ~30 s on 2 cores
def test_torchrun_two_ranks_learn_in_sync(shards, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(common_args(shards, out, steps=24, lr="3e-3", checkpoint_every=12, keep_last=5)
                    + ["--data.num_workers=1", "--data.shuffle_buffer=4"])
    finish(proc)

    rows = read_csv(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # memorising 11 images: the diffusion loss falls
    assert rows[-1]["skipped_samples"] >= 1  # the corrupt sample was seen, skipped and counted
    assert rows[-1]["nonfinite_steps"] == 0

    log = (out / "train.log").read_text()
    digests = log.split("weights digest per rank: ")[1].split(" (")[0].split()
    assert len(digests) == 2 and digests[0] == digests[1], log  # both ranks hold the same weights
    assert "2 rank(s) on cpu" in log

    ckpts = complete_checkpoints(out)
    assert sorted(ckpts) == [12, 24]
    state = load_state(ckpts[24])
    assert state["step"] == 24 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["config"]["train"]["steps"] == 24
    # The exported checkpoint is the EMA U-Net, loadable by the generic loader with its model config.
    models = load_models(ckpts[24] / "model.safetensors")
    assert models.config.name == "tiny" and models.config.image_size == 32
    for k, v in models.unet.state_dict().items():
        torch.testing.assert_close(v, state["ema"]["modules"]["unet"][k], rtol=0, atol=0)
    raw = state["model"]["unet"]
    assert any(not torch.equal(raw[k], v) for k, v in models.unet.state_dict().items())  # EMA is not the raw copy


@pytest.mark.slow
def test_sigkill_then_resume_auto_continues_from_the_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(common_args(shards, out, steps=1000, lr="1e-3", checkpoint_every=3, keep_last=2,
                                ema_decay=0.99) + ["--data.num_workers=0"])
    try:
        deadline = time.time() + 180
        while not any(s >= 6 for s in complete_checkpoints(out)):  # one checkpoint already replaced an older one
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
    finally:  # the agent and both ranks at once, as a node failure would: mid-step or mid-save
        kill_tree(proc)

    # A save interrupted by a kill: only a temp directory, with truncated files. It must never be resumed.
    partial = out / ".tmp-ckpt-00000999-12345"
    partial.mkdir(exist_ok=True)
    (partial / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    (partial / "model.safetensors").write_bytes(b"\x10\x00\x00")
    ckpts = complete_checkpoints(out)
    step0 = max(ckpts)
    saved = load_state(ckpts[step0])
    assert saved["step"] == step0

    # Resume with lr = 0: raw weights must stay exactly as saved, so the EMA follows a closed form from the saved EMA.
    proc = torchrun(common_args(shards, out, steps=step0 + 3, lr=0.0, lr_schedule="constant", ema_decay=0.99,
                                checkpoint_every=1000) + ["--data.num_workers=0", "--resume", "auto"])
    finish(proc)
    log = (out / "train.log").read_text()
    assert f"resumed from ckpt-{step0:08d} at step {step0}" in log
    assert not partial.exists()  # the leftover was removed, not loaded

    final = load_state(complete_checkpoints(out)[step0 + 3])
    assert final["step"] == step0 + 3
    for k, v in saved["model"]["unet"].items():
        assert torch.equal(final["model"]["unet"][k], v), k
    for s0, s1 in zip(saved["optimizer"]["state"].values(), final["optimizer"]["state"].values()):
        assert float(s1["step"]) == float(s0["step"]) + 3  # Adam's moments continued, not restarted
    n0 = saved["ema"]["updates"]
    assert final["ema"]["updates"] == n0 + 3
    keep = math.prod(min(0.99, (1 + n) / (10 + n)) for n in range(n0, n0 + 3))
    for k, w in saved["model"]["unet"].items():
        if not w.is_floating_point():
            continue
        expect = w.double() + keep * (saved["ema"]["modules"]["unet"][k].double() - w.double())
        torch.testing.assert_close(final["ema"]["modules"]["unet"][k].double(), expect, rtol=1e-5, atol=1e-6)
    rows = read_csv(out)
    resumed = [int(r["step"]) for r in rows if int(r["step"]) > step0]
    assert resumed[-3:] == [step0 + 1, step0 + 2, step0 + 3]


STOP_IN_STEP_3 = """
import signal, sys, time
from pathlib import Path
from latentdiff.train import __main__ as train_main, loop

marker, argv = Path(sys.argv[1]), sys.argv[2:]
real_step, real_handler, signalled = loop.train_step, loop.StopRequested.handler, []


def handler(self, signum, frame):
    signalled.append(signum)
    real_handler(self, signum, frame)


def step(run, batches, window):
    if run.step == 2 and run.d.main:  # rank 0, in step 3: ask for the signal, and go on only once it arrived
        marker.write_text("in step 3")
        deadline = time.time() + 60
        while not signalled and time.time() < deadline:
            time.sleep(0.05)
    return real_step(run, batches, window)


loop.StopRequested.handler, loop.train_step = handler, step
sys.exit(train_main.main(argv))
"""


@pytest.mark.slow  # a torchrun launch: ~15 s on 2 cores
def test_torchrun_stops_at_the_end_of_the_step_the_signal_arrived_in(clean_shards, tmp_path):
    """SIGTERM to torchrun's process group (the agent passes it on to the ranks) while rank 0 is in step 3: every
    rank stops at the end of step 3 and saves there, with log steps far apart (log_every=40)."""
    script, marker, out = tmp_path / "stop_in_step_3.py", tmp_path / "in-step-3", tmp_path / "run"
    script.write_text(STOP_IN_STEP_3)
    proc = torchrun(common_args(clean_shards, out, steps=10_000, log_every=40, checkpoint_every=10_000)
                    + ["--data.num_workers=0"], program=(str(script), str(marker)), start_new_session=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "rank 0 did not reach step 3 within 120 s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)  # as `timeout -s TERM torchrun ...` or a container stop does
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert "step 3: stop requested" in output, output[-4000:]
    assert sorted(complete_checkpoints(out)) == [3], output[-4000:]
    state = load_state(complete_checkpoints(out)[3])
    assert state["step"] == 3 and len(state["rng"]) == 2  # both ranks took part in the save


def test_latent_shards_train_like_encoding_on_the_fly(clean_shards, tmp_path, tiny_checkpoint):
    from latentdiff.data import __main__ as data_cli
    latent_dir = tmp_path / "latents"
    data_cli.main(["encode-shards", clean_shards, "--out", str(latent_dir), "--checkpoint", str(tiny_checkpoint),
               "--resolution", "32", "--batch-size", "3", "--device", "cpu"])
    runs = {}
    for name, spec, latents in (("pixels", clean_shards, "false"), ("latents", str(latent_dir), "true")):
        out = tmp_path / name
        train_main.main(["--config", str(CONFIG), *common_args(spec, out, steps=6, lr="1e-3", init=tiny_checkpoint),
                        "--data.num_workers=0", f"--data.latents={latents}", "--data.shuffle_buffer=3"])
        runs[name] = [r["loss"] for r in read_csv(out)]
    assert len(runs["pixels"]) == 6
    torch.testing.assert_close(torch.tensor(runs["latents"]), torch.tensor(runs["pixels"]), rtol=1e-4, atol=1e-6)


def test_nonfinite_losses_are_skipped_and_counted(clean_shards, tmp_path, monkeypatch):
    calls = [0]
    real = diffusion.training_batch

    def poisoned(x0, t, noise, schedule, prediction):
        calls[0] += 1
        x_t, target = real(x0, t, noise, schedule, prediction)
        return x_t, target * float("nan") if calls[0] in (2, 3) else target

    monkeypatch.setattr(diffusion, "training_batch", poisoned)
    out = tmp_path / "run"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, steps=6, lr="1e-3", sample_every=6,
                                                          sample_steps=2), "--data.num_workers=0"])
    rows = read_csv(out)
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 2, 2, 2, 2]
    assert math.isnan(rows[1]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[3:])
    state = load_state(complete_checkpoints(out)[6])
    assert state["ema"]["updates"] == 4  # the two poisoned steps updated neither weights nor EMA
    assert all(float(s["step"]) == 4 for s in state["optimizer"]["state"].values())
    grid = Image.open(out / "samples" / "step-00000006.png")
    assert grid.size == (2 * 32, 32)  # two validation prompts at the training resolution, from the EMA weights


def test_too_many_nonfinite_losses_stop_with_a_clear_message(clean_shards, tmp_path, monkeypatch):
    real = diffusion.training_batch
    monkeypatch.setattr(diffusion, "training_batch",
                        lambda *a: (lambda xt, tg: (xt, tg * float("inf")))(*real(*a)))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"3 consecutive non-finite losses at step 3 .*max_consecutive_nonfinite=3"):
        train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, steps=20,
                                                              max_consecutive_nonfinite=3), "--data.num_workers=0"])
    assert not complete_checkpoints(out)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(clean_shards, tmp_path, monkeypatch):
    calls = [0]
    real = diffusion.training_batch

    def preempted(*args):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would, in the middle of step 3
        return real(*args)

    monkeypatch.setattr(diffusion, "training_batch", preempted)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, steps=50, checkpoint_every=100),
                    "--data.num_workers=0"])
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is gone after the run
    assert sorted(complete_checkpoints(out)) == [3]  # step 3 finished, then saved
    assert load_state(complete_checkpoints(out)[3])["step"] == 3
    assert "stop requested" in (out / "train.log").read_text()


def test_vae_stage_reduces_reconstruction_loss(clean_shards, tmp_path):
    out = tmp_path / "vae"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, stage="vae", steps=12, lr="2e-3",
                                                          sample_every=12), "--data.num_workers=0"])
    losses = [r["loss"] for r in read_csv(out)]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    state = load_state(complete_checkpoints(out)[12])
    assert set(state["model"]) == {"vae"}
    models = load_models(complete_checkpoints(out)[12] / "model.safetensors")
    for k, v in models.vae.state_dict().items():
        assert torch.equal(v, state["ema"]["modules"]["vae"][k]), k
    assert Image.open(out / "samples" / "step-00000012.png").size == (4 * 32, 2 * 32)  # originals over EMA recons

    # From scratch the exported scale factor is estimated (1/std of the reference batch's latents): latents of the
    # other training images, scaled by it, have a standard deviation near 1, and SD's 0.18215 is gone.
    from latentdiff.data.loader import DataConfig, make_loader
    assert models.config.vae.scale_factor != pytest.approx(0.18215)
    loader = make_loader(DataConfig(shards=clean_shards, resolution=32, batch_size=8, num_workers=0,
                                    caption_dropout=0.0, resample=False))
    pixels = torch.cat([b["pixels"] for b in loader])
    with torch.no_grad():
        std = models.vae.encode(pixels).std().item()  # encode() applies the stored factor
    assert 0.6 < std < 1.6, std


def test_vae_stage_keeps_the_scale_factor_when_asked(clean_shards, tmp_path):
    out = tmp_path / "vae"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, stage="vae", steps=2,
                                                          vae_scale_factor="keep"), "--data.num_workers=0"])
    models = load_models(complete_checkpoints(out)[2] / "model.safetensors")
    assert models.config.vae.scale_factor == pytest.approx(0.18215)


def test_gradient_checkpointing_changes_nothing_but_memory(clean_shards, tmp_path, tiny_checkpoint):
    """Text encoder trained with the U-Net, min-SNR weighting, two accumulated micro-batches: the same run with
    and without activation checkpointing gives the same losses and weights."""
    states = {}
    for gc in ("false", "true"):
        out = tmp_path / gc
        train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, steps=3, lr="1e-3", grad_accum=2,
                                                              train_text_encoder="true", loss_weighting="min_snr",
                                                              gradient_checkpointing=gc, init=tiny_checkpoint),
                        "--data.batch_size=2", "--data.num_workers=0"])
        states[gc] = (read_csv(out), load_state(complete_checkpoints(out)[3]))
    (rows0, s0), (rows1, s1) = states["false"], states["true"]
    torch.testing.assert_close([r["loss"] for r in rows1], [r["loss"] for r in rows0], rtol=1e-5, atol=1e-7)
    assert set(s0["model"]) == {"unet", "text"}
    for k, v in s0["model"]["text"].items():
        torch.testing.assert_close(s1["model"]["text"][k], v, rtol=1e-4, atol=1e-6)
    init = load_models(tiny_checkpoint).text.state_dict()
    assert any(not torch.equal(init[k], v) for k, v in s0["model"]["text"].items())  # the text encoder trained


def test_init_vae_keeps_the_vae_and_builds_the_rest_from_model_config(clean_shards, tmp_path, tiny_checkpoint,
                                                                     capsys):
    """train.init_vae: the VAE and its scale factor come from the checkpoint, the U-Net and text encoder are the
    config's fresh ones, and model: overrides (here the prediction target) apply, unlike with train.init."""
    out = tmp_path / "x0"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, steps=1, init_vae=tiny_checkpoint),
                    "--model.diffusion.prediction=sample", "--model.vae.scale_factor=0.5", "--data.num_workers=0"])
    got = load_models(complete_checkpoints(out)[1] / "model.safetensors")
    src = load_models(tiny_checkpoint)
    assert got.config.diffusion.prediction == "sample"
    assert got.config.vae.scale_factor == src.config.vae.scale_factor == pytest.approx(0.18215)
    for k, v in src.vae.state_dict().items():
        assert torch.equal(got.vae.state_dict()[k], v), k
    torch.manual_seed(0)  # the trainer's seed: the same fresh text encoder as a run from scratch
    fresh = train_loop.build_fresh(got.config).text.state_dict()
    assert all(torch.equal(got.text.state_dict()[k], v) for k, v in fresh.items())  # frozen, as built
    refused(capsys, "is not the one model.vae describes",
            ["--config", str(CONFIG), *common_args(clean_shards, tmp_path / "bad", steps=1, init_vae=tiny_checkpoint),
             "--model.vae.z_channels=8", "--model.vae.embed_dim=8", "--data.num_workers=0"])
    refused(capsys, "train.init_vae starts a U-Net stage",
            ["--config", str(CONFIG), "--train.stage=vae", f"--train.init_vae={tiny_checkpoint}"])


def refused(capsys, pattern, argv):
    """The trainer refuses argv with exit code 2 and one line on stderr matching pattern."""
    capsys.readouterr()
    assert train_main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


def test_config_errors_name_the_problem(clean_shards, tmp_path, capsys):
    refused(capsys, r"unknown config key\(s\) train\.lrr",
            ["--config", str(CONFIG), f"--data.shards={clean_shards}", "--train.lrr=1e-4"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text() + "optim:\n  lr: 1\n")
    refused(capsys, r"unknown config section\(s\) optim", ["--config", str(bad)])
    refused(capsys, "train.stage=vae trains on pixels",
            ["--config", str(CONFIG), "--train.stage=vae", "--data.latents=true"])
    refused(capsys, r"train.lr_schedule: 'linear' is not one of",
            ["--config", str(CONFIG), "--train.lr_schedule=linear"])


def test_lr_schedule_warmup_then_cosine():
    cfg = train_config.TrainConfig(lr=1.0, warmup_steps=4, steps=14, lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [train_config.lr_at(s, cfg) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    # cosine from lr at the end of warm-up to lr * min_lr_ratio at the last step (Loshchilov & Hutter 2017)
    for s in range(4, 14):
        expect = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 10))
        assert abs(lrs[s] - expect) < 1e-12
    const = train_config.TrainConfig(lr=2.0, warmup_steps=0, lr_schedule="constant")
    assert {train_config.lr_at(s, const) for s in (0, 5, 500)} == {2.0}


@pytest.mark.parametrize("bias", [0.0, 2.0])
def test_timestep_bias_draws_t_with_the_stated_law(bias):
    """P(t < k) = (k / T)^(1 + bias), checked on 200k draws against the closed form at every decile (a KS-style
    bound of 6 standard errors); bias 2 puts 1 - 0.6^3 = 78.4% of the draws above t = 600."""
    T, n = 1000, 200_000
    gen = torch.Generator().manual_seed(0)
    t = train_losses.sample_timesteps(n, T, bias, gen, "cpu")
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= T - 1
    for k in range(100, T, 100):
        p = (k / T) ** (1 + bias)
        got = (t < k).double().mean().item()
        assert abs(got - p) < 6 * math.sqrt(p * (1 - p) / n), (k, got, p)
    if bias:
        assert (t >= 600).double().mean().item() == pytest.approx(1 - 0.6 ** 3, abs=0.005)


def test_vae_decoder_only_keeps_the_encoder_and_the_latents(clean_shards, tmp_path, capsys):
    """train.vae_trainable=decoder from a VAE checkpoint: encoder and quant_conv stay bit-identical (so latents a
    U-Net learnt stay valid, and the scale factor is kept), the decoder trains and its loss falls."""
    first = tmp_path / "vae"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, first, stage="vae", steps=2, lr="2e-3"),
                    "--data.num_workers=0"])
    init = complete_checkpoints(first)[2] / "model.safetensors"
    out = tmp_path / "decoder"
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, stage="vae", steps=10, lr="2e-3",
                                                          init=init, vae_trainable="decoder"),
                    "--data.num_workers=0"])
    src, got = load_models(init), load_models(complete_checkpoints(out)[10] / "model.safetensors")
    assert got.config.vae.scale_factor == src.config.vae.scale_factor
    a, b = src.vae.state_dict(), got.vae.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert all(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder.") and k.endswith(".weight"))
    losses = [r["loss"] for r in read_csv(out)]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    refused(capsys, "vae_trainable=decoder fine-tunes a trained VAE",
            ["--config", str(CONFIG), "--train.stage=vae", "--train.vae_trainable=decoder"])


def test_on_the_fly_latents_equal_encode_shards_under_bf16_autocast(clean_shards, tmp_path, tiny_checkpoint,
                                                                   monkeypatch):
    """The U-Net stage trains on exactly the latents encode-shards writes, also under bf16 autocast (item 6)."""
    import numpy as np

    from latentdiff.data.loader import DataConfig, make_loader
    from latentdiff.data.encode import encode_shards
    from latentdiff.diffusion.schedule import Schedule
    summary = encode_shards(clean_shards, tmp_path / "lat", tiny_checkpoint, 32, 8, "cpu", progress=False)
    models = load_models(tiny_checkpoint)
    loss = train_losses.UNetLoss(models, Schedule.from_config(models.config.diffusion), False, "simple", 5.0)
    seen, real = [], diffusion.training_batch

    def spy(x0, *args):
        seen.append(x0.detach().clone())
        return real(x0, *args)
    monkeypatch.setattr(diffusion, "training_batch", spy)
    loader = make_loader(DataConfig(shards=clean_shards, resolution=32, batch_size=8, num_workers=0,
                                    shuffle_buffer=1, resample=False, caption_dropout=0.0),
                         tokenize=train_loop.Tokenizer(models.config.text))
    batch = next(iter(loader))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss(batch, torch.Generator().manual_seed(0))
    # Captions repeat across the synthetic set; each on-the-fly latent must equal a stored one of its caption.
    want = {}
    for shard in summary["shards"]:
        for key, files in read_tar(shard).items():
            want.setdefault(files["txt"].decode(), []).append(np.load(io.BytesIO(files["latent.npy"])))
    for x0, caption in zip(seen[0], batch["captions"]):
        errs = [float(np.abs(x0.numpy() - w).max()) for w in want[caption]]
        assert min(errs) < 1e-5, (caption, errs)


# ----------------------------------------------------------------------------------------------
# Host reads: what the device-side accounting must not do (issue 20, item 11)


def host_reads(prof, allowed_under: tuple[str, ...] = ()) -> list[list[str]]:
    """The profiled `aten::_local_scalar_dense` calls (a tensor read back to the host: a device sync on a GPU),
    each as its chain of parent ops, leaving out those inside an op of `allowed_under`."""
    found = []
    for ev in prof.events():
        if ev.name != "aten::_local_scalar_dense":
            continue
        chain, p = [], ev.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if not any(name in allowed_under for name in chain):
            found.append(chain)
    return found


def test_ema_update_reads_nothing_back_and_follows_the_closed_form():
    """EMA.update keeps its weight on the device (no _local_scalar_dense in a profile of it), and its weights
    follow the float64 recursion e_n = d_n e_{n-1} + (1 - d_n) p_n with d_n = min(decay, (1 + n) / (10 + n)),
    a skipped step (ok False) leaving average, buffers and count alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
    ema = train_losses.EMA({"net": net}, decay=0.9, warmup=True)
    ema.CHUNK = 10  # parameters of 30, 6, 6 and 6 elements: three foreach chunks
    assert [len(e) for e, _ in train_losses._chunks(list(net.parameters()), list(net.parameters()), 10)] == [1, 2, 1]
    expect = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    n, oks = 0, [True, True, False, True, True, True, False, True]
    for i, ok in enumerate(oks):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 5))  # moves the BatchNorm running statistics (buffers, copied when ok)
        if i == 0:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                ema.update(torch.tensor(ok))
            assert host_reads(prof) == []
        else:
            ema.update(torch.tensor(ok))
        if ok:
            d = min(0.9, (1 + n) / (10 + n))
            names = dict(net.named_parameters())
            for k in expect:
                src = net.state_dict()[k].double()
                expect[k] = d * expect[k] + (1 - d) * src if k in names else src
            n += 1
    assert ema.updates == n == 6
    got = ema.modules["net"].state_dict()
    for k, v in expect.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ema.update()  # without ok, as well
    assert host_reads(prof) == []


def test_a_training_step_reads_nothing_back_from_the_device(clean_shards, tmp_path, monkeypatch):
    """A whole train_step (loss, backward, clipping, optimizer, EMA, window) queues its work without reading a
    tensor back to the host. Fused AdamW's CPU kernel reads its step count and found_inf from host memory (its
    CUDA kernel reads them on the device), so reads inside it are not counted here."""
    real, seen = train_loop.train_step, []

    def profiled(run, batches, window):
        if run.step != 2:
            return real(run, batches, window)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            real(run, batches, window)
        seen.append(host_reads(prof, allowed_under=("aten::_fused_adamw_",)))
    monkeypatch.setattr(train_loop, "train_step", profiled)
    train_main.main(["--config", str(CONFIG), *common_args(clean_shards, tmp_path / "run", steps=3),
                    "--data.num_workers=0"])
    assert seen == [[]]


def test_sample_grids_are_drawn_eagerly_without_cuda_graphs(tiny_config, tmp_path, monkeypatch):
    """save_samples builds its Pipeline with cuda_graphs=False: a grid every sample_every steps would capture a
    throw-away graph (and its memory pool) while loader threads may be calling CUDA."""
    from conftest import build_models
    from latentdiff.data.loader import DataConfig
    from latentdiff.train import log as train_log
    built = []

    class Recorded(train_log.Pipeline):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(train_log, "Pipeline", Recorded)
    models = build_models(tiny_config)
    ema = train_losses.EMA({"unet": models.unet}, decay=0.9, warmup=True)
    cfg = train_config.TrainConfig(sample_prompts=("a red square",), sample_steps=2)
    path = tmp_path / "grid.png"
    train_log.save_samples(path, models, ema, cfg, DataConfig(resolution=32), "cpu", None)
    assert Image.open(path).size == (32, 32)
    assert len(built) == 1 and built[0].get("cuda_graphs") is False, built


def test_gradient_accumulation_equals_one_larger_batch(clean_shards, tmp_path, monkeypatch):
    """grad_accum=2 over batches of 2 takes the same optimizer steps as grad_accum=1 over batches of 4 holding the
    same samples: same losses, same weights (to float rounding). Timesteps and noise are made functions of each
    sample (the two runs draw their random streams in different shapes), captions are never dropped."""
    monkeypatch.setattr(train_losses, "sample_timesteps", lambda n, T, bias, gen, device: torch.full((n,), 400,
                                                                                                     device=device))
    real = diffusion.training_batch
    monkeypatch.setattr(diffusion, "training_batch",
                        lambda x0, t, noise, *rest: real(x0, t, torch.sin(7.0 * x0 + 1.0) * 1.3, *rest))
    runs = {}
    for accum, batch in ((2, 2), (1, 4)):
        out = tmp_path / f"accum{accum}"
        train_main.main(["--config", str(CONFIG), *common_args(clean_shards, out, steps=3, lr="1e-3", grad_accum=accum),
                         f"--data.batch_size={batch}", "--data.caption_dropout=0", "--data.num_workers=0"])
        runs[accum] = ([r["loss"] for r in read_csv(out)], load_state(complete_checkpoints(out)[3]))
    (loss2, s2), (loss1, s1) = runs[2], runs[1]
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-7)
    for k, v in s1["model"]["unet"].items():
        torch.testing.assert_close(s2["model"]["unet"][k], v, rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)  # the trainer's seed: the weights both runs started from
    init = train_loop.build_fresh(load_models(complete_checkpoints(tmp_path / "accum1")[3] / "model.safetensors")
                                  .config).unet.state_dict()
    assert all(not torch.equal(v, init[k]) for k, v in s1["model"]["unet"].items() if k.endswith(".weight"))
