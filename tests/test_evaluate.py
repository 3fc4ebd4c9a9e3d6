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


def test_nearest_hits_on_a_hand_worked_case():
    """Three references on a line at 0, 1 and 3; generations at 0.1 (nearest 0), 2.2 (nearest 2, not 1) and 2.9
    (nearest 2): top-1 = 2/3, and with k = 2 every generation has its reference among its two nearest."""
    ref = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    top1, top2, nearest = nearest_hits(torch.tensor([[0.1], [2.2], [2.9]], dtype=torch.float64), ref, k=2)
    assert top1 == pytest.approx(2 / 3) and top2 == 1.0
    assert nearest.tolist() == [[0, 1], [2, 1], [2, 1]]


def pooled(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 3, H, W) uint8 -> (N, 3 * size * size) means of H/size x W/size blocks, in [0, 1] (numpy float64)."""
    n, c, h, w = images.shape
    blocks = images.astype(np.float64).reshape(n, c, size, h // size, size, w // size) / 255.0
    return blocks.mean(axis=(3, 5)).reshape(n, -1)


def test_load_reference_and_the_command(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """The report's numbers against their definitions computed here in numpy float64 on the same images:
    nearest references in 16x16, the Frechet distance of 8x8 pixels (Tr((S_a S_b)^(1/2)) from the eigenvalues of
    the product) and the VAE's round-trip PSNR."""
    import latentdiff.evaluate as evaluate
    from latentdiff.io.checkpoint import load_models
    reference_set(tmp_path)
    names, prompts, images = load_reference(tmp_path)
    assert names[0] == "shape 0" and prompts[0] == "a shape 0" and images.shape == (6, 3, 64, 64)
    assert images[0, :, 20, 20].tolist() == [255, 0, 0] and images[0, :, 0, 0].tolist() == [255, 255, 255]
    assert features(images, 16).shape == (6, 768)
    generated, real_generate = [], evaluate.generate_all
    monkeypatch.setattr(evaluate, "generate_all", lambda *a, **k: generated.append(real_generate(*a, **k))
                        or generated[-1])
    rc = main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--steps", "2", "--device", "cpu",
               "--out", str(tmp_path / "r.json"), "--sheet", str(tmp_path / "s.png")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and report["references"] == 6
    assert Image.open(tmp_path / "s.png").size == (5 * 64, 6 * 64)

    gen = generated[0].numpy()
    _, _, ref = load_reference(tmp_path, load_models(tiny_checkpoint).config.image_size)
    ref = ref.numpy()
    dist = np.linalg.norm(pooled(gen, 16)[:, None] - pooled(ref, 16)[None], axis=2)
    order = np.argsort(dist, axis=1, kind="stable")
    rows = np.arange(len(gen))
    assert report["top1"] == pytest.approx(np.mean(order[:, 0] == rows))
    assert report["top5"] == pytest.approx(np.mean((order[:, :5] == rows[:, None]).any(axis=1)))
    a, b = pooled(gen, 8), pooled(ref, 8)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    fd = np.square(a.mean(0) - b.mean(0)).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root_trace
    assert report["frechet_pix8"] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    vae = load_models(tiny_checkpoint).vae
    with torch.no_grad():
        x = torch.from_numpy(ref).float() / 127.5 - 1
        y = vae.decode(vae.encode(x)).clamp(-1, 1).double().numpy()
    mse = np.square((y - x.double().numpy()) / 2).reshape(len(ref), -1).mean(axis=1)
    assert report["vae_psnr_db"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)


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
