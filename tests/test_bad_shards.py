"""Odd images and bad shards: every PIL mode decoded as it displays, and a corpus of broken samples that the loader
survives with exact skip counts. Expected pixels are closed forms of the mode's definition, not Pillow's output."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from latentdiff.data.loader import DataConfig, make_loader
from latentdiff.io.images import load_image
from latentdiff.data.shards import ShardWriter, make_shards, write_tar


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pixels(data: bytes, res: int) -> np.ndarray:
    return np.asarray(load_image(data, res), dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# PIL modes (issue 14, item 2)


def gray16() -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG (mode I;16) of 16 levels spread over 0..65535, and its 8-bit values round(v/257)."""
    v = np.linspace(0, 65535, 16).round().astype(np.uint16).reshape(4, 4)
    return encoded(Image.fromarray(v)), np.rint(v / 257.0).astype(np.int64)


def test_16bit_png_is_scaled_not_clipped():
    data, want = gray16()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = pixels(data, 4)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)


def test_palette_with_transparency_is_flattened_onto_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 2), 1)
    data = encoded(img, transparency=0)  # palette entry 0 is transparent
    got = pixels(data, 4)
    assert (got[2, 1] == [200, 100, 50]).all()
    mask = np.ones((4, 4), bool)
    mask[2, 1] = False
    assert (got[mask] == 255).all()


def test_la_is_composited_over_white():
    img = Image.new("LA", (4, 4), (100, 128))
    got = pixels(encoded(img), 4)
    want = 100 * 128 / 255 + 255 * (1 - 128 / 255)  # alpha blend onto white: 177.2
    assert np.abs(got - want).max() <= 1


def test_cmyk_jpeg_uses_the_subtractive_formula():
    img = Image.new("CMYK", (8, 8), (100, 0, 0, 100))
    got = pixels(encoded(img, "JPEG", quality=100), 8)
    want = np.array([255 * (1 - 100 / 255) * (1 - 100 / 255), 255 * (1 - 100 / 255), 255 * (1 - 100 / 255)])
    assert np.abs(got - want).max() <= 2  # JPEG quantisation


def orientated() -> bytes:
    """8 wide x 4 high, left half red, right half blue, stored with EXIF orientation 6 (display rotated 90 CW)."""
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.paste((0, 0, 255), (4, 0, 8, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, exif=exif.tobytes())


def test_exif_orientation_is_applied():
    img = load_image(orientated(), 4)  # displayed 4 wide x 8 high: red on top, blue below; centre crop 4x4
    got = np.asarray(img, dtype=np.int64)
    assert (got[:2] == [255, 0, 0]).all() and (got[2:] == [0, 0, 255]).all()


def test_make_shards_stores_odd_images_as_they_display(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data16, want16 = gray16()
    (src / "a.png").write_bytes(data16)
    (src / "b.png").write_bytes(orientated())
    for name in ("a", "b"):
        (src / f"{name}.txt").write_text(f"image {name}")
    summary = make_shards(src, tmp_path / "out", progress=False)
    assert summary["written"] == 2 and not summary["skipped"]
    with tarfile.open(summary["shards"][0]) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    a = Image.open(io.BytesIO(stored["000000000.png"]))
    b = Image.open(io.BytesIO(stored["000000001.png"]))
    assert a.mode == "RGB" and b.mode == "RGB" and b.size == (4, 8)  # 8-bit, upright, for any reader
    np.testing.assert_array_equal(np.asarray(a)[..., 0], want16)


# ----------------------------------------------------------------------------------------------
# A half-written shard set (item 4)


def test_interrupted_overwrite_leaves_the_old_set_whole(tmp_path):
    def sample(i, color):
        return {"png": encoded(Image.new("RGB", (4, 4), color)), "txt": f"s{i}".encode()}

    with ShardWriter(tmp_path, "x", per_shard=2) as w:
        for i in range(6):
            w.write(f"{i:03d}", sample(i, (255, 0, 0)))
    before = {p.name: p.read_bytes() for p in tmp_path.glob("x-*.tar")}
    assert len(before) == 3
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, "x", per_shard=2, overwrite=True) as w:
            for i in range(5):
                w.write(f"{i:03d}", sample(i, (0, 0, 255)))
            raise KeyboardInterrupt  # Ctrl-C after two new shards were complete
    after = {p.name: p.read_bytes() for p in tmp_path.glob("x-*.tar")}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary left behind


def test_overwrite_replaces_the_whole_set(tmp_path):
    for n, color in ((6, (255, 0, 0)), (3, (0, 0, 255))):
        with ShardWriter(tmp_path, "x", per_shard=2, overwrite=True) as w:
            for i in range(n):
                w.write(f"{i:03d}", {"png": encoded(Image.new("RGB", (4, 4), color)), "txt": b"c"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000000.tar", "x-000001.tar"]


# ----------------------------------------------------------------------------------------------
# The corpus: the loader survives every bad sample and counts each exactly once (items 2, 3)


def tar_of(path, members: list[tuple[str, bytes | None]]):
    """A tar with regular files (bytes), a directory (None) and a symlink ('->target' names)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif name.endswith("->"):
                info.name, info.type, info.linkname = name[:-2], tarfile.SYMTYPE, "elsewhere"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def one_pass(pattern, **cfg) -> tuple[int, int]:
    """(samples delivered, samples skipped) over one pass of a single-process, unshuffled-size loader."""
    base = dict(shards=pattern, resolution=4, batch_size=1, num_workers=0, shuffle_buffer=1000, resample=False,
                caption_dropout=0.0)
    base.update(cfg)
    loader = make_loader(DataConfig(**base))
    n = skipped = 0
    for batch in loader:
        n += len(batch["captions"])
        skipped += batch["n_skipped"]
    return n, skipped


def test_image_corpus_exact_skip_counts(tmp_path):
    good = encoded(Image.new("RGB", (6, 5), (10, 200, 30)))
    members = [
        ("g0.png", good), ("g0.txt", b"good"),                                   # delivered
        ("m16.png", gray16()[0]), ("m16.txt", b"sixteen bit"),                 # delivered
        ("cmyk.jpg", encoded(Image.new("CMYK", (5, 5), (0, 50, 0, 0)), "JPEG")), ("cmyk.txt", b"cmyk"),  # delivered
        ("la.png", encoded(Image.new("LA", (5, 5), (90, 40)))), ("la.txt", b"la"),  # delivered
        ("rot.png", orientated()), ("rot.txt", b"rotated"),                     # delivered
        ("dir", None), ("link.png->", b""),                                      # not samples: ignored
        ("text.png", b"this is text, not a PNG"), ("text.txt", b"x"),            # skipped 1: undecodable image
        ("badutf.png", good), ("badutf.txt", b"\xff\xfe\xfa"),                    # skipped 2: caption not UTF-8
        ("nocap.png", good),                                                     # skipped 3: no caption
        ("noimg.txt", b"caption only"),                                          # skipped 4: no image
        ("badjson.png", good), ("badjson.json", b"{not json"), ("badjson.txt", b"x"),  # skipped 5
        ("nolist.png", good), ("nolist.json", b'{"captions": 5}'), ("nolist.txt", b"x"),  # skipped 6
        ("g1.png", good), ("g1.txt", b"good again"),                             # delivered
    ]
    tar_of(tmp_path / "a.tar", members)
    (tmp_path / "b.tar").write_bytes(b"\x00garbage, not a tar file" * 40)      # skipped 7: unreadable tar
    whole = tmp_path / "c-full.tar"
    write_tar(whole, [(f"t{i}", {"png": good, "txt": b"t"}) for i in range(4)])
    data = whole.read_bytes()
    # Cut inside the data of t2.png: t0 and t1 are whole, the tar read fails once there (skipped 8).
    cut = data.index(b"t2.png") + 512 + len(good) // 2
    (tmp_path / "c.tar").write_bytes(data[:cut])
    whole.unlink()
    n, skipped = one_pass(str(tmp_path / "{a,b,c}.tar"))
    assert (n, skipped) == (6 + 2, 8)


def latent_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=a.dtype == object)
    return buf.getvalue()


def test_latent_corpus_exact_skip_counts(tmp_path):
    ok = np.zeros((4, 2, 2), np.float32)
    members = [("a.latent.npy", latent_bytes(ok)), ("a.txt", b"a")]           # delivered
    bad = {"wide": np.zeros((4, 2, 3), np.float32),                            # mis-shaped
           "flat": np.zeros((4, 4), np.float32),                               # 2-D
           "ints": np.zeros((4, 2, 2), np.int64),                              # not floating point
           "nan": np.full((4, 2, 2), np.nan, np.float32),                      # not finite
           "pickled": np.array([{"x": 1}], dtype=object)}                      # refused: never unpickled
    for key, arr in bad.items():
        members += [(f"{key}.latent.npy", latent_bytes(arr)), (f"{key}.txt", b"x")]
    members += [("junk.latent.npy", b"not an npy file"), ("junk.txt", b"x")]
    members += [("half.latent.npy", latent_bytes(ok.astype(np.float16))), ("half.txt", b"half")]  # delivered
    members += [("b.latent.npy", latent_bytes(ok + 1)), ("b.txt", b"b")]       # delivered
    tar_of(tmp_path / "l.tar", members)
    n, skipped = one_pass(str(tmp_path / "l.tar"), latents=True, batch_size=2)
    assert (n, skipped) == (3, 6)


def test_latent_shape_given_by_the_trainer_wins_over_the_first_sample(tmp_path):
    wrong_first = np.zeros((4, 3, 3), np.float32)
    ok = np.zeros((4, 2, 2), np.float32)
    members = [("a.latent.npy", latent_bytes(wrong_first)), ("a.txt", b"a")]
    for i in range(3):
        members += [(f"k{i}.latent.npy", latent_bytes(ok)), (f"k{i}.txt", b"k")]
    tar_of(tmp_path / "l.tar", members)
    base = dict(shards=str(tmp_path / "l.tar"), resolution=4, batch_size=2, num_workers=0, shuffle_buffer=1000,
                resample=False, caption_dropout=0.0, latents=True)
    batches = list(make_loader(DataConfig(**base), latent_shape=(4, 2, 2)))
    assert sum(len(b["captions"]) for b in batches) == 3 and sum(b["n_skipped"] for b in batches) == 1
