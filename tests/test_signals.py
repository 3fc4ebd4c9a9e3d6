"""A stop signal to the whole process group (timeout -s TERM, scancel, a container stop) saves a checkpoint and
exits 0, also with loader workers: they ignore SIGTERM/SIGINT and leave shutdown to the main process (issue 13)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import CONFIG, ROOT, common_args, descendants, write_shards
from latentdiff.train.state import list_checkpoints


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_saves_and_exits_0(tmp_path, sig):
    shards = write_shards(tmp_path / "shards", 2, 4, corrupt=False)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "latentdiff.train", "--config", str(CONFIG),
           *common_args(shards, out, steps=100000, checkpoint_every=100000), "--data.num_workers=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        log = out / "log.csv"
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # two steps done: workers are serving
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, sig)  # the main process and both workers, as `timeout -s TERM` does
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    assert "stop requested" in output
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1 and ckpts[0][0] >= 2


LEFT_OPEN = """
import sys
from latentdiff.data.loader import DataConfig, make_loader
cfg = DataConfig(shards=sys.argv[1], resolution=32, batch_size=2, num_workers=2, shuffle_buffer=4)
kept = [make_loader(cfg, epoch_length=1000), make_loader(cfg)]  # an endless stream and a one-pass loader
readers = [iter(loader) for loader in kept]
for r in readers:
    next(r)
print("read a batch from each; exiting with both open", flush=True)
"""


def test_a_loader_left_open_does_not_hang_the_exit(tmp_path):
    """The workers ignore SIGTERM, and multiprocessing's exit hook terminates (SIGTERM) and then joins its children:
    a loader nobody closed (a test that stopped reading, an exception) once left `pytest` waiting there for ever
    after its summary. data/loader.py closes every open loader at exit, before that hook."""
    shards = write_shards(tmp_path / "shards", 2, 4, corrupt=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", LEFT_OPEN, shards], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        tree = [proc.pid, *descendants(proc.pid)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the process did not exit within 90 s of its last line ({len(tree)} processes left)")
    assert proc.returncode == 0 and "exiting with both open" in output, output[-4000:]


def test_close_ends_the_workers_and_the_loader_can_start_again(tmp_path):
    from latentdiff.data.loader import DataConfig, make_loader
    shards = write_shards(tmp_path / "shards", 2, 4, corrupt=False)
    loader = make_loader(DataConfig(shards=shards, resolution=32, batch_size=2, num_workers=2, shuffle_buffer=4),
                         epoch_length=3)
    workers = lambda: [p for p in descendants(os.getpid()) if _comm(p) == "pt_data_worker"]  # noqa: E731
    before = set(workers())
    assert len(list(loader)) == 3
    assert len(set(workers()) - before) == 2  # the endless stream keeps its two workers between `for` loops
    loader.close()
    assert set(workers()) - before == set()
    assert len(list(loader)) == 3  # a new stream


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
