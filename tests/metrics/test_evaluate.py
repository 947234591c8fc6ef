"""Tests for the brats_jax.evaluate CLI with tiny NIfTIs of hand-known Dice."""

import csv
import functools
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from brats_jax import evaluate
from brats_jax.metrics import folder as E

REPO = pathlib.Path(__file__).resolve().parents[2]


def _save(path: pathlib.Path, arr, zooms=(1.0, 1.0, 1.0), dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr, dtype), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def _volumes(et_label):
    """GT: WT 4 voxels (2 ED, 1 NCR, 1 ET); prediction hits 2 of them + 0 false positives."""
    gt = np.zeros((6, 5, 4), np.int16)
    gt[1, 1, 1] = 2
    gt[1, 2, 1] = 2
    gt[2, 1, 1] = 1
    gt[2, 2, 1] = et_label
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = 2
    pred[2, 2, 1] = et_label
    # WT 2*2/(4+2) = 2/3 ; TC: target {NCR, ET}, pred {ET} -> 2/3 ; ET 1
    return gt, pred


def _rows(path):
    with open(path, newline="") as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def test_case_folders_both_namings_and_flat_predictions(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt, pred = _volumes(4)  # BraTS 2018-2021: ET = 4
    _save(gt_dir / "Brats18_A" / "Brats18_A_seg.nii.gz", gt)
    _save(pred_dir / "Brats18_A.nii.gz", pred)
    gt3, pred3 = _volumes(3)  # BraTS 2023: ET = 3, '-seg'
    _save(gt_dir / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz", gt3, (2, 3, 1))
    _save(pred_dir / "BraTS-GLI-00001-000-seg.nii.gz", pred3)
    _save(gt_dir / "Brats18_B" / "Brats18_B_seg.nii.gz", gt)  # no prediction: worst score
    _save(pred_dir / "Brats18_C_seg.nii.gz", gt)  # no GT: skipped
    (pred_dir / "notes.txt").write_text("not a nifti")

    rows = E.evaluate_folder(pred_dir, gt_dir, missing="skip")
    assert [r["case_id"] for r in rows] == ["BraTS-GLI-00001-000", "Brats18_A"]  # sorted
    for r in rows:
        assert r["dice_WT"] == pytest.approx(2 / 3)
        assert r["dice_TC"] == pytest.approx(2 / 3)
        assert r["dice_ET"] == pytest.approx(1.0)
        assert r["hd95_ET"] == 0.0
        assert r["sensitivity_WT"] == pytest.approx(0.5)
    # spacing from the GT header: the two missed WT voxels are one voxel from a predicted one
    # along x or y: 1 mm at (1,1,1) mm; min(2, 3) = 2 mm at (2,3,1) mm. P95 of [0,0,d,d] = d
    b, a = rows
    assert a["hd95_WT"] == pytest.approx(1.0)
    assert b["hd95_WT"] == pytest.approx(2.0)
    out = tmp_path / "res" / "metrics.csv"
    E.write_csv(rows, out)
    got = _rows(out)
    assert set(got) == {"Brats18_A", "BraTS-GLI-00001-000"}
    assert float(got["Brats18_A"]["dice_WT"]) == pytest.approx(2 / 3, abs=1e-6)
    assert list(got["Brats18_A"]) == E.COLUMNS
    assert not [p for p in out.parent.iterdir() if p.name != "metrics.csv"]  # no temp files


def test_missing_prediction_scores_zero_by_default_and_is_named(tmp_path):
    gt, pred = _volumes(4)
    for cid in ("A1", "B2", "C3"):
        _save(tmp_path / "gt" / cid / f"{cid}_seg.nii.gz", gt)
    _save(tmp_path / "pred" / "B2.nii.gz", pred)
    logged = []
    rows = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", log=logged.append)
    assert [r["case_id"] for r in rows] == ["A1", "B2", "C3"]
    for r in (rows[0], rows[2]):
        assert [r[f"dice_{x}"] for x in ("WT", "TC", "ET")] == [0.0, 0.0, 0.0]
        assert [r[f"hd95_{x}"] for x in ("WT", "TC", "ET")] == [373.13] * 3
        assert r["volume_dice_4class"] == 0.0 and set(r) == set(E.COLUMNS)
    assert rows[1]["dice_WT"] == pytest.approx(2 / 3)
    warning = [m for m in logged if "without prediction" in m]
    assert warning == [
        "warning: 2 GT case(s) without prediction scored Dice 0 / HD95 373.13 "
        "(--missing=skip leaves them out): A1, C3"
    ]
    # the mean counts them: WT (0 + 2/3 + 0) / 3
    assert np.mean([r["dice_WT"] for r in rows]) == pytest.approx(2 / 9)
    skipped = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", missing="skip", log=list)
    assert [r["case_id"] for r in skipped] == ["B2"]
    with pytest.raises(E.EvaluationError, match="--missing='zero'"):
        E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", missing="zero")


def test_summarize_means_std_medians_by_hand():
    rows = []
    for cid, dice, hd in (("a", 0.2, 1.0), ("b", 0.5, 2.0), ("c", 0.8, 373.13), ("d", 0.9, 3.0)):
        row = E.missing_case_row(cid)
        row.update({f"dice_{x}": dice for x in E.REGION_NAMES})
        row.update({f"hd95_{x}": hd for x in E.REGION_NAMES})
        row["volume_dice_4class"] = dice / 2
        rows.append(row)
    lines = E.summarize(rows).splitlines()
    assert lines[0] == "4 case(s)"
    table = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in lines[2:]}
    # dice: mean 2.4/4 = 0.6; population std sqrt((.16+.01+.04+.09)/4) = sqrt(.075);
    # median (0.5 + 0.8)/2 = 0.65
    assert table["dice_WT"] == pytest.approx([0.6, 0.2739, 0.65], abs=1e-4)
    assert table["dice_ET"] == table["dice_WT"]
    # hd95: mean 379.13/4 = 94.7825, median (2 + 3)/2 = 2.5
    assert table["hd95_TC"][0] == pytest.approx(94.7825, abs=1e-4)
    assert table["hd95_TC"][2] == pytest.approx(2.5)
    assert table["volume_dice_4class"] == pytest.approx([0.3, 0.1369, 0.325], abs=1e-4)


def test_flat_ground_truth_and_value_based_convention(tmp_path):
    gt, pred = _volumes(4)
    _save(tmp_path / "gt" / "case1.nii.gz", gt)  # flat, no naming hint: 4 present -> 2018
    _save(tmp_path / "pred" / "case1-seg.nii.gz", pred)
    gt3, pred3 = _volumes(3)
    _save(tmp_path / "gt" / "case2.nii", gt3)  # no 4 -> 2023
    _save(tmp_path / "pred" / "case2.nii.gz", pred3)
    rows = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert [r["dice_TC"] for r in rows] == pytest.approx([2 / 3, 2 / 3])
    # predictions written in the training convention against 2018 GT
    _save(tmp_path / "pred2" / "case1.nii.gz", np.where(pred == 4, 3, pred))
    rows = E.evaluate_folder(tmp_path / "pred2", tmp_path / "gt", pred_labels="brats2023")
    assert rows[0]["dice_ET"] == pytest.approx(1.0)


def test_nested_case_folders_hgg_lgg(tmp_path):
    """2018-2019 layout: GT case folders under HGG/ and LGG/; a non-case folder's files are
    not GT, and a case folder's modality files are not flat GT files."""
    gt, pred = _volumes(4)
    for grade, cid in (("HGG", "Brats18_H"), ("LGG", "Brats18_L")):
        _save(tmp_path / "gt" / grade / cid / f"{cid}_seg.nii.gz", gt)
        _save(tmp_path / "gt" / grade / cid / f"{cid}_flair.nii.gz", gt)
        _save(tmp_path / "pred" / f"{cid}.nii.gz", pred)
    _save(tmp_path / "gt" / "other" / "Brats18_L.nii.gz", gt)  # not top level: ignored
    assert sorted(E.find_ground_truth(tmp_path / "gt")) == ["Brats18_H", "Brats18_L"]
    logged = []
    rows = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", log=logged.append)
    assert [r["dice_WT"] for r in rows] == pytest.approx([2 / 3, 2 / 3])
    assert not [m for m in logged if "affine" in m]
    _save(tmp_path / "pred" / "Brats18_L.nii.gz", pred, zooms=(1.0, 1.0, 2.0))  # another grid
    E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", log=logged.append)
    assert [m for m in logged if "affine" in m] == [
        "warning: case Brats18_L: the prediction's affine differs from the ground truth's; "
        "scored voxel by voxel, as if both were on the ground truth's grid"
    ]
    _save(tmp_path / "gt" / "Brats18_H" / "Brats18_H_seg.nii.gz", gt)  # same id twice
    with pytest.raises(E.EvaluationError, match="two ground-truth files for case Brats18_H"):
        E.find_ground_truth(tmp_path / "gt")


def test_gt_given_as_one_case_folder_scores_that_case_alone(tmp_path, monkeypatch):
    """`--gt=<ID>/` (or `.` inside it): the folder is the case; its modality images are not
    ground truths of cases without predictions (which would score Dice 0 each)."""
    gt, pred = _volumes(4)
    case = tmp_path / "Brats18_H"
    _save(case / "Brats18_H_seg.nii.gz", gt)
    for m in ("flair", "t1", "t1ce", "t2"):
        _save(case / f"Brats18_H_{m}.nii.gz", gt)
    _save(tmp_path / "pred" / "Brats18_H.nii.gz", pred)
    rows = E.evaluate_folder(tmp_path / "pred", case)
    assert [(r["case_id"], r["dice_WT"]) for r in rows] == [("Brats18_H", pytest.approx(2 / 3))]
    monkeypatch.chdir(case)
    assert list(E.find_ground_truth(pathlib.Path("."))) == ["Brats18_H"]


def test_value_based_convention_without_enhancing_tumour(tmp_path):
    """A GT with no ET (common in LGG) has neither 3 nor 4: a 2018-convention prediction with
    a false-positive ET voxel (4) is scored, not rejected; its ET Dice is 0 (GT ET empty)."""
    gt, pred = _volumes(4)
    gt[gt == 4] = 1  # no enhancing tumour: labels {0, 1, 2}
    _save(tmp_path / "gt" / "lgg.nii.gz", gt)
    _save(tmp_path / "pred" / "lgg.nii.gz", pred)  # has a 4
    (row,) = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert row["dice_ET"] == 0.0 and row["hd95_ET"] == pytest.approx(373.13)
    # TC: GT {NCR x2}, prediction {ET voxel (2,2,1), which is GT NCR} -> 2*1/(2+1)
    assert row["dice_TC"] == pytest.approx(2 / 3)
    pred3 = np.where(pred == 4, 3, pred)  # the same prediction in the 2023 convention
    _save(tmp_path / "pred" / "lgg.nii.gz", pred3)
    (row3,) = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert row3["dice_TC"] == pytest.approx(2 / 3) and row3["dice_ET"] == 0.0


def test_errors_name_the_case(tmp_path):
    gt, pred = _volumes(4)
    _save(tmp_path / "gt" / "X1" / "X1_seg.nii.gz", gt)
    _save(tmp_path / "pred" / "Y1.nii.gz", pred)
    with pytest.raises(E.EvaluationError, match="no matching cases"):
        E.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    _save(tmp_path / "pred" / "X1.nii.gz", pred[:, :, :3])
    with pytest.raises(E.EvaluationError, match=r"case X1: prediction shape \(6, 5, 3\)"):
        E.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    bad = pred.copy()
    bad[0, 0, 0] = 3  # 3 is unused in the 2018 convention
    _save(tmp_path / "pred" / "X1.nii.gz", bad)
    with pytest.raises(E.EvaluationError, match=r"case X1 prediction .*unknown label values \[3\]"):
        E.evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(E.EvaluationError, match="does not exist"):
        E.evaluate_folder(tmp_path / "nope", tmp_path / "gt")


def test_cli_writes_csv_and_fails_with_one_line(tmp_path):
    gt, pred = _volumes(4)
    _save(tmp_path / "gt" / "X1" / "X1_seg.nii.gz", gt)
    _save(tmp_path / "pred" / "X1_seg.nii.gz", pred)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "brats_jax.evaluate", f"--gt={tmp_path / 'gt'}"]
    ok = subprocess.run(
        [*cmd, f"--pred={tmp_path / 'pred'}", f"--out={tmp_path / 'm.csv'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert float(_rows(tmp_path / "m.csv")["X1"]["dice_WT"]) == pytest.approx(2 / 3, abs=1e-6)
    assert "dice_WT" in ok.stdout
    bad = subprocess.run(
        [*cmd, f"--pred={tmp_path / 'gt'}", f"--out={tmp_path / 'n.csv'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("brats_jax.evaluate: error: no matching")
    assert not (tmp_path / "n.csv").exists()


def test_postprocessing_file_applied_before_scoring(tmp_path):
    from brats_jax.inference import postprocess

    gt, pred = _volumes(4)
    pred[5, 4, 3] = 2  # a far island: WT HD95 grows to its distance, Dice drops
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    _save(gt_dir / "Brats18_A" / "Brats18_A_seg.nii.gz", gt)
    _save(pred_dir / "Brats18_A.nii.gz", pred)
    raw = E.evaluate_folder(pred_dir, gt_dir)[0]
    assert raw["dice_WT"] == pytest.approx(2 * 2 / (4 + 3))
    # nearest GT WT voxel to (5,4,3) is (2,2,1): sqrt(9 + 4 + 4); 95th percentile of the
    # directed distances [0, 0, 1, 1] (GT->pred) and [0, 0, sqrt 17] (pred->GT), max of both
    d = np.sqrt(17.0)
    assert raw["hd95_WT"] == pytest.approx(max(np.percentile([0, 0, 1, 1], 95),
                                               np.percentile([0, 0, d], 95)))  # fmt: skip
    cfg = tmp_path / "postprocessing.json"
    postprocess.save(cfg, postprocess.PostprocessConfig(largest_component_only=True))
    out = tmp_path / "m.csv"
    r = subprocess.run(
        [sys.executable, "-m", "brats_jax.evaluate", f"--pred={pred_dir}", f"--gt={gt_dir}",
         f"--out={out}", f"--apply_postprocessing={cfg}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = _rows(out)["Brats18_A"]
    assert float(row["dice_WT"]) == pytest.approx(2 / 3)  # as without the island
    assert float(row["hd95_WT"]) == pytest.approx(1.0)
    bad = subprocess.run(
        [sys.executable, "-m", "brats_jax.evaluate", f"--pred={pred_dir}", f"--gt={gt_dir}",
         f"--out={out}", f"--apply_postprocessing={tmp_path / 'nope.json'}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert bad.returncode != 0 and "nope.json does not exist" in bad.stderr.strip().splitlines()[-1]


def test_et_relabel_rule_finds_et_in_the_2018_convention(tmp_path, run_command):
    """An `et_min_voxels` rule on a BraTS 2018 prediction (ET = 4) with 1 ET voxel: that
    voxel becomes NCR (1) before scoring. By hand (`_volumes`): WT unchanged 2/3; TC
    {NCR, ET} of GT is {(2,1,1), (2,2,1)}, the prediction's TC still {(2,2,1)}: 2/3; ET:
    GT has 1 voxel, the prediction none after the rule: Dice 0 (1 without it)."""
    from brats_jax.inference import postprocess

    gt, pred = _volumes(4)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    _save(gt_dir / "Brats18_A" / "Brats18_A_seg.nii.gz", gt)
    _save(pred_dir / "Brats18_A.nii.gz", pred)
    raw = E.evaluate_folder(pred_dir, gt_dir)[0]
    assert raw["dice_ET"] == pytest.approx(1.0)
    rule = postprocess.PostprocessConfig(et_min_voxels=2)
    apply_rule = functools.partial(postprocess.apply, config=rule)
    row = E.evaluate_folder(pred_dir, gt_dir, postprocessing=apply_rule)[0]
    assert row["dice_WT"] == pytest.approx(2 / 3)
    assert row["dice_TC"] == pytest.approx(2 / 3)
    assert row["dice_ET"] == pytest.approx(0.0)
    # the same through the CLI's --apply_postprocessing file
    cfg = tmp_path / "postprocessing.json"
    postprocess.save(cfg, rule)
    out = tmp_path / "m.csv"
    run_command(
        evaluate,
        f"--pred={pred_dir}",
        f"--gt={gt_dir}",
        f"--out={out}",
        f"--apply_postprocessing={cfg}",
    )
    written = _rows(out)["Brats18_A"]
    assert float(written["dice_ET"]) == pytest.approx(0.0)
    assert float(written["dice_TC"]) == pytest.approx(2 / 3)
    # a 2-voxel ET meets the threshold and stays ET
    pred[1, 2, 1] = 4
    _save(pred_dir / "Brats18_A.nii.gz", pred)
    kept = E.evaluate_folder(pred_dir, gt_dir, postprocessing=apply_rule)[0]
    assert kept["dice_ET"] == pytest.approx(2 * 1 / (1 + 2))
