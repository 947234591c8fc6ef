"""experiments/analyses/postprocessing_ablation: tuning on tuning cases only, rows scored on
test cases."""

import numpy as np
import pytest

from brats_jax.inference import postprocess
from experiments.analyses import postprocessing_ablation as ablation


def _volumes():
    """A 27-voxel ED tumour with an 8-voxel ET core; the prediction adds a 4-voxel island."""
    gt = np.zeros((16, 16, 16), np.uint8)
    gt[2:5, 2:5, 2:5] = 2
    gt[2:4, 2:4, 2:4] = 3
    pred = gt.copy()
    pred[12:14, 12:14, 12] = 2
    return pred, gt


def test_rows_tuned_on_tuning_cases_and_scored_on_test_cases():
    pred, gt = _volumes()
    clean = gt.copy()
    labels = {"none": {"tune": pred, "test": pred}, "flips": {"tune": clean, "test": clean}}
    gts = {"tune": gt, "test": gt}
    rows, tuning = ablation.plan_rows(labels, gts, ["tune"], log=lambda _: None)
    names = [r[0] for r in rows]
    assert "+ TTA flips_ud" not in names  # not predicted, not a row
    assert names[0] == "baseline" and names[-1] == "best combination (chosen on tuning cases)"
    # the default size thresholds (>= 50) would remove the 27-voxel tumour; relabelling its
    # 8 ET voxels (thresholds >= 50) would cost ET Dice: only "largest component" is kept
    assert (
        tuning["none/full"]["config"]
        == postprocess.PostprocessConfig(largest_component_only=True).to_dict()
    )
    scored = ablation.score_rows(rows, labels, gts, {"test": (1.0, 1.0, 1.0)}, ["test"])
    by_row = {s["row"]: s["per_case"][0] for s in scored}
    # baseline: WT 2*27/(27+31); TC and ET exact
    assert by_row["baseline"]["dice_WT"] == pytest.approx(54 / 58)
    assert by_row["baseline"]["dice_TC"] == by_row["baseline"]["dice_ET"] == 1.0
    assert by_row["+ largest component"]["dice_WT"] == 1.0
    assert by_row["+ largest component"]["hd95_WT"] == 0.0
    assert by_row["+ TTA flips"]["dice_WT"] == 1.0
    table = ablation.markdown(scored)
    assert "| baseline | none | none | 0.931 [0.931, 0.931] |" in table
    assert "| + largest component | none | largest component (26-conn.) | 1.000 [1.000" in table


def test_describe_names_every_step():
    cfg = postprocess.PostprocessConfig(largest_component_only=True, et_min_voxels=200)
    assert ablation._describe(cfg) == "largest component (26-conn.); ET < 200 vx -> NCR"
    assert ablation._describe(postprocess.PostprocessConfig()) == "none"
