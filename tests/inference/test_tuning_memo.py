"""The lesion-wise tuning's memo of region scores (inference/postprocess.py `_Objective`): keyed
by content, so a second tuning over the same cases (one per fold) computes nothing again, and
never confuses two cases that share a prediction but not a ground truth or a voxel size."""

import numpy as np
import pytest

from brats_jax.inference import postprocess as pp
from brats_jax.metrics import lesionwise


def _volume(*cubes) -> np.ndarray:
    """(20, 20, 10) class map; each cube (x0, y0, z0, size, class)."""
    v = np.zeros((20, 20, 10), np.uint8)
    for x, y, z, n, c in cubes:
        v[x : x + n, y : y + n, z : z + n] = c
    return v


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = lesionwise.region_scores

    def counting(pred, gt, spacing=(1.0, 1.0, 1.0), **kw):
        calls.append(1)
        return real(pred, gt, spacing, **kw)

    monkeypatch.setattr(lesionwise, "region_scores", counting)
    monkeypatch.setattr(pp, "_REGION_SCORES", {})
    return calls


def test_a_second_objective_over_the_same_cases_reuses_every_score(counted):
    """(Caught: a memo per objective instance only, i.e. per fold.)"""
    pred = _volume((2, 2, 2, 5, 2), (12, 12, 2, 4, 1))
    gt = _volume((2, 2, 2, 5, 2))
    first = pp._Objective("lesionwise", [gt, gt], [(1.0, 1.0, 1.0)] * 2)([pred, pred])
    n = len(counted)
    assert n == 3  # one per region: the second case is the same content
    again = pp._Objective("lesionwise", [gt], [(1.0, 1.0, 1.0)])([pred])
    assert len(counted) == n and again == first


def test_same_prediction_other_truth_or_voxel_size_is_scored_again(counted):
    """Case A's truth holds the first predicted WT cube one slice off (overlap 5x5x4: Dice 0.8;
    with the FP cube lesion-wise Dice (0.8 + 0) / 2 = 0.4),
    case B's truth lies elsewhere (2 FP + 1 FN: 0); then case A again at 2 mm slices, where the
    TP's HD95 (the prediction is one slice off) doubles. Each must get its own scores, as the
    unmemoised `lesionwise.region_scores` gives them. (Caught: a key without the truth's
    digest, or without the spacing.)"""
    pred = _volume((2, 2, 3, 5, 2), (12, 12, 2, 4, 2))
    gt_a = _volume((2, 2, 2, 5, 2))
    gt_b = _volume((12, 2, 2, 5, 2))
    obj = pp._Objective("lesionwise", [gt_a, gt_b], [(1.0, 1.0, 1.0)] * 2)
    dice, hd = obj([pred, pred])
    # TC and ET are empty in both truths and predictions: Dice 1, HD95 0 each
    assert dice == pytest.approx(np.mean([(0.4 + 2) / 3, (0.0 + 2) / 3]))
    ref = {
        z: lesionwise.region_scores(pred > 0, gt_a > 0, (1.0, 1.0, z))["hd95"] for z in (1.0, 2.0)
    }
    assert ref[2.0] > ref[1.0]  # the voxel size matters here
    _, hd_a2 = pp._Objective("lesionwise", [gt_a], [(1.0, 1.0, 2.0)])([pred])
    _, hd_a1 = pp._Objective("lesionwise", [gt_a], [(1.0, 1.0, 1.0)])([pred])
    assert (hd_a1, hd_a2) == pytest.approx((ref[1.0] / 3, ref[2.0] / 3))
