"""Resume semantics (issue 14, item 1): a run that starts behind the newest checkpoint moves the newer ones aside,
whole, into superseded-*/; nothing is deleted that keep_last did not ask for, and --resume auto then continues
the run that was started last, never the abandoned one."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from latentdiff.train import __main__ as train_main, state as train_state

from test_train import CONFIG, common_args, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), 1, 4, corrupt=False)


def run(shards, out, *extra, **train):
    args = ["--config", str(CONFIG), *common_args(shards, out, **train), "--data.num_workers=0",
            "--data.batch_size=2", *extra]
    assert train_main.main(args) == 0


def steps_in(folder: Path) -> dict[int, int]:
    """{checkpoint step: train.steps of the run that wrote it} for the complete checkpoints in folder."""
    out = {}
    for step, path in train_state.list_checkpoints(folder):
        state = torch.load(path / "state.pt", weights_only=True)
        out[step] = state["config"]["train"]["steps"]
    return out


def test_rolling_back_moves_newer_checkpoints_aside(shards, tmp_path):
    out = tmp_path / "run"
    run(shards, out, steps=6, checkpoint_every=2, keep_last=3)
    assert steps_in(out) == {2: 6, 4: 6, 6: 6}
    # Roll back to step 2 (say the run diverged after it) and train to 4 with keep_last=1.
    run(shards, out, "--resume", str(out / "ckpt-00000002"), steps=4, checkpoint_every=2, keep_last=1, lr="1e-4")
    assert steps_in(out) == {4: 4}  # the new run's step 4, not the abandoned one; its ancestor pruned by keep_last
    aside = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and steps_in(aside[0]) == {4: 6, 6: 6}  # the abandoned run, whole
    assert "moved ckpt-00000004, ckpt-00000006" in (out / "train.log").read_text()
    # --resume auto continues the rolled-back run.
    run(shards, out, "--resume", "auto", steps=5, checkpoint_every=5, keep_last=1)
    assert steps_in(out) == {5: 5}


def test_a_fresh_start_in_a_used_folder_keeps_the_earlier_run(shards, tmp_path):
    out = tmp_path / "run"
    run(shards, out, steps=2, checkpoint_every=1, keep_last=5)
    run(shards, out, steps=1, checkpoint_every=1, keep_last=1)  # no --resume: a new run from step 0
    assert steps_in(out) == {1: 1}
    aside = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and steps_in(aside[0]) == {1: 2, 2: 2}


def test_run_files_follow_the_umask(shards, tmp_path):
    import os
    old = os.umask(0o027)
    try:
        run(shards, tmp_path / "run", steps=1, checkpoint_every=1)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
