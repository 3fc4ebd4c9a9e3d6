"""The default emoji model ships inside the package: the file is the one the recipe made, a wheel carries it, and
`generate` without --checkpoint draws with it."""
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from latentdiff.generate import BUNDLED, main

ROOT = Path(__file__).resolve().parent.parent
# The sha256 recorded beside the file where it was made (shared/emoji-gpu/README.md: 98.5% top-1 on all emoji).
SHA256 = "6bbaf58ec1ba6675bb435b3b285c0f2cde06a4e0f6e6f1ee73360579e572e70d"


def test_the_bundled_file_is_the_recorded_model():
    assert BUNDLED.is_file(), f"{BUNDLED} is missing"
    assert hashlib.sha256(BUNDLED.read_bytes()).hexdigest() == SHA256


def test_generate_without_checkpoint_uses_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["a cat", "--seed", "1", "--steps", "4", "--device", "cpu", "-o", str(out)]) == 0
    params = Image.open(out).info["parameters"]
    assert "Model: emoji" in params and Image.open(out).size == (64, 64)


@pytest.mark.slow
def test_a_wheel_carries_the_model_as_package_data(tmp_path):
    """What a non-editable install gets: the wheel built from this tree holds latentdiff/weights/emoji.safetensors."""
    env = dict(os.environ, LATENTDIFF_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, env=env, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("latentdiff-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("latentdiff/weights/emoji.safetensors")
    assert info.file_size == BUNDLED.stat().st_size
