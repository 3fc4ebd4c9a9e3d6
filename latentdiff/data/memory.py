"""Small data sets held on the training device: read the shards once, draw every batch there with torch ops.

Used by the trainer when data.in_memory is true, or auto and the decoded samples fit in data.in_memory_max_mb
(the 1,377 emoji latents take 11 MB). Per draw it makes the same choices as the streaming loader: one of the
sample's captions at random, caption dropout to the empty prompt, a horizontal flip with data.hflip (the
flipped latent from latent shards, the mirrored image from image shards). Each epoch is a permutation of the
whole set, the same on every rank, wrapped around to a multiple of the world size W (as DistributedSampler pads),
of which rank r takes positions r, r + W, ...; batches run on across epoch ends, so every batch has
data.batch_size samples, every rank takes ceil(N / W) per epoch and each epoch covers the set exactly once, but
for the ceil(N / W) * W - N padding samples seen twice (so data.resample, data.shuffle_buffer and data.num_workers
do not apply). Every rank holds the whole set.
"""
from __future__ import annotations

import os

import torch

from latentdiff.data.loader import DataConfig, DataError, _seed, expand_shards, sample_contents


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _decoded_mb(item: dict) -> float:
    tensors = [item["x"]] + ([item["x_flip"]] if item["x_flip"] is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def read_samples(cfg: DataConfig, urls: list[str], max_mb: float | None = None,
                 latent_shape: tuple[int, ...] | None = None) -> tuple[list[dict], int] | None:
    """Every sample of the shards, decoded ({"key", "captions", "x", "x_flip"}), and how many failed to read or
    had another shape (latent_shape for latents, when given; else the first sample's); None as soon as the decoded
    samples pass max_mb."""
    import webdataset as wds

    failures = [0]

    def on_error(exc):  # an unreadable tar member: skipped and counted, as the streaming loader does
        failures[0] += 1
        return True

    items, total = [], 0.0
    for sample in wds.tarfile_samples(iter([{"url": u} for u in urls]), handler=on_error):
        try:
            item = sample_contents(sample, cfg)
        except DataError:
            raise
        except Exception:  # corrupt image, missing caption, bad json: skipped and counted
            failures[0] += 1
            continue
        want = latent_shape if cfg.latents and latent_shape else (items[0]["x"].shape if items else None)
        if want is not None and tuple(item["x"].shape) != tuple(want):  # skipped and counted, as when streaming
            failures[0] += 1
            continue
        item["key"] = sample["__key__"]
        total += _decoded_mb(item)
        if max_mb is not None and total > max_mb:
            return None
        items.append(item)
    return items, failures[0]


class MemoryLoader:
    """Endless batches {"latents" | "pixels", "tokens" (with tokenize), "n_skipped"} drawn on `device`."""

    def __init__(self, cfg: DataConfig, items: list[dict], n_skipped: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, tokenize=None, device="cpu"):
        if len(items) < world_size:
            raise DataError(f"{len(items)} sample(s) for {world_size} ranks: every rank needs at least one; "
                            f"write more samples or set data.in_memory: false")
        shapes = {tuple(it["x"].shape) for it in items}
        if len(shapes) != 1:
            raise DataError(f"the samples have different shapes {sorted(shapes)[:3]}; data.in_memory needs one shape "
                            f"(encode all shards at one resolution), or set data.in_memory: false")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.device = torch.device(device)
        self.key = "latents" if cfg.latents else "pixels"
        self.n = len(items)
        self.keys = [it["key"] for it in items]
        self.captions = [it["captions"] for it in items]
        self.x = torch.stack([it["x"] for it in items]).to(self.device)  # (N, C, H, W)
        self.x_flip = torch.stack([it["x_flip"] for it in items]).to(self.device) \
            if cfg.latents and cfg.hflip else None
        self.tokens = None
        if tokenize is not None:
            # All captions in one table; sample i owns rows start[i] .. start[i] + count[i] - 1.
            flat = [c for caps in self.captions for c in caps]
            counts = torch.tensor([len(caps) for caps in self.captions], dtype=torch.int64)
            self.tokens = torch.as_tensor(tokenize(flat), dtype=torch.int64).to(self.device)  # (sum counts, L)
            self.empty = torch.as_tensor(tokenize([""]), dtype=torch.int64).to(self.device)  # (1, L)
            self.count = counts.to(self.device)
            self.start = (torch.cumsum(counts, 0) - counts).to(self.device)
        self.n_skipped = n_skipped
        self.gen = torch.Generator(self.device).manual_seed(_seed(seed, rank, 1))  # per-rank draws
        self.epoch, self.pos, self.order = -1, 0, torch.empty(0, dtype=torch.int64, device=self.device)

    def _next_epoch(self):
        self.epoch += 1
        # The same permutation on every rank (seeded by seed and epoch only), so the rank slices are disjoint.
        perm_gen = torch.Generator(self.device).manual_seed(_seed(self.seed, self.epoch, 2))
        perm = torch.randperm(self.n, generator=perm_gen, device=self.device)
        # Wrapped around to a multiple of the world size, as torch's DistributedSampler pads: every rank takes
        # ceil(N / W) samples per epoch, so the ranks go through the epochs together (unequal slices would drift
        # apart, and their epochs' permutations with them, across epoch ends).
        pad = -self.n % self.world_size
        perm = torch.cat([perm, perm[:pad]]) if pad else perm
        self.order, self.pos = perm[self.rank::self.world_size], 0

    def indices(self, batch_size: int) -> torch.Tensor:
        """(batch_size,) sample indices, the next ones of this rank's epoch stream (lengths known on the host)."""
        parts, need = [], batch_size
        while need:
            if self.pos == len(self.order):
                self._next_epoch()
            take = min(need, len(self.order) - self.pos)
            parts.append(self.order[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batch(self, idx: torch.Tensor) -> dict:
        """The batch of the samples idx, with this loader's random caption, dropout and flip per row."""
        cfg, B, g = self.cfg, len(idx), self.gen
        x = self.x.index_select(0, idx)
        if cfg.hflip:
            flip = torch.rand(B, generator=g, device=self.device) < 0.5
            other = self.x_flip.index_select(0, idx) if self.x_flip is not None else x.flip(-1)
            x = torch.where(flip.view(B, 1, 1, 1), other, x)
        out = {self.key: x}
        if self.tokens is not None:
            count = self.count.index_select(0, idx)
            pick = (torch.rand(B, generator=g, device=self.device) * count).long()
            row = self.start.index_select(0, idx) + torch.minimum(pick, count - 1)
            tokens = self.tokens.index_select(0, row)
            drop = torch.rand(B, generator=g, device=self.device) < cfg.caption_dropout
            out["tokens"] = torch.where(drop.view(B, 1), self.empty, tokens)  # the unconditional example for CFG
        return out

    def __iter__(self):
        while True:
            batch = self.batch(self.indices(self.cfg.batch_size))
            batch["n_skipped"], self.n_skipped = self.n_skipped, 0  # counted once, with the first batch
            yield batch


def make_memory_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, tokenize=None,
                       device="cpu", log=print, latent_shape: tuple[int, ...] | None = None) -> MemoryLoader | None:
    """A MemoryLoader when data.in_memory says so (auto: local shards whose decoded samples fit
    data.in_memory_max_mb); None means: use the streaming loader."""
    if cfg.in_memory is False:
        return None
    if not cfg.shards:
        raise DataError("data.shards is empty; set it to your shards, e.g. data.shards: 'data/x-{000000..000009}.tar'")
    if cfg.batch_size < 1:
        raise DataError("data.batch_size must be >= 1")
    if not 0.0 <= cfg.caption_dropout <= 1.0:
        raise DataError(f"data.caption_dropout must be in [0, 1], got {cfg.caption_dropout}")
    urls = expand_shards(cfg.shards)
    limit = None
    if cfg.in_memory == "auto":
        if not all(_is_local(u) for u in urls):
            return None
        limit = cfg.in_memory_max_mb
        # Decoded samples take at least their bytes in the tar (float32 latents as much, images more): a set too
        # large on disk is not read twice.
        if sum(os.path.getsize(u) for u in urls) / 2**20 > limit:
            log(f"data: the shards take more than data.in_memory_max_mb={limit:g} MB; streaming them")
            return None
    found = read_samples(cfg, urls, limit, latent_shape)
    if found is None:
        log(f"data: the decoded samples take more than data.in_memory_max_mb={limit:g} MB; streaming them")
        return None
    items, failed = found
    if not items:
        raise DataError(f"no readable sample in {len(urls)} shard(s) ({failed} failed); check the shards "
                        f"(and that data.latents matches what they hold)")
    loader = MemoryLoader(cfg, items, failed, rank=rank, world_size=world_size, seed=seed, tokenize=tokenize,
                          device=device)
    held = [t for t in (loader.x, loader.x_flip, loader.tokens) if t is not None]
    mb = sum(t.numel() * t.element_size() for t in held) / 2**20
    log(f"data: {loader.n} samples ({sum(len(c) for c in loader.captions)} captions) held in memory on "
        f"{loader.device.type}, {mb:.1f} MB" + (f"; {failed} unreadable sample(s) skipped" if failed else ""))
    return loader
