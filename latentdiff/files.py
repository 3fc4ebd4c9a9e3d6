"""Files written whole or not at all: a temp file beside the target, renamed over it once complete."""
from __future__ import annotations

import contextlib
import os
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
