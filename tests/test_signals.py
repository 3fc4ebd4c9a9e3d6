"""A stop signal to the whole process group (timeout -s TERM, scancel, a container stop) saves a checkpoint and
exits 0, also with loader workers: they ignore SIGTERM/SIGINT and leave shutdown to the main process (issue 13)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_train import CONFIG, ROOT, common_args, write_shards
from latentdiff.train import list_checkpoints


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
