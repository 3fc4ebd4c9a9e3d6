"""`python -m latentdiff.generate`: files, metadata, reproducibility, and one-line errors for user mistakes."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latentdiff.io.images import format_parameters, parse_parameters
from latentdiff.generate import main, params_from_png


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_writes_a_png_with_a1111_parameters(tmp_path, capsys, tiny_checkpoint):
    rc, out, _ = run(capsys, "a cat", "--checkpoint", tiny_checkpoint, "--steps", 2, "--seed", 7,
                     "-o", tmp_path, "--negative", "dog, blurry")
    assert rc == 0 and len(out) == 1
    path = tmp_path / "a-cat-7.png"
    assert out[0] == str(path) and Image.open(path).size == (64, 64)
    params = parse_parameters(Image.open(path).info["parameters"])
    assert params["prompt"] == "a cat" and params["negative"] == "dog, blurry"
    assert (params["Steps"], params["Seed"], params["Size"], params["Model"]) == ("2", "7", "64x64", "tiny")
    assert len(params["Model hash"]) == 10 and params["Version"].startswith("latentdiff ")


def test_same_seed_same_image_and_from_png(tmp_path, capsys, tiny_checkpoint):
    base = ["a dog", "--checkpoint", tiny_checkpoint, "--steps", 2, "--seed", 3, "--sampler", "Euler a"]
    run(capsys, *base, "-o", tmp_path / "a.png")
    run(capsys, *base, "-o", tmp_path / "b.png")
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    rc, out, _ = run(capsys, "--from-png", tmp_path / "a.png", "--checkpoint", tiny_checkpoint, "-o", tmp_path / "c.png")
    assert rc == 0 and np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_grid_only_writes_one_grid_with_a_row_per_prompt(tmp_path, capsys, tiny_checkpoint):
    (tmp_path / "p.txt").write_text("a fish\na bird\n")
    base = ["--checkpoint", tiny_checkpoint, "--steps", 2, "--seed", 5]
    rc, out, _ = run(capsys, "--from-file", tmp_path / "p.txt", *base, "-n", 2, "--grid-only",
                     "-o", tmp_path / "g" / "gallery.png")
    assert rc == 0 and out == [str(tmp_path / "g" / "gallery.png")]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["gallery.png"]
    grid = pixels(tmp_path / "g" / "gallery.png")
    assert grid.shape == (128, 128, 3)
    rc, single, _ = run(capsys, "a bird", *base[:-1], 8, "-o", tmp_path / "bird.png")  # 2nd prompt, 2nd image
    assert np.abs(grid[64:, 64:].astype(int) - pixels(single[0]).astype(int)).max() <= 1


def test_image_i_of_n_equals_seed_plus_i(tmp_path, capsys, tiny_checkpoint):
    base = ["a fish", "--checkpoint", tiny_checkpoint, "--steps", 2, "--sampler", "dpmpp_2m_sde"]
    rc, out, _ = run(capsys, *base, "-n", 3, "--seed", 20, "-o", tmp_path / "batch", "--grid")
    assert rc == 0 and len(out) == 4 and "grid" in out[-1]
    assert Image.open(out[-1]).size == (128, 128)  # 3 images on a 2x2 grid
    rc, single, _ = run(capsys, *base, "--seed", 22, "-o", tmp_path / "one.png")
    diff = np.abs(pixels(out[2]).astype(int) - pixels(single[0]).astype(int))
    assert diff.max() <= 1  # the same image, up to float rounding across batch sizes


def test_random_seed_is_printed(tmp_path, capsys, tiny_checkpoint):
    rc, out, err = run(capsys, "x", "--checkpoint", tiny_checkpoint, "--steps", 1, "-o", tmp_path)
    seed = int(err.split("seed: ")[1].split()[0])
    assert rc == 0 and out[0].endswith(f"x-{seed}.png")


def test_from_file_and_trajectory(tmp_path, capsys, tiny_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    rc, out, _ = run(capsys, "--from-file", prompts, "--checkpoint", tiny_checkpoint, "--steps", 3, "--seed", 1,
                     "-o", tmp_path / "out", "--trajectory")
    assert rc == 0 and [p.split("/")[-1] for p in out] == ["a-cat-1.png", "a-dog-2.png"]
    strip = Image.open(tmp_path / "out" / "a-cat-1-trajectory.png")
    assert strip.size == (3 * 64, 64)
    gif = Image.open(tmp_path / "out" / "a-cat-1-trajectory.gif")
    assert gif.n_frames == 3


def test_img2img(tmp_path, capsys, tiny_checkpoint):
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "in.png")
    rc, out, _ = run(capsys, "a cat", "--checkpoint", tiny_checkpoint, "--steps", 4, "--seed", 1,
                     "--init-image", tmp_path / "in.png", "--strength", 0.5, "-o", tmp_path / "o.png")
    assert rc == 0
    assert params_from_png(out[0])["strength"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["-W", "60"], "multiples of 8"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--sampler", "nonsense"], "unknown sampler"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--strength", "1.5", "--init-image", "__IMG__"], "strength must be in (0, 1]"),
])
def test_user_mistakes_are_one_line_with_exit_code_2(tmp_path, capsys, tiny_checkpoint, args, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    args = [a.replace("__IMG__", str(tmp_path / "img.png")) for a in args]
    rc, out, err = run(capsys, "a cat", "--checkpoint", tiny_checkpoint, "-o", tmp_path, *args)
    assert rc == 2 and out == []
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_unknown_sampler_lists_the_valid_ones(tmp_path, capsys, tiny_checkpoint):
    rc, _, err = run(capsys, "a", "--checkpoint", tiny_checkpoint, "--sampler", "nope", "-o", tmp_path)
    assert rc == 2 and "euler" in err and "dpmpp_2m" in err


def test_missing_wrong_checkpoint_and_unwritable_output(tmp_path, capsys, tiny_checkpoint):
    rc, _, err = run(capsys, "a", "--checkpoint", tmp_path / "nope.safetensors", "-o", tmp_path)
    assert rc == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    rc, _, err = run(capsys, "a", "--checkpoint", bad, "-o", tmp_path)
    assert rc == 2 and "bad.safetensors" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, _, err = run(capsys, "a", "--checkpoint", tiny_checkpoint, "-o", blocker / "sub")
    assert rc == 2 and "cannot write to output folder" in err


def test_no_traceback_from_the_real_command(tmp_path, tiny_checkpoint):
    """The module entry point, as a user runs it: a mistake prints one line, exit code 2."""
    r = subprocess.run([sys.executable, "-m", "latentdiff.generate", "a cat", "--checkpoint", str(tiny_checkpoint),
                        "--steps", "-3", "-o", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [r.stderr.strip().splitlines()[-1]]


def test_parameters_round_trip_and_a1111_text():
    p = dict(prompt="a cat, best", negative="dog", steps=20, sampler="DPM++ 2M Karras", guidance=7.5, seed=1,
             width=512, height=768, model="sd15", model_hash="0123456789")
    back = parse_parameters(format_parameters(p))
    assert back["prompt"] == "a cat, best" and back["Sampler"] == "DPM++ 2M Karras" and back["Size"] == "512x768"
    a1111 = ("masterpiece, a cat\nNegative prompt: lowres, bad\nSteps: 28, Sampler: Euler a, Schedule type: "
             "Automatic, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: abcdef0123, Model: v1-5, "
             "Lora hashes: \"x: 1, y: 2\", Version: v1.9.0")
    q = parse_parameters(a1111)
    assert q["prompt"] == "masterpiece, a cat" and q["negative"] == "lowres, bad"
    assert (q["Steps"], q["Sampler"], q["Seed"], q["Lora hashes"], q["Version"]) == ("28", "Euler a", "123",
                                                                                       "x: 1, y: 2", "v1.9.0")
    # Backslashes: written as they are where no quotes are needed (A1111 too), escaped inside quotes; each read back
    # as it was, so only quoted values have their escapes decoded.
    extra = {"Hires prompt": "a\\b", "Hires negative prompt": 'c, "d"\\e: f', "Mask blur": 4}
    back = parse_parameters(format_parameters(p | {"extra": extra}))
    assert {k: back[k] for k in extra} == {k: str(v) for k, v in extra.items()}, back


SMALL_SD21 = """\
model:
  name: sd21-small
  image_size: 64
  unet: {model_channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [1, 2], num_heads: -1,
         num_head_channels: 16, context_dim: 64, use_linear_in_transformer: true, norm_groups: 8}
  vae: {ch: 32, ch_mult: [1, 2, 2], num_res_blocks: 1, norm_groups: 8, resolution: 64}
  text: {width: 64, layers: 3, heads: 2, act: gelu, output_layer: penultimate, pad: zero, embed_dim: 32}
"""


def test_sd21_layout_checkpoint_end_to_end(tmp_path, capsys):
    """A random-valued file in the official SD 2.x single-file layout (schedule buffers, no latentdiff metadata)."""
    import torch
    from safetensors.torch import save_file

    from latentdiff.io.checkpoint import state_dict_for
    from latentdiff.io.config import load_model_config
    from latentdiff.pipeline import Pipeline
    from latentdiff.diffusion.schedule import Schedule
    from conftest import build_models

    (tmp_path / "small.yaml").write_text(SMALL_SD21)
    cfg = load_model_config(tmp_path / "small.yaml")
    models = build_models(cfg, seed=1)
    state = {k: v.contiguous() for k, v in state_dict_for(models).items()}
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in state)
    sched = Schedule.from_config(cfg.diffusion)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        state[name] = getattr(sched, name).float()
    path = tmp_path / "v2-small.safetensors"
    save_file(state, str(path))  # no metadata: detection must come from the keys

    for extra in ([], ["--prediction", "v_prediction"]):
        rc, out, err = run(capsys, "a cat", "--checkpoint", path, "--config", tmp_path / "small.yaml", "--steps", 3,
                           "--seed", 2, "-o", tmp_path / f"out{len(extra)}.png", *extra)
        assert rc == 0, err
        assert Image.open(out[0]).size == (64, 64)
    assert not np.array_equal(pixels(tmp_path / "out0.png"), pixels(tmp_path / "out2.png"))  # eps vs v differ

    pipe = Pipeline.from_checkpoint(path, device="cpu", config=cfg)  # the Python API, same file
    assert pipe.config.text.output_layer == "penultimate"
    assert torch.equal(pipe.unet.state_dict()["out.2.weight"], models.unet.state_dict()["out.2.weight"])

    # Without --config the keys say SD 2.x, the full-size preset is built, and the sizes cannot match: one line.
    rc, _, err = run(capsys, "a cat", "--checkpoint", path, "--steps", 1, "-o", tmp_path)
    assert rc == 2 and "mis-shaped keys" in err and len(err.strip().splitlines()) == 1


def test_without_a_bundled_model_the_command_says_what_to_do(tmp_path, capsys, monkeypatch):
    import latentdiff.generate as g
    monkeypatch.setattr(g, "BUNDLED", tmp_path / "absent.safetensors")
    rc, out, err = run(capsys, "a cat", "-o", tmp_path)
    assert rc == 2 and out == [] and "--checkpoint" in err and len(err.strip().splitlines()) == 1


def test_grid_cols_sets_the_grid_layout(tmp_path, capsys, tiny_checkpoint):
    (tmp_path / "p.txt").write_text("a fish\na bird\na cat\n")
    rc, out, _ = run(capsys, "--from-file", tmp_path / "p.txt", "--checkpoint", tiny_checkpoint, "--steps", 1,
                     "--seed", 2, "--grid-only", "--grid-cols", 3, "-o", tmp_path / "g.png")
    assert rc == 0 and Image.open(tmp_path / "g.png").size == (3 * 64, 64)
    rc, _, err = run(capsys, "a cat", "--checkpoint", tiny_checkpoint, "--grid-cols", 0, "-o", tmp_path)
    assert rc == 2 and "--grid-cols must be at least 1" in err
