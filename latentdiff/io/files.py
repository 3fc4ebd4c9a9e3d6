"""Files written whole or not at all (a temp file beside the target, renamed over it once complete), and hashes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temp path beside `path` to write; when the block ends it replaces `path`, on an error it is removed.

    The temp file is synced to disk before the rename, so a crash leaves the old file or the new one, never half
    of one. Its name (`.NAME.tmpPID`) is hidden and never matches the target's pattern.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # some writers (safetensors) create 0600 files: follow the umask instead
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_name(path: str | Path) -> str:
    """The name a model file goes by in PNG parameters (`Model:`) and a server's model list: its file name without
    the suffix, as A1111's; a training checkpoint (RUN/ckpt-00001000/model.safetensors, all named alike) is named
    after its run and step instead: RUN-step1000."""
    path = Path(path)
    step = re.fullmatch(r"ckpt-(\d+)", path.parent.name)
    if step and path.stem == "model":
        run = path.resolve().parent.parent.name or "run"
        return f"{run}-step{int(step[1])}"
    return path.stem


def file_hash(path: str | Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    return file_sha256(path)[:10]


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 in hex, cached by path, size and mtime (checkpoints are gigabytes)."""
    path = Path(path).resolve()
    st = path.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "latentdiff" / "sha256.json"
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        try:
            with atomic_write(cache_file) as tmp:
                tmp.write_text(json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs a re-hash next time
    return cache[key]
