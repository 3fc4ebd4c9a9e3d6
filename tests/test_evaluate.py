"""Evaluation metrics against independent computations, and the command end to end on a tiny model."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.shards import write_tar
from latentdiff.evaluate import features, frechet_distance, load_reference, main, nearest_hits, reconstruction_psnr


def test_frechet_distance_matches_a_general_eigen_route():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.3
    # Independent route: Tr((S_a S_b)^(1/2)) as the sum of square roots of the (real, >= 0) eigenvalues of the
    # non-symmetric product S_a S_b.
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    ev = torch.linalg.eigvals(s_a @ s_b).real.clamp(min=0).sqrt().sum()
    expect = (a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * ev
    assert frechet_distance(a, b) == pytest.approx(float(expect), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # Commuting (diagonal) covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    g = torch.Generator().manual_seed(1)
    sd_a, sd_b = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.5, 1.0, 3.0])
    a = torch.randn(200000, 3, generator=g, dtype=torch.float64) * sd_a
    b = torch.randn(200000, 3, generator=g, dtype=torch.float64) * sd_b + torch.tensor([1.0, 0.0, -1.0])
    expect = 2.0 + ((sd_a - sd_b) ** 2).sum().item()
    assert frechet_distance(a, b) == pytest.approx(expect, rel=2e-2)


def test_nearest_hits():
    ref = torch.rand(20, 12, dtype=torch.float64)
    top1, top5, nearest = nearest_hits(ref + 1e-3, ref)
    assert (top1, top5) == (1.0, 1.0) and nearest.shape == (20, 5)
    top1, _, _ = nearest_hits(ref.flip(0), ref)
    assert top1 == 0.0


def test_reconstruction_psnr_closed_form():
    class Shift:  # a stand-in autoencoder whose reconstruction is off by exactly 0.1 in [-1, 1] units
        def encode(self, x):
            return x

        def decode(self, z):
            return z + 0.1
    images = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    # error 0.05 in [0, 1] pixel units: PSNR = 10 log10(1 / 0.05^2)
    assert reconstruction_psnr(Shift(), images) == pytest.approx(10 * torch.log10(torch.tensor(400.0)).item(), rel=1e-5)


def reference_set(folder, n=6, size=64):
    colors = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (250, 200, 0), (120, 0, 160), (0, 0, 0)]
    samples, index = [], []
    for i in range(n):
        im = Image.new("RGB", (size, size), "white")
        im.paste(colors[i % len(colors)], (8 + 4 * i, 8, 40 + 4 * i, 48))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        name = f"shape {i}"
        meta = {"name": name, "captions": [f"a {name}", name]}
        samples.append((f"k{i}", {"png": buf.getvalue(), "txt": name.encode(), "json": json.dumps(meta).encode()}))
        index.append({"codepoint": f"U+{i:04X}", "name": name, "shard": "ref-000000.tar", "key": f"k{i}"})
    write_tar(folder / "ref-000000.tar", samples)
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))


def test_load_reference_and_the_command(tmp_path, tiny_checkpoint, capsys):
    reference_set(tmp_path)
    names, prompts, images = load_reference(tmp_path)
    assert names[0] == "shape 0" and prompts[0] == "a shape 0" and images.shape == (6, 3, 64, 64)
    assert images[0, :, 20, 20].tolist() == [255, 0, 0] and images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert features(images, 16).shape == (6, 768)
    rc = main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--steps", "2", "--device", "cpu",
               "--out", str(tmp_path / "r.json"), "--sheet", str(tmp_path / "s.png")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and report["references"] == 6 and 0 <= report["top1"] <= report["top5"] <= 1
    assert report["vae_psnr_db"] > 0 and report["frechet_pix8"] >= 0
    assert Image.open(tmp_path / "s.png").size == (5 * 64, 6 * 64)


def test_denoise_from_with_an_oracle_network_returns_the_vae_reconstruction(tmp_path, tiny_checkpoint):
    """A network that predicts the true x0 (prediction "sample") makes both the one-step estimate and the
    iterative run land on x0 exactly, whatever the noise: the output is the VAE's round trip of the reference."""
    import dataclasses

    from latentdiff.io.checkpoint import load_models
    from latentdiff.evaluate import denoise_from, psnr
    from latentdiff.pipeline import Pipeline
    from latentdiff.io.images import to_pil
    reference_set(tmp_path)
    _, prompts, images = load_reference(tmp_path)
    models = load_models(tiny_checkpoint)
    cfg = dataclasses.replace(models.config, diffusion=dataclasses.replace(models.config.diffusion,
                                                                           prediction="sample"))
    pipe = Pipeline(dataclasses.replace(models, config=cfg), device="cpu")
    with torch.no_grad():
        x0 = pipe.vae.encode(images.float() / 127.5 - 1)
    expect = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in to_pil(pipe.decode(x0))])
    pipe.unet_call = lambda x, t, ctx: x0.repeat(x.shape[0] // len(x0), 1, 1, 1)  # what the sampler calls
    for t, steps in ((999, None), (400, None), (999, 5), (250, 3)):
        out = denoise_from(pipe, prompts, images, t, steps, sampler="DPM++ 2M Karras", guidance=3.0, batch_size=64)
        assert (out.int() - expect.int()).abs().max() <= 1, (t, steps)  # rounding to uint8 only
    assert psnr(expect, expect) == pytest.approx(100.0)  # identical images: the 1e-10 MSE floor
    shifted = (expect.int() + 51).clamp(max=255).to(torch.uint8)
    err = ((shifted.double() - expect.double()) / 255).square().flatten(1).mean(1)
    assert psnr(shifted, expect) == pytest.approx(float((10 * torch.log10(1 / err)).mean()))
