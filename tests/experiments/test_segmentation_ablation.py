"""experiments.analyses.segmentation_ablation: folds, run commands, cross-fold tuning, row
choice."""

import concurrent.futures
import json
import pathlib
import types

import numpy as np
import pytest

from brats_jax import metrics
from brats_jax.inference import postprocess
from experiments.analyses import segmentation_ablation as A

IDS = [f"case{i:02d}" for i in range(18)]


def test_folds_partition_the_cases_deterministically():
    folds = A.folds_of(IDS[::-1], 3)
    assert [len(f) for f in folds] == [6, 6, 6]
    assert sorted(c for f in folds for c in f) == IDS
    assert folds == A.folds_of(IDS, 3)  # order of the input does not matter


def test_train_command_holds_the_fold_and_the_variant(tmp_path):
    args = types.SimpleNamespace(
        out=tmp_path, config="configs/unet.py:cpu", set=["train.num_steps=4"]
    )
    cmd = A.train_command(args, "context_regions", 1, ["a", "b"], pathlib.Path("/c"))
    assert f"--workdir={tmp_path}/runs/context_regions-fold1" in cmd
    for flag in (
        "--config.data.test_cases=a,b",
        "--config.data.root=/c",
        "--config.data.context_slices=1",
        "--config.model.output=regions",
        "--config.train.num_steps=4",
        "--config.data.val_fraction=0.0",
    ):
        assert flag in cmd


def test_tuned_thresholds_of_a_fold_never_see_its_cases(monkeypatch):
    seen = []

    def fake_tune(preds, gts, spacings, objective):
        seen.append(sorted(int(g[0, 0, 0]) for g in gts))  # case numbers ride in the volumes
        return postprocess.PostprocessConfig(et_min_voxels=len(seen))

    monkeypatch.setattr(A, "_tune", fake_tune)
    ids = IDS[:6]
    folds = [ids[0:2], ids[2:4], ids[4:6]]
    gts = {c: np.full((2, 2, 2), i, np.uint8) for i, c in enumerate(ids)}
    preds = {"baseline": {"none": {c: gts[c] for c in ids}}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rows = A.plan_rows(preds, gts, folds, pool, log=lambda *a: None)
    assert [r["pp"] for r in rows] == ["none", "largest", "tuned"]
    assert seen == [[2, 3, 4, 5], [0, 1, 4, 5], [0, 1, 2, 3]]  # fold i's cases left out
    assert [c.et_min_voxels for c in rows[2]["configs"]] == [1, 2, 3]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        rows = A.plan_rows(preds, gts, folds, pool, log=lambda *a: None, tuned=False)
    assert [r["pp"] for r in rows] == ["none", "largest"] and len(seen) == 3  # none tuned


def _row(variant, dice, hd):
    per_case = [
        {"case_id": f"c{i}", "fold": i % 2, **{f"dice_{g}": d for g in A.REGIONS},
         **{f"hd95_{g}": h for g in A.REGIONS}}
        for i, (d, h) in enumerate(zip(dice, hd, strict=True))
    ]  # fmt: skip
    return {"variant": variant, "tta": "none", "pp": "none", "per_case": per_case}


def test_best_row_is_the_lowest_hd95_without_losing_dice():
    base = _row("baseline", [0.8, 0.8], [20, 10])
    worse_dice = _row("a", [0.7, 0.8], [1, 1])  # best HD95 but Dice below the baseline
    good = _row("b", [0.8, 0.9], [5, 5])
    better = _row("c", [0.85, 0.8], [4, 5])
    assert A.best_row([base, worse_dice, good, better]) is better
    md = A.markdown({"rows": [base, good], "folds": [["c0"], ["c1"]]})
    assert "| **b** | none | none | 0.850 ± 0.050 [0.800, 0.900]" in md  # mean, SD, range
    assert "0.800 / 0.900" in md and "5.0 / 5.0" in md  # fold means
    assert "Fold means (fold 0 / fold 1)" in md
    assert "Per case, b / TTA none / none" in md and "| c1 | 0.900 | 0.900 | 0.900 | 5.0" in md


def test_recipe_variants_are_the_segmentation_options_plus_one_part_each():
    """Each generalisation-recipe row is the segmentation options (`cpu` + 2.5D input + region
    outputs, `cpu_best`'s training fields until 2026-12-06) with one part of nnU-Net's recipe
    changed, and nothing else: its config diff against them is exactly the fields named here
    (values by hand from nnU-Net's 2D defaults), and it passes the run's own checks (a misspelt
    or out-of-range field would raise)."""
    from brats_jax import config_fields
    from brats_jax.data import augment
    from brats_jax.training import config_choices
    from configs import unet

    expected = {
        "cb_patches": {"data.image_size": 240, "data.patch_size": 128},
        "cb_spatial": {
            "augment.mirror_p": 0.5, "augment.rotation_p": 0.2, "augment.scale_p": 0.2,
        },
        "cb_intensity": {
            "augment.noise_p": 0.1, "augment.blur_p": 0.2, "augment.brightness_p": 0.15,
            "augment.contrast_p": 0.15, "augment.lowres_p": 0.25,
            "augment.gamma_inverted_p": 0.1, "augment.gamma_p": 0.3,
        },
        "cb_wide_contrast": {
            "augment.contrast_p": 0.15, "augment.contrast_min": 0.5, "augment.contrast_max": 2.0,
        },
        "cb_long": {"train.num_steps": 5000},
        "cb_instance_norm": {"model.norm": "instance"},
        "cb_deep_supervision": {"model.deep_supervision": True},
    }  # fmt: skip
    options = unet.get_config("cpu")
    config_fields.apply_overrides(options, {"data.context_slices": 1, "model.output": "regions"})
    for name, fields in expected.items():
        c = unet.get_config("cpu")
        config_fields.apply_overrides(c, A.VARIANTS[name])
        diff = {f: new for f, _, new in config_fields.config_diff(options.to_dict(), c.to_dict())}
        assert diff == fields, name
        config_choices.check_choices(c)
        augment.from_config(c)


def _scored_row(variant, dice, hd95, tta="none", pp="largest"):
    cases = [dict(case_id=f"c{i}", fold=i % 3) for i in range(6)]
    for c in cases:  # per-case values whose case means are `dice` and `hd95` in every region
        s = 1 if int(c["case_id"][1]) % 2 else -1
        c.update({f"dice_{g}": dice + 0.01 * s for g in A.REGIONS})
        c.update({f"hd95_{g}": hd95 - 0.5 * s for g in A.REGIONS})
    return dict(variant=variant, tta=tta, pp=pp, per_case=cases)


def test_recipe_rule_keeps_combines_and_chooses_as_declared():
    rows = [
        _scored_row("context_regions", 0.70, 10.0),
        _scored_row("context_regions", 0.60, 5.0, pp="none"),  # other rows are not the rule's
        _scored_row("cb_a", 0.71, 10.5),  # kept: +0.010 Dice, +0.5 mm
        _scored_row("cb_b", 0.704, 9.0),  # +0.004 Dice: not kept
        _scored_row("cb_c", 0.80, 11.5),  # +1.5 mm: not kept
        _scored_row("cb_d", 0.72, 9.0),  # kept, the best single row
        _scored_row("cb_b", 0.90, 1.0, tta="flips"),  # TTA rows are not the rule's
    ]
    c = A.recipe_choice(rows)
    assert c["kept"] == ["cb_a", "cb_d"] and c["combination"] == "cb_a+cb_d"
    assert c["choice"] == "cb_d"  # the combination is not scored yet
    assert A.recipe_choice(rows + [_scored_row("cb_a+cb_d", 0.716, 10.9)])["choice"] == "cb_a+cb_d"
    assert A.recipe_choice(rows + [_scored_row("cb_a+cb_d", 0.714, 9.0)])["choice"] == "cb_d"
    assert A.recipe_choice(rows + [_scored_row("cb_a+cb_d", 0.73, 11.1)])["choice"] == "cb_d"
    assert A.recipe_choice(rows[:2] + rows[3:5])["choice"] == "context_regions"


def test_combined_variant_is_the_union_of_its_parts(monkeypatch):
    both = A.variant_fields("cb_spatial+cb_intensity")
    assert both == {**A.VARIANTS["cb_spatial"], **A.VARIANTS["cb_intensity"]}
    assert len(both) == len(A.VARIANTS["cb_spatial"]) + len(A.VARIANTS["cb_intensity"]) - 2
    monkeypatch.setitem(A.VARIANTS, "cb_other", {"data.context_slices": 2})
    with pytest.raises(SystemExit, match="data.context_slices"):
        A.variant_fields("cb_spatial+cb_other")
    with pytest.raises(SystemExit, match="cb_nope"):
        A.variant_fields("cb_spatial+cb_nope")


def test_an_inference_only_variant_predicts_with_the_runs_of_its_training_part(tmp_path):
    """A variant "x+sliding_window" trains nothing of its own: its run folder and training
    command are x's, and only its predictions slide windows."""
    comb = "cb_intensity+cb_patches"
    assert A.training_variant(f"{comb}+sliding_window") == comb
    assert A.run_dir(tmp_path, f"{comb}+sliding_window", 2) == tmp_path / "runs" / f"{comb}-fold2"
    args = types.SimpleNamespace(out=tmp_path, config="configs/unet.py:cpu", set=[])
    cmd = A.train_command(args, f"{comb}+sliding_window", 0, ["a"], pathlib.Path("/c"))
    assert cmd == A.train_command(args, comb, 0, ["a"], pathlib.Path("/c"))
    assert not any("sliding_window" in flag for flag in cmd)
    assert A.variant_fields(f"{comb}+sliding_window")["eval.sliding_window"] is True
    with pytest.raises(SystemExit, match="changes inference only"):
        A.training_variant("sliding_window")


def test_train_stage_trains_a_shared_run_once(tmp_path, monkeypatch):
    started = []

    class _Done:  # a finished training process
        def __init__(self, cmd, **kw):
            started.append(cmd)
            self.returncode = 0

        def poll(self):
            return 0

    from brats_jax.data import cache

    monkeypatch.setattr(cache, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(A.subprocess, "Popen", _Done)
    monkeypatch.setattr(A.time, "sleep", lambda s: None)
    args = types.SimpleNamespace(
        out=tmp_path, config="configs/unet.py:cpu", set=[], cache_dir=None, parallel=1,
        data_root="/d", variants=["cb_patches", "cb_patches+sliding_window"],
    )  # fmt: skip
    A.train(args, [["a"], ["b"]])
    workdirs = sorted(f for cmd in started for f in cmd if f.startswith("--workdir="))
    assert workdirs == [f"--workdir={tmp_path}/runs/cb_patches-fold{i}" for i in (0, 1)]


# cpu_best's post-processing against the defaults (issue 47's choice), by hand
CPU_BEST_POSTPROCESS = [
    ("postprocess.connectivity", 26, 6),
    ("postprocess.et_min_mm3", 0.0, 200.0),
    ("postprocess.et_min_voxels", 0, 50),
    ("postprocess.min_component_voxels", 0, 5000),
    ("postprocess.tc_min_mm3", 0.0, 200.0),
]


@pytest.mark.parametrize(
    "preset, row",
    [
        ("cpu_best", "cb_deep_supervision+cb_intensity"),  # the replicate rule's choice
        ("cpu_recipe", "cb_deep_supervision+cb_intensity+cb_patches"),  # the combination
    ],
)
def test_preset_trains_the_measured_row(preset, row):
    """`configs/unet.py:<preset>` trains exactly what its ablation row measured
    (EXPERIMENTS.md), with the post-processing chosen on the 41 cases' folds (issue 47)."""
    from brats_jax import config_fields
    from configs import unet

    measured = unet.get_config("cpu")
    config_fields.apply_overrides(measured, A.variant_fields(row))
    diff = config_fields.config_diff(measured.to_dict(), unet.get_config(preset).to_dict())
    assert sorted(diff) == [("name", "unet-cpu", f"unet-{preset}"), *CPU_BEST_POSTPROCESS]


def test_folds_of_another_seed_are_another_partition():
    one = A.folds_of(IDS, 3, seed=1)
    assert sorted(c for f in one for c in f) == IDS and [len(f) for f in one] == [6, 6, 6]
    assert one != A.folds_of(IDS, 3)  # a replicate trains and tests on other case sets
    assert A.folds_of(IDS, 3) == A.folds_of(IDS, 3, seed=0)


def _case(case_id, dice, hd95):
    return dict(
        case_id=case_id,
        fold=0,
        **{f"dice_{g}": d for g, d in zip(A.REGIONS, dice, strict=True)},
        **{f"hd95_{g}": h for g, h in zip(A.REGIONS, hd95, strict=True)},
    )


BASE = [_case("c0", (0.8, 0.7, 0.6), (10, 20, 30)), _case("c1", (0.9, 0.5, 0.5), (5, 5, 5))]
# against BASE per (case, metric): c0 win tie loss | win loss tie; c1 win win win | win loss tie
CAND = [_case("c0", (0.9, 0.7, 0.5), (8, 25, 30)), _case("c1", (0.95, 0.6, 0.6), (4, 6, 5))]


def test_brats_win_fraction_counts_wins_and_half_ties_by_hand():
    assert A.brats_win_fraction(CAND, BASE) == pytest.approx(7.5 / 12)
    assert A.brats_win_fraction(BASE, CAND) == pytest.approx(4.5 / 12)
    assert A.brats_win_fraction(BASE, BASE) == 0.5
    with pytest.raises(SystemExit, match="different cases"):
        A.brats_win_fraction(CAND[:1], BASE)


def _replicate_rows(cand):
    row = lambda v, pc, **kw: dict(variant=v, tta="none", pp="largest", per_case=pc, **kw)
    return [
        row(A.RECIPE_BASELINE, BASE),
        dict(row(A.RECIPE_CANDIDATE, BASE), pp="none"),  # not the rule's row
        row(A.RECIPE_CANDIDATE, cand),
    ]


def test_replicate_rule_needs_all_four_conditions():
    c = A.replicate_choice(_replicate_rows(CAND))
    # mean Dice: candidate (0.925 + 0.65 + 0.55) / 3, baseline (0.85 + 0.6 + 0.55) / 3
    assert c["stats"][A.RECIPE_CANDIDATE][:2] == pytest.approx((2.125 / 3, 13.0))
    assert c["passed"] == [True, True, True, True] and c["choice"] == A.RECIPE_CANDIDATE
    empty = [CAND[0], dict(CAND[1], hd95_ET=metrics.HD95_EMPTY)]  # ET missed in c1
    c = A.replicate_choice(_replicate_rows(empty))
    assert c["stats"][A.RECIPE_CANDIDATE][3] == 1 and c["passed"] == [True, True, True, False]
    assert c["choice"] == A.RECIPE_BASELINE
    low = [dict(CAND[0], dice_WT=0.74), CAND[1]]  # a case under the rule's WT 0.75
    assert A.replicate_choice(_replicate_rows(low))["passed"] == [True, True, False, True]
    # one case much better, every other pair slightly worse: Dice up, rank down
    rare = [
        _case("c0", (1.0, 1.0, 0.9), (11, 21, 31)),
        _case("c1", (0.89, 0.49, 0.49), (6, 6, 6)),
    ]
    c = A.replicate_choice(_replicate_rows(rare))
    assert c["win_fraction"] == pytest.approx(3 / 12) and c["passed"] == [True, False, True, True]
    small = [dict(c, **{f"dice_{g}": c[f"dice_{g}"] + 0.004 for g in A.REGIONS}) for c in BASE]
    assert A.replicate_choice(_replicate_rows(small))["passed"][0] is False  # +0.004 < 0.005
    with pytest.raises(SystemExit, match="replicate rule"):
        A.replicate_choice(_replicate_rows(CAND)[:2])


def test_the_table_ends_with_the_replicate_rules_verdict():
    rows = [dict(r, configs=[]) for r in _replicate_rows(CAND)]
    table = A.markdown(dict(rows=rows, folds=[["c0", "c1"]]))
    assert "candidate wins 0.625 of (case, metric) pairs" in table
    assert f"conditions [True, True, True, True]; choice: {A.RECIPE_CANDIDATE}." in table
    assert "choice: context_regions." not in table.split("Replicate rule")[1]
    # one verdict per combination: another one gets its own line
    other = "cb_intensity+cb_patches"
    more = [dict(r, variant=other) for r in rows[1:]]
    empty = [CAND[0], dict(CAND[1], hd95_TC=metrics.HD95_EMPTY)]
    more[1]["per_case"] = empty
    lines = A.markdown(dict(rows=rows + more, folds=[["c0", "c1"]])).split("Replicate rule")
    assert len(lines) == 3 and f"choice: {A.RECIPE_CANDIDATE}." in lines[1]
    assert f"{other} 0.708 / " in lines[2]  # Dice 2.125 / 3, as above
    assert " mm / 0 WT < 0.75 / 1 empty;" in lines[2]
    assert "conditions [True, True, True, False]; choice: context_regions." in lines[2]


@pytest.mark.parametrize(
    "part, changed",
    [
        # nnUNetTrainerDA5's range, by hand (EXPERIMENTS.md, declared 2026-12-06 11:39 UTC)
        (
            "cb_wide_contrast",
            [("augment.contrast_max", 1.25, 2.0), ("augment.contrast_min", 0.75, 0.5)],
        ),
        # twice the `cpu` budget's steps (EXPERIMENTS.md, declared 2026-12-06 14:49 UTC)
        ("cb_long", [("train.num_steps", 2500, 5000)]),
        # InstanceNorm where `cpu_best` has none (EXPERIMENTS.md, declared 2026-12-06 19:30 UTC)
        ("cb_instance_norm", [("model.norm", "none", "instance")]),
    ],
)  # fmt: skip
def test_a_candidate_on_cpu_best_changes_only_its_fields(part, changed):
    """Each candidate declared on top of `cpu_best` is `cpu_best`'s training fields with the
    declared change and nothing else, and the replicate rule holds it against `cpu_best`."""
    from brats_jax import config_fields
    from configs import unet

    candidate = A.CPU_BEST_VARIANT + "+" + part
    c = unet.get_config("cpu")
    config_fields.apply_overrides(c, A.variant_fields(candidate))
    diff = config_fields.config_diff(unet.get_config("cpu_best").to_dict(), c.to_dict())
    assert sorted(diff) == sorted(
        changed
        + [
            ("name", "unet-cpu_best", "unet-cpu"),
            *[(k, new, old) for k, old, new in CPU_BEST_POSTPROCESS],  # the preset's own
        ]
    )
    assert A.replicate_baselines(candidate, {A.CPU_BEST_VARIANT})[-1] == A.CPU_BEST_VARIANT


def test_a_combination_on_top_of_cpu_best_is_held_against_it_too():
    spatial = A.CPU_BEST_VARIANT + "+cb_spatial"
    assert A.replicate_baselines(spatial, {A.CPU_BEST_VARIANT}) == [
        "context_regions",
        "cb_deep_supervision+cb_intensity",
    ]
    assert A.replicate_baselines(spatial, set()) == ["context_regions"]  # not scored
    assert A.replicate_baselines("cb_intensity+cb_patches", {A.CPU_BEST_VARIANT}) == [
        "context_regions"
    ]  # does not add to cpu_best
    assert A.replicate_baselines(A.CPU_BEST_VARIANT, {A.CPU_BEST_VARIANT}) == ["context_regions"]
    row = lambda v, pc: dict(variant=v, tta="none", pp="largest", per_case=pc, configs=[])
    # the candidate scores what cpu_best scores: it beats the segmentation options (CAND against
    # BASE, as above) and ties cpu_best on every pair (win share 0.5, no Dice gain)
    rows = [row("context_regions", BASE), row(A.CPU_BEST_VARIANT, CAND), row(spatial, CAND)]
    c = A.replicate_choice(rows, spatial, A.CPU_BEST_VARIANT)
    assert c["win_fraction"] == 0.5 and c["passed"] == [False, False, True, True]
    assert c["choice"] == A.CPU_BEST_VARIANT
    lines = A.markdown(dict(rows=rows, folds=[["c0", "c1"]])).split("Replicate rule")[1:]
    verdicts = [ln.split("choice: ")[1].split(".")[0] for ln in lines]
    # cpu_best against the segmentation options; the candidate against both
    assert verdicts == [A.CPU_BEST_VARIANT, spatial, A.CPU_BEST_VARIANT]
    assert "wins 0.500 of" in lines[2] and "wins 0.625 of" in lines[1]


def test_leave_one_out_drops_each_part_once():
    assert A.leave_one_out("a+b+c") == ["b+c", "a+c", "a+b"]
    assert A.leave_one_out() == [
        "cb_intensity+cb_patches",
        "cb_deep_supervision+cb_patches",
        "cb_deep_supervision+cb_intensity",
    ]


def _diagnosis_rows(hd95_case, dice):
    """The three leave-one-out rows; row i scores the diagnosis case with HD95s `hd95_case[i]`
    (TC, ET) and every region of both cases with Dice `dice[i]`."""
    rows = []
    for v, (tc, et), d in zip(A.leave_one_out(), hd95_case, dice, strict=True):
        cases = [
            _case(A.DIAGNOSIS_CASE, (d, d, d), (5.0, tc, et)),
            _case("other", (d, d, d), (5.0, 5.0, 5.0)),
        ]
        rows.append(dict(variant=v, tta="none", pp="largest", per_case=cases, configs=[]))
    return rows


def test_diagnosis_candidate_is_the_best_row_that_finds_the_core():
    E = metrics.HD95_EMPTY
    # the best row by Dice misses ET on the case: the next one that finds both is chosen
    rows = _diagnosis_rows([(9.0, E), (12.0, 30.0), (8.0, 7.0)], [0.9, 0.7, 0.6])
    assert A.diagnosis_candidate(rows) == A.leave_one_out()[1]
    rows = _diagnosis_rows([(E, 9.0), (12.0, 30.0), (8.0, 7.0)], [0.6, 0.7, 0.8])
    assert A.diagnosis_candidate(rows) == A.leave_one_out()[2]
    assert A.diagnosis_candidate(_diagnosis_rows([(E, E), (E, 3.0), (3.0, E)], [0.9] * 3)) is None
    # rows with TTA or without post-processing are not the rule's
    perfect = _diagnosis_rows([(1.0, 1.0)] * 3, [1.0] * 3)[0]["per_case"]
    others = [dict(rows[0], tta="flips", per_case=perfect), dict(rows[0], pp="none")]
    others[1]["per_case"] = perfect
    assert A.diagnosis_candidate(rows + others) == A.leave_one_out()[2]
    with pytest.raises(SystemExit, match="diagnosis rule"):
        A.diagnosis_candidate(rows[:2])
    table = A.markdown(dict(rows=rows, folds=[[A.DIAGNOSIS_CASE, "other"]]))
    assert f"Diagnosis rule ({A.DIAGNOSIS_CASE}): candidate {A.leave_one_out()[2]}." in table


def test_table_merges_records_of_the_same_folds(tmp_path, capsys):
    rows = [dict(r, configs=[]) for r in _replicate_rows(CAND)]
    base = dict(folds=[["c0", "c1"]], fold_seed=1, hd95_mode="max")
    (tmp_path / "a.json").write_text(json.dumps(dict(base, rows=rows[:1])))  # the baseline
    (tmp_path / "b.json").write_text(json.dumps(dict(base, rows=rows[1:])))  # the candidate
    merged = A.merge_records([dict(base, rows=rows[:1]), dict(base, rows=rows[1:])])
    assert [r["per_case"] for r in merged["rows"]] == [r["per_case"] for r in rows]
    assert A.main(["table", f"--records={tmp_path / 'a.json'},{tmp_path / 'b.json'}"]) == 0
    assert f"choice: {A.RECIPE_CANDIDATE}." in capsys.readouterr().out  # needs both records
    with pytest.raises(SystemExit, match=r"differ in folds"):
        A.merge_records([dict(base, rows=rows[:1]), dict(base, folds=[["c0"], ["c1"]], rows=[])])
    with pytest.raises(SystemExit, match=r"row \('context_regions', 'none', 'largest'\) is in two"):
        A.merge_records([dict(base, rows=rows[:1])] * 2)
    with pytest.raises(SystemExit, match=r"--records .*missing.json: expected a score record"):
        A.main(["table", f"--records={tmp_path / 'missing.json'}"])
    with pytest.raises(SystemExit, match="train needs --data_root and --out"):
        A.main(["train", "--out=x"])
