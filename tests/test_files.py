"""atomic_write: the target is the old file or the complete new one, never a part; modes follow the umask."""
import os
import stat

import pytest

from latentdiff.files import atomic_write


def test_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half of the sec")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]  # no temp file left behind


def test_new_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.png").stat().st_mode) == 0o644
