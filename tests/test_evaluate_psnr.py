"""evaluate's fidelity measure: per-generation PSNR at 64x64 against the named reference, its median and the share
above the threshold, against closed forms."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from latentdiff import evaluate
from latentdiff.evaluate import PSNR_THRESHOLD_DB, fidelity_psnr, load_reference, psnr_summary


def off_by(ref: torch.Tensor, c: list[int]) -> torch.Tensor:
    """Image i differs from ref i by exactly c[i] in every pixel and channel (down where it can, else up)."""
    c = torch.tensor(c, dtype=torch.int16).view(-1, 1, 1, 1)
    r = ref.to(torch.int16)
    return torch.where(r >= c, r - c, r + c).to(torch.uint8)


def analytic(c: int) -> float:
    return 20 * math.log10(255 / c)  # MSE = (c / 255)^2 on [0, 1] pixels, peak 1


def test_a_known_constant_difference_gives_the_analytic_psnr():
    ref = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    c = [1, 5, 51, 127]
    got = fidelity_psnr(off_by(ref, c), ref)
    torch.testing.assert_close(got, torch.tensor([analytic(v) for v in c], dtype=torch.float64))
    assert fidelity_psnr(ref, ref).tolist() == [100.0] * 4  # identical: the MSE floor 1e-10


def test_other_sizes_are_compared_at_64():
    # Flat images stay flat under any resampling, so a 32x32 generation against a 128x128 reference keeps the
    # analytic PSNR of its constant difference.
    ref = torch.full((2, 3, 128, 128), 200, dtype=torch.uint8)
    gen = torch.full((2, 3, 32, 32), 190, dtype=torch.uint8)
    torch.testing.assert_close(fidelity_psnr(gen, ref), torch.full((2,), analytic(10), dtype=torch.float64))


def test_median_and_share_above_the_threshold():
    c = [2, 10, 20, 30, 40, 60]  # 42.1, 28.1, 22.1, 18.6, 16.1, 12.6 dB
    ref = torch.full((6, 3, 64, 64), 128, dtype=torch.uint8)
    s = psnr_summary(fidelity_psnr(off_by(ref, c), ref), threshold=20.0)
    assert s["median_db"] == pytest.approx((analytic(20) + analytic(30)) / 2)  # even count: the middle two's mean
    assert s["share_above"] == 3 / 6 and s["threshold_db"] == 20.0
    s = psnr_summary(fidelity_psnr(off_by(ref[:5], c[:5]), ref[:5]), threshold=PSNR_THRESHOLD_DB)
    assert s["median_db"] == pytest.approx(analytic(20))
    assert s["share_above"] == 5 / 5  # 16.1 dB is above the 15 dB default


def test_the_command_reports_the_fidelity(tmp_path, tiny_checkpoint, monkeypatch):
    from test_evaluate import reference_set  # tests/ is on sys.path under pytest

    reference_set(tmp_path)
    _, _, ref = load_reference(tmp_path)
    c = [3, 9, 27, 40, 60, 81]
    monkeypatch.setattr(evaluate, "generate_all", lambda pipe, prompts, **kw: off_by(ref, c))
    evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data", str(tmp_path), "--steps", "1", "--device", "cpu",
                   "--out", str(tmp_path / "r.json"), "--psnr-threshold", "17"])
    got = json.loads((tmp_path / "r.json").read_text())["psnr64"]
    assert got["median_db"] == pytest.approx(statistics.median(analytic(v) for v in c))
    assert got["share_above"] == pytest.approx(3 / 6) and got["threshold_db"] == 17  # 27 -> 19.5 dB, 40 -> 16.1
