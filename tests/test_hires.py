"""The hires fix (A1111's two-pass txt2img): sizes, the second pass's start and step count, latent and pixel
upscalers, super-resolution networks read by spandrel, the infotext and --from-png; and the VAE in tiles, which
must equal the whole-picture VAE (and is chosen by itself when a whole picture would not fit)."""
import base64
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from latentdiff.diffusion.samplers import get_sampler
from latentdiff.generate import main as generate_main
from latentdiff.io.images import from_pil, parse_parameters, to_pil
from latentdiff.models.upscalers import LATENT_MODES, upscale_latents
from latentdiff.models.vae import AutoencoderKL, VAEConfig
from latentdiff.models.vae_tiles import decoder_halo, encoder_halo, tiled_decode, tiled_encode
from latentdiff.pipeline import Hires, Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_checkpoint(tiny_checkpoint, device="cpu")


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# ---- sizes and upscalers --------------------------------------------------------------------------------------

def test_sizes_follow_a1111_scale_and_resize_rules():
    assert Hires(scale=1.5).sizes(512, 512, 64) == ((768, 768), (768, 768))
    assert Hires(scale=1.3).sizes(512, 512, 64) == ((640, 640), (640, 640))  # 665 rounded down to the multiple
    assert Hires(resize_x=1024).sizes(512, 768, 8) == ((1024, 1536), (1024, 1536))  # keeps the aspect ratio
    assert Hires(resize_y=1024).sizes(512, 768, 8) == ((680, 1024), (680, 1024))
    # both: cover 1024x1024 at 2:3, then crop the middle
    assert Hires(resize_x=1024, resize_y=1024).sizes(512, 768, 8) == ((1024, 1536), (1024, 1024))
    assert Hires(resize_x=1024, resize_y=512).sizes(768, 512, 8) == ((1024, 680), (1024, 512))


def test_latent_upscalers_are_a1111_s_interpolations():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    nearest = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=torch.float32)
    assert torch.equal(upscale_latents(x, (4, 4), "Latent (nearest)")[0, 0], nearest)
    assert torch.equal(upscale_latents(x, (4, 4), "Latent (nearest-exact)")[0, 0], nearest)
    # bilinear, half-pixel centres (align_corners=False): output i samples input (i + 0.5) / 2 - 0.5, clamped
    row = torch.tensor([0.0, 0.25, 0.75, 1.0])
    want = row[None, :] + 2 * row[:, None]
    for name in ("Latent", "Latent (antialiased)"):  # antialiasing changes nothing when enlarging
        assert torch.allclose(upscale_latents(x, (4, 4), name)[0, 0], want, atol=1e-6), name
    big = torch.randn(1, 4, 8, 8)
    bicubic, bilinear = upscale_latents(big, (16, 16), "Latent (bicubic)"), upscale_latents(big, (16, 16), "Latent")
    assert not torch.allclose(bicubic, bilinear)
    assert set(LATENT_MODES) == {"Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                                 "Latent (nearest)", "Latent (nearest-exact)"}


# ---- the second pass ------------------------------------------------------------------------------------------

def test_second_pass_starts_from_the_upscaled_first_pass_noised_to_its_strength(pipe):
    """Euler draws only its start noise, so the second pass's noise is each generator's next draw: the second
    pass starts at x = upscale(x0 of the first pass) + sigma_t0 * eps and runs exactly `steps` steps, the last of a
    schedule of steps / strength (A1111's hires steps)."""
    kw = dict(steps=4, sampler="euler", seed=21, guidance=3.0, progress=False)
    first = pipe("a red ball", return_latents=True, **kw).latents  # (1, 4, 16, 16)
    for upscaler, n, strength in (("Latent", 3, 0.6), ("Lanczos", 0, 0.45), ("Latent (nearest)", 5, 1.0)):
        seen = []
        res = pipe("a red ball", hires=Hires(scale=2, steps=n, strength=strength, upscaler=upscaler),
                   callback=lambda i: seen.append((i["sigma"], i["x"], i["steps"], i["i"])), return_latents=True, **kw)
        assert res.images[0].size == (128, 128) and res.latents.shape == (1, 4, 32, 32)
        second = seen[4:]
        n = n or 4
        assert len(second) == n and all(s[2] == 4 + n for s in seen)  # the callback counts both passes' steps
        assert [s[3] for s in seen] == list(range(4 + n))
        total = int(n / min(strength, 0.999))
        t0 = pipe.img2img_start(float(get_sampler("euler").sigmas(pipe.schedule, total)[total - n]))
        assert second[0][0] == pytest.approx(float(pipe.schedule.sigmas[t0]))
        if upscaler == "Lanczos":
            picture = to_pil(pipe.decode(first))[0].resize((128, 128), Image.LANCZOS)
            x0 = pipe.encode(from_pil(picture, (128, 128), "cpu", torch.float32))
        else:
            x0 = F.interpolate(first, size=(32, 32), mode="bilinear" if upscaler == "Latent" else "nearest")
        g = torch.Generator().manual_seed(21)
        torch.randn(1, 4, 16, 16, generator=g)  # the first pass's start
        eps = torch.randn(1, 4, 32, 32, generator=g)
        assert torch.allclose(second[0][1], x0 + second[0][0] * eps, atol=1e-3), upscaler


def test_hires_prompt_sampler_and_infotext(pipe):
    h = Hires(scale=1.5, steps=2, strength=0.5, upscaler="Latent (bicubic)", sampler="DPM++ 2M Karras",
              prompt="a blue ball, sharp", negative_prompt="blur")
    res = pipe("a red ball", steps=2, sampler="euler", seed=3, progress=False, hires=h)
    info = parse_parameters(res.infotexts[0])
    assert res.images[0].size == (96, 96) and info["Size"] == "64x64"  # A1111 records the first pass's size
    assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"], info["Denoising strength"]) == \
        ("1.5", "2", "Latent (bicubic)", "0.5")
    assert info["Hires sampler"] == "DPM++ 2M Karras" and info["Hires prompt"] == "a blue ball, sharp"
    assert info["Hires negative prompt"] == "blur"
    plain = pipe("a red ball", steps=2, sampler="euler", seed=3, progress=False,
                 hires=Hires(scale=1.5, steps=2, strength=0.5, upscaler="Latent (bicubic)"))
    assert not np.array_equal(px(plain.images[0]), px(res.images[0]))
    assert "Hires prompt" not in plain.infotexts[0] and "Hires sampler" not in plain.infotexts[0]


def test_memory_estimate_covers_the_second_pass(pipe, monkeypatch):
    import latentdiff.pipeline as pl
    small, large = pipe.image_bytes(64, 64, 7.5), pipe.image_bytes(256, 256, 7.5)
    monkeypatch.setattr(pl, "available_memory", lambda device: (small + large) // 2)
    pipe("a", steps=1, progress=False)  # the first pass alone fits
    with pytest.raises(ValueError, match="a 256x256 image needs"):
        pipe("a", steps=1, progress=False, hires=Hires(scale=4))


def test_bad_hires_settings_are_one_line_errors(pipe):
    from PIL import Image as I
    for h, match in ((Hires(upscaler="Latent (magic)"), "unknown hires upscaler"), (Hires(scale=0.5), "1..8"),
                     (Hires(strength=0), r"\(0, 1\]"), (Hires(steps=-1), "hires steps"),
                     (Hires(sampler="nope"), "unknown sampler"), (Hires(resize_x=-8), "hires resize")):
        with pytest.raises(ValueError, match=match):
            pipe("a", steps=1, progress=False, hires=h)
    with pytest.raises(ValueError, match="second pass of text-to-image"):
        pipe("a", steps=1, progress=False, hires=Hires(), init_image=I.new("RGB", (64, 64)))


def test_generate_hires_round_trips_through_from_png(tmp_path, capsys, tiny_checkpoint):
    base = ["a castle", "--checkpoint", tiny_checkpoint, "--steps", 2, "--seed", 8]
    assert generate_main([str(a) for a in base + ["--hires", 2, "--hires-steps", 2, "--hires-strength", 0.6,
                                                  "--hires-upscaler", "Nearest", "-o", tmp_path / "a.png"]]) == 0
    a = Image.open(tmp_path / "a.png")
    assert a.size == (128, 128)
    info = parse_parameters(a.info["parameters"])
    assert (info["Hires upscaler"], info["Denoising strength"], info["Size"]) == ("Nearest", "0.6", "64x64")
    assert generate_main(["--from-png", str(tmp_path / "a.png"), "--checkpoint", str(tiny_checkpoint),
                          "-o", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(px(a), px(Image.open(tmp_path / "b.png")))
    assert generate_main([str(a) for a in base + ["--hires-resize", "96x0", "-o", tmp_path / "c.png"]]) == 0
    assert Image.open(tmp_path / "c.png").size == (96, 96)
    capsys.readouterr()
    for extra, expect in ((["--hires", 2, "--hires-upscaler", "Bogus"], "unknown --hires-upscaler"),
                          (["--hires-steps", 3], "only applies to the hires fix"),
                          (["--hires", 100], "hires scale must be in 1..8"),
                          (["--hires", 2, "--hires-upscaler", tmp_path / "none.pth"], "not found")):
        assert generate_main([str(a) for a in base + extra + ["-o", tmp_path / "x.png"]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("size", [["--hires", 2], ["--hires-resize", "96x80"]])
def test_from_png_remakes_hires_with_a_pixel_upscaler_its_own_sampler_and_prompts(tmp_path, tiny_checkpoint, size):
    argv = ["a castle", "--checkpoint", tiny_checkpoint, "--steps", 2, "--seed", 9, "--sampler", "Euler a",
            "--negative", "fog", *size, "--hires-upscaler", "Lanczos", "--hires-steps", 2, "--hires-strength", 0.55,
            "--hires-sampler", "DPM++ 2M Karras", "--hires-prompt", "a castle: at night, (detailed:1.2)",
            "--hires-negative", "blur, rain", "-o", tmp_path / "a.png"]
    assert generate_main([str(a) for a in argv]) == 0
    a = Image.open(tmp_path / "a.png")
    info = parse_parameters(a.info["parameters"])
    assert (info["Hires upscaler"], info["Hires steps"], info["Hires sampler"], info["Denoising strength"]) == \
        ("Lanczos", "2", "DPM++ 2M Karras", "0.55")
    assert info.get("Hires upscale", info.get("Hires resize")) in ("2.0", "96x80")
    assert generate_main(["--from-png", str(tmp_path / "a.png"), "--checkpoint", str(tiny_checkpoint),
                          "-o", str(tmp_path / "b.png")]) == 0
    b = Image.open(tmp_path / "b.png")
    assert a.size == b.size == ((128, 128) if size[0] == "--hires" else (96, 80))
    assert b.info["parameters"] == a.info["parameters"]
    assert np.array_equal(px(a), px(b))


# ---- super-resolution networks through spandrel --------------------------------------------------------------

@pytest.fixture(scope="module")
def esrgan_file(tmp_path_factory):
    """A tiny random ESRGAN (RRDB) at scale 2, saved with the original ESRGAN key names ('model.0.weight', ...),
    which spandrel recognises; the architecture class here is spandrel's, used only to write the file."""
    arch = pytest.importorskip("spandrel.architectures.ESRGAN")
    torch.manual_seed(0)
    net = arch.ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2).eval()
    path = tmp_path_factory.mktemp("esrgan") / "2x-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def test_network_upscaler_is_the_network_then_lanczos_and_drives_the_hires_pass(pipe, esrgan_file):
    from latentdiff.io.upscalers import load_upscaler
    path, net = esrgan_file
    up = load_upscaler(path)
    assert (up.name, up.scale) == ("2x-tiny", 2)
    picture = Image.fromarray((np.random.RandomState(3).rand(24, 20, 3) * 255).astype(np.uint8))
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        ref = net(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    want = Image.fromarray(np.rint(ref * 255).astype(np.uint8))
    assert np.array_equal(px(up(picture, (40, 48))), px(want))  # one pass reaches 40x48 exactly
    assert np.array_equal(px(up(picture, (30, 30))), px(want.resize((30, 30), Image.LANCZOS)))
    assert up(picture, (100, 100)).size == (100, 100)  # two passes (4x), then Lanczos down to the size
    res = pipe("a cat", steps=1, seed=2, progress=False, hires=Hires(scale=2, steps=1, upscaler=up))
    assert res.images[0].size == (128, 128)
    assert parse_parameters(res.infotexts[0])["Hires upscaler"] == "2x-tiny"


def test_upscaler_files_that_are_not_networks_are_refused_in_one_line(tmp_path):
    from latentdiff.io.upscalers import UpscalerError, load_upscaler
    pytest.importorskip("spandrel")
    save_file({"a.weight": torch.zeros(3, 3)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "y.pth").write_bytes(b"not a pickle")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"params": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "z.pth")
    for name, match in (("x.safetensors", "not an upscaler network"), ("y.pth", "refused|could not be read"),
                        ("z.pth", "refused"), ("none.pth", "not found"), ("w.txt", "unknown upscaler file type")):
        if name == "w.txt":
            (tmp_path / name).write_text("x")
        with pytest.raises(UpscalerError, match=match) as e:
            load_upscaler(tmp_path / name)
        assert "\n" not in str(e.value)
    assert not marker.exists()


# ---- the VAE in tiles -----------------------------------------------------------------------------------------

SD_LAYOUT = VAEConfig(ch=8, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=4)  # SD's VAE, narrower
SMALL_LAYOUT = VAEConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)


def random_vae(cfg, dtype=torch.float64):
    torch.manual_seed(1)
    vae = AutoencoderKL(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.mark.parametrize("cfg,shape,tile,halos", [
    (SMALL_LAYOUT, (2, 4, 30, 26), 6, (9, 7)),
    pytest.param(SD_LAYOUT, (1, 4, 40, 36), 10, (14, 11), marks=pytest.mark.slow)])
def test_tiled_vae_equals_the_whole_picture_vae(cfg, shape, tile, halos):
    """In float64, tiles with the whole picture's GroupNorm statistics and a halo as wide as the receptive field
    give the untiled decode and encode to 1e-12 (measured 2e-15: no seams, no drift)."""
    vae = random_vae(cfg)
    f = vae.latent_factor
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    images = torch.rand(1, 3, shape[2] * f, shape[3] * f, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64) * 2 - 1
    assert (decoder_halo(vae), encoder_halo(vae)) == halos and shape[2] > tile + 2 * halos[0]  # inner tiles are cut
    with torch.no_grad():
        full_d, full_e = vae.decode(z), vae.encode(images)
        tiled_d, tiled_e = tiled_decode(vae, z, tile), tiled_encode(vae, images, tile)
    assert (tiled_d - full_d).abs().max() < 1e-12 * full_d.abs().max()
    assert (tiled_e - full_e).abs().max() < 1e-12 * full_e.abs().max()


def test_a_halo_too_narrow_shows(monkeypatch):
    """The check above can fail: with a 3-latent halo the tiles' edges reach their interiors (measured 3e-2)."""
    import latentdiff.models.vae_tiles as vt
    vae = random_vae(SMALL_LAYOUT)
    z = torch.randn(1, 4, 30, 26, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        full = vae.decode(z)
        monkeypatch.setattr(vt, "decoder_halo", lambda v: 3)
        assert (tiled_decode(vae, z, 6) - full).abs().max() > 1e-3 * full.abs().max()


def test_pipeline_tiles_the_vae_by_itself_when_a_whole_picture_does_not_fit(pipe, monkeypatch):
    import latentdiff.models.vae_tiles as vt
    import latentdiff.pipeline as pl
    z = torch.randn(2, 4, 48, 48, generator=torch.Generator().manual_seed(5))
    whole = pipe.decode(z)
    calls = []
    real = vt.tiled_decode
    monkeypatch.setattr(pl, "tiled_decode", lambda *a: calls.append(a[2]) or real(*a))
    need = pipe.vae_bytes(192, 192)
    monkeypatch.setattr(pl, "available_memory", lambda device: int(need * 1.5))  # one picture fits, not two
    assert pipe.vae_tile(192, 192, 2) == 0
    assert torch.allclose(pipe.decode(z), whole, atol=1e-5) and calls == []
    monkeypatch.setattr(pl, "available_memory", lambda device: int(need * 0.9))
    tile = pipe.vae_tile(192, 192, 2)
    assert tile and pipe.vae_bytes(192, 192, tile) <= 0.8 * need * 0.9
    tiled = pipe.decode(z)
    assert calls == [tile, tile] and (tiled - whole).abs().max() < 1e-4
    x = pipe.encode(tiled[:1])
    monkeypatch.setattr(pl, "available_memory", lambda device: None)
    assert (x - pipe.encode(tiled[:1])).abs().max() < 1e-4


@pytest.mark.slow
def test_sd_size_random_weights_hires_shapes(tmp_path):
    """The full SD 1.5 network sizes (random weights) through both passes at a small picture size."""
    from latentdiff.io.config import load_model_config
    from pathlib import Path
    cfg = load_model_config(Path(__file__).resolve().parent.parent / "configs" / "sd15.yaml")
    sd = Pipeline.from_config(cfg, device="cpu")
    seen = []
    res = sd("a cat", steps=2, width=128, height=128, seed=1, progress=False, return_latents=True,
             hires=Hires(scale=1.5, steps=2, strength=0.5), callback=lambda i: seen.append(i["x"].shape))
    assert res.images[0].size == (192, 192) and res.latents.shape == (1, 4, 24, 24)
    assert seen == [(1, 4, 16, 16)] * 2 + [(1, 4, 24, 24)] * 2
    assert math.isfinite(float(res.latents.abs().max()))
    # A pixel upscaler from the same first pass, a lower strength: other pictures, and the settings A1111 writes
    seen.clear()
    other = sd("a cat", steps=2, width=128, height=128, seed=1, progress=False, return_latents=True,
               hires=Hires(scale=1.5, steps=2, strength=0.25, upscaler="Lanczos"),
               callback=lambda i: seen.append(i["x"].shape))
    assert seen == [(1, 4, 16, 16)] * 2 + [(1, 4, 24, 24)] * 2 and other.images[0].size == (192, 192)
    assert not torch.equal(other.latents, res.latents)
    info = parse_parameters(other.infotexts[0])
    assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"], info["Denoising strength"],
            info["Size"]) == ("1.5", "2", "Lanczos", "0.25", "128x128"), info


# ---- the A1111 API ----------------------------------------------------------------------------------------------

def test_api_enable_hr_is_generate_s_hires(tiny_checkpoint, tmp_path, esrgan_file):
    webuiapi = pytest.importorskip("webuiapi")
    from test_serve import InProcess
    srv = InProcess([tiny_checkpoint])
    srv.worker.find_upscalers([esrgan_file[0].parent])
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        res = srv.post("txt2img", {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2,
                                   "denoising_strength": 0.55, "hr_upscaler": "Latent (nearest)", "prompt": "a tower",
                                   "seed": 6, "steps": 2, "sampler_name": "Euler", "cfg_scale": 4, "width": 64,
                                   "height": 64}).json()
        image = Image.open(io.BytesIO(base64.b64decode(res["images"][0])))
        assert generate_main([str(a) for a in ["a tower", "--checkpoint", tiny_checkpoint, "--hires", 2,
                                               "--hires-steps", 2, "--hires-strength", 0.55, "--hires-upscaler",
                                               "Latent (nearest)", "--seed", 6, "--steps", 2, "--sampler", "Euler",
                                               "--guidance", 4, "-o", tmp_path / "cli.png"]]) == 0
        assert image.size == (128, 128) and np.array_equal(px(image), px(Image.open(tmp_path / "cli.png")))
        info = parse_parameters(json.loads(res["info"])["infotexts"][0])
        assert (info["Hires upscale"], info["Hires steps"], info["Hires upscaler"], info["Size"]) == \
            ("2.0", "2", "Latent (nearest)", "64x64")
        r = api.txt2img(enable_hr=True, hr_resize_x=96, hr_upscaler="2x-tiny", hr_sampler_name="DPM++ 2M",
                        hr_scheduler="Karras", hr_prompt="a tall tower", prompt="a tower", steps=1, width=64,
                        height=64)
        info = parse_parameters(r.info["infotexts"][0])
        assert r.image.size == (96, 96) and info["Hires upscaler"] == "2x-tiny"
        assert info["Hires sampler"] == "DPM++ 2M Karras" and info["Hires prompt"] == "a tall tower"
        assert {u["name"] for u in srv.get("upscalers").json()} == {"Lanczos", "Nearest", "2x-tiny"}
        assert len(srv.get("latent-upscale-modes").json()) == 6
        for extra, expect in (({"hr_scale": 40}, "hires scale"), ({"hr_resize_x": 4096}, "over this server's limit"),
                              ({"hr_upscaler": "R-ESRGAN 4x+"}, "not found"),
                              ({"hr_second_pass_steps": 500}, "hr_second_pass_steps"),
                              ({"denoising_strength": 0}, "denoising_strength")):
            res = srv.post("txt2img", {"prompt": "a", "steps": 1, "enable_hr": True, **extra})
            assert res.status_code == 422 and expect in res.json()["detail"], res.text
    finally:
        srv.close()
