"""Silent failures a new user met, each now said out loud: a split without test cases (an
error when a test fraction rounds to none, a note when asked for on purpose), evaluate's
cases scored 0 for a missing prediction (counted in the summary's first line), predict's
uncertainty and probability maps beside the label maps (skipped, named), and where a
finished run's results are (its last lines; each validation's Dice on the console)."""

import os
import pathlib
import re
import subprocess
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from brats_jax.data.common import DataError
from brats_jax.labels import label_map
from brats_jax.metrics import folder as E

REPO = pathlib.Path(__file__).resolve().parents[2]


def _command(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
    )


# --------------------------------------------------------------------------------------------
# 1. a split without test cases
@pytest.mark.parametrize("num_cases, fraction", [(1, 0.1), (2, 0.2)])
def test_a_test_fraction_that_gives_no_test_case_is_an_error_before_training(
    tmp_path, tiny_config, num_cases, fraction
):
    """1 or 2 cases (a Kaggle folder of one volume): round(fraction x cases) = 0 test cases
    used to train the whole budget and end with `paper_dice: null`; now nothing trains."""
    from brats_jax.training import train

    config = tiny_config(**{"data.synthetic_num_cases": num_cases, "data.test_fraction": fraction})
    with pytest.raises(
        DataError,
        match=rf"^data\.test_fraction={fraction} of {num_cases} cases? gives no test case; "
        r"set data\.test_fraction=0 to train without a test pass, or name the test cases in "
        r"data\.test_cases=",
    ):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_the_command_says_so_in_one_line(tmp_path):
    proc = _command(
        "brats_jax.main", "--config=configs/unet.py:tiny", f"--workdir={tmp_path / 'run'}",
        "--config.data.synthetic_num_cases=1", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data.test_fraction=0.2 of 1 case gives no test case; set data.test_fraction=0 "
        "to train without a test pass, or name the test cases in data.test_cases=ID,..."
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_test_fraction_zero_trains_without_a_test_pass_and_says_so(tmp_path, tiny_config, caplog):
    """An empty test split asked for (data.test_fraction=0) trains without complaint; the log
    says no test pass will run, and so do the run's last lines."""
    from brats_jax import main
    from brats_jax.training import train

    config = tiny_config(
        **{"train.num_steps": 2, "data.synthetic_num_cases": 2, "data.test_fraction": 0.0}
    )
    with caplog.at_level("INFO"):
        results = train.train_and_evaluate(config, tmp_path)
    assert results["steps"] == 2 and results["paper_dice"] is None
    notes = [r.getMessage() for r in caplog.records if "no test pass will run" in r.getMessage()]
    assert notes == [
        "no test cases (data.test_fraction=0, data.test_cases empty): no test pass will run; "
        "results.json will hold no test scores"
    ]
    lines = main.final_lines(tmp_path, results)
    assert lines == [
        f"workdir: {tmp_path}",
        "test: none - no test cases (data.test_fraction=0, data.test_cases empty); "
        "results.json has no test scores",
        f"results: {tmp_path / 'results.json'}, per case: {tmp_path / 'per_case.csv'}",
    ]


# --------------------------------------------------------------------------------------------
# 2. evaluate's cases scored 0 for a missing prediction
def _save(path: pathlib.Path, arr, dtype=np.uint8, descrip=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr, dtype), np.eye(4))
    if descrip is not None:
        img.header["descrip"] = descrip
    nib.save(img, str(path))


def _gt_and_pred():
    """GT: WT 4 voxels (2 ED, 1 NCR, 1 ET = 4); the prediction hits an ED and the ET voxel:
    Dice WT 2/3, TC 2/3, ET 1."""
    gt = np.zeros((6, 5, 4), np.int16)
    gt[1, 1, 1] = gt[1, 2, 1] = 2
    gt[2, 1, 1] = 1
    gt[2, 2, 1] = 4
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = 2
    pred[2, 2, 1] = 4
    return gt, pred


def test_evaluate_summary_counts_the_cases_scored_zero_for_a_missing_prediction(tmp_path):
    gt, pred = _gt_and_pred()
    for cid in ("A1", "B2", "C3"):
        _save(tmp_path / "gt" / cid / f"{cid}_seg.nii.gz", gt)
    _save(tmp_path / "pred" / "B2.nii.gz", pred)
    proc = _command(
        "brats_jax.evaluate", f"--gt={tmp_path / 'gt'}", f"--pred={tmp_path / 'pred'}",
        f"--out={tmp_path / 'm.csv'}", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("3 case(s)")] == [
        "3 case(s), 2 of them without a prediction and scored Dice 0 / HD95 373.13 "
        "(--missing=skip leaves them out: 1 case(s))"
    ], proc.stdout
    wt = next(ln for ln in lines if ln.startswith("dice_WT"))
    assert float(wt.split()[1]) == pytest.approx(2 / 9, abs=1e-4)  # (0 + 2/3 + 0) / 3
    # --missing=skip: the line says what was left out; nothing missing: the count alone
    skipped = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", missing="skip", log=list)
    assert E.summarize(skipped).splitlines()[0] == (
        "1 case(s) (2 GT case(s) without a prediction left out: --missing=skip)"
    )
    _save(tmp_path / "pred" / "A1.nii.gz", pred)
    _save(tmp_path / "pred" / "C3.nii.gz", pred)
    full = E.evaluate_folder(tmp_path / "pred", tmp_path / "gt", log=list)
    assert E.summarize(full).splitlines()[0] == "3 case(s)"


# --------------------------------------------------------------------------------------------
# 3. predict's uncertainty and probability maps in the prediction folder
def test_evaluate_scores_label_maps_only_not_predicts_uncertainty_and_probability_maps(
    tmp_path,
):
    """Case A as `predict --output=pred/A_seg.nii.gz --uncertainty=pred/A_unc.nii.gz
    --probabilities=pred/A_probs.nii.gz` writes it (predict's own writers); case B's
    entropy map from a folder run (`B.nii.gz`, float, no description) beside its labels;
    case C's labels stored as floats (MONAI's default), which are still a label map."""
    from brats_jax.inference import case_prediction
    from brats_jax.inference import uncertainty as unc

    gt, pred = _gt_and_pred()
    for cid in ("A", "B", "C"):
        _save(tmp_path / "gt" / cid / f"{cid}_seg.nii.gz", gt)
    d = tmp_path / "pred"
    d.mkdir()
    case = types.SimpleNamespace(
        header=nib.Nifti1Header(),
        affine=np.eye(4),
        to_file=None,
        naming="2018",
        convention=label_map("2018"),
    )
    classes = np.where(pred == 4, 3, pred)  # training classes
    probs = np.eye(4, dtype=np.float32)[classes] * 0.7 + 0.075  # (6, 5, 4, 4), sums to 1
    case_prediction.write_case(
        case, classes, probs, d / "A_seg.nii.gz", probabilities=d / "A_probs.nii.gz"
    )
    unc.write_nifti(unc.entropy(probs, "classes"), case, d / "A_unc.nii.gz")
    _save(d / "B_seg.nii.gz", pred)
    _save(d / "B.nii.gz", unc.entropy(probs, "classes"), np.float32)
    _save(d / "C_seg.nii.gz", pred, np.float32)
    logged = []
    rows = E.evaluate_folder(d, tmp_path / "gt", log=logged.append)
    assert [r["case_id"] for r in rows] == ["A", "B", "C"]
    for r in rows:
        assert (r["dice_WT"], r["dice_TC"], r["dice_ET"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert not rows.absent
    notes = [m for m in logged if m.startswith("note:")]
    assert len(notes) == 1, logged
    assert notes[0].startswith(f"note: 3 file(s) in {d} are not label maps and are not scored: ")
    assert "A_probs.nii.gz (4-D (6, 5, 4, 4), a probability map)" in notes[0]
    assert "A_unc.nii.gz (predict's 'brats_jax predictive entropy (nats)')" in notes[0]
    assert "B.nii.gz (non-integer float32 values, an uncertainty or probability map)" in notes[0]
    assert not [m for m in logged if "without GT" in m]  # not taken for cases A_unc, A_probs
    # by name: a float map named like predict's companions is skipped without its values read
    assert E.not_a_label_map(d / "A_unc.nii.gz") is not None
    _save(tmp_path / "X_unc.nii.gz", np.zeros((2, 2, 2)), np.float32)
    assert "named like an uncertainty" in E.not_a_label_map(tmp_path / "X_unc.nii.gz")
    assert E.not_a_label_map(d / "C_seg.nii.gz") is None


# --------------------------------------------------------------------------------------------
# 4. where a run's results are, and its validation Dice on the console
def test_training_command_prints_each_validation_and_ends_naming_its_results(tmp_path):
    workdir = tmp_path / "run"
    proc = _command(
        "brats_jax.main", "--config=configs/unet.py:tiny", f"--workdir={workdir}",
        "--config.train.num_steps=2", "--config.train.eval_every_steps=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    number = r"\d\.\d{4}"
    val = [ln for ln in out if ln.startswith("step ")]
    assert len(val) == 2, proc.stdout
    for step, line in enumerate(val, 1):
        assert re.fullmatch(
            rf"step {step}: val paper Dice {number} \| WT {number} TC {number} ET {number} "
            rf"\| loss \d+\.\d{{4}}",
            line,
        ), line
    last = out[-4:]
    assert last[0] == f"workdir: {workdir}"
    assert re.fullmatch(
        rf"test: paper Dice {number} \| WT {number} TC {number} ET {number} "
        r"\(1 case\(s\), weights of step [12]\)",
        last[1],
    ), last[1]
    assert re.fullmatch(
        rf"test lesion-wise: WT {number} TC {number} ET {number} \| HD95 "
        r"\d+\.\d / \d+\.\d / \d+\.\d mm \| false-positive lesions \d+ / \d+ / \d+, "
        r"missed \d+ / \d+ / \d+ \(WT / TC / ET\)",
        last[2],
    ), last[2]
    assert last[3] == f"results: {workdir / 'results.json'}, per case: {workdir / 'per_case.csv'}"
    assert (workdir / "results.json").is_file() and (workdir / "per_case.csv").is_file()


def test_the_last_lines_give_the_lesion_wise_scores_and_counts_of_the_results(tmp_path):
    """results.json's `lesionwise` block in one line, each value in its region's place.
    (Caught: TC and ET swapped, the FN counts printed as FP, Dice printed for HD95.)"""
    from brats_jax import main

    results = {
        "per_case": [{}, {}],
        "paper_dice": 0.8,
        "dice": {"WT": 0.9, "TC": 0.8, "ET": 0.7},
        "tested_step": 5,
        "lesionwise": {
            "dice": {"WT": 0.91, "TC": 0.72, "ET": 0.55},
            "hd95": {"WT": 8.04, "TC": 48.0, "ET": 108.25},
            "tp": {"WT": 2, "TC": 2, "ET": 3},
            "fn": {"WT": 0, "TC": 1, "ET": 2},
            "fp": {"WT": 1, "TC": 6, "ET": 24},
        },
    }
    lines = main.final_lines(tmp_path, results)
    assert lines[2] == (
        "test lesion-wise: WT 0.9100 TC 0.7200 ET 0.5500 | HD95 8.0 / 48.0 / 108.2 mm | "
        "false-positive lesions 1 / 6 / 24, missed 0 / 1 / 2 (WT / TC / ET)"
    )
    del results["lesionwise"]
    assert len(main.final_lines(tmp_path, results)) == 3  # older results: no such line
