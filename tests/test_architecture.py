"""The package's shape: imports run one way (commands -> cli -> pipeline -> data -> io -> models, diffusion), as
the layers contract in pyproject.toml says; import-linter checks it on the real tree and on a copy with one import
turned around."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports on the latentdiff package found in `tree`, with the repository's contract."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def source_copy(dest: Path) -> Path:
    """The package's Python files (no weights, no compiled extension) under dest/latentdiff."""
    for path in (ROOT / "latentdiff").rglob("*.py"):
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return dest


def test_imports_follow_the_layers():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, reversed_import", [
    ("models/unet.py", "import latentdiff.pipeline"),          # a network reaching up into the composition
    ("io/images.py", "from latentdiff.generate import main"),  # library code reaching into a command
    ("serve/app.py", "import latentdiff.train.loop"),          # one command importing another
])
def test_a_reversed_import_breaks_the_contract(tmp_path, module, reversed_import):
    tree = source_copy(tmp_path)
    path = tree / "latentdiff" / module
    path.write_text(path.read_text() + f"\n{reversed_import}  # deliberately against the layers\n")
    result = lint(tree)
    assert result.returncode != 0, result.stdout
    assert "0 kept, 1 broken" in result.stdout, result.stdout
