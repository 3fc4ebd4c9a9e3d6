"""Data-loader-only throughput (no model): images/s at 64px from synthetic JPEG shards, 0 and 2 workers.

    OMP_NUM_THREADS=1 pytest -q -s benchmarks/test_bench_data.py
"""
import io
import time

import numpy as np
import pytest
from PIL import Image

from latentdiff.data.loader import DataConfig, make_loader
from latentdiff.data.shards import ShardWriter

SHARDS, PER_SHARD, SIZE, RES, BATCH = 8, 64, (80, 72), 64, 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_shards")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    with ShardWriter(out, "bench", PER_SHARD) as w:
        for i in range(SHARDS * PER_SHARD):
            # Smooth gradients plus a little noise: compresses like a photo rather than like pure noise.
            f = rng.uniform(0.02, 0.2, 3)
            img = (127 + 100 * np.sin(x[..., None] * f + y[..., None] * f[::-1]) + rng.normal(0, 8, (*y.shape, 3)))
            buf = io.BytesIO()
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            w.write(f"{i:06d}", {"jpg": buf.getvalue(), "txt": f"image {i}".encode()})
    return str(out)


def fixed_tokens(captions):
    """A stand-in tokenizer (module level, so the loader's workers can unpickle it)."""
    return [[1] * 77 for _ in captions]


def images_per_second(shards, num_workers, batches=24, warmup=3):
    cfg = DataConfig(shards=shards, resolution=RES, batch_size=BATCH, num_workers=num_workers, shuffle_buffer=256,
                     hflip=True, resample=True)
    loader = make_loader(cfg, tokenize=fixed_tokens)
    it = iter(loader)
    for _ in range(warmup):  # worker start-up and the shuffle buffer filling are not steady state
        next(it)
    t0 = time.perf_counter()
    n = sum(next(it)["pixels"].shape[0] for _ in range(batches))
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def test_loader_throughput(shards, capsys):
    rows = [(w, images_per_second(shards, w)) for w in (0, 2)]
    with capsys.disabled():
        print(f"\ndata loader, {SIZE[0]}x{SIZE[1]} JPEG -> {RES}x{RES}, batch {BATCH}, hflip, tokenize")
        print(f"{'workers':>8} {'images/s':>10} {'vs 0':>6}")
        for w, ips in rows:
            print(f"{w:>8} {ips:>10.0f} {ips / rows[0][1]:>6.2f}")
    # A generous floor: the tiny model trains at tens of images/s on these CPUs, the loader must not be slower.
    assert all(ips > 50 for _, ips in rows), rows
