"""Lesion-wise summaries and counts (`metrics/lesionwise.py`) on hand-made rows and masks."""

import numpy as np
import pytest

from brats_jax import metrics as M
from brats_jax.metrics import lesionwise as L


def _row(dice, hd, tp, fn, fp):
    """One case's columns: region r gets dice[r], hd[r], ... (dicts by region)."""
    out = {}
    for r in ("WT", "TC", "ET"):
        for k, v in zip(L._KEYS, (dice[r], hd[r], tp[r], fn[r], fp[r]), strict=True):
            out[f"lesionwise_{k}_{r}"] = v
    return out


ROWS = [
    _row({"WT": 1.0, "TC": 0.2, "ET": 0.0}, {"WT": 0.0, "TC": 10.0, "ET": 374.0},
         {"WT": 2, "TC": 1, "ET": 0}, {"WT": 0, "TC": 1, "ET": 3}, {"WT": 1, "TC": 0, "ET": 2}),
    _row({"WT": 0.5, "TC": 0.6, "ET": 1.0}, {"WT": 187.0, "TC": 2.0, "ET": 0.0},
         {"WT": 1, "TC": 4, "ET": 1}, {"WT": 5, "TC": 0, "ET": 0}, {"WT": 0, "TC": 7, "ET": 0}),
]  # fmt: skip


def test_summary_table_lines_by_hand():
    lines = L.summary_table(ROWS).splitlines()
    assert lines[0] == "lesion-wise (BraTS 2023)"
    assert lines[1] == f"{'metric':<20}{'mean':>10}{'std':>10}{'median':>10}"
    # WT Dice 1.0, 0.5: mean 0.75, population std 0.25, median 0.75
    assert lines[2] == "lesionwise_dice_WT      0.7500    0.2500    0.7500"
    assert lines[3] == "lesionwise_dice_TC      0.4000    0.2000    0.4000"
    assert lines[4] == "lesionwise_dice_ET      0.5000    0.5000    0.5000"
    assert lines[5] == "lesionwise_hd95_WT     93.5000   93.5000   93.5000"
    assert lines[7] == "lesionwise_hd95_ET    187.0000  187.0000  187.0000"
    assert lines[8] == ("lesions WT: TP 3 FN 5 FP 1  TC: TP 5 FN 1 FP 7  ET: TP 1 FN 3 FP 2")
    assert len(lines) == 9


def test_summarise_skips_non_finite_and_missing_values():
    rows = [*ROWS, {"lesionwise_dice_WT": float("nan"), "lesionwise_tp_WT": None}]
    got = L.summarise(rows)
    assert got["dice"]["WT"] == pytest.approx(0.75)
    assert got["tp"]["WT"] == 3 and isinstance(got["tp"]["WT"], int)
    assert isinstance(got["dice"]["TC"], float)
    assert L.summarise([{}])["dice"] == {"WT": None, "TC": None, "ET": None}


def _hollow_cube_with_core():
    """GT: a 6x6x6 shell (152 voxels); prediction: the 2x2x2 core, one voxel from the shell."""
    gt = np.zeros((10, 10, 10), bool)
    gt[2:8, 2:8, 2:8] = True
    gt[3:7, 3:7, 3:7] = False
    pred = np.zeros_like(gt)
    pred[4:6, 4:6, 4:6] = True
    return pred, gt


def test_no_dilation_matches_only_overlapping_components():
    pred, gt = _hollow_cube_with_core()
    got = L.region_scores(pred, gt, dilation_iterations=0)
    assert (got["tp"], got["fn"], got["fp"]) == (0, 1, 1)
    assert got["dice"] == 0.0 and got["hd95"] == L.HD95_WORST
    one = L.region_scores(pred, gt, dilation_iterations=1)  # 1 voxel grown: not enough
    assert (one["tp"], one["fn"], one["fp"]) == (0, 1, 1)
    two = L.region_scores(pred, gt, dilation_iterations=2)
    assert (two["tp"], two["fn"], two["fp"]) == (1, 0, 0)


def test_one_dilation_matches_a_face_neighbour():
    gt = np.zeros((8, 8, 8), bool)
    gt[1:5, 1:5, 1:5] = True  # 64 voxels
    pred = np.zeros_like(gt)
    pred[5, 2, 2] = True  # touches the lesion's face
    got = L.region_scores(pred, gt, dilation_iterations=1)
    assert (got["tp"], got["fn"], got["fp"]) == (1, 0, 0)


def test_evaluate_volume_passes_spacing_and_options_and_names_bad_maps():
    gt = np.zeros((8, 8, 8), np.int64)
    gt[1:4, 1:4, 1:5] = 2  # 36 voxels: 72 mm^3 at 2 mm in x (kept), 36 at 1 mm (ignored)
    pred = gt.copy()
    fine = L.evaluate_volume(pred, gt)
    assert fine["lesionwise_tp_WT"] == 0 and fine["lesionwise_dice_WT"] == 1.0
    coarse = L.evaluate_volume(pred, gt, spacing=(2.0, 1.0, 1.0))
    assert coarse["lesionwise_tp_WT"] == 1 and coarse["lesionwise_fn_WT"] == 0
    small = L.evaluate_volume(pred, gt, min_volume=10.0)
    assert small["lesionwise_tp_WT"] == 1 and list(small) == L.COLUMNS
    with pytest.raises(ValueError, match="^pred must be an integer class map"):
        L.evaluate_volume(pred.astype(float), gt)
    with pytest.raises(ValueError, match=r"^target has values \[7\] outside"):
        L.evaluate_volume(pred, np.where(gt == 2, 7, gt))


def test_region_scores_argument_checks():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError) as err:
        L.region_scores(a, np.zeros((4, 4, 5), bool))
    assert str(err.value) == "pred and gt masks must be equal (H, W, D); got (4, 4, 4), (4, 4, 5)"
    with pytest.raises(ValueError) as err:
        L.region_scores(a, a, component_neighbours=7)
    assert str(err.value) == "component_neighbours 7: expected one of [6, 18, 26]"


def test_float_masks_two_ignored_lesions_and_the_hd95_options():
    gt = np.zeros((20, 20, 20), bool)
    gt[0, 0, 0] = gt[19, 19, 19] = True  # two 1-voxel lesions, far apart: both ignored
    gt[7:13, 7:13, 7:13] = True  # one kept lesion, 216 voxels
    pred = np.zeros_like(gt)
    pred[8:12, 8:12, 8:12] = True  # inside the lesion: one match
    got = L.region_scores(pred, gt)
    assert got["ignored"] == 2 and (got["tp"], got["fn"], got["fp"]) == (1, 0, 0)
    assert L.region_scores(pred.astype(float), gt.astype(float)) == got
    lesion = gt.copy()
    lesion[0, 0, 0] = lesion[19, 19, 19] = False
    pooled = L.region_scores(pred, gt, hd95_mode="pooled")["hd95"]
    assert pooled == pytest.approx(M.hd95(pred, lesion, mode="pooled"))
    assert got["hd95"] == pytest.approx(M.hd95(pred, lesion)) and pooled != got["hd95"]
    shifted = np.roll(lesion, 1, axis=0)  # one voxel along x: distances along x only
    aniso = L.region_scores(shifted, lesion, spacing=(3.0, 1.0, 1.0))["hd95"]
    assert aniso == pytest.approx(M.hd95(shifted, lesion, (3.0, 1.0, 1.0))) and aniso == 3.0
    assert L.region_scores(shifted, lesion)["hd95"] == 1.0
