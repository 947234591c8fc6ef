"""Reliability of saved probability maps: `evaluate --overlays` finds predict's maps beside
the predictions (or in --probabilities), counts their brain voxels against the ground truth
and draws the diagram; the test pass does the same for a run's test cases."""

import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from brats_jax.metrics import folder

REPO = pathlib.Path(__file__).resolve().parents[2]
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ece_by_hand(p, y, num_bins=15):
    """Reference ECE of one channel written here: bins floor(15 p), last one closed."""
    p = np.asarray(p, np.float64)
    k = np.minimum(np.floor(p * num_bins), num_bins - 1)
    return sum(
        (k == b).sum() / p.size * abs(y[k == b].mean() - p[k == b].mean())
        for b in range(num_bins)
        if (k == b).any()
    )


def _case(tmp_path, write_labelled_case, cid="Brats18_A_1"):
    """A labelled GT case folder (x rows < 4 background in every modality), an empty
    prediction, and (16, 16, 8, 3) region probabilities drawn with a seed."""
    gt_dir = tmp_path / "gt"
    write_labelled_case(gt_dir, cid)
    label = write_labelled_case.label("2018")
    pred = tmp_path / "pred"
    pred.mkdir()
    predicted = np.zeros_like(label)  # unlike the ground truth: the targets are the GT's
    nib.save(nib.Nifti1Image(predicted, AFFINE), str(pred / f"{cid}.nii.gz"))
    probs = np.random.default_rng(0).uniform(size=(*label.shape, 3)).astype(np.float32)
    probs[8:10, 6:8, 2] = 0.97  # the labelled voxels: confident
    return gt_dir, pred, label, probs


def test_folder_reliability_counts_brain_voxels_of_the_maps_beside_predictions(
    tmp_path, write_labelled_case
):
    """`<ID>_probs.nii.gz` beside the label map is found (the label map is still the one
    scored); ECE per region = the reference over the brain rows x >= 4 with WT/TC/ET of the
    2018 labels. Catches: the map matched to no case (suffix kept in the ID), all voxels
    counted, regions' targets from the wrong labels."""
    gt_dir, pred, label, probs = _case(tmp_path, write_labelled_case)
    nib.save(nib.Nifti1Image(probs, AFFINE), str(pred / "Brats18_A_1_probs.nii.gz"))
    maps = folder.find_probability_maps(pred)
    assert list(maps) == ["Brats18_A_1"]
    rel = folder.FolderReliability(maps)
    rows = folder.evaluate_folder(pred, gt_dir, on_case=rel.add, log=lambda *_: None)
    assert [r["case_id"] for r in rows] == ["Brats18_A_1"]
    bins = rel.bins["regions"]
    train = np.array([0, 1, 2, 0, 3])[label]  # 2018 values -> training classes
    brain = np.zeros(label.shape, bool)
    brain[4:] = True
    for i, classes in enumerate(((1, 2, 3), (1, 3), (3,))):
        y = np.isin(train, classes)[brain]
        assert bins.ece()[i] == pytest.approx(_ece_by_hand(probs[..., i][brain], y), abs=1e-9)
    assert bins.count[0].sum() == brain.sum() and not rel.notes


def test_evaluate_overlays_draws_the_reliability_diagram(tmp_path, write_labelled_case):
    """The command with --overlays and --probabilities (predict's folder layout): writes
    reliability.png and prints each region's ECE. Catches: the hook not passed on, the
    diagram not written."""
    gt_dir, pred, label, probs = _case(tmp_path, write_labelled_case)
    (tmp_path / "probs").mkdir()
    nib.save(nib.Nifti1Image(probs, AFFINE), str(tmp_path / "probs" / "Brats18_A_1.nii.gz"))
    r = subprocess.run(
        [sys.executable, "-m", "brats_jax.evaluate", f"--pred={pred}", f"--gt={gt_dir}",
         f"--out={tmp_path / 'm.csv'}", f"--overlays={tmp_path / 'pics'}",
         f"--probabilities={tmp_path / 'probs'}"],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ECE (regions"))
    assert "WT" in line and "ET" in line
    png = tmp_path / "pics" / "reliability.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_test_pass_reports_the_brain_voxels_reliability(tmp_path, monkeypatch):
    """The test pass with probabilities 0.85 on the true class and 0.05 elsewhere and an
    image whose brain is a known box: per class, ECE = (0.15 n_c + 0.05 (N - n_c)) / N over
    the box's N voxels (n_c of class c); reliability.png written. Catches: voxels outside
    the brain counted, the block or the picture missing."""
    from brats_jax import data
    from brats_jax.training import evaluation, run_group
    from configs import unet as unet_config

    run = run_group.build_run(unet_config.get_config("tiny"), tmp_path)
    seen, real_load = [], data.load_volume

    def load_volume(source, case_id):  # the case's label; a box of brain in the image
        image, label = real_load(source, case_id)
        box = np.full(image.shape, -1.0, np.float32)
        box[4:-4, 4:-4] = 1.0
        seen.append(label)
        return box, label

    def predict_volume(predict, variables, image, **kw):
        return 0.8 * np.eye(4, dtype=np.float32)[seen[-1]] + np.float32(0.05)

    monkeypatch.setattr(evaluation.data, "load_volume", load_volume)
    monkeypatch.setattr(evaluation.whole_volume, "predict_volume", predict_volume)
    results, _ = evaluation.evaluate_test_volumes(run, None, None)
    inside = np.concatenate([s[4:-4, 4:-4].ravel() for s in seen])
    block = results["calibration"]
    assert block["num_voxels"] == inside.size
    for c, name in enumerate(("background", "NCR", "ED", "ET")):
        n_c = (inside == c).sum()
        expected = (0.15 * n_c + 0.05 * (inside.size - n_c)) / inside.size
        assert block["ece"][name] == pytest.approx(expected, abs=1e-6)
    evaluation.write_outputs(tmp_path, run.config, results, [])
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
