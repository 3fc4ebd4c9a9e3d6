"""What a new user meets in the first hour (issue 21): the trainer's refusals and resume messages, make-shards and
evaluate on a user's own shards, checkpoint names, generate's seeds, guidance, --ema, --from-png of img2img and
half-precision images, the Python API's saved parameters, and the server's access log and size warnings."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import evaluate
from latentdiff.data import __main__ as data_main
from latentdiff.data.loader import expand_shards
from latentdiff.generate import main as generate_main
from latentdiff.io.images import parse_parameters
from latentdiff.train import __main__ as train_main
from test_train import CONFIG, common_args, write_shards

ROOT = Path(__file__).resolve().parent.parent


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def params_of(path) -> dict:
    return parse_parameters(Image.open(path).info["parameters"])


def one_line(err: str) -> str:
    """A refusal's stderr: one line, no traceback."""
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def generate(capsys, *argv) -> tuple[int, str]:
    rc = generate_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The trainer: an untrained VAE, resuming at the end, extending a run, checkpoint names


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 2, 4, corrupt=False)


def train(shards, out, *extra, **train_keys) -> int:
    return train_main.main(["--config", str(CONFIG), *common_args(shards, out, **train_keys),
                            "--data.num_workers=0", *extra])


def test_unet_on_an_untrained_vae_is_refused_and_the_override_warns(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(shards, out, steps=1, allow_untrained_vae="false") == 2
    err = one_line(capsys.readouterr().err)
    assert "untrained VAE" in err and "--train.init_vae" in err and "--train.init=" in err
    assert "train.allow_untrained_vae=true" in err and not out.exists()
    # configs/train-tiny.yaml sets the override on purpose (trainer tests): the run says, loudly, what it makes.
    assert train(shards, out, steps=1) == 0
    assert "WARNING: this U-Net trains on a random, untrained VAE" in (out / "train.log").read_text()
    assert "WARNING" in capsys.readouterr().err


def lr_column(out: Path) -> dict[int, float]:
    with open(out / "log.csv") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def cosine(step: int, lr: float, floor_ratio: float, length: int) -> float:
    floor = lr * floor_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / length)))


def test_resume_at_the_end_says_so_and_extending_keeps_the_lr_schedule(shards, tmp_path, capsys):
    out = tmp_path / "run"
    keys = dict(lr_schedule="cosine", lr="1e-3", min_lr_ratio=0.1, checkpoint_every=100)
    assert train(shards, out, steps=4, **keys) == 0
    capsys.readouterr()
    # Resuming a run that is done: nothing trains, and the message says how to train on.
    assert train(shards, out, "--resume", "auto", steps=4, **keys) == 0
    err = capsys.readouterr().err
    assert "already at step 4" in err and "--train.steps=N" in err and "--train.reschedule=true" in err
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000004"]
    # Raising train.steps keeps the run's 4-step cosine: steps 5..8 train at its end value, lr * min_lr_ratio.
    assert train(shards, out, "--resume", "auto", steps=8, **keys) == 0
    lrs = lr_column(out)
    for step in range(1, 9):  # log.csv's lr at step s is the one step s - 1 trained with
        assert lrs[step] == pytest.approx(cosine(step - 1, 1e-3, 0.1, 4), rel=1e-9), step
    log = (out / "train.log").read_text()
    assert "keeps the run's length of 4 steps" in log and "--train.reschedule=true stretches it" in log
    # ... unless asked: train.reschedule stretches the cosine over the new train.steps, and says what it changed.
    assert train(shards, out, "--resume", "auto", steps=12, reschedule="true", **keys) == 0
    lrs = lr_column(out)
    for step in range(9, 13):
        assert lrs[step] == pytest.approx(cosine(step - 1, 1e-3, 0.1, 12), rel=1e-9), step
    note = re.search(r"the lr at step 8 goes from ([\d.e-]+) to ([\d.e-]+)", (out / "train.log").read_text())
    assert note and float(note[1]) == pytest.approx(1e-4, rel=1e-2)
    assert float(note[2]) == pytest.approx(cosine(8, 1e-3, 0.1, 12), rel=1e-2)


def test_training_checkpoints_are_named_after_the_run_and_step(shards, tmp_path, capsys):
    from latentdiff.serve.worker import find_checkpoints
    out = tmp_path / "my-run"
    assert train(shards, out, steps=2, checkpoint_every=1, keep_last=2) == 0
    ckpt = out / "ckpt-00000002" / "model.safetensors"
    rc, _ = generate(capsys, "a red square", "--checkpoint", ckpt, "--steps", 2, "--seed", 1,
                     "-o", tmp_path / "a.png")
    assert rc == 0 and params_of(tmp_path / "a.png")["Model"] == "my-run-step2"
    listed = [c.item() for c in find_checkpoints([str(out / "ckpt-00000001" / "model.safetensors"), str(ckpt)])]
    assert [c["model_name"] for c in listed] == ["my-run-step1", "my-run-step2"]
    assert listed[1]["title"].startswith("my-run-step2 [")
    # --ema on it: its model.safetensors already holds the EMA weights, and the message names the flag.
    rc, err = generate(capsys, "a red square", "--checkpoint", ckpt, "--ema", "--steps", 2)
    err = one_line(err)
    assert rc == 2 and "already are the EMA weights" in err and "drop --ema" in err


# ----------------------------------------------------------------------------------------------
# make-shards and evaluate on a user's own images


def captioned_folder(folder: Path, n: int, size: int = 40) -> list[tuple[str, Image.Image]]:
    """n coloured images with sidecar captions, as a user's folder holds them."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture number {i}\n")
        made.append((f"picture number {i}", image))
    return made


def printed_shards(out: str) -> str:
    line = next(ln for ln in out.splitlines() if "--data.shards=" in ln)
    return shlex.split(line.split("--data.shards=", 1)[1])[0]


def test_make_shards_prints_the_data_shards_value(tmp_path, capsys):
    captioned_folder(tmp_path / "photos", 5)
    data_main.main(["make-shards", str(tmp_path / "photos"), "--out", str(tmp_path / "shards"), "--per-shard", "2"])
    value = printed_shards(capsys.readouterr().out)
    assert value == str(tmp_path / "shards" / "data-{000000..000002}.tar")
    assert expand_shards(value) == sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    data_main.main(["make-shards", str(tmp_path / "photos"), "--out", str(tmp_path / "one")])
    assert printed_shards(capsys.readouterr().out) == str(tmp_path / "one" / "data-000000.tar")


def test_evaluate_reads_captions_and_images_from_make_shards_output(tmp_path, capsys):
    made = captioned_folder(tmp_path / "photos", 6)
    data_main.main(["make-shards", str(tmp_path / "photos"), "--out", str(tmp_path / "shards"), "--per-shard", "4"])
    value = printed_shards(capsys.readouterr().out)
    for data in (str(tmp_path / "shards"), value):  # the folder, or the value make-shards printed
        names, prompts, images = evaluate.load_reference(data, 32)
        assert prompts == names == [caption for caption, _ in made]
        for (_, source), got in zip(made, images):  # the trainer's crop: 48x40 -> 38x32, then the centre 32
            ref = source.resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32))
            assert np.array_equal(got.permute(1, 2, 0).numpy(), np.asarray(ref))
    assert evaluate.main(["--data", str(tmp_path / "photos"), "--limit", "5"]) == 2
    assert "index.jsonl" in one_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# generate


def test_seed_minus_one_draws_a_random_seed_and_records_it(tmp_path, capsys, tiny_checkpoint):
    base = ["a cat", "--checkpoint", tiny_checkpoint, "--steps", 2]
    rc, err = generate(capsys, *base, "--seed", -1, "-o", tmp_path / "a.png")
    seed = int(re.search(r"seed: (\d+)", err)[1])
    assert rc == 0 and params_of(tmp_path / "a.png")["Seed"] == str(seed)
    rc, _ = generate(capsys, *base, "--seed", seed, "-o", tmp_path / "b.png")
    assert rc == 0 and np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    rc, err = generate(capsys, *base, "--seed", -2)
    assert rc == 2 and "or -1 for a random seed" in one_line(err)


def test_negative_guidance_is_refused_and_0_and_1_are_valid(tmp_path, capsys, tiny_checkpoint):
    from latentdiff.pipeline import Pipeline
    base = ["a cat", "--checkpoint", tiny_checkpoint, "--steps", 1, "--seed", 1]
    rc, err = generate(capsys, *base, "--guidance", -3)
    assert rc == 2 and "--guidance must be at least 0" in one_line(err)
    assert not (tmp_path / "outputs").exists()
    for g in (0, 1):
        rc, _ = generate(capsys, *base, "--guidance", g, "-o", tmp_path / f"g{g}.png")
        assert rc == 0 and params_of(tmp_path / f"g{g}.png")["CFG scale"] == f"{g:.1f}"
    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match=">= 0"):
        pipe("a cat", steps=1, guidance=-0.5)


def test_sampler_is_written_as_a1111s_title(tmp_path, capsys, tiny_checkpoint):
    titles = {"dpmpp_2m_karras": "DPM++ 2M Karras", "euler_ancestral": "Euler a", "k_heun": "Heun",
              "EulerAncestralDiscreteScheduler": "Euler a", "dpm++ 2m sde exponential": "DPM++ 2M SDE Exponential"}
    for typed, title in titles.items():
        if typed.startswith("k_"):
            typed = "sample_" + typed[2:]  # k-diffusion's function name
        rc, _ = generate(capsys, "a cat", "--checkpoint", tiny_checkpoint, "--steps", 2, "--seed", 1,
                         "--sampler", typed, "-o", tmp_path / "s.png")
        assert rc == 0 and params_of(tmp_path / "s.png")["Sampler"] == title, typed


def rgb_hash(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()[:10]


def test_from_png_of_img2img_needs_its_init_image(tmp_path, capsys, tiny_checkpoint):
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    init.save(tmp_path / "init-copy.bmp")  # the same pixels in another file format
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "other.png")
    ck = ["--checkpoint", tiny_checkpoint]
    rc, _ = generate(capsys, "a boat", *ck, "--steps", 4, "--seed", 2, "--init-image", tmp_path / "init.png",
                     "--strength", 0.5, "-o", tmp_path / "i2i.png")
    params = params_of(tmp_path / "i2i.png")
    assert rc == 0 and params["Denoising strength"] == "0.5" and params["Init image hash"] == rgb_hash(init)
    rc, err = generate(capsys, "--from-png", tmp_path / "i2i.png", *ck, "-o", tmp_path / "x.png")
    err = one_line(err)
    assert rc == 2 and "image-to-image" in err and "--init-image" in err and not (tmp_path / "x.png").exists()
    rc, err = generate(capsys, "--from-png", tmp_path / "i2i.png", *ck, "--init-image", tmp_path / "other.png")
    assert rc == 2 and "is not the picture" in one_line(err)
    rc, _ = generate(capsys, "--from-png", tmp_path / "i2i.png", *ck, "--init-image", tmp_path / "init-copy.bmp",
                     "-o", tmp_path / "again.png")
    assert rc == 0 and np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "i2i.png"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_from_png_reproduces_a_half_precision_image(tmp_path, capsys, tiny_checkpoint, dtype):
    ck = ["--checkpoint", tiny_checkpoint]
    rc, _ = generate(capsys, "a cat", *ck, "--steps", 3, "--seed", 4, "--device", "cpu", "--dtype", dtype,
                     "-o", tmp_path / "half.png")
    assert rc == 0 and params_of(tmp_path / "half.png")["Dtype"] == dtype
    rc, _ = generate(capsys, "a cat", *ck, "--steps", 3, "--seed", 4, "--device", "cpu", "-o", tmp_path / "fp32.png")
    assert rc == 0 and params_of(tmp_path / "fp32.png")["Dtype"] == "fp32"
    assert not np.array_equal(pixels(tmp_path / "half.png"), pixels(tmp_path / "fp32.png"))  # the dtype matters
    rc, _ = generate(capsys, "--from-png", tmp_path / "half.png", *ck, "--device", "cpu", "-o", tmp_path / "re.png")
    assert rc == 0 and np.array_equal(pixels(tmp_path / "re.png"), pixels(tmp_path / "half.png"))


def test_from_file_prints_the_seed_of_each_prompt(tmp_path, capsys, tiny_checkpoint):
    (tmp_path / "p.txt").write_text("a fish\na bird\na tree\n")
    rc, err = generate(capsys, "--from-file", tmp_path / "p.txt", "--checkpoint", tiny_checkpoint, "--steps", 1,
                       "-n", 2, "--seed", 10, "-o", tmp_path / "out")
    assert rc == 0
    assert [ln for ln in err.splitlines() if ln.startswith("seed ")] == [
        "seed 10..11: a fish", "seed 12..13: a bird", "seed 14..15: a tree"]
    seeds = {params_of(p)["prompt"] + " " + params_of(p)["Seed"] for p in (tmp_path / "out").glob("*.png")}
    assert seeds == {"a fish 10", "a fish 11", "a bird 12", "a bird 13", "a tree 14", "a tree 15"}


def test_python_api_loads_the_bundled_model_and_saves_the_clis_parameters(tmp_path, capsys):
    from latentdiff.io.checkpoint import BUNDLED
    from latentdiff.pipeline import Pipeline
    rc, _ = generate(capsys, "a rocket", "--seed", 5, "--steps", 6, "--sampler", "euler_a", "--device", "cpu",
                     "-o", tmp_path / "cli.png")
    assert rc == 0
    pipe = Pipeline.from_checkpoint(device="cpu")
    assert pipe.checkpoint_path == str(BUNDLED) and pipe.config.name == "emoji"
    result = pipe("a rocket", seed=5, steps=6, sampler="euler_a", progress=False)
    result.save(tmp_path / "api.png")
    assert Image.open(tmp_path / "api.png").info["parameters"] == Image.open(tmp_path / "cli.png").info["parameters"]
    assert np.array_equal(pixels(tmp_path / "api.png"), pixels(tmp_path / "cli.png"))


# ----------------------------------------------------------------------------------------------
# The server


def access_lines(caplog) -> list[str]:
    """The server's access-log lines captured so far."""
    lines = [r.getMessage() for r in caplog.records if r.name == "latentdiff.serve"]
    return [ln for ln in lines if re.fullmatch(r"127\.0\.0\.1 (GET|POST) \S+ \d{3} \d+ ms", ln)]


def test_access_log_names_requests_but_never_prompts_or_credentials(tiny_checkpoint, caplog):
    test_serve = pytest.importorskip("test_serve")
    import requests
    server = test_serve.InProcess([tiny_checkpoint], credentials=[("ann", "s3cret-pw")])
    try:
        with caplog.at_level(logging.INFO, logger="latentdiff.serve"):
            ok = requests.post(server.url + "/sdapi/v1/txt2img", auth=("ann", "s3cret-pw"), timeout=60,
                               json={"prompt": "a SECRET-PROMPT", "steps": 1, "width": 512, "height": 512})
            denied = requests.get(server.url + "/sdapi/v1/samplers", auth=("ann", "wrong"), timeout=60)
            negative = requests.post(server.url + "/sdapi/v1/txt2img", auth=("ann", "s3cret-pw"), timeout=60,
                                     json={"prompt": "x", "steps": 1, "cfg_scale": -3})
            fine = requests.post(server.url + "/sdapi/v1/txt2img", auth=("ann", "s3cret-pw"), timeout=60,
                                 json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
            # A request's line is logged once its response has gone out, so the client can be back first: wait
            # (on a loaded machine) for the fourth line before the level goes back and would drop it.
            deadline = time.monotonic() + 30
            while len(access_lines(caplog)) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.close()
    assert (ok.status_code, denied.status_code, negative.status_code, fine.status_code) == (200, 401, 422, 200)
    assert "cfg_scale must be a finite number >= 0" in negative.json()["detail"]
    warnings = json.loads(ok.json()["info"])["latentdiff_warnings"]
    assert len(warnings) == 1 and "512x512 is far from the 64x64" in warnings[0]
    assert json.loads(fine.json()["info"])["latentdiff_warnings"] == []
    lines = [r.getMessage() for r in caplog.records if r.name == "latentdiff.serve"]
    access = access_lines(caplog)
    assert [ln.split()[1:4] for ln in access] == [["POST", "/sdapi/v1/txt2img", "200"],
                                                 ["GET", "/sdapi/v1/samplers", "401"],
                                                 ["POST", "/sdapi/v1/txt2img", "422"],
                                                 ["POST", "/sdapi/v1/txt2img", "200"]]
    assert any("512x512 is far from the 64x64" in ln for ln in lines)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET-PROMPT" not in text and "s3cret" not in text and "YW5u" not in text  # base64 of "ann:"


def test_server_logs_each_request_and_says_when_it_stops(tmp_path):
    import requests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff.serve", "--port", str(port), "--device", "cpu"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            try:
                assert requests.get(f"http://127.0.0.1:{port}/sdapi/v1/sd-models", timeout=5).status_code == 200
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what a service manager sends; its default action kills at once
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert re.search(r"127\.0\.0\.1 GET /sdapi/v1/sd-models 200 \d+ ms", err), err
    assert err.splitlines()[-1] == f"latentdiff: stopped serving at http://127.0.0.1:{port}/ (SIGTERM)"


# ----------------------------------------------------------------------------------------------
# The README


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_webuiapi_example_asks_for_the_models_own_settings():
    """webuiapi sends cfg_scale=7 and 512x512 unless told: the example passes the bundled model's own values, so it
    gives the image `generate --seed 7` draws."""
    from latentdiff.io.config import load_model_config
    cfg = load_model_config(ROOT / "configs" / "emoji.yaml")
    block = re.search(r"```python\nimport webuiapi.*?```", readme(), re.S)[0]
    values = dict(re.findall(r"(\w+)=([\w\"+. ]+?)[,)]", block))
    assert float(values["cfg_scale"]) == cfg.sampling.guidance
    assert int(values["width"]) == int(values["height"]) == cfg.image_size
    assert values["sampler"].strip('"') == cfg.sampling.sampler and int(values["steps"]) == cfg.sampling.steps
    assert values["seed"] == "7"


def readme_command(prefix: str) -> list[str]:
    """The README command line that starts with `prefix` (continuation lines joined), split as a shell would."""
    text = readme().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(prefix))
    return shlex.split(line.split("#")[0])


def test_readme_finetune_of_the_bundled_model_still_draws(tmp_path, capsys, monkeypatch):
    """The README's first training path, run as written from the repository root on a few captioned emoji (the
    bundled model's own drawings, made here), for 12 steps instead of 1,000, at the config's learning rate from the
    first step (no warm-up: 12 warm-up steps would barely move it) and with the folders in tmp_path: the result must
    still draw what each caption names."""
    from latentdiff.io.checkpoint import BUNDLED, load_file
    from latentdiff.pipeline import Pipeline
    prompts = ["a cat", "a pizza", "a rocket", "a red heart", "a ghost", "a snowman", "a frog", "a tulip"]
    photos, folders = tmp_path / "photos", {"photos/": str(tmp_path / "photos"), "shards/": str(tmp_path / "shards")}
    photos.mkdir()
    drawn = Pipeline.from_checkpoint(device="cpu")(prompts, seed=100, progress=False)
    for i, (prompt, image) in enumerate(zip(prompts, drawn.images)):
        image.save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(prompt)
    make = readme_command("python -m latentdiff.data make-shards photos/")
    data_main.main([folders.get(a, a) for a in make[3:]])
    shards = printed_shards(capsys.readouterr().out)
    command = readme_command("python -m latentdiff.train --config configs/finetune-emoji.yaml")
    assert command[:3] == ["python", "-m", "latentdiff.train"]
    args = [a for a in command[3:] if not a.startswith("--data.shards=")] + [f"--data.shards={shards}"]
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)  # train.init in the config is a path from the clone's root, where the README runs
    assert train_main.main(args + [f"--train.out_dir={out}", "--train.steps=12", "--train.checkpoint_every=12",
                                   "--train.warmup_steps=0", "--data.batch_size=8"]) == 0
    ckpt = out / "ckpt-00000012" / "model.safetensors"
    tuned, bundled = load_file(ckpt)[0], load_file(BUNDLED)[0]
    assert any(not torch.equal(tuned[k].float(), bundled[k].float()) for k in bundled)  # it did train
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", shards, "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["references"] == 8 and report["top1"] >= 7 / 8, report
    assert report["psnr64"]["share_above"] >= 0.75, report


def test_readme_from_scratch_and_sd_commands_run(shards, tmp_path, monkeypatch, tiny_checkpoint):
    """The README's other two paths, run as written for two steps each (their length is the only change, and the
    folders are in tmp_path): the two-stage from-scratch commands, and the SD fine-tune on a tiny SD-layout file."""
    monkeypatch.chdir(ROOT)
    short = ["--train.steps=2", "--train.checkpoint_every=2", "--data.batch_size=4", "--train.warmup_steps=0"]

    def as_here(command: list[str]) -> list[str]:
        args = []
        for a in command[3:]:
            key, _, value = a.partition("=")
            if key == "--data.shards":
                value = shards
            elif value.startswith("runs/"):
                value = str(tmp_path / value.replace("ckpt-00003000", "ckpt-00000002"))
            args.append(f"{key}={value}" if value else a)
        return args + short
    vae, unet = [readme_command(f"python -m latentdiff.train --config configs/emoji.yaml {x}")
                 for x in ("--train.stage=vae", "--data.latents=false")]
    assert train_main.main(as_here(vae)) == 0
    assert train_main.main(as_here(unet)) == 0
    run = tmp_path / "runs" / "my-unet"
    assert "from scratch on the VAE of" in (run / "train.log").read_text()
    sd = readme_command("python -m latentdiff.train --config configs/finetune-sd.yaml")
    args = [a if not a.startswith("--train.init=") else f"--train.init={tiny_checkpoint}" for a in as_here(sd)]
    assert train_main.main(args + ["--data.resolution=64", "--train.grad_accum=1",
                                   f"--train.out_dir={tmp_path / 'sd'}"]) == 0
    assert (tmp_path / "sd" / "ckpt-00000002" / "model.safetensors").is_file()
