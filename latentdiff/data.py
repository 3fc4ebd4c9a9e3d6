"""Webdataset shards in and out: the training loader, and the tools that write shards.

    python -m latentdiff.data make-shards SRC --out DIR         images + captions -> tar shards
    python -m latentdiff.data encode-shards 'DIR/x-{000000..000009}.tar' --out LATDIR --checkpoint CKPT
    python -m latentdiff.data emoji --out DIR                   the Noto Color Emoji set (the bundled model's data)

A shard is a plain tar of samples that share a key: `KEY.jpg` or `KEY.png` (the image), `KEY.txt` (the caption),
`KEY.json` (width, height, source; emoji add name/captions), or `KEY.latent.npy` in latent shards.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import random
import re
import sys
import tarfile
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .files import atomic_write

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what the loader decodes, in order of preference
SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what make-shards accepts


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
    # (latentdiff.memory_loader): true, false, or auto = when the decoded samples take at most in_memory_max_mb
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


def load_image(data: bytes, resolution: int) -> Image.Image:
    """Decode, flatten transparency onto white, resize the short side to `resolution` and center-crop."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale in the DCT domain when that still covers `resolution`
        img.draft("RGB", (resolution, resolution))
    img.load()  # a truncated file fails here rather than later
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB image -> float (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1.0


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle shard contents


def _caption(sample: dict, rng: random.Random) -> str:
    """One caption: a random template from json["captions"] when the shard has them (emoji), else the txt."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        captions = meta.get("captions") if isinstance(meta, dict) else None
        if captions:
            return str(rng.choice(captions))
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    raise KeyError("sample has no caption (.txt)")


class _Fatal(Exception):
    """A data error that skipping cannot fix: it stops the run with its message."""


# ----------------------------------------------------------------------------------------------
# The loader


MAX_FAILURES_IN_A_ROW = 1000
SHUFFLE_START = 100


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline: pick shards, read tars, decode, shuffle, batch.

    Every worker of every rank gets its own RNG seeded from (seed, rank, worker, epoch), so shard choice, shuffle,
    flips and caption dropout differ across ranks and workers and are reproducible for a given seed.
    """

    def __init__(self, cfg: DataConfig, urls: list[str], rank: int, world_size: int, seed: int, tokenize=None):
        super().__init__()
        self.cfg, self.urls, self.rank, self.world_size, self.seed = cfg, urls, rank, world_size, seed
        self.tokenize = tokenize
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

        def on_error(exc):  # unreadable tar files or members: count and go on
            failed(exc, "a tar file")
            return True

        samples = wds.tarfile_samples(self._shards(rng, worker, num_workers), handler=on_error)
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
            x = torch.from_numpy(_npy(sample["latent_flip.npy" if flip else "latent.npy"]).astype(np.float32))
            return {"latents": x, "caption": caption}
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


class Loader:
    """Iterable of batches. Without epoch_length one `for` loop is one pass (endless when resampling); with it,
    each `for` loop yields exactly epoch_length batches from one endless stream, so every rank steps equally."""

    def __init__(self, dataset: ShardStream, num_workers: int, epoch_length: int | None):
        self.dataset, self.num_workers, self.epoch_length = dataset, num_workers, epoch_length
        self._stream = None

    def _dataloader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                           prefetch_factor=4 if self.num_workers else None,
                                           pin_memory=torch.cuda.is_available())

    def __len__(self):
        if self.epoch_length is None:
            raise TypeError("this loader has no length; pass epoch_length to make_loader")
        return self.epoch_length

    def __iter__(self):
        if self.epoch_length is None:
            try:
                yield from self._dataloader()
            finally:
                self.dataset.epoch += 1  # workers start from a copy of the dataset, so the next pass reshuffles
            return
        if self._stream is None:
            self.dataset.repeat = True
            self._stream = iter(self._dataloader())
        for _ in range(self.epoch_length):
            yield next(self._stream)


def make_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, tokenize=None,
                epoch_length: int | None = None) -> Loader:
    """Batches {"pixels" | "latents", "captions", "tokens" (with tokenize), "n_skipped"} for one rank."""
    if not cfg.shards:
        raise DataError("data.shards is empty; set it to your shards, e.g. data.shards: 'data/x-{000000..000009}.tar'")
    if cfg.batch_size < 1 or cfg.resolution < 1 or cfg.num_workers < 0:
        raise DataError("data.batch_size and data.resolution must be >= 1 and data.num_workers >= 0")
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
    return Loader(ShardStream(cfg, urls, rank, world_size, seed, tokenize), cfg.num_workers, epoch_length)


# ----------------------------------------------------------------------------------------------
# Writing shards


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: same input, same shard bytes
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]):
    """Write [(key, {ext: bytes})] as one tar, atomically: a temp file in the same folder, then os.replace."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, files in samples:
                for ext, data in files.items():
                    _tar_bytes(tar, f"{key}.{ext}", data)


class ShardWriter:
    """Collect samples and write DIR/PREFIX-000000.tar, -000001.tar, ... of `per_shard` samples each."""

    def __init__(self, out_dir, prefix: str = "data", per_shard: int = 1000, overwrite: bool = False):
        if per_shard < 1:
            raise DataError(f"--per-shard must be >= 1, got {per_shard}")
        self.out, self.prefix, self.per_shard = Path(out_dir), prefix, per_shard
        self.out.mkdir(parents=True, exist_ok=True)
        self.old = sorted(self.out.glob(f"{prefix}-[0-9]*.tar"))
        if self.old and not overwrite:
            raise DataError(f"{self.out} already holds {len(self.old)} shard(s) named {prefix}-*.tar; pass "
                            f"--overwrite to replace them, or choose another --out or --prefix")
        self.pending: list[tuple[str, dict[str, bytes]]] = []
        self.paths: list[Path] = []
        self.count = 0

    def write(self, key: str, files: dict[str, bytes]) -> str:
        """Queue one sample; returns the name of the shard it goes into."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/' (webdataset splits keys at the dot)")
        self.pending.append((key, files))
        self.count += 1
        name = f"{self.prefix}-{len(self.paths):06d}.tar"
        if len(self.pending) == self.per_shard:
            self._flush()
        return name

    def _flush(self):
        if self.pending:
            path = self.out / f"{self.prefix}-{len(self.paths):06d}.tar"
            write_tar(path, self.pending)
            self.paths.append(path)
            self.pending = []

    def close(self) -> list[Path]:
        self._flush()
        for stale in set(self.old) - set(self.paths):  # left over from a larger earlier run
            stale.unlink()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


def _image_record(path: Path, source: str) -> dict[str, bytes]:
    """Check one image decodes fully; keep JPEG/PNG bytes as they are, re-encode other formats as PNG."""
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
    meta = {"width": img.width, "height": img.height, "source": source}
    if fmt == "JPEG":
        ext = "jpg"
    elif fmt == "PNG":
        ext = "png"
    else:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    return {ext: data, "json": json.dumps(meta).encode()}


def _read_caption_list(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, image path, caption or None when the line is unreadable) from a CSV or JSONL file."""
    rows: list[tuple[int, str, str | None]] = []
    if not path.is_file():
        raise DataError(f"captions file {path} not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
                raise DataError(f"{path} needs a header row with columns 'path' and 'caption' "
                                f"(found {reader.fieldnames})")
            for row in reader:
                rows.append((reader.line_num, row["path"] or "", row["caption"]))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((n, str(obj["path"]), str(obj["caption"])))
            except (ValueError, KeyError, TypeError):
                rows.append((n, "", None))
    else:
        raise DataError(f"captions file {path} must be .csv (columns path,caption) or .jsonl "
                        f'({{"path": ..., "caption": ...}} per line)')
    return rows


def make_shards(src, out, per_shard: int = 1000, captions=None, prefix: str = "data", overwrite: bool = False,
                progress: bool = True) -> dict:
    """Images with captions -> shards. Returns {"written", "shards", "skipped": {reason: n}, "examples"}."""
    from tqdm import tqdm

    src = Path(src)
    if captions is None and src.is_file():
        captions, src = src, src.parent  # SRC is itself the CSV/JSONL: paths are relative to its folder
    if not src.is_dir():
        raise DataError(f"source {src} is not a folder of images (or a .csv/.jsonl captions file)")
    if captions is not None:
        items = [(n, src / p if p else None, c) for n, p, c in _read_caption_list(Path(captions))]
    else:
        images = sorted(p for p in src.rglob("*") if p.suffix.lower() in SOURCE_EXTS and p.is_file())
        items = [(n, p, p.with_suffix(".txt")) for n, p in enumerate(images)]  # captions are read as we go
    if not items:
        raise DataError(f"no images found in {src} (looked for {', '.join(sorted(SOURCE_EXTS))})")

    skipped: Counter = Counter()
    examples: dict[str, str] = {}

    def skip(reason, what):
        skipped[reason] += 1
        examples.setdefault(reason, str(what))

    with ShardWriter(out, prefix, per_shard, overwrite) as writer:
        for n, path, caption in tqdm(items, desc="make-shards", unit="img", disable=not progress):
            if path is None:
                skip("unreadable line in the captions file", f"{captions}:{n}")
                continue
            if isinstance(caption, Path):
                try:
                    caption = caption.read_text(encoding="utf-8") if caption.exists() else None
                except (OSError, UnicodeDecodeError) as e:
                    skip(f"unreadable caption file ({type(e).__name__})", path)
                    continue
            if caption is None:
                skip("no caption", path)
                continue
            if not caption.strip():
                skip("empty caption", path)
                continue
            if not path.is_file():
                skip("image file missing", path)
                continue
            try:
                record = _image_record(path, os.path.relpath(path, src))
            except Exception as e:
                skip(f"undecodable image ({type(e).__name__})", path)
                continue
            writer.write(f"{writer.count:09d}", {**record, "txt": caption.strip().encode("utf-8")})
        written = writer.count
    return {"written": written, "shards": [str(p) for p in writer.paths], "skipped": dict(skipped),
            "examples": examples}


def _print_summary(what: str, summary: dict, t0: float):
    shards = summary["shards"]
    where = os.path.dirname(shards[0]) if shards else "-"
    print(f"{what}: wrote {summary['written']} samples in {len(shards)} shard(s) to {where} "
          f"in {time.time() - t0:.1f} s")
    skipped = summary["skipped"]
    if skipped:
        print(f"skipped {sum(skipped.values())}:")
        for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
            example = summary.get("examples", {}).get(reason)
            print(f"  {n:6d}  {reason}" + (f"  (e.g. {example})" if example else ""))
    else:
        print("skipped 0")


# ----------------------------------------------------------------------------------------------
# encode-shards: image shards -> latent shards


def encode_shards(src, out, checkpoint, resolution: int | None = None, batch_size: int = 32, device: str = "cpu",
                  hflip: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Encode every image once with the VAE (posterior mode, scaled) and write one latent shard per input shard.

    The mode (the posterior mean) is deterministic, so the latents are a fixed function of the image; the
    sampling noise of the KL posterior is small next to the diffusion noise added during training.
    """
    import webdataset as wds
    from tqdm import tqdm

    from .checkpoint import CheckpointError, load_models

    urls = expand_shards(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / os.path.basename(u) for u in urls]
    if len(set(targets)) != len(targets):
        raise DataError("input shards have repeated file names; encode each folder into its own --out")
    clash = [str(t) for t, u in zip(targets, urls) if os.path.exists(u) and t.exists() and t.samefile(u)]
    if clash:
        raise DataError(f"--out would overwrite the input shard {clash[0]}; choose another --out folder")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists ({len(existing)} output shard(s) do); pass --overwrite or another --out")

    try:
        models = load_models(str(checkpoint), torch.device(device), torch.float32)
    except (CheckpointError, FileNotFoundError) as e:
        raise DataError(f"cannot load --checkpoint {checkpoint}: {e}") from None
    vae = models.vae.eval()
    resolution = resolution or models.config.image_size
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    written = 0

    def on_error(exc):
        skipped[f"unreadable tar member ({type(exc).__name__})"] += 1
        return True

    @torch.no_grad()
    def encode(pixels):
        return vae.encode(pixels.to(device)).float().cpu().numpy()

    def encode_batch(images, records, done):
        pixels = torch.stack([to_tensor(img) for img in images])
        lat = encode(pixels)
        lat_flip = encode(pixels.flip(-1)) if hflip else None
        for i, (key, caption, meta) in enumerate(records):
            files = {"txt": caption, "latent.npy": _npy_bytes(lat[i])}
            if lat_flip is not None:
                files["latent_flip.npy"] = _npy_bytes(lat_flip[i])
            meta["latent"] = {"shape": list(lat[i].shape), "resolution": resolution, "posterior": "mode",
                              "scale_factor": models.config.vae.scale_factor, "checkpoint": Path(checkpoint).name}
            files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            done.append((key, files))

    for url, target in tqdm(list(zip(urls, targets)), desc="encode-shards", unit="shard", disable=not progress):
        done: list[tuple[str, dict[str, bytes]]] = []
        images, records = [], []
        for sample in wds.tarfile_samples([{"url": url}], handler=on_error):
            key = os.path.basename(sample["__key__"])
            try:
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    raise KeyError("no image")
                img = load_image(sample[ext], resolution)
                meta = json.loads(sample["json"]) if "json" in sample else {}
                caption = sample["txt"]
            except Exception as e:
                reason = f"undecodable sample ({type(e).__name__})"
                skipped[reason] += 1
                examples.setdefault(reason, f"{url}:{key}")
                continue
            images.append(img)
            records.append((key, caption, meta))
            if len(images) == batch_size:
                encode_batch(images, records, done)
                images, records = [], []
        if images:
            encode_batch(images, records, done)
        write_tar(target, done)
        written += len(done)
    return {"written": written, "shards": [str(t) for t in targets], "skipped": dict(skipped), "examples": examples}


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# emoji: the Noto Color Emoji set


EMOJI_FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf",
                    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
                    "/usr/local/share/fonts/NotoColorEmoji.ttf", "/Library/Fonts/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109  # the one strike size of the CBDT bitmaps in Noto Color Emoji
# Blocks that hold the single-code-point emoji (Unicode emoji-data.txt; everything else there is text).
EMOJI_RANGES = ((0xA9, 0xA9), (0xAE, 0xAE), (0x2000, 0x2BFF), (0x3000, 0x33FF), (0x1F000, 0x1FAFF))
# Emoji components: they render, but are parts of sequences rather than pictures of a thing.
EMOJI_COMPONENTS = (set(range(0x1F1E6, 0x1F200)) | set(range(0x1F3FB, 0x1F400)) | set(range(0x1F9B0, 0x1F9B4))
                    | {0x20E3, 0x200D, 0xFE0F}
                    | set(range(0xE0020, 0xE0080)))
EMOJI_CREDIT = "Noto Color Emoji, © Google, SIL Open Font License 1.1"


def find_emoji_font(path=None) -> str:
    if path:
        if not os.path.isfile(path):
            raise DataError(f"font {path} not found; install it with `apt-get install fonts-noto-color-emoji`")
        return str(path)
    for p in EMOJI_FONT_PATHS:
        if os.path.isfile(p):
            return p
    raise DataError("Noto Color Emoji font not found; install it with `apt-get install fonts-noto-color-emoji` "
                    "or pass --font PATH")


def load_emoji_font(path):
    from PIL import ImageFont
    try:
        return ImageFont.truetype(str(path), EMOJI_FONT_SIZE)
    except OSError as e:
        raise DataError(f"cannot load {path} at size {EMOJI_FONT_SIZE} ({e}); pass a color emoji font") from None


def render_emoji(font, text: str, resolution: int) -> Image.Image | None:
    """Glyph on white, cropped to its visible pixels, padded to a centred square, LANCZOS-resized; None if blank."""
    from PIL import ImageDraw

    try:
        left, top, right, bottom = font.getbbox(text)
    except RuntimeError:  # the layout engine refuses some code points (line separators, ...)
        return None
    pad = 32  # colour bitmaps may overhang the reported box
    canvas = Image.new("RGBA", (right - min(left, 0) + 2 * pad, bottom - min(top, 0) + 2 * pad), (0, 0, 0, 0))
    try:
        ImageDraw.Draw(canvas).text((pad - min(left, 0), pad - min(top, 0)), text, font=font, embedded_color=True)
    except RuntimeError:
        return None
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    square = square.resize((resolution, resolution), Image.LANCZOS)  # Pillow premultiplies alpha for RGBA
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, square).convert("RGB")


def emoji_captions(name: str, aliases=()) -> list[str]:
    """'cat' -> ['a cat', 'an emoji of a cat', 'cat', *aliases]."""
    article = "an" if name[:1] in "aeiou" else "a"
    return [f"{article} {name}", f"an emoji of {article} {name}", name, *[a for a in aliases if a != name]]


def _emoji_package():
    try:
        import emoji  # optional: CLDR names for emoji newer than this Python's unicodedata, and aliases
        return emoji.EMOJI_DATA
    except ImportError:
        return None


def _short_name(code: str) -> str:
    """':thumbs_up:' -> 'thumbs up'."""
    return code.strip(":").replace("_", " ").lower()


def _emoji_entries(font, sequences: bool):
    """(text, name, aliases) for every emoji the font draws, and a Counter of what was skipped and why."""
    pkg = _emoji_package()
    skipped: Counter = Counter()
    entries = []

    def pkg_entry(text):
        return pkg and (pkg.get(text) or pkg.get(text + "\ufe0f"))

    for lo, hi in EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            try:
                drawn = font.getmask(ch).getbbox() is not None
            except RuntimeError:
                drawn = False
            if not drawn:
                if pkg_entry(ch):
                    skipped["blank (an emoji this font version does not draw)"] += 1
                continue  # not in the font: not an emoji candidate
            if cp in EMOJI_COMPONENTS:
                skipped["emoji component (skin tone, hair style, regional indicator, keycap part)"] += 1
                continue
            name = unicodedata.name(ch, "").lower()
            entry = pkg_entry(ch)
            if not name and entry:
                name = _short_name(entry["en"])
            if not name:
                version = unicodedata.unidata_version
                skipped[f"no Unicode name (newer than unicodedata {version}; pip install emoji)"] += 1
                continue
            entries.append((ch, name, entry))
    if sequences:
        if pkg is None:
            raise DataError("--sequences needs names for emoji sequences: pip install emoji")
        glyph_width = font.getbbox("\U0001F408")[2]
        for text, entry in sorted(pkg.items()):
            base = text.replace("\ufe0f", "")
            if len(base) < 2 or entry.get("status", 2) != 2:  # fully-qualified sequences only
                continue
            try:
                width = font.getbbox(text)[2]
            except RuntimeError:
                width = 0
            if not 0 < width <= 1.5 * glyph_width:  # the font has no ligature: it would draw the parts side by side
                skipped["sequence the font does not join into one glyph"] += 1
                continue
            entries.append((text, _short_name(entry["en"]), entry))

    # Aliases: readable words only, and never one that names another emoji (it would blur the captions).
    names = Counter(name for _, name, _ in entries)
    alias_lists = []
    for _, name, entry in entries:
        cand = [entry["en"], *entry.get("alias", [])] if entry else []
        alias_lists.append(sorted({_short_name(a) for a in cand} - {name}))
    uses = Counter(a for al in alias_lists for a in al)
    out = []
    for (text, name, _), al in zip(entries, alias_lists):
        al = [a for a in al if re.fullmatch(r"[a-z][a-z ']*", a) and names[a] == 0 and uses[a] == 1]
        out.append((text, name, al))
    return out, skipped


def _emoji_key(text: str) -> str:
    return "u" + "_".join(f"{ord(c):x}" for c in text if c != "\ufe0f")


def make_emoji_shards(out, resolution: int = 64, per_shard: int = 100, font_path=None, sequences: bool = False,
                      overwrite: bool = False, progress: bool = True) -> dict:
    """Render the emoji set to shards plus index.jsonl (codepoint, name, shard, key per emoji)."""
    from PIL import features
    from tqdm import tqdm

    path = find_emoji_font(font_path)
    if sequences and not features.check("raqm"):
        raise DataError("--sequences needs Pillow built with libraqm (skin tones and ZWJ sequences are ligatures)")
    font = load_emoji_font(path)
    entries, skipped = _emoji_entries(font, sequences)
    index = []
    with ShardWriter(out, "emoji", per_shard, overwrite) as writer:
        for text, name, aliases in tqdm(entries, desc="emoji", unit="img", disable=not progress):
            img = render_emoji(font, text, resolution)
            if img is None:
                skipped["blank render"] += 1
                continue
            buf = io.BytesIO()
            img.save(buf, format="PNG", optimize=True)
            codepoint = " ".join(f"U+{ord(c):04X}" for c in text if c != "\ufe0f")
            meta = {"width": resolution, "height": resolution, "source": f"{os.path.basename(path)} {codepoint}",
                    "codepoint": codepoint, "name": name, "captions": emoji_captions(name, aliases),
                    "aliases": aliases}
            key = _emoji_key(text)
            shard = writer.write(key, {"png": buf.getvalue(), "txt": name.encode("utf-8"),
                                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            index.append({"codepoint": codepoint, "char": text, "name": name, "shard": shard, "key": key})
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index)
    with atomic_write(Path(out) / "index.jsonl") as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return {"written": writer.count, "shards": [str(p) for p in writer.paths], "skipped": dict(skipped),
            "font": path, "aliases": _emoji_package() is not None}


# ----------------------------------------------------------------------------------------------
# Decoding one sample without the per-draw choices (for loaders that make those choices themselves)


def sample_contents(sample: dict, cfg: DataConfig) -> dict:
    """{"captions": every caption the loader may draw, "x": latent or image tensor, "x_flip": the flipped latent
    when cfg.hflip and latent shards (None otherwise: an image is flipped as a tensor)}."""
    meta = json.loads(sample["json"]) if "json" in sample else None
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if captions:
        captions = [str(c) for c in captions]
    elif "txt" in sample:
        captions = [sample["txt"].decode("utf-8").strip()]
    else:
        raise KeyError("sample has no caption (.txt)")
    if cfg.latents:
        if "latent.npy" not in sample:
            raise KeyError("sample has no latent.npy")
        if cfg.hflip and "latent_flip.npy" not in sample:
            raise DataError("data.hflip is true but these latent shards hold no flipped latents; re-run "
                            "encode-shards with --hflip, or set data.hflip: false")
        flip = torch.from_numpy(_npy(sample["latent_flip.npy"]).astype(np.float32)) if cfg.hflip else None
        return {"captions": captions, "x": torch.from_numpy(_npy(sample["latent.npy"]).astype(np.float32)),
                "x_flip": flip}
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise KeyError("sample has no image")
    return {"captions": captions, "x": to_tensor(load_image(sample[ext], cfg.resolution)), "x_flip": None}


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m latentdiff.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Train on the result with data.shards: 'DIR/PREFIX-{000000..00000N}.tar'.")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-shards", help="a folder of images (+ sidecar .txt captions, or a CSV/JSONL) -> shards")
    m.add_argument("src", help="folder of images with NAME.txt captions beside them, or a .csv/.jsonl of path,caption")
    m.add_argument("--out", required=True, help="output folder for PREFIX-000000.tar, ...")
    m.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    m.add_argument("--captions", help="CSV (columns path,caption) or JSONL; paths relative to SRC")
    m.add_argument("--prefix", default="data", help="shard file name prefix (default data)")
    m.add_argument("--overwrite", action="store_true", help="replace shards of the same prefix in --out")

    e = sub.add_parser("encode-shards", help="image shards -> VAE latent shards (posterior mode), for U-Net training")
    e.add_argument("src", help="input shards: brace pattern, folder or glob")
    e.add_argument("--out", required=True, help="output folder; shards keep their file names")
    e.add_argument("--checkpoint", required=True, help="checkpoint with the VAE (any file latentdiff loads)")
    e.add_argument("--resolution", type=int, help="pixels before encoding (default: the checkpoint's image_size)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--hflip", action="store_true", help="also store latents of the mirrored image (data.hflip)")
    e.add_argument("--overwrite", action="store_true")

    j = sub.add_parser("emoji", help="render Noto Color Emoji to shards + index.jsonl (the bundled model's data)")
    j.add_argument("--out", required=True)
    j.add_argument("--resolution", type=int, default=64)
    j.add_argument("--per-shard", type=int, default=100, help="samples per shard (default 100: 14 shards)")
    j.add_argument("--font", help="path to NotoColorEmoji.ttf (default: the fonts-noto-color-emoji location)")
    j.add_argument("--sequences", action="store_true", help="also skin-tone and ZWJ sequences (needs `emoji`)")
    j.add_argument("--overwrite", action="store_true")

    args = p.parse_args(argv)
    t0 = time.time()
    try:
        if args.cmd == "make-shards":
            _print_summary("make-shards", make_shards(args.src, args.out, args.per_shard, args.captions, args.prefix,
                                                      args.overwrite), t0)
        elif args.cmd == "encode-shards":
            if args.batch_size < 1:
                raise DataError("--batch-size must be >= 1")
            _print_summary("encode-shards", encode_shards(args.src, args.out, args.checkpoint, args.resolution,
                                                          args.batch_size, args.device, args.hflip, args.overwrite),
                           t0)
        else:
            if args.resolution < 8:
                raise DataError("--resolution must be >= 8")
            s = make_emoji_shards(args.out, args.resolution, args.per_shard, args.font, args.sequences, args.overwrite)
            _print_summary("emoji", s, t0)
            print(f"index: {Path(args.out) / 'index.jsonl'}; font: {s['font']} ({EMOJI_CREDIT}); aliases from the "
                  f"`emoji` package: {'yes' if s['aliases'] else 'no (pip install emoji)'}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
