"""The in-memory fast path (latentdiff.data.memory): epoch coverage, rank slices, caption dropout, the same samples
and captions as the streaming loader, the same loss in a training run, and no host sync between log steps."""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.train import config as train_config, log as train_log, loop as train_loop, losses as train_losses, __main__ as train_main
from latentdiff.diffusion.schedule import Schedule
from latentdiff.io.checkpoint import load_models
from latentdiff.data.loader import DataConfig, expand_shards, make_loader
from latentdiff.data.shards import write_tar
from latentdiff.data.memory import MemoryLoader, make_memory_loader, read_samples

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train-tiny.yaml"
LATENT = (4, 8, 8)  # the tiny VAE's latents at 32x32


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_set(out: Path, n_shards: int, per_shard: int, pixels: bool = False, corrupt: bool = False) -> str:
    """Samples i = 0..: even i carry three caption templates in .json (as emoji do), odd i one .txt caption;
    latent shards also hold latent_flip.npy; with corrupt, sample 1 cannot be decoded."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    i = 0
    for k in range(n_shards):
        samples = []
        for _ in range(per_shard):
            files = {"txt": f"thing {i}".encode()}
            if i % 2 == 0:
                files["json"] = json.dumps({"captions": [f"a thing {i}", f"thing number {i}", f"{i}"]}).encode()
            if pixels:
                files["png"] = png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            else:
                z = rng.standard_normal(LATENT)
                files["latent.npy"], files["latent_flip.npy"] = npy(z), npy(z[..., ::-1])
            if corrupt and i == 1:
                files = {k: b"not a valid file" for k in (["png"] if pixels else ["latent.npy", "latent_flip.npy"])}
                files["txt"] = b"broken"
            samples.append((f"{i:06d}", files))
            i += 1
        write_tar(out / f"m-{k:06d}.tar", samples)
    return str(out / f"m-{{000000..{n_shards - 1:06d}}}.tar")


WIDTH = 24


def byte_tokens(captions: list[str]) -> torch.Tensor:
    """A reversible stand-in tokenizer: the caption's bytes, zero-padded."""
    return torch.tensor([list(c.encode().ljust(WIDTH, b"\0")) for c in captions])


def untokenize(row: torch.Tensor) -> str:
    return bytes(row.tolist()).rstrip(b"\0").decode()


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("lat"), 3, 5)  # 15 samples


def memory(shards, world_size=1, rank=0, seed=0, tokenize=byte_tokens, **cfg) -> MemoryLoader:
    cfg = DataConfig(**{"shards": shards, "latents": True, "batch_size": 4, "caption_dropout": 0.0, **cfg})
    items, failed = read_samples(cfg, expand_shards(shards))
    return MemoryLoader(cfg, items, failed, rank=rank, world_size=world_size, seed=seed, tokenize=tokenize)


def row_ids(loader: MemoryLoader, x: torch.Tensor) -> list[int]:
    """Which stored sample each batch row is (rows are matched exactly)."""
    table = {loader.x[i].numpy().tobytes(): i for i in range(loader.n)}
    return [table[r.numpy().tobytes()] for r in x]


def test_every_epoch_covers_the_set_exactly_once(latents):
    loader = memory(latents)
    assert loader.n == 15
    it = iter(loader)
    x = torch.cat([next(it)["latents"] for _ in range(15)])  # 60 rows = 4 epochs of 15, batches across epoch ends
    ids = row_ids(loader, x)
    for e in range(4):
        assert sorted(ids[15 * e:15 * (e + 1)]) == list(range(15))
    assert ids[:15] != ids[15:30]  # a new permutation each epoch


@pytest.mark.parametrize("n,world", [(7, 2), (15, 3), (16, 3), (15, 2)])
def test_ranks_take_equal_slices_that_cover_each_epoch(tmp_path, n, world):
    """Every rank takes ceil(N / W) samples per epoch (the permutation wrapped around to a multiple of W, as torch's
    DistributedSampler pads), so the ranks go through the epochs together, batches running across epoch ends: each
    epoch's slices cover the set, and only the ceil(N / W) * W - N padding samples come twice."""
    shards = write_set(tmp_path, 1, n)
    loaders = [memory(shards, world_size=world, rank=r, seed=7) for r in range(world)]
    per_rank, epochs = -(-n // world), 4
    streams = [torch.cat([ld.indices(3) for _ in range(-(-epochs * per_rank // 3))])[:epochs * per_rank].tolist()
               for ld in loaders]
    assert len({ld.epoch for ld in loaders}) == 1  # all ranks in the same epoch after the same number of batches
    for e in range(epochs):
        taken = [i for stream in streams for i in stream[e * per_rank:(e + 1) * per_rank]]
        assert set(taken) == set(range(n))
        counts = collections.Counter(taken)
        assert sorted(counts.values()) == [1] * (n - (per_rank * world - n)) + [2] * (per_rank * world - n)


def test_caption_dropout_and_caption_choice_rates(latents):
    p = 0.3
    loader = memory(latents, caption_dropout=p, batch_size=600)
    it = iter(loader)
    batches = [next(it) for _ in range(20)]
    tokens = torch.cat([b["tokens"] for b in batches])
    ids = row_ids(loader, torch.cat([b["latents"] for b in batches]))
    n = len(tokens)
    dropped = (tokens == 0).all(1)  # the empty prompt's byte tokens
    assert abs(dropped.double().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    # The kept captions of a three-template sample are each of its templates with probability 1/3.
    kept = [(i, untokenize(t)) for i, t, d in zip(ids, tokens, dropped) if not d]
    for i in (0, 2):
        mine = [c for j, c in kept if j == i]
        assert set(mine) == set(loader.captions[i])
        for c in loader.captions[i]:
            share = mine.count(c) / len(mine)
            assert abs(share - 1 / 3) < 4.5 * math.sqrt(2 / 9 / len(mine))
    assert all(c == loader.captions[j][0] for j, c in kept if j % 2)  # a .txt sample has its one caption


def stream_pairs(cfg: DataConfig, key: str, passes: int) -> set[tuple[bytes, str]]:
    loader = make_loader(cfg)
    pairs = set()
    for _ in range(passes):
        for batch in loader:
            pairs |= {(x.numpy().tobytes(), c) for x, c in zip(batch[key], batch["captions"])}
    return pairs


def memory_pairs(loader: MemoryLoader, key: str, batches: int) -> set[tuple[bytes, str]]:
    it = iter(loader)
    pairs = set()
    for _ in range(batches):
        b = next(it)
        pairs |= {(x.numpy().tobytes(), untokenize(t)) for x, t in zip(b[key], b["tokens"])}
    return pairs


@pytest.mark.parametrize("pixels", [False, True])
def test_same_samples_captions_and_flips_as_the_streaming_loader(tmp_path, pixels):
    shards = write_set(tmp_path, 2, 4, pixels=pixels, corrupt=True)  # 7 readable samples
    key = "pixels" if pixels else "latents"
    cfg = DataConfig(shards=shards, latents=not pixels, resolution=8, batch_size=4, caption_dropout=0.0,
                     hflip=True, num_workers=0, resample=False, shuffle_buffer=4)
    streamed = stream_pairs(cfg, key, passes=80)  # every (sample, caption, flip): 2 flips x up to 3 templates
    loader = make_memory_loader(dataclasses.replace(cfg, in_memory=True), tokenize=byte_tokens, log=lambda m: None)
    assert loader.n == 7 and next(iter(loader))["n_skipped"] == 1  # the corrupt sample, counted once
    assert memory_pairs(loader, key, batches=150) == streamed
    assert len(streamed) == 4 * 2 * 3 + 3 * 2  # four three-template samples, three one-caption samples


def test_auto_holds_small_sets_and_streams_large_ones(latents):
    cfg = DataConfig(shards=latents, latents=True)
    quiet = {"log": lambda m: None}
    assert make_memory_loader(cfg, **quiet).n == 15  # auto, 15 x 1 KB under the default limit
    assert make_memory_loader(dataclasses.replace(cfg, in_memory_max_mb=0.001), **quiet) is None
    assert make_memory_loader(dataclasses.replace(cfg, in_memory=True, in_memory_max_mb=0.001), **quiet).n == 15
    assert make_memory_loader(dataclasses.replace(cfg, in_memory=False), **quiet) is None


def test_training_loss_matches_the_streaming_batch(latents, tmp_path, tiny_checkpoint, monkeypatch):
    """Step 1 of a fast-path run logs the loss the streaming path's samples give with the same weights and noise."""
    first = []
    real = MemoryLoader.batch
    monkeypatch.setattr(MemoryLoader, "batch", lambda self, idx: first.append(real(self, idx)) or first[-1])
    out = tmp_path / "run"
    train_main.main(["--config", str(CONFIG), f"--data.shards={latents}", "--data.latents=true",
                    "--data.in_memory=true", "--data.batch_size=6", "--data.caption_dropout=0",
                    f"--train.init={tiny_checkpoint}", f"--train.out_dir={out}", "--train.steps=3",
                    "--train.warmup_steps=0", "--train.log_every=1", "--train.lr=1e-3"])
    rows = (out / "log.csv").read_text().splitlines()
    logged = float(rows[1].split(",")[1])
    assert all(math.isfinite(float(r.split(",")[1])) for r in rows[1:]) and len(rows) == 4

    # The streaming loader's decoding of the same samples (latent bytes -> latent, caption), tokenized by it.
    model_cfg, _, cfg = train_config.load_config(CONFIG, {"data": {"shards": latents}})
    models = load_models(tiny_checkpoint, dtype=torch.float32)
    tokenize = train_loop.Tokenizer(models.config.text)
    stream = {}
    streaming = make_loader(DataConfig(shards=latents, latents=True, batch_size=5, caption_dropout=0.0,
                                       num_workers=0, resample=False), tokenize=tokenize)
    for _ in range(40):  # each pass draws new captions: after 40, every template of every sample
        for b in streaming:
            for x, t in zip(b["latents"], b["tokens"]):
                stream.setdefault(x.numpy().tobytes(), {})[tuple(t.tolist())] = (x, t)
    rows_ = [stream[x.numpy().tobytes()][tuple(t.tolist())] for x, t in zip(first[0]["latents"], first[0]["tokens"])]
    batch = {"latents": torch.stack([r[0] for r in rows_]), "tokens": torch.stack([r[1] for r in rows_])}
    loss_module = train_losses.UNetLoss(models, Schedule.from_config(models.config.diffusion), False,
                                     cfg.loss_weighting, cfg.min_snr_gamma, cfg.timestep_bias)
    models.unet.train()
    models.text.eval()
    loss = loss_module(batch, torch.Generator().manual_seed(cfg.seed * 100003))  # the trainer's rank-0 stream
    assert loss.item() == pytest.approx(logged, rel=1e-5)


def test_no_host_sync_between_log_steps(latents, tmp_path, tiny_checkpoint, monkeypatch):
    syncs, at_step = [0], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **kw):
            syncs[0] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_advance = train_log.Logger.advance
    monkeypatch.setattr(train_log.Logger, "advance", lambda self, n=1: (at_step.append(syncs[0]),
                                                                         real_advance(self, n)))
    train_main.main(["--config", str(CONFIG), f"--data.shards={latents}", "--data.latents=true",
                    "--data.batch_size=4", f"--train.init={tiny_checkpoint}", f"--train.out_dir={tmp_path / 'r'}",
                    "--train.steps=12", "--train.warmup_steps=0", "--train.log_every=4",
                    "--train.checkpoint_every=1000", "--train.lr=1e-3"])
    per_step = [b - a for a, b in zip(at_step, at_step[1:])]  # syncs from after step k's end to step k+1's end
    log_reads = [per_step[k] for k in (3, 7)]  # steps 5 and 9 carry the log reads of steps 4 and 8
    assert all(n > 0 for n in log_reads)
    assert [n for k, n in enumerate(per_step) if k not in (3, 7)] == [0] * 9


def test_nonfinite_steps_inside_a_log_window_are_skipped_and_counted(latents, tmp_path, tiny_checkpoint,
                                                                       monkeypatch):
    """Steps 2 and 3 poisoned, read only at the log step 6: the checkpoint at step 5 already counts them, and
    neither updated weights, optimizer or EMA."""
    from latentdiff.diffusion import process as diffusion
    calls, real = [0], diffusion.training_batch

    def poisoned(*args):
        calls[0] += 1
        x_t, target = real(*args)
        return x_t, target * float("nan") if calls[0] in (2, 3) else target

    monkeypatch.setattr(diffusion, "training_batch", poisoned)
    out = tmp_path / "run"
    train_main.main(["--config", str(CONFIG), f"--data.shards={latents}", "--data.latents=true",
                    f"--train.init={tiny_checkpoint}", f"--train.out_dir={out}", "--train.steps=6",
                    "--train.warmup_steps=0", "--train.log_every=6", "--train.checkpoint_every=5", "--train.lr=1e-3"])
    state = torch.load(out / "ckpt-00000005" / "state.pt", weights_only=True)
    assert state["counters"]["nonfinite_steps"] == 2
    assert state["ema"]["updates"] == 3
    assert all(float(s["step"]) == 3 for s in state["optimizer"]["state"].values())
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[5] == "2"  # one log row at step 6: 2 non-finite steps in all
    assert math.isfinite(float(rows[1].split(",")[1]))  # the mean of the 4 finite steps


def test_ema_step_is_skipped_on_the_device_when_not_ok():
    """ema = d ema + (1 - d) p with d = min(decay, (1 + n) / (10 + n)), n counting only the ok updates."""
    m = torch.nn.Linear(3, 2)
    ema = train_losses.EMA({"m": m}, decay=0.9, warmup=True)
    start = {k: v.clone() for k, v in ema.modules["m"].state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(torch.tensor(False))
    assert ema.updates == 0 and all(torch.equal(v, start[k]) for k, v in ema.modules["m"].state_dict().items())
    for n in range(2):
        before = {k: v.clone().double() for k, v in ema.modules["m"].state_dict().items()}
        ema.update(torch.tensor(True))
        d = min(0.9, (1 + n) / (10 + n))
        for k, v in ema.modules["m"].state_dict().items():
            torch.testing.assert_close(v.double(), d * before[k] + (1 - d) * m.state_dict()[k].double())
    assert ema.updates == 2
