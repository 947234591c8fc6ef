"""Post-processing edge cases (`inference/postprocess.py`): the config's checks and
equivalences, stored files that are not what `save` writes, and boundary sizes."""

import json

import numpy as np
import pytest

from brats_jax.inference import postprocess as pp


def _message(fn, *args, **kw):
    with pytest.raises(ValueError) as err:
        fn(*args, **kw)
    return str(err.value)


def test_config_field_errors_exact():
    assert _message(pp.PostprocessConfig, connectivity=18) == "connectivity 18: expected 6 or 26"
    for name, v in (("min_component_voxels", 0), ("et_min_voxels", True),
                    ("et_min_voxels", 2.0), ("min_component_voxels", -3)):  # fmt: skip
        assert _message(pp.PostprocessConfig, **{name: v}) == (
            f"{name} {v!r}: expected a positive whole number of voxels"
        )
    assert _message(pp.PostprocessConfig, largest_component_only=1) == (
        "largest_component_only 1: expected true/false"
    )
    pp.PostprocessConfig(min_component_voxels=1, et_min_voxels=1)  # 1 is allowed


def test_identity_and_effective_equivalence():
    assert not pp.PostprocessConfig(min_component_voxels=5).is_identity
    assert not pp.PostprocessConfig(largest_component_only=True).is_identity
    assert not pp.PostprocessConfig(et_min_voxels=5).is_identity
    assert pp.PostprocessConfig(connectivity=6).is_identity
    assert pp.PostprocessConfig(connectivity=6).effective() == pp.PostprocessConfig()
    both = pp.PostprocessConfig(min_component_voxels=9, largest_component_only=True,
                                connectivity=6, et_min_voxels=4)  # fmt: skip
    assert both.effective() == pp.PostprocessConfig(
        largest_component_only=True, connectivity=6, et_min_voxels=4
    )
    size = pp.PostprocessConfig(min_component_voxels=9, connectivity=6)
    assert size.effective() == size


def test_from_dict_and_load_errors_name_the_source(tmp_path):
    assert _message(pp.PostprocessConfig.from_dict, [1], where="w") == (
        "w: expected a JSON object of thresholds, got [1]"
    )
    assert _message(pp.PostprocessConfig.from_dict, {"a": 1, "connectivity": 6}, where="w") == (
        "w: unknown field(s) ['a']; expected ['connectivity', 'et_action', 'et_min_mm3', "
        "'et_min_voxels', 'largest_component_only', 'min_component_voxels', 'tc_action', "
        "'tc_min_mm3']"
    )
    assert _message(pp.PostprocessConfig.from_dict, {"connectivity": 4}) == (
        "post-processing config: connectivity 4: expected 6 or 26"
    )
    path = tmp_path / "p.json"
    path.write_text("{not json")
    assert _message(pp.load, path).startswith(f"{path}: not valid JSON (")
    path.write_text(json.dumps({"tuning": {}}))
    assert _message(pp.load, path) == (
        f"{path}: expected a JSON object with a 'postprocessing' entry"
    )
    path.write_text(json.dumps([1, 2]))
    assert "expected a JSON object with a 'postprocessing' entry" in _message(pp.load, path)
    path.write_text(json.dumps({"postprocessing": {"et_min_voxels": 0}}))
    assert _message(pp.load, path) == (
        f"{path}: et_min_voxels 0: expected a positive whole number of voxels"
    )
    pp.save(path, pp.PostprocessConfig(et_min_voxels=3))
    assert json.loads(path.read_text())["tuning"] == {}


def test_from_config_reads_a_plain_dict_section():
    got = pp.from_config(
        {
            "postprocess": {
                "min_component_voxels": 0,
                "et_min_voxels": 7,
                "largest_component_only": False,
                "connectivity": 6,
            }
        }
    )
    assert got == pp.PostprocessConfig(connectivity=6, et_min_voxels=7)
    with pytest.raises(ValueError, match="^config postprocess: unknown field"):
        pp.from_config({"postprocess": {"min_voxels": 3}})


def test_filter_components_shapes_and_empty_volumes():
    assert _message(pp.filter_components, np.zeros((4, 4)), min_voxels=2) == (
        "expected a 3-D label volume (H, W, D), got shape (4, 4)"
    )
    assert _message(pp.label_components, np.zeros((2, 2, 2)), 18) == (
        "connectivity 18: expected 6 or 26"
    )
    empty = np.zeros((3, 3, 3), np.int32)
    assert not pp.filter_components(empty, largest_only=True).any()
    v = np.zeros((3, 3, 3), np.int32)
    v[0, 0, 0] = 2
    out = pp.filter_components(v)  # neither rule: an unchanged copy
    out[0, 0, 0] = 0
    assert v[0, 0, 0] == 2
    comps, sizes = pp.label_components(v)
    assert sizes.tolist() == [0, 1] and comps.dtype.kind == "i"


def test_largest_component_ties_keep_the_first_in_scan_order():
    v = np.zeros((5, 5, 5), np.int32)
    v[0, 0, 0] = v[0, 0, 1] = 2  # first component, 2 voxels
    v[4, 4, 3] = v[4, 4, 4] = 1  # second, 2 voxels
    out = pp.filter_components(v, largest_only=True)
    np.testing.assert_array_equal(np.argwhere(out), [[0, 0, 0], [0, 0, 1]])


def test_et_relabelling_boundaries():
    v = np.zeros((4, 4, 4), np.int32)
    v[0, 0, :3] = 3
    v[1, 1, 1] = 2
    assert (pp.relabel_small_et(v, 3) == v).all()  # 3 ET voxels: not fewer than 3
    out = pp.relabel_small_et(v, 4)
    assert (out[0, 0, :3] == 1).all() and out[1, 1, 1] == 2 and v[0, 0, 0] == 3
    no_et = np.where(v == 3, 0, v)
    assert (pp.relabel_small_et(no_et, 100) == no_et).all()
    # apply: the ET step alone leaves the components as they are
    islands = v.copy()
    islands[3, 3, 3] = 2
    got = pp.apply(islands, pp.PostprocessConfig(et_min_voxels=4))
    assert got[3, 3, 3] == 2 and (got[0, 0, :3] == 1).all()


def test_tuning_input_errors_and_logs():
    a = np.zeros((3, 3, 3), np.int32)
    assert _message(pp.tune_postprocessing, [], []) == (
        "0 predictions, 0 ground truths: expected >= 1 each"
    )
    assert _message(pp.tune_postprocessing, [a, a], [a]) == (
        "2 predictions, 1 ground truths: expected >= 1 each"
    )
    assert _message(pp.tune_postprocessing, [a], [np.zeros((3, 3, 2), np.int32)]) == (
        "case 0: prediction (3, 3, 3) and ground truth (3, 3, 2) differ"
    )
    assert _message(pp.tune_postprocessing, [a[0]], [a[0]]) == (
        "case 0: prediction (3, 3) and ground truth (3, 3) differ"
    )
    lines = []
    gt = np.zeros((6, 6, 6), np.int32)
    gt[1:4, 1:4, 1:4] = 2
    cands = pp.TuningCandidates(min_component_voxels=(30,), largest_component=False,
                                connectivities=(26,), et_min_voxels=())  # fmt: skip
    tuned = pp.tune_postprocessing([gt], [gt], cands, log=lines.append)
    assert tuned.config == pp.PostprocessConfig()
    # removing the only (ED) component: WT Dice 0, TC and ET empty in both (1): 2/3
    # the TC / ET component steps have no candidates (TuningCandidates' defaults): off
    assert lines == [
        "components: off (best option: 0.6667)",
        "TC components: off (best option: none)",
        "ET components: off (best option: none)",
        "ET relabelling: off (best option: none)",
    ]
    assert [c for c, _ in tuned.trials] == [
        pp.PostprocessConfig().to_dict(),
        pp.PostprocessConfig(min_component_voxels=30).to_dict(),
    ]


def test_mean_region_dice_by_hand():
    gt = np.array([0, 1, 2, 3, 3]).reshape(5, 1, 1)
    pred = np.array([0, 2, 2, 3, 0]).reshape(5, 1, 1)
    # WT: tp 3, fn 1 -> 6/7; TC {1,3}: tp 1 (voxel 3), fn 2 -> 2/4; ET: tp 1, fn 1 -> 2/3
    assert pp.mean_region_dice(pred, gt) == pytest.approx((6 / 7 + 0.5 + 2 / 3) / 3)
    z = np.zeros((2, 1, 1), np.int32)
    assert pp.mean_region_dice(z, z) == 1.0


def test_connectivity_6_splits_an_edge_pair_and_filtering_needs_a_rule():
    v = np.zeros((4, 4, 3), np.int32)
    v[1, 1, 1] = v[2, 2, 1] = 2  # the two voxels share an edge only
    _, six = pp.label_components(v, 6)
    _, full = pp.label_components(v, 26)
    assert six.tolist() == [0, 1, 1] and full.tolist() == [0, 2]
    v[0, 3, 2] = 1  # a third voxel, touching neither
    np.testing.assert_array_equal(pp.filter_components(v), v)  # no rule: nothing removed


def _cube(shape=(7, 7, 7)):
    v = np.zeros(shape, np.int32)
    v[1:4, 1:4, 1:4] = 2
    return v


def test_tuning_ties_adopt_the_least_aggressive_option_and_log_it():
    gt = _cube()
    lines = []
    cands = pp.TuningCandidates(min_component_voxels=(2, 5), largest_component=False,
                                connectivities=(6,), et_min_voxels=(50, 2))  # fmt: skip
    tuned = pp.tune_postprocessing([gt], [gt], cands, log=lines.append)
    # nothing to remove, no ET: every option ties with "off" and the smallest is adopted
    assert tuned.config == pp.PostprocessConfig(min_component_voxels=2, connectivity=6,
                                                et_min_voxels=2)  # fmt: skip
    assert lines == [
        f"components: {pp.PostprocessConfig(min_component_voxels=2, connectivity=6)} -> mean "
        "Dice 1.0000 -> 1.0000",
        "TC components: off (best option: none)",
        "ET components: off (best option: none)",
        f"ET relabelling: {tuned.config} -> mean Dice 1.0000 -> 1.0000",
    ]
    configs = [c for c, _ in tuned.trials]
    assert configs[1:3] == [
        pp.PostprocessConfig(min_component_voxels=v, connectivity=6).to_dict() for v in (2, 5)
    ]
    assert [c["et_min_voxels"] for c in configs[3:]] == [2, 50]
    assert all(s == 1.0 for _, s in tuned.trials)


def test_tuning_tries_every_connectivity_with_its_own_components():
    gt = _cube()
    pred = gt.copy()
    pred[4, 4, 4] = 2  # touches the cube at a corner only: its own component at 6
    cands = pp.TuningCandidates(min_component_voxels=(2,), largest_component=True,
                                connectivities=(26, 6), et_min_voxels=())  # fmt: skip
    tuned = pp.tune_postprocessing([pred], [gt], cands)
    assert [c for c, _ in tuned.trials[1:]] == [
        pp.PostprocessConfig(min_component_voxels=2).to_dict(),
        pp.PostprocessConfig(largest_component_only=True).to_dict(),
        pp.PostprocessConfig(min_component_voxels=2, connectivity=6).to_dict(),
        pp.PostprocessConfig(largest_component_only=True, connectivity=6).to_dict(),
    ]
    assert [s for _, s in tuned.trials[1:]] == pytest.approx([tuned.score_before] * 2 + [1.0] * 2)
    assert tuned.config == pp.PostprocessConfig(min_component_voxels=2, connectivity=6)


def test_tuning_without_component_options_says_none():
    lines = []
    cands = pp.TuningCandidates(min_component_voxels=(), largest_component=False,
                                et_min_voxels=())  # fmt: skip
    gt = _cube()
    pp.tune_postprocessing([gt], [gt], cands, log=lines.append)
    assert lines[0] == "components: off (best option: none)"


def test_mean_region_dice_of_disjoint_et_voxels_is_zero():
    gt = np.array([3, 0, 1]).reshape(3, 1, 1)
    pred = np.array([0, 3, 1]).reshape(3, 1, 1)
    # WT: tp 1 (voxel 2), fp 1, fn 1 -> 1/2; TC: the same; ET: tp 0, fp 1, fn 1 -> 0
    assert pp.mean_region_dice(pred, gt) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
