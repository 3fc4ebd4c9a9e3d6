"""Shards in and out: make-shards, the loader, emoji rendering and encode-shards, on small synthetic data."""
import csv
import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data import __main__ as data_cli, loader as data
from latentdiff.data import emoji
from latentdiff.data import encode
from latentdiff.data.loader import DataConfig, DataError, expand_shards, make_loader
from latentdiff.data.shards import ShardWriter, make_shards


def solid(color, size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def random_image(rng, size=(24, 20)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def read_tar(path) -> dict:
    """{key: {ext: bytes}} of a shard, read with tarfile (independent of webdataset)."""
    out: dict = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def write_shards(tmp_path, n_shards, per_shard, make_sample, prefix="s"):
    """Shards of samples from make_sample(i) -> {ext: bytes}; returns the brace pattern."""
    with ShardWriter(tmp_path, prefix, per_shard) as w:
        for i in range(n_shards * per_shard):
            w.write(f"{i:06d}", make_sample(i))
    return str(tmp_path / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def captioned(i, size=(8, 8)):
    """Sample i: a solid colour that encodes i, captioned 'sample i'."""
    return {"png": png_bytes(solid((i % 256, (i // 256) % 256, 7), size)), "txt": f"sample {i}".encode()}


def all_batches(loader):
    return list(loader)


# ----------------------------------------------------------------------------------------------
# make-shards


def test_make_shards_sidecar_roundtrip_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    originals = {}
    for i in range(5):
        img = random_image(rng, (20 + i, 16))
        p = src / ("sub" if i % 2 else "") / f"img{i}.png"
        img.save(p)
        p.with_suffix(".txt").write_text(f"caption {i}\n")
        originals[f"caption {i}"] = np.asarray(img)
    jpg = src / "photo.jpg"
    jpg.write_bytes(jpg_bytes(random_image(rng)))
    jpg.with_suffix(".txt").write_text("a photo")
    (src / "broken.png").write_bytes(png_bytes(random_image(rng))[:60])  # truncated: must be skipped
    (src / "broken.txt").write_text("broken")
    random_image(rng).save(src / "nocaption.png")
    random_image(rng).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes(b"caf\xe9")  # not UTF-8

    summary = make_shards(src, tmp_path / "out", per_shard=2, progress=False)
    assert summary["written"] == 6
    assert len(summary["shards"]) == 3
    assert sum(v for k, v in summary["skipped"].items() if k.startswith("undecodable")) == 1
    assert summary["skipped"]["no caption"] == 1
    assert summary["skipped"]["unreadable caption file (UnicodeDecodeError)"] == 1
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left behind

    seen = 0
    for shard in summary["shards"]:
        for key, files in read_tar(shard).items():
            caption = files["txt"].decode()
            meta = json.loads(files["json"])
            if caption == "a photo":
                assert "jpg" in files and files["jpg"] == jpg.read_bytes()  # JPEG bytes kept as they are
                continue
            img = np.asarray(Image.open(io.BytesIO(files["png"])))
            np.testing.assert_array_equal(img, originals[caption])  # PNG round trip is exact
            assert (meta["width"], meta["height"]) == (img.shape[1], img.shape[0])
            assert meta["source"].endswith(".png")
            seen += 1
    assert seen == 5


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_make_shards_from_caption_list(tmp_path, kind):
    rng = np.random.default_rng(1)
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(4):
        random_image(rng).save(src / f"{i}.png")
        rows.append((f"{i}.png", f"picture {i}"))
    (src / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [("bad.jpg", "bad"), ("missing.png", "gone")]
    listing = tmp_path / f"captions.{kind}"
    if kind == "csv":
        with open(listing, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "caption"])
            w.writerows(rows)
    else:
        lines = [json.dumps({"path": p, "caption": c}) for p, c in rows] + ["{not json"]
        listing.write_text("\n".join(lines) + "\n")

    summary = make_shards(src, tmp_path / "out", per_shard=3, captions=listing, progress=False)
    assert summary["written"] == 4
    skipped = summary["skipped"]
    assert sum(v for k, v in skipped.items() if k.startswith("undecodable")) == 1
    assert skipped["image file missing"] == 1
    assert skipped.get("unreadable line in the captions file", 0) == (1 if kind == "jsonl" else 0)
    captions = sorted(f["txt"].decode() for s in summary["shards"] for f in read_tar(s).values())
    assert captions == [f"picture {i}" for i in range(4)]


def test_make_shards_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        solid((i * 40, 0, 0)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"red {i}")
    data_cli.main(["make-shards", str(src), "--out", str(tmp_path / "out"), "--per-shard", "2", "--prefix", "red"])
    out = capsys.readouterr().out
    assert "wrote 3 samples in 2 shard(s)" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["red-000000.tar", "red-000001.tar"]
    # A second run into the same folder is refused unless --overwrite: one line, exit code 2.
    with pytest.raises(SystemExit) as e:
        data_cli.main(["make-shards", str(src), "--out", str(tmp_path / "out"), "--prefix", "red"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and "\n" not in err
    data_cli.main(["make-shards", str(src), "--out", str(tmp_path / "out"), "--prefix", "red", "--overwrite"])
    assert sorted(os.listdir(tmp_path / "out")) == ["red-000000.tar"]  # the stale second shard is gone
    with pytest.raises(SystemExit) as e:
        data_cli.main(["make-shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------
# Shard lists


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"x-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "other.txt").write_text("")
    three = [str(tmp_path / f"x-{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "x-{000000..000002}.tar")) == three
    assert expand_shards(str(tmp_path)) == three  # a folder means its .tar files
    assert expand_shards(str(tmp_path / "x-*.tar")) == three
    assert expand_shards(f"{three[0]}::{three[2]}") == [three[0], three[2]]
    assert expand_shards("pipe:cat a.tar") == ["pipe:cat a.tar"]
    with pytest.raises(DataError, match="does not exist"):
        expand_shards(str(tmp_path / "x-{000000..000003}.tar"))
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(str(tmp_path / "y-*.tar"))


# ----------------------------------------------------------------------------------------------
# The loader


def test_loader_shapes_ranges_tokens_and_crop(tmp_path):
    # Three vertical bands, red | green | blue, in a 48x16 image: the 16x16 centre crop is all green.
    bands = np.zeros((16, 48, 3), np.uint8)
    bands[:, :16, 0] = 255
    bands[:, 16:32, 1] = 255
    bands[:, 32:, 2] = 255
    sample = {"png": png_bytes(Image.fromarray(bands)), "txt": b"green"}
    pattern = write_shards(tmp_path, 2, 5, lambda i: sample)

    def tokenize(captions):
        return [[len(c)] * 77 for c in captions]

    cfg = DataConfig(shards=pattern, resolution=16, batch_size=4, num_workers=0, shuffle_buffer=3,
                     caption_dropout=0.0, resample=False)
    batches = all_batches(make_loader(cfg, tokenize=tokenize))
    assert [b["pixels"].shape[0] for b in batches] == [4, 4, 2]  # one pass, last batch partial
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    for b in batches:
        assert b["pixels"].dtype == torch.float32 and b["pixels"].shape[1:] == (3, 16, 16)
        assert torch.equal(b["pixels"], green.expand_as(b["pixels"]))
        assert b["captions"] == ["green"] * len(b["captions"])
        assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (len(b["captions"]), 77)
        assert (b["tokens"] == 5).all()
        assert type(b["n_skipped"]) is int and b["n_skipped"] == 0

    # Downscaling a 40x32 JPEG to 16px keeps values inside [-1, 1].
    rng = np.random.default_rng(0)
    big = write_shards(tmp_path, 1, 3, lambda i: {"jpg": jpg_bytes(random_image(rng, (40, 32))), "txt": b"x"},
                       prefix="big")
    b = next(iter(make_loader(DataConfig(shards=big, resolution=16, batch_size=3, num_workers=0,
                                         resample=False))))
    assert b["pixels"].shape == (3, 3, 16, 16)
    assert b["pixels"].min() >= -1.0 and b["pixels"].max() <= 1.0


def test_caption_dropout_rate(tmp_path):
    pattern = write_shards(tmp_path, 4, 250, captioned)
    p = 0.3
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=100, num_workers=0, shuffle_buffer=10,
                     caption_dropout=p, resample=False)
    captions = [c for b in make_loader(cfg, seed=3) for c in b["captions"]]
    n = len(captions)
    assert n == 1000
    dropped = sum(c == "" for c in captions)
    # Binomial(n, p): 5 standard deviations either side.
    assert abs(dropped - n * p) < 5 * math.sqrt(n * p * (1 - p)), dropped
    assert all(c == "" or c.startswith("sample ") for c in captions)


def test_caption_templates_from_json(tmp_path):
    meta = json.dumps({"captions": ["a cat", "an emoji of a cat", "cat"]}).encode()
    pattern = write_shards(tmp_path, 1, 60, lambda i: {**captioned(i), "txt": b"cat", "json": meta})
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=60, num_workers=0, caption_dropout=0.0,
                     resample=False)
    captions = next(iter(make_loader(cfg)))["captions"]
    assert set(captions) == {"a cat", "an emoji of a cat", "cat"}


def test_hflip_really_flips(tmp_path):
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, :3] = (255, 0, 0)  # red on the left three columns, black elsewhere
    pattern = write_shards(tmp_path, 1, 64, lambda i: {"png": png_bytes(Image.fromarray(half)), "txt": b"h"})
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=64, num_workers=0, hflip=True, resample=False)
    pixels = next(iter(make_loader(cfg, seed=1)))["pixels"]
    plain = torch.from_numpy(half.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    mirrored = torch.from_numpy(half[:, ::-1].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    flipped = [torch.equal(x, mirrored) for x in pixels]
    assert all(f or torch.equal(x, plain) for f, x in zip(flipped, pixels))
    assert 10 < sum(flipped) < 54  # about half, never all or none

    cfg = DataConfig(shards=pattern, resolution=8, batch_size=64, num_workers=0, hflip=False, resample=False)
    assert all(torch.equal(x, plain) for x in next(iter(make_loader(cfg)))["pixels"])


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(2)
    good = jpg_bytes(random_image(rng))

    def sample(i):
        if i == 3:
            return {"jpg": good[: len(good) // 2], "txt": b"truncated"}  # a JPEG cut in half
        if i == 5:
            return {"png": b"garbage", "txt": b"garbage"}
        if i == 6:
            return {"jpg": good}  # no caption
        return {"jpg": good, "txt": f"ok {i}".encode()}

    pattern = write_shards(tmp_path, 2, 4, sample)
    cfg = DataConfig(shards=pattern, resolution=16, batch_size=2, num_workers=0, caption_dropout=0.0,
                     shuffle_buffer=1, resample=False)
    batches = all_batches(make_loader(cfg))
    assert sorted(c for b in batches for c in b["captions"]) == [f"ok {i}" for i in (0, 1, 2, 4, 7)]
    assert sum(b["n_skipped"] for b in batches) == 3

    # A shard that is not a tar at all is counted too, and the good shards still arrive.
    (tmp_path / "s-000002.tar").write_bytes(b"this is not a tar file" * 40)
    cfg = DataConfig(**{**cfg.__dict__, "shards": pattern.replace("000001}", "000002}")})
    batches = all_batches(make_loader(cfg))
    assert sum(len(b["captions"]) for b in batches) == 5
    assert sum(b["n_skipped"] for b in batches) == 4


def test_only_corrupt_samples_stop_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_FAILURES_IN_A_ROW", 20)
    pattern = write_shards(tmp_path, 2, 4, lambda i: {"png": b"garbage", "txt": b"x"})
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=2, num_workers=0, resample=True)
    with pytest.raises(DataError, match="20 samples in a row failed to read or decode"):
        next(iter(make_loader(cfg)))
    for i in range(2):  # shards that are not tars at all
        (tmp_path / f"s-00000{i}.tar").write_bytes(b"junk" * 300)
    with pytest.raises(DataError, match="20 samples in a row failed to read or decode"):
        next(iter(make_loader(cfg)))


def test_no_resample_needs_a_shard_per_reader(tmp_path):
    pattern = write_shards(tmp_path, 3, 2, captioned)
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=2, num_workers=2, resample=False)
    with pytest.raises(DataError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\).*resample: true"):
        make_loader(cfg, rank=0, world_size=2)
    make_loader(cfg.__class__(**{**cfg.__dict__, "resample": True}), rank=0, world_size=2)  # resampling is fine


def test_split_by_rank_partitions_the_shards(tmp_path):
    pattern = write_shards(tmp_path, 4, 3, captioned)
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=5, num_workers=0, caption_dropout=0.0,
                     resample=False)
    seen = [sorted(c for b in make_loader(cfg, rank=r, world_size=2) for c in b["captions"]) for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"sample {i}" for i in range(12))
    assert len(seen[0]) == len(seen[1]) == 6


def test_resampled_ranks_and_workers_differ(tmp_path):
    pattern = write_shards(tmp_path, 8, 16, captioned)
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=4, num_workers=0, shuffle_buffer=8,
                     caption_dropout=0.0, resample=True)

    def first(rank, seed=0, n=6, c=cfg):
        it = iter(make_loader(c, rank=rank, world_size=2, seed=seed))
        return [tuple(next(it)["captions"]) for _ in range(n)]

    assert first(0) == first(0)  # reproducible for a seed
    assert first(0) != first(1)  # ranks see different data
    assert first(0) != first(0, seed=1)
    # Two DataLoader workers must not replay the same stream (the classic duplicate-seed bug).
    workers = DataConfig(**{**cfg.__dict__, "num_workers": 2})
    batches = first(0, n=8, c=workers)
    assert len(set(batches)) == len(batches)


def test_shuffle_buffer_permutes_without_loss(tmp_path):
    pattern = write_shards(tmp_path, 1, 300, captioned)  # one shard: only the buffer can reorder
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=7, num_workers=0, shuffle_buffer=120,
                     caption_dropout=0.0, resample=False)
    order = [int(c.split()[1]) for b in make_loader(cfg) for c in b["captions"]]
    assert sorted(order) == list(range(300))  # every sample exactly once in a pass
    # Mixed across the shard: many samples leave far from where they were read.
    assert sum(abs(pos - i) > 50 for pos, i in enumerate(order)) > 100


def test_epoch_length(tmp_path):
    pattern = write_shards(tmp_path, 2, 5, captioned)
    cfg = DataConfig(shards=pattern, resolution=8, batch_size=4, num_workers=0, shuffle_buffer=4, resample=False)
    loader = make_loader(cfg, epoch_length=4)  # more batches than one pass holds: the stream repeats
    assert len(loader) == 4
    assert [len(list(loader)) for _ in range(2)] == [4, 4]


def test_latent_shards(tmp_path):
    rng = np.random.default_rng(3)
    lat = [rng.standard_normal((4, 2, 2)).astype(np.float32) for _ in range(6)]

    def sample(i):
        return {"latent.npy": encode._npy_bytes(lat[i]), "txt": str(i).encode()}

    pattern = write_shards(tmp_path, 1, 6, sample)
    cfg = DataConfig(shards=pattern, batch_size=6, num_workers=0, caption_dropout=0.0, latents=True,
                     resample=False)
    b = next(iter(make_loader(cfg)))
    assert "pixels" not in b and b["latents"].shape == (6, 4, 2, 2)
    for caption, x in zip(b["captions"], b["latents"]):
        np.testing.assert_array_equal(x.numpy(), lat[int(caption)])
    with pytest.raises(DataError, match="encode-shards with --hflip"):
        next(iter(make_loader(DataConfig(**{**cfg.__dict__, "hflip": True}))))


def test_config_errors(tmp_path):
    with pytest.raises(DataError, match="data.shards is empty"):
        make_loader(DataConfig())
    pattern = write_shards(tmp_path, 1, 1, captioned)
    with pytest.raises(DataError, match="caption_dropout"):
        make_loader(DataConfig(shards=pattern, caption_dropout=1.5))


# ----------------------------------------------------------------------------------------------
# emoji

FONT = next((p for p in emoji.EMOJI_FONT_PATHS if os.path.isfile(p)), None)
needs_font = pytest.mark.skipif(FONT is None, reason="Noto Color Emoji not installed "
                                                     "(apt-get install fonts-noto-color-emoji)")


@needs_font
def test_render_emoji():
    font = emoji.load_emoji_font(FONT)
    for cp in (0x1F408, 0x1F355, 0x1F680, 0x2764):  # cat, pizza, rocket, heart
        img = emoji.render_emoji(font, chr(cp), 32)
        assert img.size == (32, 32) and img.mode == "RGB"
        a = np.asarray(img).astype(int)
        assert (a[0, 0] == 255).all() and (a[-1, -1] == 255).all()  # white background in the corners
        colourful = (a.max(-1) - a.min(-1)) > 40
        assert colourful.mean() > 0.1, hex(cp)  # a colour picture, not a blank or grey box
        # The glyph touches two opposite borders: cropped to its box and padded to a square.
        ink = (a < 250).any(-1)
        assert (ink[0].any() and ink[-1].any()) or (ink[:, 0].any() and ink[:, -1].any())
    assert emoji.render_emoji(font, "\ue000", 32) is None  # private use: nothing drawn


def test_emoji_captions():
    assert emoji.emoji_captions("cat") == ["a cat", "an emoji of a cat", "cat"]
    assert emoji.emoji_captions("octopus", ["squid"])[:2] == ["an octopus", "an emoji of an octopus"]
    assert emoji.emoji_captions("octopus", ["squid"])[-1] == "squid"


@needs_font
def test_emoji_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "EMOJI_RANGES", ((0x1F408, 0x1F40A), (0x1F3FB, 0x1F3FB), (0xE000, 0xE000)))
    summary = emoji.make_emoji_shards(tmp_path, resolution=24, per_shard=2, progress=False)
    assert summary["written"] == 3  # cat, dragon, crocodile; the skin tone is a component, U+E000 not drawn
    assert sum(v for k, v in summary["skipped"].items() if k.startswith("emoji component")) == 1
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["codepoint"] for r in index] == ["U+1F408", "U+1F409", "U+1F40A"]
    cat = index[0]
    assert cat["name"] == "cat" and cat["char"] == "\U0001F408"
    files = read_tar(tmp_path / cat["shard"])[cat["key"]]
    meta = json.loads(files["json"])
    assert files["txt"] == b"cat" and meta["name"] == "cat"
    assert meta["captions"][:3] == ["a cat", "an emoji of a cat", "cat"]
    assert Image.open(io.BytesIO(files["png"])).size == (24, 24)


def test_missing_font_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(emoji, "EMOJI_FONT_PATHS", (str(tmp_path / "none.ttf"),))
    with pytest.raises(SystemExit) as e:
        data_cli.main(["emoji", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "apt-get install fonts-noto-color-emoji" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# encode-shards


def tiny_checkpoint(path):
    from latentdiff.io.checkpoint import build_models, save_models
    from latentdiff.io.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config("configs/tiny.yaml")
    models = build_models(config)
    save_models(path, config, models.unet, models.vae, models.text)
    return models.vae.eval()


def test_encode_shards_equals_vae_encode(tmp_path, capsys):
    pytest.importorskip("latentdiff.checkpoint")
    vae = tiny_checkpoint(tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(4)
    images = [random_image(rng, (40, 32)) for _ in range(6)]

    def sample(i):
        if i == 2:
            return {"png": b"not a png", "txt": b"broken"}
        return {"png": png_bytes(images[i]), "txt": f"image {i}".encode(),
                "json": json.dumps({"source": f"{i}.png"}).encode()}

    pattern = write_shards(tmp_path / "img", 2, 3, sample)
    out = tmp_path / "lat"
    data_cli.main(["encode-shards", pattern, "--out", str(out), "--checkpoint", str(tmp_path / "tiny.safetensors"),
               "--resolution", "32", "--batch-size", "2", "--device", "cpu", "--hflip"])
    summary = capsys.readouterr().out
    assert "wrote 5 samples in 2 shard(s)" in summary and "undecodable sample" in summary

    got = {k: v for shard in sorted(out.glob("*.tar")) for k, v in read_tar(shard).items()}
    assert sorted(got) == [f"{i:06d}" for i in (0, 1, 3, 4, 5)]
    for key, files in got.items():
        i = int(key)
        # Reference pixels without the loader's code: a 40x32 image center-cropped to 32x32 is columns 4..35.
        crop = np.asarray(images[i])[:, 4:36].astype(np.float32) / 127.5 - 1
        x = torch.from_numpy(crop).permute(2, 0, 1)[None]
        with torch.no_grad():
            want = vae.encode(x)[0].numpy()
            want_flip = vae.encode(x.flip(-1))[0].numpy()
        lat = np.load(io.BytesIO(files["latent.npy"]), allow_pickle=False)
        assert lat.shape == (4, 8, 8) and lat.dtype == np.float32
        np.testing.assert_allclose(lat, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.load(io.BytesIO(files["latent_flip.npy"])), want_flip, rtol=1e-4, atol=1e-5)
        meta = json.loads(files["json"])
        assert files["txt"] == f"image {i}".encode() and meta["source"] == f"{i}.png"
        assert meta["latent"]["posterior"] == "mode" and meta["latent"]["shape"] == [4, 8, 8]

    # The loader reads them back as latents, flipped ones included.
    cfg = DataConfig(shards=str(out), batch_size=5, num_workers=0, caption_dropout=0.0, latents=True,
                     hflip=True, resample=False)
    batch = next(iter(make_loader(cfg)))
    assert batch["latents"].shape == (5, 4, 8, 8)

    with pytest.raises(SystemExit) as e:  # the outputs exist now: refused without --overwrite
        data_cli.main(["encode-shards", pattern, "--out", str(out), "--checkpoint", str(tmp_path / "tiny.safetensors")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        data_cli.main(["encode-shards", pattern, "--out", str(tmp_path / "l2"), "--checkpoint", str(tmp_path / "no")])
    assert e.value.code == 2
    assert "cannot load --checkpoint" in capsys.readouterr().err
