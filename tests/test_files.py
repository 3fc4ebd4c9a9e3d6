"""atomic_write: the target is the old file or the complete new one, never a part; modes follow the umask."""
import os
import stat

import pytest

from latentdiff.io.files import atomic_write


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


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_checkpoints_follow_the_umask(tmp_path, mask, tiny_checkpoint):
    """safetensors writes its files 0600; ours follow the umask like every other file (issue 14, item 8)."""
    from safetensors.torch import save_file
    import torch

    from latentdiff import checkpoint
    old = os.umask(mask)
    try:
        with atomic_write(tmp_path / "a.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        assert checkpoint.main([str(tiny_checkpoint), str(tmp_path / "b.safetensors"), "--dtype", "fp32"]) == 0
    finally:
        os.umask(old)
    for name in ("a.safetensors", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
