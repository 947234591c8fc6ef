"""3D post-processing on hand-made label volumes, its tuning, JSON storage, config fields."""

import json

import numpy as np
import pytest

from brats_jax.inference import postprocess as pp


def _tumour_with_islands():
    """A 3x3x3 tumour (ED shell, NCR core voxel, 2 ET voxels) plus islands of 1 and 2 voxels."""
    v = np.zeros((12, 12, 10), np.int32)
    v[2:5, 2:5, 2:5] = 2
    v[3, 3, 3] = 1
    v[2, 2, 2] = v[2, 2, 3] = 3
    tumour = v.copy()
    v[10, 10, 8] = 2  # 1-voxel island, far away
    v[10, 0, 0] = v[10, 1, 0] = 1  # 2-voxel island
    return v, tumour


def test_default_config_changes_nothing():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 4, (8, 7, 6)).astype(np.int32)
    assert pp.PostprocessConfig().is_identity
    np.testing.assert_array_equal(pp.apply(v, pp.PostprocessConfig()), v)


@pytest.mark.parametrize(
    "config",
    [
        pp.PostprocessConfig(min_component_voxels=3),
        pp.PostprocessConfig(largest_component_only=True),
    ],
)
def test_islands_removed_and_the_tumour_untouched(config):
    v, tumour = _tumour_with_islands()
    out = pp.apply(v, config)
    np.testing.assert_array_equal(out, tumour)
    assert v[10, 10, 8] == 2  # the input is not modified


def test_size_threshold_keeps_components_at_the_threshold():
    v, tumour = _tumour_with_islands()
    out = pp.apply(v, pp.PostprocessConfig(min_component_voxels=2))
    expected = tumour.copy()
    expected[10, 0, 0] = expected[10, 1, 0] = 1  # the 2-voxel island stays, the 1-voxel goes
    np.testing.assert_array_equal(out, expected)
    # a threshold above every component's size keeps the largest (the 27-voxel tumour), as
    # nnU-Net does: a threshold tuned on large tumours never erases a small one
    # (bug caught: every component below the threshold removed, the volume emptied)
    np.testing.assert_array_equal(
        pp.apply(v, pp.PostprocessConfig(min_component_voxels=28)), tumour
    )


def test_connectivity_6_and_26_differ_on_a_diagonal_pair():
    v = np.zeros((5, 5, 5), np.int32)
    v[1, 1, 1] = 2
    v[2, 2, 2] = 1  # touches (1,1,1) at a corner only
    keep = pp.apply(v, pp.PostprocessConfig(min_component_voxels=2, connectivity=26))
    np.testing.assert_array_equal(keep, v)  # one component of 2 voxels
    # two components of 1 voxel each: the largest stays (a tie: the first in scan order)
    first = np.zeros_like(v)
    first[1, 1, 1] = 2
    out = pp.apply(v, pp.PostprocessConfig(min_component_voxels=2, connectivity=6))
    np.testing.assert_array_equal(out, first)
    face = np.zeros((5, 5, 5), np.int32)
    face[1, 1, 1] = face[1, 1, 2] = 3  # face neighbours: one component either way
    for conn in (6, 26):
        out = pp.apply(face, pp.PostprocessConfig(min_component_voxels=2, connectivity=conn))
        np.testing.assert_array_equal(out, face)


def test_small_et_relabelled_as_ncr_and_nothing_else():
    v, _ = _tumour_with_islands()  # 2 ET voxels
    out = pp.apply(v, pp.PostprocessConfig(et_min_voxels=3))
    expected = v.copy()
    expected[2, 2, 2] = expected[2, 2, 3] = 1
    np.testing.assert_array_equal(out, expected)
    # exactly at the threshold: kept
    np.testing.assert_array_equal(pp.apply(v, pp.PostprocessConfig(et_min_voxels=2)), v)


def test_components_are_filtered_before_the_et_count():
    v = np.zeros((10, 10, 10), np.int32)
    v[1:4, 1:4, 1:4] = 2
    v[2, 2, 2] = 3  # 1 ET voxel in the tumour
    v[8, 8, 8] = 3  # 1 ET voxel in an island
    cfg = pp.PostprocessConfig(largest_component_only=True, et_min_voxels=2)
    out = pp.apply(v, cfg)
    expected = v.copy()
    expected[8, 8, 8] = 0
    expected[2, 2, 2] = 1  # 1 ET voxel left after the island went: fewer than 2
    np.testing.assert_array_equal(out, expected)


def test_config_json_round_trip_and_errors(tmp_path):
    cfg = pp.PostprocessConfig(min_component_voxels=250, connectivity=6, et_min_voxels=500)
    path = tmp_path / pp.POSTPROCESSING_FILE
    pp.save(path, cfg, {"cases": ["A", "B"]})
    stored = json.loads(path.read_text())
    assert stored["postprocessing"] == {
        "min_component_voxels": 250,
        "largest_component_only": False,
        "connectivity": 6,
        "et_min_voxels": 500,
    }
    assert stored["tuning"] == {"cases": ["A", "B"]}
    assert pp.load(path) == cfg
    path.write_text(json.dumps({"postprocessing": {"min_voxels": 3}}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['min_voxels'\]"):
        pp.load(path)
    with pytest.raises(ValueError, match="connectivity 18"):
        pp.PostprocessConfig(connectivity=18)
    with pytest.raises(ValueError, match="et_min_voxels 0"):
        pp.PostprocessConfig(et_min_voxels=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pp.load(tmp_path / "missing.json")


def _tuning_cases():
    """Case A: a 27-voxel tumour (8 ET) and a 9-voxel false island; case B: a 27-voxel NCR
    tumour without ET, predicted with 2 spurious ET voxels."""
    gt_a = np.zeros((14, 14, 14), np.int32)
    gt_a[2:5, 2:5, 2:5] = 2  # 27 voxels
    gt_a[2:4, 2:4, 2:4] = 3  # 8 of them ET
    pred_a = gt_a.copy()
    pred_a[9:12, 9:12, 9] = 2  # a 9-voxel false-positive island
    gt_b = np.zeros((14, 14, 14), np.int32)
    gt_b[5:8, 5:8, 5:8] = 1  # 27 voxels NCR, no ET
    pred_b = gt_b.copy()
    pred_b[6, 6, 6] = pred_b[6, 6, 7] = 3  # 2 voxels of spurious ET inside the core
    return [pred_a, pred_b], [gt_a, gt_b]


def test_tuning_picks_island_removal_and_et_relabelling():
    preds, gts = _tuning_cases()
    cands = pp.TuningCandidates(
        min_component_voxels=(5, 20, 30), connectivities=(26,), et_min_voxels=(2, 3, 100)
    )
    tuned = pp.tune_postprocessing(preds, gts, cands)
    # before: A: WT 2*27/(27+36), TC = ET = 1; B: WT = TC = 1, ET 0 (predicted, absent in GT)
    before = np.mean([(54 / 63 + 2) / 3, 2 / 3])
    assert tuned.score_before == pytest.approx(before)
    # 20 voxels: the island goes, the tumours (27) stay (30 would remove them; largest-only
    # ties with 20 and is more aggressive); ET below 3 voxels: B's 2 spurious voxels -> NCR,
    # A's 8 ET voxels stay (100 would relabel them too)
    assert tuned.config == pp.PostprocessConfig(min_component_voxels=20, et_min_voxels=3)
    assert tuned.score_after == pytest.approx(1.0)
    after = [
        pp.mean_region_dice(pp.apply(p, tuned.config), g) for p, g in zip(preds, gts, strict=True)
    ]
    assert np.mean(after) == pytest.approx(1.0)  # `apply` agrees with the tuning's shortcut
    tried = [c["min_component_voxels"] for c, _ in tuned.trials[1:4]]
    assert tried == [5, 20, 30]


def test_tuning_leaves_a_step_off_when_it_lowers_dice():
    preds, gts = _tuning_cases()
    cands = pp.TuningCandidates(
        min_component_voxels=(30,), largest_component=False, et_min_voxels=(100,)
    )
    # case A alone: removing components < 30 voxels empties it, relabelling its 8 ET voxels
    # costs its ET Dice
    tuned = pp.tune_postprocessing(preds[:1], gts[:1], cands)
    assert tuned.config == pp.PostprocessConfig()  # both steps lower the objective: off
    assert tuned.score_after == tuned.score_before


def test_from_config_fields_zero_means_off_and_old_configs_get_identity():
    from configs import default

    c = default.get_config()
    assert pp.from_config(c).is_identity  # the defaults change nothing
    with c.unlocked():
        c.postprocess.min_component_voxels = 3
        c.postprocess.connectivity = 6
        c.postprocess.et_min_voxels = 5
    got = pp.from_config(c)
    assert got == pp.PostprocessConfig(min_component_voxels=3, connectivity=6, et_min_voxels=5)
    v, tumour = _tumour_with_islands()  # 2 ET voxels < 5: relabelled NCR; islands dropped
    want = np.where(tumour == 3, 1, tumour)
    np.testing.assert_array_equal(pp.apply(v, got), want)
    # a run folder's config.json (a dict) from before the fields existed
    assert pp.from_config({"model": {}, "data": {}}).is_identity
    with pytest.raises(ValueError, match="postprocess.*connectivity 5"):
        pp.from_config({"postprocess": {"connectivity": 5}})
