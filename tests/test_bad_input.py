"""A net under every command: invalid values for each argument (zero, negative, huge, non-numeric, missing file,
unwritable path, wrong file type) end with exit code 2, exactly one line on stderr, no traceback, and no file left
behind. The commands run in-process through their main(argv); hostile stored configs and img2img start steps too.

The generate table ends with the inputs issue 12 found by trying (--steps 100000, a huge --seed, a huge
--width/--height, --strength without --init-image).
"""
from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from latentdiff import checkpoint as checkpoint_cmd, evaluate, generate
from latentdiff.data import __main__ as data
from latentdiff.io import checkpoint
from latentdiff.train import __main__ as train_main

from test_train import CONFIG, write_shards


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoint):
    """Valid and invalid input files; 'blocker' is a regular file, so any path below it is unwritable."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "text.txt").write_text("hello")
    (d / "fake.safetensors").write_text("not a checkpoint")
    (d / "fake.png").write_text("not an image")
    (d / "blocker").write_text("a file, not a folder")
    (d / "empty.txt").write_text("\n\n")
    (d / "bad.yaml").write_text("model: [unclosed\n")
    (d / "badheader.csv").write_text("file,text\na.png,a cat\n")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "plain.png")
    for name, params in (("badsize", "a cat\nSteps: 2, Size: 32by32"), ("badsteps", "a cat\nSteps: many, Size: 32x32")):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", params)
        Image.new("RGB", (32, 32)).save(d / f"{name}.png", pnginfo=info)
    (d / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(d / "imgs" / "a.png")
    (d / "imgs" / "a.txt").write_text("a black square")
    (d / "empty_dir").mkdir()
    (d / "ref").mkdir()
    (d / "ref" / "index.jsonl").write_text(json.dumps({"codepoint": "U+1F408", "char": "c", "name": "cat",
                                                       "shard": "emoji-000000.tar", "key": "u1f408"}) + "\n")
    write_shards(d / "shards", 1, 2, corrupt=False)
    hostile(d, tiny_checkpoint)
    return d


HOSTILE = {  # a stored config -> what the one-line error names
    "norm_groups0": ({"unet": {"norm_groups": 0}}, "unet.norm_groups"),
    "heads0": ({"unet": {"num_heads": 0}}, "num_heads"),
    "textheads0": ({"text": {"heads": 0}}, "text.heads"),
    "res_blocks_huge": ({"unet": {"num_res_blocks": 10 ** 6}}, "num_res_blocks"),
    "channels_huge": ({"unet": {"model_channels": 2 ** 19}}, "parameters"),
    "layers_huge": ({"text": {"layers": 10 ** 6}}, "parameters"),
    "no_levels": ({"vae": {"ch_mult": []}}, "ch_mult"),
    "groups_odd": ({"vae": {"norm_groups": 7}}, "vae.norm_groups"),
    "nested": ({"unet": {"channel_mult": [[[[[1]]]]]}}, "nested more than 4 levels deep"),
    "deep": (None, "invalid"),  # 100,000 levels of JSON
}


def hostile(folder: Path, source: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from latentdiff.io.config import merge
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, (change, _) in HOSTILE.items():
        stored = ('{"unet": ' + "[" * 100_000 + "]" * 100_000 + "}" if change is None
                  else json.dumps(merge(json.loads(meta[checkpoint.CONFIG_KEY]), change)))
        save_file(tensors, str(folder / f"hostile-{name}.safetensors"), metadata={**meta, checkpoint.CONFIG_KEY: stored})


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def refused(main, argv, expect, work: Path, capfd):
    """main(argv) exits 2 with one line on stderr that matches `expect`, no traceback, and writes nothing. capfd
    reads file descriptor 2, so what a child process (a loader worker) or native code prints counts too."""
    before = files_under(work)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err[-3000:])
    assert len(lines) == 1 and "Traceback" not in err, (argv, err[-3000:])
    assert re.search(expect, lines[0], re.I), (argv, lines[0])
    assert files_under(work) == before, argv


def expand(row: str, **paths) -> list[str]:
    return [a.format(**paths) for a in shlex.split(row)]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # generate's default outputs/ would land here
    return tmp_path


# ----------------------------------------------------------------------------------------------
# generate

GENERATE = [
    ("-n 0", "num-images"), ("-n -3", "num-images"), ("-n abc", "invalid int"),
    ("--steps 0", "steps"), ("--steps -1", "steps"), ("--steps abc", "invalid int"),
    ("--guidance nan", "guidance"), ("--guidance inf", "guidance"), ("--guidance abc", "invalid float"),
    ("--guidance-rescale -1", "guidance-rescale"), ("--guidance-rescale 2", "guidance-rescale"),
    ("--guidance-rescale nan", "guidance-rescale"), ("--sampler bogus", "sampler"),
    ("--width 0", "width"), ("--width -32", "width"), ("--width 33", "multiples"), ("--height abc", "invalid int"),
    ("--checkpoint {work}/missing.safetensors", "not found"),
    ("--checkpoint {inp}/fake.safetensors", "safetensors"), ("--checkpoint {inp}/fake.png", "checkpoint type"),
    ("--config {work}/missing.yaml", "not found"), ("--config {inp}/bad.yaml", "YAML"),
    ("--from-file {work}/missing.txt", "cannot read"), ("--from-file {inp}/empty.txt", "no prompts"),
    ("--from-png {work}/missing.png", "cannot read"), ("--from-png {inp}/plain.png", "parameters"),
    ("--from-png {inp}/badsize.png", "Size"), ("--from-png {inp}/badsteps.png", "Steps"),
    ("--from-png {inp}/text.txt", "cannot read"), ("--from-file {inp}/imgs", "cannot read"),
    ("--config {inp}/imgs", "cannot read"), ("--config {inp}/plain.png", "cannot read|YAML|mapping"),
    ("--clip-skip 0", "clip-skip"), ("--clip-skip -2", "clip-skip"), ("--clip-skip 99", "clip-skip"),
    ("--clip-skip abc", "invalid int"),
    ("--init-image {work}/missing.png", "init-image"), ("--init-image {inp}/text.txt", "init-image"),
    ("--init-image {inp}/imgs", "init-image"),
    ("--init-image {inp}/plain.png --strength 0", "strength"),
    ("--init-image {inp}/plain.png --strength 1.5", "strength"),
    ("--init-image {inp}/plain.png --strength nan", "strength"),
    ("-o {inp}/blocker/x.png", "cannot write"), ("--device bogus", "device"),
    ("--prediction bogus", "invalid choice"), ("--dtype bogus", "invalid choice"), ("--backend bogus", "invalid choice"),
    # issue 12: found by trying
    ("--steps 100000", "steps must be between 1 and 1000"), ("--seed 99999999999999999999", "seed must be in 0.."),
    ("--seed -5", "seed must be in 0.."), ("-n 2 --seed 18446744073709551615", r"0\.\.18446744073709551614 for 2 image"),
    ("--width 65536 --height 65536", "GiB available"), ("--strength 0.5", "only applies to image-to-image"),
    ("--grid-cols 0", "grid-cols"),
] + [(f"--checkpoint {{inp}}/hostile-{name}.safetensors", expect) for name, (_, expect) in HOSTILE.items()]


@pytest.mark.parametrize("row,expect", GENERATE)
def test_generate_refuses(row, expect, inputs, tiny_checkpoint, work, capfd):
    argv = ["a cat", "--checkpoint", str(tiny_checkpoint), "-o", str(work / "x.png"), "--steps", "2"]
    refused(generate.main, argv + expand(row, inp=inputs, work=work), expect, work, capfd)


def test_generate_without_a_prompt(tiny_checkpoint, work, capfd):
    refused(generate.main, ["--checkpoint", str(tiny_checkpoint)], "give a prompt", work, capfd)


# ----------------------------------------------------------------------------------------------
# evaluate

EVALUATE = [
    ("--limit 4", "limit"), ("--limit 0", "limit"), ("--limit -1", "limit"), ("--limit abc", "invalid int"),
    ("--batch-size 0", "batch-size"), ("--batch-size -2", "batch-size"), ("--steps 0", "steps"),
    ("--denoise-from abc", "denoise-from"), ("--denoise-from 0", "denoise-from"),
    ("--denoise-from 1000", "denoise-from"), ("--denoise-from -5", "denoise-from"), ("--denoise-from 5,x", "denoise"),
    ("--guidance nan", "guidance"), ("--sampler bogus", "sampler"), ("--seed abc", "invalid int"),
    ("--checkpoint {work}/missing.safetensors", "not found"), ("--checkpoint {inp}/fake.safetensors", "safetensors"),
    ("--data {work}/missing", "index.jsonl"), ("--data {inp}", "index.jsonl"),
    ("--out {inp}/blocker/r.json", "--out"), ("--sheet {inp}/blocker/s.png", "--sheet"),
    ("--shards other.tar", "no reference"),
] + [(f"--checkpoint {{inp}}/hostile-{name}.safetensors", expect) for name, (_, expect) in HOSTILE.items()]


@pytest.mark.parametrize("row,expect", EVALUATE)
def test_evaluate_refuses(row, expect, inputs, tiny_checkpoint, work, capfd):
    argv = ["--checkpoint", str(tiny_checkpoint), "--data", str(inputs / "ref"), "--out", str(work / "r.json")]
    refused(evaluate.main, argv + expand(row, inp=inputs, work=work), expect, work, capfd)


def test_evaluate_without_a_bundled_model(inputs, work, capfd, monkeypatch):
    monkeypatch.setattr(evaluate, "BUNDLED", work / "none.safetensors")
    refused(evaluate.main, ["--data", str(inputs / "ref")], "no bundled model", work, capfd)


# ----------------------------------------------------------------------------------------------
# train

TRAIN = [
    ("--train.steps=0", "train.steps"), ("--train.steps=-1", "train.steps"), ("--train.steps=abc", "integer"),
    ("--train.lr=abc", "number"), ("--train.lr=-1", "train.lr"), ("--train.lr=.nan", "train.lr"),
    ("--train.warmup_steps=-1", "warmup"), ("--train.grad_clip=-1", "grad_clip"),
    ("--train.keep_last=0", "keep_last"), ("--train.grad_accum=0", "grad_accum"), ("--train.log_every=0", "log_every"),
    ("--train.ema_decay=1.5", "ema_decay"), ("--train.timestep_bias=-1", "timestep_bias"),
    ("--data.batch_size=0", "batch_size"), ("--data.resolution=0", "resolution"),
    ("--data.resolution=1000000", "resolution"), ("--data.num_workers=-1", "num_workers"),
    ("--data.num_workers=100000", "num_workers"), ("--data.caption_dropout=2", "caption_dropout"),
    ("--data.shards={work}/missing/{{0..3}}.tar", "does not exist"), ("--data.shards=", "data.shards is empty"),
    ("--train.init={work}/missing.safetensors", "not found"), ("--train.init={inp}/fake.safetensors", "safetensors"),
    ("--train.out_dir={inp}/blocker/run", "out_dir"),
    ("--train.loss_weighting=vlb --model.diffusion.zero_terminal_snr=true", "v_prediction"),
    ("--model.unet.norm_groups=0", "norm_groups"), ("--model.text.heads=0", "text.heads"),
    ("--model.unet.num_res_blocks=1000000", "num_res_blocks"),
    ("--resume {inp}", "no state.pt"), ("--config {work}/missing.yaml", "not found"),
    ("--config {inp}/text.txt", "mapping"), ("--config {inp}/bad.yaml", "YAML"), ("--train.bogus=1", "unknown"),
    ("--config {inp}/imgs", "cannot read"), ("--resume {inp}/text.txt", "no state.pt"),
    ("--train.init={inp}/hostile-norm_groups0.safetensors", "norm_groups"),
]


@pytest.mark.parametrize("row,expect", TRAIN)
def test_train_refuses(row, expect, inputs, work, capfd):
    shards = str(inputs / "shards" / "s-{000000..000000}.tar")
    argv = ["--config", str(CONFIG), f"--data.shards={shards}", "--data.num_workers=0", "--train.steps=1",
            f"--train.out_dir={work}/run"]
    refused(train_main.main, argv + expand(row, inp=inputs, work=work), expect, work, capfd)


# ----------------------------------------------------------------------------------------------
# data

DATA = [
    ("make-shards {work}/missing --out {work}/o", "not a folder"),
    ("make-shards {inp}/imgs --out {work}/o --per-shard 0", "per-shard"),
    ("make-shards {inp}/imgs --out {work}/o --per-shard -1", "per-shard"),
    ("make-shards {inp}/imgs --out {work}/o --per-shard abc", "invalid int"),
    ("make-shards {inp}/imgs --out {work}/o --captions {work}/missing.csv", "not found"),
    ("make-shards {inp}/imgs --out {work}/o --captions {inp}/badheader.csv", "header"),
    ("make-shards {inp}/imgs --out {work}/o --captions {inp}/text.txt", "csv"),
    ("make-shards {inp}/imgs --out {inp}/blocker/o", "cannot create"),
    ("make-shards {inp}/empty_dir --out {work}/o", "no images"),
    ("make-shards --out {work}/o", "required"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {work}/missing.safetensors", "not found"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {inp}/fake.safetensors", "safetensors"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {ckpt} --batch-size 0", "batch-size"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {ckpt} --resolution 0", "resolution"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {ckpt} --resolution abc", "invalid int"),
    ("encode-shards {work}/missing.tar --out {work}/l --checkpoint {ckpt}", "does not exist"),
    ("encode-shards {inp}/shards --out {inp}/blocker/l --checkpoint {ckpt}", "cannot create"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {ckpt} --device bogus", "device"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {inp}/hostile-heads0.safetensors", "num_heads"),
    ("encode-shards {inp}/shards --out {work}/l --checkpoint {ckpt} --resolution 1000000", "resolution"),
    ("emoji --out {work}/e --resolution 0", "resolution"), ("emoji --out {work}/e --resolution abc", "invalid int"),
    ("emoji --out {work}/e --resolution 100000", "resolution"),
    ("emoji --out {work}/e --per-shard 0", "per-shard"), ("emoji --out {work}/e --font {work}/missing.ttf", "font"),
    ("emoji --out {work}/e --font {inp}/text.txt", "cannot load"),
    ("bogus", "invalid choice"), ("", "required"),
]


@pytest.mark.parametrize("row,expect", DATA)
def test_data_refuses(row, expect, inputs, tiny_checkpoint, work, capfd):
    refused(data.main, expand(row, inp=inputs, work=work, ckpt=tiny_checkpoint), expect, work, capfd)


# ----------------------------------------------------------------------------------------------
# checkpoint

CHECKPOINT = [
    ("{work}/missing.safetensors {work}/o.safetensors", "not found"),
    ("{ckpt} {work}/o.ckpt", "safetensors"), ("{inp}/fake.safetensors {work}/o.safetensors", "safetensors"),
    ("{inp}/fake.png {work}/o.safetensors", "checkpoint type"), ("{inp}/imgs {work}/o.safetensors", "not found"),
    ("{ckpt} {inp}/blocker/o.safetensors", "cannot write"), ("{ckpt} {work}/o.safetensors --dtype bogus", "choice"),
    ("{ckpt} {work}/o.safetensors --set unet.norm_groups=0", "norm_groups"),
    ("{ckpt} {work}/o.safetensors --set unet.bogus=1", "unknown config key"),
    ("{ckpt} {work}/o.safetensors --set nonsense", "override"),
    ("{ckpt} {work}/o.safetensors --set image_size=abc", "integer"),
    ("{ckpt} {work}/o.safetensors --vae {work}/missing.safetensors", "not found"),
    ("{ckpt} {work}/o.safetensors --ema", "EMA"), ("{ckpt}", "required"),
] + [(f"{{inp}}/hostile-{name}.safetensors {{work}}/o.safetensors", expect) for name, (_, expect) in HOSTILE.items()]


@pytest.mark.parametrize("row,expect", CHECKPOINT)
def test_checkpoint_refuses(row, expect, inputs, tiny_checkpoint, work, capfd):
    refused(checkpoint_cmd.main, expand(row, inp=inputs, work=work, ckpt=tiny_checkpoint), expect, work, capfd)


class Built(Exception):
    """Raised by the patched builders: something of the model was constructed."""


def forbid_building(monkeypatch):
    """Every way load_models builds a model (the meta builder, the fresh builder, each module's constructor)
    raises Built."""
    from latentdiff.models import text_encoder, unet, vae

    def built(*args, **kwargs):
        raise Built("a model was built")
    for owner, name in ((checkpoint, "_meta_models"), (checkpoint, "build_models"), (unet.UNetModel, "__init__"),
                        (vae.AutoencoderKL, "__init__"), (text_encoder.TextEncoder, "__init__"),
                        (text_encoder.DualTextEncoder, "__init__")):
        monkeypatch.setattr(owner, name, built)


def test_hostile_configs_are_refused_before_building(inputs, tiny_checkpoint, monkeypatch):
    """Each hostile file is refused before any module is constructed (item 13): the builders are patched to
    fail, and a sound file does reach them."""
    forbid_building(monkeypatch)
    with pytest.raises(Built):
        checkpoint.load_models(tiny_checkpoint)
    for name, (_, expect) in HOSTILE.items():
        with pytest.raises(checkpoint.CheckpointError, match=re.compile(expect, re.I)):
            checkpoint.load_models(inputs / f"hostile-{name}.safetensors")


# ----------------------------------------------------------------------------------------------
# img2img start step (item 10)


@pytest.mark.parametrize("steps", [150, 500])
def test_img2img_sigmas_descend_for_every_strength(steps, tiny_config):
    """Every strength k/steps on Karras sigmas starts from a sigma strictly above the next one (the integer start
    timestep used to round down: 2 bad starts of 150 and 24 of 500)."""
    from latentdiff.pipeline import Pipeline
    from latentdiff.diffusion.samplers import NoiseSampler, get_sampler
    pipe = Pipeline.from_config(tiny_config, device="cpu")
    sigmas = get_sampler("DPM++ 2M Karras").sigmas(pipe.schedule, steps)
    image = Image.new("RGB", (32, 32), (90, 120, 200))
    bad = []
    for k in range(1, steps + 1):
        noise = NoiseSampler([torch.Generator().manual_seed(0)])
        _, left = pipe._init_from_image(image, (32, 32), sigmas, k / steps, noise, (1, 4, 4, 4))
        if not bool((left[1:] < left[:-1]).all()):
            bad.append(k)
    assert bad == []


def test_train_exits_2_on_a_data_error_raised_in_a_worker(inputs, work, capfd, monkeypatch):
    """All-corrupt shards stop the run with the loader's DataError, which a worker raises wrapped in its own
    traceback: still one line, exit 2 (item 12)."""
    from latentdiff.data.shards import write_tar
    write_tar(inputs / "corrupt.tar", [(f"{i:03d}", {"png": b"not a png", "txt": b"x"}) for i in range(3)])
    argv = ["--config", str(CONFIG), f"--data.shards={inputs / 'corrupt.tar'}", "--data.num_workers=1",
            "--train.steps=1", f"--train.out_dir={work}/run", "--data.in_memory=false"]  # the streaming worker
    capfd.readouterr()
    assert train_main.main(argv) == 2
    assert "1000 samples in a row failed" in the_error_line(capfd.readouterr().err, work / "run" / "train.log")
    # The same shards read into memory (data.in_memory: auto takes them, being small): one line too.
    assert train_main.main(argv[:-1]) == 2
    assert "no readable sample in 1 shard(s) (3 failed)" in the_error_line(capfd.readouterr().err,
                                                                            work / "run" / "train.log")


def the_error_line(err: str, log: Path) -> str:
    """The whole of a failed run's stderr is the run's own log (train.log, which the trainer also prints) and one
    error line, with no traceback anywhere: returns that line."""
    assert "Traceback" not in err, err[-3000:]
    logged = set(log.read_text().splitlines()) if log.exists() else set()
    rest = [line for line in err.splitlines() if line.strip() and line not in logged]
    assert len(rest) == 1 and rest[0].startswith("error: "), err[-3000:]
    return rest[0]
