"""Per-region post-processing (TC / ET components below a volume in mm^3, relabelled or
removed), its config fields and JSON, its tuning for the lesion-wise objective, and the
spacing that predict, evaluate and the test pass give it. Expected volumes are written by
hand, voxel by voxel; expected scores are hand-computed fractions."""

import csv
import json
import pathlib
import runpy
import types

import nibabel as nib
import numpy as np
import pytest

from brats_jax.inference import postprocess as pp

ANISO = (1.0, 1.0, 2.5)  # a voxel is 2.5 mm^3
SCRIPT = pathlib.Path(__file__).parents[2] / "examples" / "segment_with_onnxruntime.py"


def _two_islands(label):
    """ED block with two separate islands of `label`: A, 4 voxels (10 mm^3 at ANISO) and B, 6
    voxels (15 mm^3 at ANISO); returns (volume, A's index, B's index)."""
    v = np.zeros((8, 8, 7), np.int32)
    v[1:6, 1:6, 1:6] = 2
    a = np.s_[2:4, 2:4, 2]  # 2 x 2 x 1
    b = np.s_[1:4, 1:3, 4]  # 3 x 2 x 1, two slices above A: not touching
    v[a] = label
    v[b] = label
    return v, a, b


@pytest.mark.parametrize("region, label, relabelled", [("tc", 1, 2), ("et", 3, 1)])
def test_the_volume_rule_is_in_mm3_not_voxels(region, label, relabelled):
    """Bug caught: sizes compared in voxels (or the spacing ignored): at 2.5 mm slices a
    12 mm^3 threshold takes the 4-voxel island (10 mm^3) and keeps the 6-voxel one (15 mm^3);
    a voxel count (4 and 6 < 12) takes both, as 1 mm isotropic spacing does."""
    v, a, b = _two_islands(label)
    cfg = pp.PostprocessConfig(**{f"{region}_min_mm3": 12})
    want = v.copy()
    want[a] = relabelled
    np.testing.assert_array_equal(pp.apply(v, cfg, ANISO), want)
    want[b] = relabelled  # at 1 mm: 4 and 6 mm^3, both below 12
    np.testing.assert_array_equal(pp.apply(v, cfg), want)
    np.testing.assert_array_equal(pp.apply(v, cfg, (1.0, 1.0, 1.0)), want)
    # the threshold itself is kept (below, not at): 10 mm^3 stays at 10
    at = pp.PostprocessConfig(**{f"{region}_min_mm3": 10})
    np.testing.assert_array_equal(pp.apply(v, at, ANISO), v)


def _core_with_island(island):
    """ED block (rows/cols 1..6, z 1..5) around a TC core: NCR rows/cols 2..4, z 2..3, with 6
    ET voxels (15 mm^3 at ANISO); plus `island` {(x, y, z): label} two voxels from the core."""
    v = np.zeros((9, 9, 8), np.int32)
    v[1:7, 1:7, 1:6] = 2
    v[2:5, 2:5, 2:4] = 1
    v[3, 2:5, 2:4] = 3
    for xyz, label in island.items():
        v[xyz] = label
    return v


def _masks(v):
    return {r: np.isin(v, c) for r, c in (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,)))}


@pytest.mark.parametrize("action", ["relabel", "remove"])
def test_tc_island_relabelled_ed_or_removed(action):
    """Bug caught: the TC action swapped or its class wrong (NCR instead of ED, ET kept), or
    ED counted into TC components. A 2-voxel TC island (NCR + ET, 5 mm^3) below 10 mm^3:
    "relabel" -> both voxels ED (WT as before, TC and ET lose it), "remove" -> 0 (WT too).
    The core (18 voxels, 45 mm^3) stays."""
    island = {(6, 6, 4): 3, (6, 6, 5): 1}
    v = _core_with_island(island)
    out = pp.apply(v, pp.PostprocessConfig(tc_min_mm3=10, tc_action=action), ANISO)
    want = v.copy()
    want[6, 6, 4] = want[6, 6, 5] = 2 if action == "relabel" else 0
    np.testing.assert_array_equal(out, want)
    masks, before = _masks(out), _masks(v)
    core = _masks(_core_with_island({(6, 6, 4): 2, (6, 6, 5): 2}))  # by hand: island as ED
    np.testing.assert_array_equal(masks["TC"], core["TC"])
    np.testing.assert_array_equal(masks["ET"], core["ET"])
    wt = before["WT"].copy()
    if action == "remove":
        wt[6, 6, 4] = wt[6, 6, 5] = False
    np.testing.assert_array_equal(masks["WT"], wt)


@pytest.mark.parametrize("action", ["relabel", "remove"])
def test_et_island_relabelled_ncr_or_removed(action):
    """Bug caught: the ET action swapped or its class wrong. A 1-voxel ET island in the ED
    (2.5 mm^3 < 10): "relabel" -> NCR (it joins TC), "remove" -> 0 (it leaves WT); the
    core's 6 ET voxels (15 mm^3) stay ET."""
    v = _core_with_island({(6, 6, 4): 3})
    out = pp.apply(v, pp.PostprocessConfig(et_min_mm3=10, et_action=action), ANISO)
    want = v.copy()
    want[6, 6, 4] = 1 if action == "relabel" else 0
    np.testing.assert_array_equal(out, want)
    masks = _masks(out)
    assert masks["ET"].sum() == 6 and masks["ET"][3, 2:5, 2:4].all()
    assert masks["TC"][6, 6, 4] == (action == "relabel")
    assert masks["WT"][6, 6, 4] == (action == "relabel")
    assert masks["WT"].sum() == 6 * 6 * 5 - (action == "remove")


def test_region_components_use_the_configs_connectivity():
    """Bug caught: the TC / ET components labelled at a fixed connectivity. Two diagonal NCR
    voxels: one 2-voxel component at 26 (2 mm^3, kept at 2), two 1-voxel ones at 6 (ED)."""
    v = np.zeros((5, 5, 5), np.int32)
    v[1:4, 1:4, 1:4] = 2
    v[1, 1, 1] = v[2, 2, 2] = 1
    np.testing.assert_array_equal(pp.apply(v, pp.PostprocessConfig(tc_min_mm3=2)), v)
    six = pp.apply(v, pp.PostprocessConfig(tc_min_mm3=2, connectivity=6))
    np.testing.assert_array_equal(six, np.where(v == 1, 2, v))
    assert pp.PostprocessConfig(tc_min_mm3=2, connectivity=6).effective().connectivity == 6


def test_steps_run_whole_tumour_then_tc_then_et_then_total_et():
    """Bug caught: any two steps swapped in `apply`. Each volume is a line of voxels (1 mm)."""
    # WT before TC: ED ED ED NCR ED ED is one component (kept by largest-only); the 1-voxel
    # TC is removed after, leaving both ED pieces (TC first would split the WT and drop 2)
    v = np.zeros((3, 10, 3), np.int32)
    v[1, 1:7, 1] = [2, 2, 2, 1, 2, 2]
    cfg = pp.PostprocessConfig(largest_component_only=True, tc_min_mm3=2, tc_action="remove")
    np.testing.assert_array_equal(pp.apply(v, cfg)[1, :, 1], [0, 2, 2, 2, 0, 2, 2, 0, 0, 0])
    # TC before ET: NCR NCR NCR ET NCR NCR NCR is one 7-voxel TC component (kept at 5); the
    # 1-voxel ET is removed after (ET first would split TC into two 3-voxel ones -> ED)
    v[1, 1:8, 1] = [1, 1, 1, 3, 1, 1, 1]
    cfg = pp.PostprocessConfig(tc_min_mm3=5, et_min_mm3=2, et_action="remove")
    np.testing.assert_array_equal(pp.apply(v, cfg)[1, :, 1], [0, 1, 1, 1, 0, 1, 1, 1, 0, 0])
    # ET components before the total-ET count: ET 4 + ET 2 (apart); the 2-voxel component
    # goes (< 3 mm^3), then 4 ET voxels < 5 -> all NCR (the count first would see 6 >= 5)
    v[1, :, 1] = [3, 3, 3, 3, 2, 2, 3, 3, 0, 0]
    cfg = pp.PostprocessConfig(et_min_mm3=3, et_action="remove", et_min_voxels=5)
    np.testing.assert_array_equal(pp.apply(v, cfg)[1, :, 1], [1, 1, 1, 1, 2, 2, 0, 0, 0, 0])


def test_defaults_and_actions_without_a_threshold_change_nothing():
    """Bug caught: a region rule on by default, an action acting without its threshold, or
    `is_identity` / `effective` blind to the new fields."""
    v, _, _ = _two_islands(3)
    v[6, 6, 6] = 1  # a 1-voxel TC component too
    for cfg in (
        pp.PostprocessConfig(),
        pp.PostprocessConfig(tc_action="remove", et_action="remove"),
    ):
        assert cfg.is_identity
        np.testing.assert_array_equal(pp.apply(v, cfg, ANISO), v)
        assert cfg.effective() == pp.PostprocessConfig()
    assert not pp.PostprocessConfig(tc_min_mm3=1).is_identity
    assert not pp.PostprocessConfig(et_min_mm3=1).is_identity
    assert pp.PostprocessConfig(et_min_mm3=1, et_action="remove").effective() != (
        pp.PostprocessConfig(et_min_mm3=1).effective()
    )
    assert pp.PostprocessConfig(tc_min_mm3=5, connectivity=6).effective() != (
        pp.PostprocessConfig(tc_min_mm3=5).effective()
    )


def test_old_json_loads_and_the_new_fields_round_trip(tmp_path):
    """Bug caught: the new fields required on load, or written when off (files of old rules
    would change and older versions could not read them), or lost on the way."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"postprocessing": {
        "min_component_voxels": None, "largest_component_only": True, "connectivity": 26,
        "et_min_voxels": 300}, "tuning": {}}))  # fmt: skip
    got = pp.load(old)
    assert got == pp.PostprocessConfig(largest_component_only=True, et_min_voxels=300)
    assert (got.tc_min_mm3, got.tc_action, got.et_min_mm3, got.et_action) == (
        None, "relabel", None, "relabel"
    )  # fmt: skip
    new = tmp_path / "new.json"
    cfg = pp.PostprocessConfig(tc_min_mm3=25, tc_action="remove")
    pp.save(new, cfg)
    assert json.loads(new.read_text())["postprocessing"] == {
        "min_component_voxels": None,
        "largest_component_only": False,
        "connectivity": 26,
        "et_min_voxels": None,
        "tc_min_mm3": 25.0,
        "tc_action": "remove",
    }
    assert pp.load(new) == cfg
    pp.save(new, pp.PostprocessConfig(et_min_mm3=12.5))
    stored = json.loads(new.read_text())["postprocessing"]
    assert (stored["et_min_mm3"], stored["et_action"]) == (12.5, "relabel")
    assert "tc_min_mm3" not in stored and "tc_action" not in stored
    assert pp.load(new) == pp.PostprocessConfig(et_min_mm3=12.5)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tc_min_mm3": 0}, "tc_min_mm3 0: expected a positive volume in mm^3"),
        ({"et_min_mm3": -5.0}, "et_min_mm3 -5.0: expected a positive volume in mm^3"),
        ({"et_min_mm3": float("nan")}, "et_min_mm3 nan: expected a positive volume"),
        ({"tc_min_mm3": "50"}, "tc_min_mm3 '50': expected a positive volume"),
        ({"tc_min_mm3": True}, "tc_min_mm3 True: expected a positive volume"),
        ({"tc_action": "delete"}, "tc_action 'delete': expected 'relabel' or 'remove'"),
        ({"et_action": None}, "et_action None: expected 'relabel' or 'remove'"),
    ],
)
def test_bad_field_values_are_one_line_errors_naming_the_field(tmp_path, fields, message):
    """Bug caught: a bad value accepted (e.g. a zero threshold, a misspelt action that would
    silently remove) or an error that does not name the field."""
    with pytest.raises(ValueError) as e:
        pp.PostprocessConfig(**fields)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"postprocessing": fields}))
    with pytest.raises(ValueError, match=f"^{path}: {message.split(' ')[0]}") as e:
        pp.load(path)
    assert "\n" not in str(e.value)


def test_run_config_fields_zero_off_and_read():
    """Bug caught: a `postprocess.*_mm3` / `*_action` field not read (or 0 not "off")."""
    from configs import default

    c = default.get_config()
    assert pp.from_config(c).is_identity
    with c.unlocked():
        c.postprocess.tc_min_mm3 = 25
        c.postprocess.tc_action = "remove"
        c.postprocess.et_action = "remove"  # et_min_mm3 0: off
    assert pp.from_config(c) == pp.PostprocessConfig(
        tc_min_mm3=25.0, tc_action="remove", et_action="remove"
    )
    with c.unlocked():
        c.postprocess.et_min_mm3 = 7.5
    assert pp.from_config(c).et_min_mm3 == 7.5
    with pytest.raises(ValueError, match="^config postprocess: tc_action 'drop'"):
        pp.from_config({"postprocess": {"tc_min_mm3": 5, "tc_action": "drop"}})
    # a training run refuses a bad field before it trains, not at its test pass
    from brats_jax.training import run_group

    with c.unlocked():
        c.postprocess.et_action = "drop"
    with pytest.raises(ValueError, match="et_action 'drop'"):
        run_group._check_config(c)


# ------------------------------------------------------------------------------------------
# tuning
# ------------------------------------------------------------------------------------------
def _tuning_cases():
    """At ANISO spacing. Case 1: a 5x5x5 tumour (125 voxels) whose 3x3x3 core is ET (67.5
    mm^3, a kept lesion), predicted exactly, plus a far 2-voxel ET island (5 mm^3). Case 2: a
    5x5x5 tumour, 3x3x3 NCR core holding 4 ET voxels (10 mm^3: a lesion the challenge
    ignores, <= 50 mm^3), predicted exactly."""
    gt1 = np.zeros((20, 20, 12), np.int32)
    gt1[2:7, 2:7, 2:7] = 2
    gt1[3:6, 3:6, 3:6] = 3
    pred1 = gt1.copy()
    pred1[16, 16, 9:11] = 3
    gt2 = np.zeros((20, 20, 12), np.int32)
    gt2[2:7, 2:7, 2:7] = 2
    gt2[3:6, 3:6, 3:6] = 1
    gt2[3:5, 3:5, 4] = 3
    return [pred1, gt2.copy()], [gt1, gt2]


ET_ONLY = pp.TuningCandidates(
    min_component_voxels=(), largest_component=False, et_min_voxels=(), et_min_mm3=(20,)
)


def test_lesionwise_objective_removes_a_false_positive_et_island_dice_does_not():
    """Bug caught: the lesion-wise objective not used (or scored at 1 mm, or the ET step not
    searched). Removing ET components < 20 mm^3 drops case 1's false-positive island but
    also case 2's true 10 mm^3 ET. Voxel Dice (mean over WT/TC/ET, then cases):
      before: ((250/252 + 54/56 + 54/56) / 3 + 1) / 2;
      relabel: ((250/252 + 54/56 + 1) / 3 + (1 + 1 + 0) / 3) / 2  (ET 0 in case 2);
      remove:  (1 + (242/246 + 46/50 + 0) / 3) / 2  -> both lower: off.
    Lesion-wise Dice (the island is an FP in every region; case 2's ET lesion is ignored):
      before: ((1/2 + 1/2 + 1/2) / 3 + 1) / 2 = 0.75 (HD95 (187 + 0) / 2 = 93.5 mm);
      relabel (the island stays NCR: a WT and TC FP): ((1/2 + 1/2 + 1) / 3 + 1) / 2 = 5/6;
      remove: (1 + (242/246 + 46/50 + 1) / 3) / 2 -> remove is chosen."""
    preds, gts = _tuning_cases()
    spacings = [ANISO, ANISO]
    dice = pp.tune_postprocessing(preds, gts, ET_ONLY, spacings=spacings)
    before = ((250 / 252 + 2 * 54 / 56) / 3 + 1) / 2
    assert dice.config == pp.PostprocessConfig()
    assert dice.score_before == dice.score_after == pytest.approx(before)
    assert [c.get("et_action") for c, _ in dice.trials] == [None, "relabel", "remove"]
    assert [s for _, s in dice.trials] == pytest.approx([
        before,
        ((250 / 252 + 54 / 56 + 1) / 3 + 2 / 3) / 2,
        (1 + (242 / 246 + 46 / 50) / 3) / 2,
    ])  # fmt: skip
    lw = pp.tune_postprocessing(preds, gts, ET_ONLY, objective="lesionwise", spacings=spacings)
    remove = (1 + (242 / 246 + 46 / 50 + 1) / 3) / 2
    assert lw.config == pp.PostprocessConfig(et_min_mm3=20, et_action="remove")
    assert [s for _, s in lw.trials] == pytest.approx([0.75, 5 / 6, remove])
    assert (lw.score_before, lw.score_after) == pytest.approx((0.75, remove))
    assert lw.hd95_before == pytest.approx(93.5)
    assert lw.trials_hd95[1] == pytest.approx((374 / 3 + 0) / 2)  # relabel: 2 FPs of 3
    # applying the choice gives the tuned objective
    outs = [pp.apply(p, lw.config, s) for p, s in zip(preds, spacings, strict=True)]
    np.testing.assert_array_equal(outs[0], gts[0])


def test_a_region_rule_that_changes_nothing_is_not_adopted():
    """Bug caught: the TC / ET steps adopting a rule on a tie with "off" (as the whole-tumour
    and total-ET steps do). Cases predicted exactly whose ET lesions are all above 20 mm^3:
    every TC / ET option (thresholds 5 and 20 mm^3, both actions) scores what "off" scores,
    so the region rules stay off; the whole-tumour step still adopts its tied least
    aggressive option (min_component_voxels 50), as nnU-Net's rule does."""
    gt = np.zeros((20, 20, 12), np.int32)
    gt[2:7, 2:7, 2:7] = 2
    gt[3:6, 3:6, 3:6] = 3  # 27 voxels: 67.5 mm^3 at ANISO
    candidates = pp.TuningCandidates(
        min_component_voxels=(50,), largest_component=False, et_min_voxels=(),
        tc_min_mm3=(5, 20), et_min_mm3=(5, 20),
    )  # fmt: skip
    for objective in ("dice", "lesionwise"):
        tuned = pp.tune_postprocessing(
            [gt.copy()], [gt], candidates, objective=objective, spacings=[ANISO]
        )
        assert tuned.config == pp.PostprocessConfig(min_component_voxels=50), objective
        assert tuned.score_before == tuned.score_after == pytest.approx(1.0)
        assert len(tuned.trials) == 1 + 2 + 4 + 4  # off, 2 connectivities, 2 x 2 per region


def test_lesionwise_ties_go_to_the_lower_hd95():
    """Bug caught: the HD95 tie-break missing or reversed. A stand-in objective gives four
    options (lesion-wise Dice, HD95): the best Dice is shared by the 2nd, 3rd and 4th; the 3rd
    has the lowest HD95 and wins although the 2nd comes first. Without HD95 (the Dice
    objective) the first of equal scores, the least aggressive, stays."""
    options = [(pp.PostprocessConfig(et_min_mm3=v), []) for v in (1, 2, 3, 4)]
    results = iter([(0.5, 10.0), (0.75, 50.0), (0.75, 20.0), (0.75, 30.0)])
    trials = []
    best = pp._best(iter(options), lambda outs: next(results), trials)
    assert best[0].et_min_mm3 == 3 and best[1] == (0.75, 20.0)
    assert [t[1:] for t in trials] == [(0.5, 10.0), (0.75, 50.0), (0.75, 20.0), (0.75, 30.0)]
    results = iter([(0.75, None), (0.75, None)])
    assert pp._best(iter(options[:2]), lambda outs: next(results), [])[0].et_min_mm3 == 1


# ------------------------------------------------------------------------------------------
# the spacing reaches the rule: predict, evaluate --apply_postprocessing, the test pass,
# the onnxruntime example
# ------------------------------------------------------------------------------------------
ANISO_AFFINE = np.diag([-1.0, -1.0, 2.5, 1.0])  # BraTS's voxel order, 2.5 mm slices
ET_RULE = {"et_min_mm3": 12.0, "et_action": "remove"}


def _et_islands(shape):
    """An ED block with ET islands A (4 voxels: 10 mm^3 at 2.5 mm slices, removed by
    ET_RULE) and B (6 voxels: 15 mm^3, kept; at 1 mm both would go); -> (labels, A, B)."""
    v = np.zeros(shape, np.int64)
    v[1:7, 1:7, 0:5] = 2
    a, b = np.s_[2:4, 2:4, 1], np.s_[2:5, 5:7, 3]
    v[a] = 3
    v[b] = 3
    return v, a, b


def test_predict_uses_the_cases_voxel_size(
    tmp_path, monkeypatch, stand_in_config, write_nifti_case
):
    """Bug caught: predict's post-processing at 1 mm (the header's zooms not passed): B
    would be removed too. A stand-in run whose config holds ET_RULE; its probabilities'
    argmax is `_et_islands`; the case's header has 2.5 mm slices; ET written as 4 (2018)."""
    from brats_jax.inference import case_prediction, whole_volume
    from brats_jax.runs import train_state

    config = stand_in_config(**{"data.image_size": 16, "postprocess": dict(ET_RULE)})
    model = types.SimpleNamespace(apply=lambda variables, x, train: x)
    monkeypatch.setattr(train_state, "load_trained", lambda w, step=None: (config, model, {}))
    labels, a, b = _et_islands((12, 10, 6))
    probs = np.eye(4, dtype=np.float32)[labels] * 0.6 + 0.1
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *args, **kw: probs)
    (tmp_path / "run").mkdir()
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=1, affine=ANISO_AFFINE)
    out = case_prediction.predict_case(str(tmp_path / "run"), case, tmp_path / "seg.nii.gz")
    want = np.where(labels == 3, 4, labels)
    want[a] = 0
    np.testing.assert_array_equal(out, want)
    assert (out[b] == 4).all()


def test_evaluate_apply_postprocessing_uses_the_ground_truths_voxel_size(tmp_path, run_command):
    """Bug caught: evaluate's --apply_postprocessing at 1 mm. GT: the block with only B as
    ET; prediction: A and B. With ET_RULE at the files' 2.5 mm slices A goes and B stays:
    ET Dice 1 (at 1 mm both go: 0); A's 4 voxels leave WT: 2 x 176 / (180 + 176)."""
    from brats_jax import evaluate

    pred, a, _ = _et_islands((10, 10, 6))
    gt = pred.copy()
    gt[a] = 2
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    (gt_dir / "Brats18_A").mkdir(parents=True)
    pred_dir.mkdir()
    for arr, path in ((gt, gt_dir / "Brats18_A" / "Brats18_A_seg.nii.gz"),
                      (pred, pred_dir / "Brats18_A.nii.gz")):  # fmt: skip
        nib.save(nib.Nifti1Image(np.where(arr == 3, 4, arr).astype(np.int16), ANISO_AFFINE), path)
    cfg, out = tmp_path / "postprocessing.json", tmp_path / "m.csv"
    pp.save(cfg, pp.PostprocessConfig(**ET_RULE))
    run_command(
        evaluate,
        f"--pred={pred_dir}",
        f"--gt={gt_dir}",
        f"--out={out}",
        f"--apply_postprocessing={cfg}",
    )
    (row,) = csv.DictReader(out.open())
    assert float(row["dice_ET"]) == pytest.approx(1.0)
    assert float(row["dice_WT"]) == pytest.approx(2 * 176 / (180 + 176))


def test_the_test_pass_uses_the_sources_voxel_size(monkeypatch, stand_in_config):
    """Bug caught: the training's test pass post-processes at 1 mm. A stand-in run (source
    spacing 2.5 mm slices, config ET_RULE) whose prediction is `_et_islands` and whose label
    has only B as ET: ET Dice 1 (at 1 mm B goes too: 0)."""
    from brats_jax.training import evaluation

    pred, a, _ = _et_islands((10, 10, 6))
    label = pred.copy()
    label[a] = 2
    config = stand_in_config(**{"eval.hd95_mode": "max", "postprocess": dict(ET_RULE)})
    run = types.SimpleNamespace(
        source=types.SimpleNamespace(spacing=(1.0, 1.0, 2.5)),
        config=config,
        splits=types.SimpleNamespace(test=np.arange(6), cases={"test": ["A"]}),
    )
    image = np.zeros((10, 10, 6, 4), np.float32)
    monkeypatch.setattr(evaluation.data, "load_volume", lambda source, cid: (image, label))
    monkeypatch.setattr(evaluation.data, "case_indices", lambda source, cid: np.arange(6))
    onehot = np.eye(4, dtype=np.float32)[pred]
    monkeypatch.setattr(evaluation.whole_volume, "predict_volume", lambda *a, **k: onehot)
    results, _ = evaluation.evaluate_test_volumes(run, None, None)
    (row,) = results["per_case"]
    assert row["dice_ET"] == pytest.approx(1.0)
    assert results["postprocessing"]["et_min_mm3"] == 12.0


@pytest.mark.parametrize(
    "config",
    [
        {"tc_min_mm3": 12.0},
        {"tc_min_mm3": 12.0, "tc_action": "remove", "connectivity": 6},
        {"et_min_mm3": 12.0},
        {"et_min_mm3": 12.0, "et_action": "remove", "largest_component_only": True},
        {"tc_min_mm3": 30.0, "tc_action": "remove", "et_min_mm3": 8.0, "et_min_voxels": 30},
    ],
)
def test_example_script_applies_the_region_rules_like_the_library(config):
    """Bug caught: the onnxruntime example ignores or misapplies a TC / ET rule, its action,
    or the spacing (the volumes at 2.5 mm slices differ from voxel counts here)."""
    pytest.importorskip("onnxruntime", reason="the example imports onnxruntime")
    pytest.importorskip("scipy")
    example = runpy.run_path(str(SCRIPT))
    rng = np.random.default_rng(1)
    from scipy import ndimage

    blobs = ndimage.gaussian_filter(rng.standard_normal((24, 20, 12)), 1.2) > 0.1
    labels = np.where(blobs, rng.integers(1, 4, blobs.shape), 0)
    want = pp.apply(labels, pp.PostprocessConfig(**config), ANISO)
    meta = {**pp.PostprocessConfig().to_dict(), **config}  # as the export's JSON
    got = example["postprocess"](labels, meta, np.array(ANISO))
    np.testing.assert_array_equal(got, want)
    assert (want != labels).any()
    assert (want != pp.apply(labels, pp.PostprocessConfig(**config))).any()  # spacing matters


@pytest.mark.parametrize("min_voxels", [2, 10**6])
def test_example_script_keeps_the_largest_component_like_the_library(min_voxels):
    """Whole-tumour components below min_component_voxels go, except the largest, in both
    (bug caught: the example or the library empties a volume whose components are all below
    the threshold)."""
    pytest.importorskip("onnxruntime", reason="the example imports onnxruntime")
    example = runpy.run_path(str(SCRIPT))
    v = np.zeros((12, 12, 10), np.int32)
    v[2:5, 2:5, 2:5] = 2  # 27 voxels
    v[8:10, 8, 8] = 3  # 2 voxels
    v[10, 1, 1] = 1  # 1 voxel
    want = v.copy()
    want[10, 1, 1] = 0
    if min_voxels > 27:  # above every component: the 27-voxel one alone stays
        want[8:10, 8, 8] = 0
    meta = {**pp.PostprocessConfig().to_dict(), "min_component_voxels": min_voxels}
    got = example["postprocess"](v, meta, np.array((1.0, 1.0, 1.0)))
    np.testing.assert_array_equal(got, want)
    cfg = pp.PostprocessConfig(min_component_voxels=min_voxels)
    np.testing.assert_array_equal(pp.apply(v, cfg), want)


def test_example_script_reads_the_voxel_size_in_the_arrays_axis_order():
    """Bug caught: the header's zooms used in the file's axis order after reorienting to LPS.
    A RAS file with axes swapped (x: 2 mm along y, y: 1 mm, z 3 mm): LPS arrays are
    (1, 2, 3) mm, as nibabel's `as_reoriented` header says."""
    pytest.importorskip("onnxruntime", reason="the example imports onnxruntime")
    example = runpy.run_path(str(SCRIPT))
    affine = np.array([[0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    to_lps = nib.orientations.ornt_transform(
        nib.io_orientation(affine), nib.orientations.axcodes2ornt("LPS")
    )
    np.testing.assert_allclose(example["voxel_size"](image, to_lps), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("objective", ["dice", "lesionwise"])
def test_tune_command_objective_flag_and_auto_thresholds(
    tmp_path, monkeypatch, stand_in_config, write_nifti_case, objective, run_command
):
    """Bug caught: --objective not passed on, "auto" region thresholds wrong (lesionwise:
    REGION_MM3 x both actions for TC and ET; dice: none, as before), or the record without
    the objective / the HD95s. Trials: off, one component rule, 6 x 2 TC and 6 x 2 ET
    options (lesionwise only), one total-ET threshold."""
    from brats_jax import tune_postprocessing as tune
    from brats_jax.inference import whole_volume
    from brats_jax.runs import train_state

    config = stand_in_config(**{"data.image_size": 16})
    model = types.SimpleNamespace(apply=lambda variables, x, train: x)
    monkeypatch.setattr(train_state, "load_trained", lambda w, step=None: (config, model, {}))
    labels, a, _ = _et_islands((12, 10, 6))
    probs = np.eye(4, dtype=np.float32)[labels] * 0.6 + 0.1
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *args, **kw: probs)
    gt = np.where(labels == 3, 4, labels).astype(np.int16)
    gt[a] = 2
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=1, seg=gt)
    (tmp_path / "run").mkdir()
    run_command(
        tune,
        f"--workdir={tmp_path / 'run'}",
        f"--cases={case}",
        "--min_component_voxels=2",
        "--nolargest_component",
        "--connectivity=26",
        "--et_min_voxels=5",
        f"--objective={objective}",
    )
    stored = json.loads((tmp_path / "run" / pp.POSTPROCESSING_FILE).read_text())["tuning"]
    trials = stored["trials"]
    region = [tuple(t["config"].get(k) for k in ("tc_min_mm3", "tc_action", "et_min_mm3",
                                                 "et_action")) for t in trials]  # fmt: skip
    if objective == "dice":
        assert len(trials) == 3 and "lesion-wise" not in stored["objective"]
        assert "hd95" not in trials[0] and "hd95_after" not in stored
        return
    assert "lesion-wise Dice" in stored["objective"] and len(trials) == 27
    assert all("hd95" in t for t in trials) and stored["hd95_before"] >= stored["hd95_after"]
    tc = [(v, act) for v, act, *_ in region[2:14]]
    assert tc == [(v, act) for v in (10.0, 25.0, 50.0, 100.0, 200.0, 500.0)
                  for act in ("relabel", "remove")]  # fmt: skip
    assert [(v, act) for *_, v, act in region[14:26]] == tc
    with pytest.raises(ValueError, match=r"--tc_min_mm3='0,5': expected auto or"):
        tune._mm3("0,5", "tc_min_mm3")
    with pytest.raises(ValueError, match=r"--et_min_mm3='ten': expected auto or"):
        tune._mm3("ten", "et_min_mm3")
    with pytest.raises(ValueError, match=r"--et_actions='relabel,drop': expected relabel"):
        tune._actions("relabel,drop", "et_actions")


def test_exported_json_carries_the_region_rules_the_example_applies(tmp_path, stand_in_config):
    """Bug caught: the export's JSON without a region rule (or its action), so the example
    would skip or misapply it. The JSON of a run whose config holds a TC and an ET rule,
    read by the example at 2.5 mm slices, gives `postprocess.apply`'s labels."""
    pytest.importorskip("onnxruntime", reason="the example imports onnxruntime")
    from brats_jax.inference import onnx_export

    rules = {"tc_min_mm3": 12.0, "tc_action": "remove", "et_min_mm3": 16.0}
    config = stand_in_config(**{"postprocess": dict(rules)})
    block = json.loads(json.dumps(onnx_export.metadata(config, tmp_path)["postprocessing"]))
    assert {k: block[k] for k in rules} == rules and block["et_action"] == "relabel"
    assert "mm^3" in block["rule"] and "tc_action" in block["rule"]
    example = runpy.run_path(str(SCRIPT))
    labels, a, b = _et_islands((10, 10, 6))
    labels[8, 8, 5] = 1  # a 1-voxel TC island
    # by hand at 2.5 mm slices: TC components island (2.5 mm^3) and A (10) < 12 removed, B
    # (15) kept; then ET component B (15 mm^3) < 16 -> NCR
    want = labels.copy()
    want[8, 8, 5] = 0
    want[a] = 0
    want[b] = 1
    np.testing.assert_array_equal(pp.apply(labels, pp.PostprocessConfig(**rules), ANISO), want)
    np.testing.assert_array_equal(example["postprocess"](labels, block, ANISO), want)
