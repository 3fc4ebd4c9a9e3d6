"""Brownian-tree noise as a user option: Pipeline(noise="brownian") against k-diffusion's samplers with its
BrownianTreeNoiseSampler, the same path at any step count, `generate --noise brownian` through the PNG, and the
one-line error without torchsde."""
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentdiff.cli import UsageError
from latentdiff.diffusion.samplers import get_sampler
from latentdiff.generate import params_from_png
from latentdiff.io.images import parse_parameters
from latentdiff.pipeline import Pipeline
from test_generate import pixels, run
from test_samplers import k_sampling


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def k_denoiser(pipe, prompts, guidance, steps):
    """The pipeline's conditioned U-Net as k-diffusion calls a model: model(x, sigma) -> D, CFG combined here."""
    den = pipe.denoiser(prompts, [""] * len(prompts), guidance, size=(64, 64), steps=steps)

    def model(x, sigma, **kw):
        s = float(sigma.reshape(-1)[0])
        out, (p, q) = den(x, s), den.coefs(s)
        if den.guidance is not None:
            u, c = out.chunk(2)
            out = u + den.guidance * (c - u)
        return p * x + q * out
    return model


def k_run(fname, model, x, sigmas, seeds):
    """k-diffusion's sampler with the tree A1111 builds for it: over [min nonzero sigma, max sigma], image seeds."""
    ks = k_sampling()
    with warnings.catch_warnings():  # torchsde warns when k-diffusion asks for sigma_max, past its rounded end
        warnings.simplefilter("ignore")
        tree = ks.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
        return getattr(ks, fname)(model, x.clone(), sigmas, noise_sampler=tree, disable=True)


@pytest.mark.parametrize("name,fname", [("dpmpp_2m_sde", "sample_dpmpp_2m_sde"), ("dpmpp_sde", "sample_dpmpp_sde"),
                                        ("dpmpp_3m_sde", "sample_dpmpp_3m_sde")])
def test_pipeline_brownian_equals_k_diffusion(pipe, name, fname):
    # Same U-Net, start and sigmas: with noise="brownian" the pipeline's latents are k-diffusion's with a tree per
    # image seeded seed + i, and the start is still the seeded Gaussian draw of the default.
    kw = dict(steps=6, sampler=name, guidance=5.0, seed=5, num_images=2, progress=False, return_latents=True)
    ours = pipe("a cat", noise="brownian", **kw).latents
    gaussian = pipe("a cat", **kw).latents
    sigmas = get_sampler(name).sigmas(pipe.schedule, 6)
    start = torch.stack([torch.randn(ours.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    theirs = k_run(fname, k_denoiser(pipe, ["a cat"] * 2, 5.0, 6), start * math.sqrt(1 + float(sigmas[0]) ** 2),
                   sigmas, [5, 6])
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 1e-5 * scale  # measured 3e-7 * scale (float32 rounding)
    assert float((gaussian - theirs).abs().max()) > 0.1 * scale  # the option changes the noise


def test_img2img_tree_spans_the_sigmas_the_pass_samples(pipe):
    # img2img starts mid-schedule: the tree is built over the sigmas this pass runs, from the same noised start.
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(init_image=picture, strength=0.6, steps=10, sampler="dpmpp_2m_sde", guidance=1.0, seed=9,
              progress=False, return_latents=True)
    seen = {"gaussian": [], "brownian": []}
    results = {kind: pipe("a dog", noise=kind, callback=lambda info, k=kind: seen[k].append(info), **kw)
               for kind in seen}
    steps = [info["sigma"] for info in seen["brownian"]]
    assert len(steps) == 6 and steps == [info["sigma"] for info in seen["gaussian"]]
    start = seen["brownian"][0]["x"]
    assert torch.equal(start, seen["gaussian"][0]["x"])  # the noised picture: the generators' draw either way
    sigmas = torch.tensor(steps + [0.0], dtype=torch.float64)
    theirs = k_run("sample_dpmpp_2m_sde", k_denoiser(pipe, ["a dog"], 1.0, 10), start, sigmas, [9])
    scale = float(theirs.abs().max())
    assert float((results["brownian"].latents - theirs).abs().max()) <= 1e-5 * scale
    assert float((results["gaussian"].latents - theirs).abs().max()) > 0.1 * scale


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_sde", "euler_a"])
def test_same_seed_same_path_at_another_step_count(pipe, monkeypatch, name):
    # The tree's point: one noise path per seed, whatever the steps. With Gaussian data, x0 ~ N(0, C^2 I), where
    # the U-Net's ideal output is E[eps | x_t] = sqrt(1 - abar) x_t / (abar C^2 + 1 - abar), 10 and 20 steps of an
    # SDE sampler approximate one solution of the SDE: they land close together on the same Brownian path, and as
    # far apart as two samples with independent Gaussian noise (measured ratio 0.14-0.23 over seeds and samplers;
    # the random-weight U-Net's rough denoiser, which 10 steps follow poorly, shows 0.6 for 2M SDE).
    C = 0.5

    def ideal_eps(x_t, t, context, *rest):
        abar = (1 / (1 + pipe.schedule.t_to_sigma(t.double()) ** 2)).view(-1, 1, 1, 1)
        return (torch.sqrt(1 - abar) * x_t.double() / (abar * C * C + 1 - abar)).float()

    monkeypatch.setattr(pipe, "unet_call", ideal_eps)
    for seed in (0, 1):
        apart = {}
        for kind in ("gaussian", "brownian"):
            a, b = (pipe("a cat", steps=n, sampler=name, guidance=1.0, seed=seed, noise=kind, progress=False,
                         return_latents=True).latents for n in (10, 20))
            apart[kind] = float((a - b).pow(2).mean().sqrt())
        assert apart["brownian"] < 0.4 * apart["gaussian"], apart


def test_generate_noise_brownian_round_trips_through_the_png(tmp_path, capsys, tiny_checkpoint):
    base = ["a fox", "--checkpoint", tiny_checkpoint, "--steps", 3, "--seed", 4, "--sampler", "DPM++ 2M SDE"]
    rc, _, _ = run(capsys, *base, "--noise", "brownian", "-o", tmp_path / "b.png")
    assert rc == 0
    params = parse_parameters(Image.open(tmp_path / "b.png").info["parameters"])
    assert params["Noise"] == "Brownian"
    run(capsys, *base, "-o", tmp_path / "g.png")
    assert "Noise" not in parse_parameters(Image.open(tmp_path / "g.png").info["parameters"])  # the default
    assert not np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "g.png"))
    rc, _, _ = run(capsys, "--from-png", tmp_path / "b.png", "--checkpoint", tiny_checkpoint, "-o", tmp_path / "c.png")
    assert rc == 0 and np.array_equal(pixels(tmp_path / "b.png"), pixels(tmp_path / "c.png"))


def test_a_bad_noise_value_in_a_png_is_one_line(tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a fox\nSteps: 3, Sampler: Euler a, Seed: 4, Noise: Pink")
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png", pnginfo=info)
    with pytest.raises(UsageError, match="bad 'Noise' value 'Pink'"):
        params_from_png(str(tmp_path / "p.png"))


def test_without_torchsde_one_line_says_how_to_install_it(tmp_path, capsys, tiny_checkpoint, pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # `import torchsde` raises ImportError
    rc, out, err = run(capsys, "a fox", "--checkpoint", tiny_checkpoint, "--noise", "brownian", "-o", tmp_path)
    assert rc == 2 and out == [] and list(tmp_path.iterdir()) == []
    assert len(err.strip().splitlines()) == 1 and "pip install torchsde" in err, err
    with pytest.raises(ValueError, match="pip install torchsde"):
        pipe("a fox", steps=2, noise="brownian", progress=False)
    with pytest.raises(ValueError, match="noise must be one of gaussian, brownian"):
        pipe("a fox", steps=2, noise="pink", progress=False)
