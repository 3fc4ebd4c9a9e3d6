"""benchmarks/gpu_check.py, the prepared GPU run: its logic on a machine without a GPU."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_every_part_is_skipped_and_the_summary_written(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_visible", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [name for name, _, _ in gpu_check.parts(tmp_path, tmp_path / "work")]
    assert [r["part"] for r in summary["parts"]] == names
    assert {r["status"] for r in summary["parts"]} == {"skip"} and summary["gpu"] is False
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-len(names) - 1].startswith("part") and all(" skip " in line for line in table[-len(names):])


def test_a_part_over_its_limit_is_ended_with_everything_it_started(gpu_check, tmp_path):
    marker = tmp_path / "child-finished"
    start = time.time()
    row = gpu_check.run_part("hang", f"(sleep 5; touch {marker}) & sleep 30", 1, tmp_path)
    assert row["status"] == "timeout" and time.time() - start < 10
    time.sleep(5.5)
    assert not marker.exists()  # the background child was in the part's process group, and was killed with it
    ok = gpu_check.run_part("ok", "echo done", 10, tmp_path)
    fail = gpu_check.run_part("bad", "echo broken; exit 3", 10, tmp_path)
    assert (ok["status"], ok["last"], fail["status"], fail["rc"]) == ("pass", "done", "fail", 3)


def test_the_budget_cuts_the_parts_that_no_longer_fit(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_visible", lambda: True)
    monkeypatch.setattr(gpu_check, "parts", lambda out, work: [("a", "sleep 3", 60), ("b", "true", 60)])
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "22"]) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert [(r["part"], r["status"]) for r in rows] == [("a", "pass"), ("b", "skip")]
    assert rows[1]["last"] == "out of budget"  # 19 s were left after a, under the 20 s a part needs to start
