"""experiments/analyses/segmentation_ablation.py `score` on hand-made predictions, labels: a case of
fold i is scored with the post-processing tuned for fold i (on the other fold), and the fixed
split (--test_cases) gives the `none` and `largest` rows of its test cases only.

The cases (16x16x8 voxels of 1 mm, one whole-tumour cube of 6x6x6 = 216 voxels, NCR inside
an ED shell) are of two kinds, by fold:
* "spurious": the label has no ET, the prediction marks 60 NCR voxels ET;
* "true": the label and the prediction hold the same 80 ET voxels.
Tuning on "true" cases keeps ET (only threshold 50 of `TuningCandidates.et_min_voxels`
(50, 100, ...) leaves it, a tie with "off", adopted); tuning on "spurious" cases picks 100 (ET
relabelled NCR). So fold "spurious" is scored with 50 (its 60 ET voxels stay: ET Dice 0) and
fold "true" with 100 (its 80 true ET voxels become NCR: ET Dice 0); swapped, both would be 1.
WT and TC are predicted exactly (ET -> NCR keeps TC), and the component rules change nothing
on one component: Dice 1, HD95 0 for them in every row.
"""

import json

import numpy as np
import pytest

from brats_jax.metrics import HD95_EMPTY
from experiments.analyses import segmentation_ablation as A

SHAPE = (16, 16, 8)
IDS = [f"Brats18_T_{i}_1" for i in range(4)]


def _label(et_voxels: int) -> np.ndarray:
    """Training classes {0..3}: the 6x6x6 cube (4..9)^2 x (1..6) is ED, but for an 80-voxel
    NCR core (4x4 columns at (5..8)^2, z = 2..6) whose first `et_voxels` voxels are ET."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:10, 4:10, 1:7] = 2
    core = np.zeros(SHAPE, bool)
    core[5:9, 5:9, 2:7] = True
    lab[core] = 1
    lab.ravel()[np.flatnonzero(core.ravel())[:et_voxels]] = 3
    return lab


@pytest.fixture
def cases(tmp_path, write_nifti_case):
    """Cases of fold 0 are "spurious", of fold 1 "true"; returns (root, out, folds, kind)."""
    root, out = tmp_path / "data", tmp_path / "out"
    folds = A.folds_of(IDS, 2)
    kind = {c: ("spurious" if c in folds[0] else "true") for c in IDS}
    preds = {}
    for c in IDS:
        if kind[c] == "spurious":
            label, pred = _label(0), _label(60)
        else:
            label = pred = _label(80)
        assert (label > 0).sum() == (pred > 0).sum() == 216
        release = np.where(label == 3, 4, label).astype(np.int16)  # BraTS 2018: ET is 4
        write_nifti_case(root, c, shape=SHAPE, std=10.0, modalities=("t1", "t1ce", "t2", "flair"),
                         seg=release)  # fmt: skip
        preds[c] = pred
    for i, fold in enumerate(folds):
        path = A.predictions_path(out, "baseline", i)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"none__{c}": preds[c] for c in fold})
    return root, out, folds, kind


def _args(root, out, *extra):
    return ["score", f"--data_root={root}", f"--out={out}", "--variants=baseline",
            "--ttas=none", "--parallel=1", *extra]  # fmt: skip


def _rows(out) -> dict:
    record = json.loads((out / "ablation.json").read_text())
    return record, {r["pp"]: r for r in record["rows"]}


def _et(row) -> dict:
    return {c["case_id"]: (c["dice_ET"], c["hd95_ET"]) for c in row["per_case"]}


def test_a_case_of_fold_i_is_scored_with_fold_is_tuned_choice(cases):
    root, out, folds, kind = cases
    assert A.main(_args(root, out, "--folds=2")) == 0
    record, rows = _rows(out)
    assert record["folds"] == folds and sorted(rows) == ["largest", "none", "tuned"]
    # fold 0 ("spurious") is tuned on fold 1 ("true"), and the other way round
    assert [c["et_min_voxels"] for c in rows["tuned"]["configs"]] == [50, 100]
    one = (1.0, 0.0)  # Dice, HD95 of a region predicted exactly (or empty in both)
    missed = (0.0, HD95_EMPTY)  # exactly one of prediction and label empty
    for pp, want in {
        "none": {"spurious": missed, "true": one},
        "largest": {"spurious": missed, "true": one},
        "tuned": {"spurious": missed, "true": missed},
    }.items():
        assert _et(rows[pp]) == {c: want[kind[c]] for c in IDS}, pp
        for c in rows[pp]["per_case"]:
            assert c["fold"] == (0 if kind[c["case_id"]] == "spurious" else 1)
            for r in ("WT", "TC"):
                assert (c[f"dice_{r}"], c[f"hd95_{r}"]) == one, (pp, c["case_id"], r)
    md = (out / "ablation.md").read_text()
    assert "2 folds over 4 cases" in md


def test_the_fixed_split_scores_its_test_cases_without_a_tuned_row(cases):
    root, out, _, kind = cases
    test = [next(c for c in IDS if kind[c] == k) for k in ("spurious", "true")]
    fold = sorted(test)  # the one "fold" of a fixed split: its prediction file, these cases
    path = A.predictions_path(out, "baseline", 0)
    spurious, true = _label(60), _label(80)
    np.savez(path, **{f"none__{c}": (spurious if kind[c] == "spurious" else true) for c in fold})
    assert A.main(_args(root, out, f"--test_cases={','.join(test)}")) == 0
    record, rows = _rows(out)
    assert record["folds"] == [fold] and [r["pp"] for r in record["rows"]] == ["none", "largest"]
    for pp in ("none", "largest"):
        assert [c["case_id"] for c in rows[pp]["per_case"]] == fold
        assert all(c["fold"] == 0 for c in rows[pp]["per_case"])
        want = {c: (0.0, HD95_EMPTY) if kind[c] == "spurious" else (1.0, 0.0) for c in fold}
        assert _et(rows[pp]) == want
    assert "2 test cases" in (out / "ablation.md").read_text()
    with pytest.raises(SystemExit, match="not under"):
        A.main(_args(root, out, "--test_cases=Brats18_T_9_1"))


def test_an_output_folder_of_other_folds_or_fewer_ttas_is_refused(cases):
    """The output folder's runs and predictions belong to its folds.json: other folds (a
    changed --fold_seed) would score runs on cases they trained on; predictions made
    without a TTA setting cannot be scored with it."""
    root, out, _, _ = cases
    with pytest.raises(SystemExit, match="lacks flips__Brats18_T_"):
        A.main(_args(root, out, "--folds=2", "--ttas=none,flips"))
    with pytest.raises(SystemExit, match=r"folds\.json holds other folds \(2, seed 0\)"):
        A.main(_args(root, out, "--folds=2", "--fold_seed=1"))
    assert A.main(_args(root, out, "--folds=2")) == 0  # the same folds: scored
