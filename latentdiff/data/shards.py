"""Writing webdataset shards: tar files written atomically, ShardWriter, and make-shards (images + captions)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image

from latentdiff.data.loader import DataError
from latentdiff.io.images import ORIENTATION, to_rgb
from latentdiff.io.files import atomic_write

SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what make-shards accepts
PLAIN_MODES = ("1", "L", "P", "RGB", "LA", "RGBA")  # 8-bit modes every reader decodes as they display


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
    """Collect samples and write DIR/PREFIX-000000.tar, -000001.tar, ... of `per_shard` samples each.

    Shards go to a hidden staging folder inside DIR and are moved into place by close(), so an interrupted run
    (an exception, Ctrl-C) leaves DIR as it was: a half-written set never sits beside, or over, a whole one.
    """

    def __init__(self, out_dir, prefix: str = "data", per_shard: int = 1000, overwrite: bool = False):
        if per_shard < 1:
            raise DataError(f"--per-shard must be >= 1, got {per_shard}")
        self.out, self.prefix, self.per_shard = Path(out_dir), prefix, per_shard
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create --out {self.out}: {e.strerror or e}; choose another folder") from None
        self.old = sorted(self.out.glob(f"{prefix}-[0-9]*.tar"))
        if self.old and not overwrite:
            raise DataError(f"{self.out} already holds {len(self.old)} shard(s) named {prefix}-*.tar; pass "
                            f"--overwrite to replace them, or choose another --out or --prefix")
        for leftover in self.out.glob(f".tmp-{prefix}-*"):  # staging of a killed run: never a whole set
            shutil.rmtree(leftover, ignore_errors=True)
        self.staging = self.out / f".tmp-{prefix}-{os.getpid()}"
        self.staging.mkdir()
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
            write_tar(self.staging / path.name, self.pending)
            self.paths.append(path)
            self.pending = []

    def close(self) -> list[Path]:
        self._flush()
        for stale in set(self.old) - set(self.paths):  # left over from a larger earlier run
            stale.unlink()
        for path in self.paths:
            os.replace(self.staging / path.name, path)
        self.staging.rmdir()
        return self.paths

    def abort(self):
        """Drop what was written; the folder keeps its earlier shards."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()


def shards_pattern(paths: list[str]) -> str:
    """The data.shards value naming exactly these shards: one path, a brace range when they are PREFIX-NNNNNN.tar
    numbered on in one folder (what ShardWriter writes), else the paths joined by '::'."""
    parts = [Path(p) for p in paths]
    named = [re.fullmatch(r"(.*)-(\d+)", p.stem) for p in parts]
    if len(parts) > 1 and all(named) and all(p.suffix == ".tar" for p in parts):
        heads = {(p.parent, m[1], len(m[2])) for p, m in zip(parts, named)}
        numbers = [int(m[2]) for m in named]
        if len(heads) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return str(parts[0].with_name(f"{named[0][1]}-{{{named[0][2]}..{named[-1][2]}}}.tar"))
    return "::".join(str(p) for p in parts)


def _image_record(path: Path, source: str) -> dict[str, bytes]:
    """Check one image decodes fully; keep 8-bit upright JPEG/PNG bytes as they are, store any other image as the
    8-bit RGB PNG a viewer would show (16-bit scaled, CMYK converted, EXIF orientation applied)."""
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
    plain = img.mode in PLAIN_MODES and img.getexif().get(ORIENTATION, 1) == 1
    if plain and fmt in ("JPEG", "PNG"):
        ext = "jpg" if fmt == "JPEG" else "png"
    else:
        img = img if plain else to_rgb(img)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data, ext = buf.getvalue(), "png"
    meta = {"width": img.width, "height": img.height, "source": source}
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
