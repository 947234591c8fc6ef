"""What `postprocess.tune_postprocessing` records and logs per objective, the rank of its
results, and the region rules' defaults and comparisons. Hand-computed values: one case, a
6x6x6 whole tumour (ED) found exactly plus a 64-voxel ED island far away (a false-positive
lesion: lesion-wise WT Dice (1 + 0) / 2, HD95 (0 + 374) / 2 = 187 mm; TC and ET empty in
both: Dice 1, HD95 0)."""

import numpy as np
import pytest

from brats_jax.inference import postprocess as pp
from brats_jax.metrics.lesionwise import HD95_WORST


def _case():
    gt = np.zeros((24, 24, 12), np.uint8)
    gt[2:8, 2:8, 2:8] = 2
    pred = gt.copy()
    pred[16:20, 16:20, 2:6] = 2
    return pred, gt


def test_lesionwise_tuning_records_its_objective_and_hd95_and_logs_them():
    """(Bugs caught: the objective or the HD95 after tuning not recorded, the log naming the
    voxel-Dice objective or leaving out the mm.)"""
    pred, gt = _case()
    lines = []
    tuned = pp.tune_postprocessing([pred], [gt], objective="lesionwise", log=lines.append)
    hd95_before = (HD95_WORST / 2 + 0 + 0) / 3  # 62.33 mm
    assert tuned.objective == "lesionwise"
    assert tuned.score_before == pytest.approx((0.5 + 1 + 1) / 3)
    assert tuned.score_after == pytest.approx(1.0)
    assert tuned.hd95_before == pytest.approx(hd95_before)
    assert tuned.hd95_after == pytest.approx(0.0)
    assert len(tuned.trials_hd95) == len(tuned.trials)
    assert tuned.trials_hd95[0] == pytest.approx(hd95_before)  # the first trial: nothing on
    assert np.array_equal(pp.apply(pred, tuned.config), gt)
    step = lines[0]
    assert step.startswith(f"{pp.STEPS[0][0]}: ")
    assert step.endswith(
        f"-> mean lesion-wise Dice (HD95) 0.8333 ({hd95_before:.1f} mm) -> 1.0000 (0.0 mm)"
    )


def test_dice_tuning_records_no_hd95_and_logs_the_mean_dice():
    """(Bugs caught: per-trial HD95 recorded for the Dice objective, the log's objective name
    or an "mm" part for Dice.) Voxel Dice of WT before: 2 * 216 / (216 + 280)."""
    pred, gt = _case()
    lines = []
    tuned = pp.tune_postprocessing([pred], [gt], objective="dice", log=lines.append)
    assert tuned.objective == "dice"
    assert (tuned.hd95_before, tuned.hd95_after, tuned.trials_hd95) == (None, None, ())
    wt = 2 * 216 / (216 + 280)
    assert lines[0].endswith(f"-> mean Dice {(wt + 1 + 1) / 3:.4f} -> 1.0000")


def test_rank_prefers_the_lower_hd95_zero_included():
    """Ties in score go to the lower HD95; 0 mm is the best, not a missing value (bug
    caught: a zero HD95 read as absent and ranked like 1 mm)."""
    assert pp._rank((0.8, 0.0)) > pp._rank((0.8, 0.5)) > pp._rank((0.8, 2.0))
    assert pp._rank((0.9, 300.0)) > pp._rank((0.8, 0.0))
    assert pp._rank((0.8, None)) == pp._rank((0.8, 0.0))  # the Dice objective: no HD95


@pytest.mark.parametrize("region", ["tc", "et"])
def test_effective_keeps_the_action_of_a_rule_that_is_on(region):
    """An action matters only with its threshold (bug caught: the action always reset, so a
    "remove" rule compares equal to a "relabel" one)."""
    on = pp.PostprocessConfig(**{f"{region}_min_mm3": 10.0, f"{region}_action": "remove"})
    assert getattr(on.effective(), f"{region}_action") == "remove"
    relabel = pp.PostprocessConfig(**{f"{region}_min_mm3": 10.0})
    assert on.effective() != relabel.effective()
    off = pp.PostprocessConfig(**{f"{region}_action": "remove"})
    assert off.effective() == pp.PostprocessConfig()


def test_region_rule_relabels_by_default():
    """`filter_region_components` without an action relabels: a small TC island -> ED."""
    v = np.zeros((6, 6, 6), np.uint8)
    v[1:5, 1:5, 1:5] = 2
    v[2, 2, 2] = 1  # a 1-voxel TC component inside the oedema
    out = pp.filter_region_components(v, "tc", 2.0)
    want = v.copy()
    want[2, 2, 2] = 2
    np.testing.assert_array_equal(out, want)


def test_a_spacing_per_case_is_required():
    pred, gt = _case()
    with pytest.raises(ValueError) as err:
        pp.tune_postprocessing([pred], [gt], spacings=[(1, 1, 1), (1, 1, 2)])
    assert str(err.value) == "2 spacings for 1 cases: expected one per case"


def test_the_region_score_memo_never_holds_more_than_its_cap(monkeypatch):
    """Cap 2: scoring one case's three regions (3 new entries) empties the memo when it is
    full, so it holds at most 2 entries at any time (bug caught: the cap exceeded by one)."""
    monkeypatch.setattr(pp, "_REGION_SCORES", {})
    monkeypatch.setattr(pp, "_REGION_SCORES_MAX", 2)
    pred, gt = _case()
    pp.tune_postprocessing([pred], [gt], objective="lesionwise")
    assert 0 < len(pp._REGION_SCORES) <= 2


def test_bad_objective_region_or_action_are_one_line_errors():
    pred, gt = _case()
    with pytest.raises(ValueError) as err:
        pp.tune_postprocessing([pred], [gt], objective="hd95")
    assert str(err.value) == "objective 'hd95': expected one of ['dice', 'lesionwise']"
    for region, action in (("wt", "relabel"), ("tc", "drop")):
        with pytest.raises(ValueError) as err:
            pp.filter_region_components(pred, region, 10.0, action)
        assert str(err.value) == (
            f"region {region!r}, action {action!r}: expected tc|et, relabel|remove"
        )
