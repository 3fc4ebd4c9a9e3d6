"""Webdataset shards in: the streaming training loader (small sets use memory.py instead).

A shard is a plain tar of samples that share a key: `KEY.jpg` or `KEY.png` (the image), `KEY.txt` (the caption),
`KEY.json` (width, height, source; emoji add name/captions), or `KEY.latent.npy` in latent shards.
"""
from __future__ import annotations

import atexit
import glob
import io
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from latentdiff.io.images import load_image, to_tensor

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the loader decodes, in order of preference


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a training YAML."""
    shards: str = ""  # brace pattern, file, directory or glob; several joined by "::"
    resolution: int = 64
    batch_size: int = 32  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000
    hflip: bool = False
    caption_dropout: float = 0.1
    resample: bool = True  # draw shards with replacement per worker; False = each shard read once per pass
    latents: bool = False  # shards hold precomputed latents (from encode-shards) instead of images
    # Hold every decoded sample and tokenized caption on the training device and draw batches there
    # (latentdiff.data.memory): true, false, or auto = when the decoded samples take at most in_memory_max_mb
    in_memory: bool | Literal["auto"] = "auto"
    in_memory_max_mb: float = 1024.0


class DataError(ValueError):
    """A data problem the user must fix (bad shard list, too few shards, ...); the message says how."""


# ----------------------------------------------------------------------------------------------
# Shard lists


def expand_shards(spec) -> list[str]:
    """Brace patterns, files, directories (their *.tar) and globs -> a list of shard paths or URLs."""
    import braceexpand

    parts = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split("::")
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        for item in braceexpand.braceexpand(part):
            if "://" in item or item.startswith("pipe:"):
                out.append(item)  # remote: webdataset's gopen opens it, we cannot check it here
            elif os.path.isdir(item):
                out.extend(sorted(glob.glob(os.path.join(item, "*.tar"))))
            elif os.path.isfile(item):
                out.append(item)
            elif glob.has_magic(item):
                out.extend(sorted(glob.glob(item)))
            else:
                raise DataError(f"shard {item!r} (from {spec!r}) does not exist; "
                                f"check the path, or write shards with `python -m latentdiff.data make-shards`")
    if not out:
        raise DataError(f"no shards match {spec!r}; give a brace pattern like 'data/x-{{000000..000009}}.tar', "
                        f"a directory of .tar files, or a glob")
    return out


# ----------------------------------------------------------------------------------------------
# Decoding one sample


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle shard contents


def _captions(sample: dict) -> tuple[list[str], bool]:
    """Every caption a sample offers, and whether they are templates to draw from (json["captions"], emoji)."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        captions = meta.get("captions") if isinstance(meta, dict) else None
        if captions:
            return [str(c) for c in captions], True
    if "txt" in sample:
        return [sample["txt"].decode("utf-8").strip()], False
    raise KeyError("sample has no caption (.txt)")


def _caption(sample: dict, rng: random.Random) -> str:
    """One caption: a random template from json["captions"] when the shard has them (emoji), else the txt."""
    captions, templates = _captions(sample)
    return rng.choice(captions) if templates else captions[0]


def _latent(data: bytes) -> np.ndarray:
    """A latent.npy member as float32, refused here when it is not a finite (C, h, w) float array: a mis-shaped
    one would otherwise fail the whole batch's torch.stack, outside the per-sample check."""
    x = _npy(data)
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"latent of shape {x.shape} and dtype {x.dtype}; expected a (C, h, w) float array")
    if not np.isfinite(x).all():
        raise ValueError("latent holds NaN or infinite values")
    return x.astype(np.float32)


class _Fatal(Exception):
    """A data error that skipping cannot fix: it stops the run with its message."""


# ----------------------------------------------------------------------------------------------
# The loader


MAX_FAILURES_IN_A_ROW = 1000
MAX_RESOLUTION, MAX_WORKERS = 16384, 256  # beyond these a typo, not a plan: refused before memory or processes run out
SHUFFLE_START = 100


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline: pick shards, read tars, decode, shuffle, batch.

    Every worker of every rank gets its own RNG seeded from (seed, rank, worker, epoch), so shard choice, shuffle,
    flips and caption dropout differ across ranks and workers and are reproducible for a given seed.
    """

    def __init__(self, cfg: DataConfig, urls: list[str], rank: int, world_size: int, seed: int, tokenize=None,
                 latent_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.cfg, self.urls, self.rank, self.world_size, self.seed = cfg, urls, rank, world_size, seed
        self.tokenize = tokenize
        self.latent_shape = tuple(latent_shape) if latent_shape else None  # None: the first good sample's
        self.epoch = 0
        self.repeat = False  # read the (split) shard list forever, a new shuffle each pass

    def _shards(self, rng: random.Random, worker: int, num_workers: int):
        if self.cfg.resample:
            while True:  # sampling with replacement: no rank ever runs dry, so no DDP hang at epoch ends
                yield {"url": rng.choice(self.urls)}
        mine = self.urls[self.rank::self.world_size][worker::num_workers]
        while True:
            rng.shuffle(mine)
            yield from ({"url": u} for u in mine)
            if not self.repeat:
                return

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(_seed(self.seed, self.rank, worker, self.epoch))
        skipped = [0]  # since the last batch; reset by _collate
        failed_in_a_row = 0

        def failed(exc, where):
            nonlocal failed_in_a_row
            skipped[0] += 1
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILURES_IN_A_ROW:  # all-bad data would otherwise spin forever when resampling
                raise DataError(f"{failed_in_a_row} samples in a row failed to read or decode (last: "
                                f"{type(exc).__name__}: {exc}, in {where}); check the shards (and that "
                                f"data.latents matches what they hold)") from None

        opened, counted = [0], [-1]

        def shards():
            for shard in self._shards(rng, worker, num_workers):
                opened[0] += 1
                yield shard

        def on_error(exc):  # unreadable tar files or members: count once per tar read and go on
            if counted[0] != opened[0]:  # webdataset reports a truncated tar twice, at the member and at the file
                counted[0] = opened[0]
                failed(exc, "a tar file")
            return True

        samples = wds.tarfile_samples(shards(), handler=on_error)
        buffer: list[dict] = []
        batch: list[dict] = []
        bufsize, read = max(1, self.cfg.shuffle_buffer), 0
        for sample in samples:
            try:
                item = self._decode(sample, rng)
            except _Fatal as e:
                raise DataError(str(e)) from None
            except Exception as e:  # corrupt image, missing caption, bad json, ...: never fatal
                failed(e, sample.get("__url__"))
                continue
            failed_in_a_row = 0
            # Shuffle buffer, as webdataset's: start after SHUFFLE_START samples so the first batch comes quickly,
            # then grow to shuffle_buffer by letting out one sample for every two read.
            buffer.append(item)
            read += 1
            if len(buffer) < min(SHUFFLE_START, bufsize) or (len(buffer) < bufsize and read % 2):
                continue
            batch.append(buffer.pop(rng.randrange(len(buffer))))
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch, skipped)
                batch = []
        rng.shuffle(buffer)
        for item in buffer:
            batch.append(item)
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch, skipped)
                batch = []
        if batch:
            yield self._collate(batch, skipped)

    def _decode(self, sample: dict, rng: random.Random) -> dict:
        cfg = self.cfg
        caption = _caption(sample, rng)
        flip = cfg.hflip and rng.random() < 0.5
        if rng.random() < cfg.caption_dropout:
            caption = ""  # the unconditional example classifier-free guidance needs (Ho & Salimans 2022)
        if cfg.latents:
            if "latent.npy" not in sample:
                raise KeyError("sample has no latent.npy")
            if flip and "latent_flip.npy" not in sample:
                raise _Fatal("data.hflip is true but these latent shards hold no flipped latents; re-run "
                             "encode-shards with --hflip, or set data.hflip: false")
            x = _latent(sample["latent_flip.npy" if flip else "latent.npy"])
            if self.latent_shape is None:
                self.latent_shape = x.shape
            if x.shape != self.latent_shape:
                raise ValueError(f"latent of shape {x.shape}; expected {self.latent_shape}")
            return {"latents": torch.from_numpy(x), "caption": caption}
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise KeyError("sample has no image")
        img = load_image(sample[ext], cfg.resolution)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return {"pixels": to_tensor(img), "caption": caption}

    def _collate(self, items: list[dict], skipped: list[int]) -> dict:
        key = "latents" if self.cfg.latents else "pixels"
        captions = [it["caption"] for it in items]
        batch = {key: torch.stack([it[key] for it in items]), "captions": captions, "n_skipped": skipped[0]}
        skipped[0] = 0
        if self.tokenize is not None:
            batch["tokens"] = torch.as_tensor(self.tokenize(captions), dtype=torch.int64)
        return batch


def ignore_stop_signals(worker_id: int):
    """Loader workers leave SIGTERM/SIGINT to the main process, which saves a checkpoint and then ends them."""
    # A signal to the whole process group (timeout -s TERM, scancel, a container stop) reaches the workers too,
    # and torch's worker handler dies on SIGTERM, which would end the run without its checkpoint. The cost: a
    # worker outlives multiprocessing's terminate(), so every Loader ends its own workers (close, and at exit).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_open_loaders: "weakref.WeakSet[Loader]" = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so it runs first
def _close_open_loaders():
    # multiprocessing's exit hook terminates daemon children with SIGTERM and joins them; our workers ignore
    # SIGTERM, so a loader still open at exit (a test that stopped reading, an exception) would hang the exit.
    for loader in list(_open_loaders):
        loader.close()


class Loader:
    """Iterable of batches. Without epoch_length one `for` loop is one pass (endless when resampling); with it,
    each `for` loop yields exactly epoch_length batches from one endless stream, so every rank steps equally."""

    def __init__(self, dataset: ShardStream, num_workers: int, epoch_length: int | None):
        self.dataset, self.num_workers, self.epoch_length = dataset, num_workers, epoch_length
        self._stream = None  # with epoch_length: the one endless pass that every `for` loop continues
        self._running: list = []  # the passes whose workers are up
        _open_loaders.add(self)

    def _dataloader(self):
        # Workers fork from a forkserver (a fresh single-threaded process) rather than from the trainer: a fork
        # taken while another thread of the trainer (a progress bar's monitor, a server's thread) holds a lock
        # leaves the child waiting on it for ever; a test run hung that way once.
        context = "forkserver" if self.num_workers and "forkserver" in mp.get_all_start_methods() else None
        return torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                           prefetch_factor=4 if self.num_workers else None,
                                           pin_memory=torch.cuda.is_available(), multiprocessing_context=context,
                                           worker_init_fn=ignore_stop_signals if self.num_workers else None)

    def __len__(self):
        if self.epoch_length is None:
            raise TypeError("this loader has no length; pass epoch_length to make_loader")
        return self.epoch_length

    def __iter__(self):
        if self.epoch_length is None:
            batches = self._start()
            try:
                yield from batches
            finally:
                self.dataset.epoch += 1  # workers start from a copy of the dataset, so the next pass reshuffles
                self._stop(batches)
            return
        if self._stream is None:
            self.dataset.repeat = True
            self._stream = self._start()
        for _ in range(self.epoch_length):
            yield next(self._stream)

    def _start(self):
        batches = iter(self._dataloader())
        self._running.append(batches)
        return batches

    def _stop(self, batches):
        if batches not in self._running:
            return
        self._running.remove(batches)
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ runs; None without workers
        if shutdown is not None:
            shutdown()  # asks each worker to stop, joins it for a few seconds, then terminates it, which it ignores
        for worker in getattr(batches, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join()

    def close(self):
        """End the workers now rather than when the garbage collector finds the iterator. Iterating again starts
        new ones."""
        for batches in list(self._running):
            self._stop(batches)
        self._stream = None


def make_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, tokenize=None,
                epoch_length: int | None = None, latent_shape: tuple[int, ...] | None = None) -> Loader:
    """Batches {"pixels" | "latents", "captions", "tokens" (with tokenize), "n_skipped"} for one rank; latent
    samples not of latent_shape (C, h, w; default: the first sample's) are skipped and counted."""
    urls = check_data(cfg, world_size)
    return Loader(ShardStream(cfg, urls, rank, world_size, seed, tokenize, latent_shape), cfg.num_workers,
                  epoch_length)


def check_data(cfg: DataConfig, world_size: int = 1) -> list[str]:
    """The shard list of a DataConfig, or a DataError saying what to fix."""
    if not cfg.shards:
        raise DataError("data.shards is empty; set it to your shards, e.g. data.shards: 'data/x-{000000..000009}.tar'")
    if cfg.batch_size < 1 or cfg.resolution < 1 or cfg.num_workers < 0:
        raise DataError("data.batch_size and data.resolution must be >= 1 and data.num_workers >= 0")
    if cfg.resolution > MAX_RESOLUTION or cfg.num_workers > MAX_WORKERS:
        raise DataError(f"data.resolution is at most {MAX_RESOLUTION} and data.num_workers at most {MAX_WORKERS} "
                        f"(got {cfg.resolution} and {cfg.num_workers})")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        raise DataError(f"data.caption_dropout must be in [0, 1], got {cfg.caption_dropout}")
    urls = expand_shards(cfg.shards)
    readers = world_size * max(1, cfg.num_workers)
    if not cfg.resample and len(urls) < readers:
        # Some reader would get no shard: its rank finishes early and DDP waits for it forever.
        raise DataError(f"{len(urls)} shard(s) for {world_size} rank(s) x {max(1, cfg.num_workers)} worker(s) = "
                        f"{readers} readers: with data.resample: false each reader needs its own shard, or training "
                        f"hangs. Set data.resample: true, write at least {readers} shards (make-shards --per-shard), "
                        f"or lower data.num_workers")
    return urls


# ----------------------------------------------------------------------------------------------
# Decoding one sample without the per-draw choices (for loaders that make those choices themselves)


def sample_contents(sample: dict, cfg: DataConfig) -> dict:
    """{"captions": every caption the loader may draw, "x": latent or image tensor, "x_flip": the flipped latent
    when cfg.hflip and latent shards (None otherwise: an image is flipped as a tensor)}."""
    captions, _ = _captions(sample)
    if cfg.latents:
        if "latent.npy" not in sample:
            raise KeyError("sample has no latent.npy")
        if cfg.hflip and "latent_flip.npy" not in sample:
            raise DataError("data.hflip is true but these latent shards hold no flipped latents; re-run "
                            "encode-shards with --hflip, or set data.hflip: false")
        flip = torch.from_numpy(_latent(sample["latent_flip.npy"])) if cfg.hflip else None
        return {"captions": captions, "x": torch.from_numpy(_latent(sample["latent.npy"])), "x_flip": flip}
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise KeyError("sample has no image")
    return {"captions": captions, "x": to_tensor(load_image(sample[ext], cfg.resolution)), "x_flip": None}
