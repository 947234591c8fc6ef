"""BraTS 2023 lesion-wise metrics on hand-made volumes with hand-known scores."""

import csv
import os
import pathlib
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats_jax.metrics import lesionwise as L

REPO = pathlib.Path(__file__).resolve().parents[2]
W = L.HD95_WORST  # 374 mm


def _cube(vol, corner, size=4, value=True):
    x, y, z = corner
    vol[x : x + size, y : y + size, z : z + size] = value


def _empty(shape=(40, 40, 16)):
    return np.zeros(shape, bool)


def test_one_lesion_found_exactly():
    gt = _empty()
    _cube(gt, (5, 5, 5))  # 64 voxels > 50 mm^3
    s = L.region_scores(gt.copy(), gt)
    assert (s["dice"], s["hd95"]) == (1.0, 0.0)
    assert (s["tp"], s["fn"], s["fp"]) == (1, 0, 0)


def test_one_of_two_lesions_missed():
    gt = _empty()
    _cube(gt, (5, 5, 5))
    _cube(gt, (5, 25, 5))  # 16 voxels apart: two lesions
    pred = _empty()
    _cube(pred, (5, 5, 5))
    s = L.region_scores(pred, gt)
    assert s["dice"] == pytest.approx(0.5)
    assert s["hd95"] == pytest.approx((0 + 374) / 2)
    assert (s["tp"], s["fn"], s["fp"]) == (1, 1, 0)


def test_spurious_islands_are_false_positives():
    gt = _empty()
    _cube(gt, (5, 5, 5))
    pred = gt.copy()
    pred[30, 30, 12] = True  # one voxel: FP components have no size threshold
    _cube(pred, (30, 5, 5), size=2)
    s = L.region_scores(pred, gt)
    # lesion Dice 1, HD95 0; two FPs at 0 / 374: sum / (1 lesion + 2 FP)
    assert s["dice"] == pytest.approx(1 / 3)
    assert s["hd95"] == pytest.approx((0 + 2 * 374) / 3)
    assert (s["tp"], s["fn"], s["fp"]) == (1, 0, 2)


def test_prediction_touching_only_the_dilated_lesion_is_matched():
    gt = _empty()
    _cube(gt, (5, 5, 5))  # y 5..8
    pred = gt.copy()
    pred[6, 11, 6] = True  # 3 voxels past the lesion (y = 11): inside the 3-step dilation
    s = L.region_scores(pred, gt)
    assert s["fp"] == 0
    assert s["dice"] == pytest.approx(2 * 64 / (65 + 64))
    pred[6, 11, 6] = False
    pred[6, 12, 6] = True  # 4 voxels past it: outside, a false positive
    s = L.region_scores(pred, gt)
    assert s["fp"] == 1
    assert s["dice"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("gap, lesions", [(6, 1), (7, 2)])
def test_lesions_within_the_dilation_are_merged(gap, lesions):
    gt = _empty()
    _cube(gt, (5, 5, 5))  # y 5..8
    _cube(gt, (5, 9 + gap, 5))  # `gap` empty voxels between: each side dilates by 3
    pred = _empty()
    _cube(pred, (5, 5, 5))
    s = L.region_scores(pred, gt)
    if lesions == 1:  # one lesion of 128 voxels, half of it predicted
        assert (s["tp"], s["fn"]) == (1, 0)
        assert s["dice"] == pytest.approx(2 * 64 / (64 + 128))
    else:  # two lesions, one found
        assert (s["tp"], s["fn"]) == (1, 1)
        assert s["dice"] == pytest.approx(0.5)
    s = L.region_scores(pred, gt, dilation_iterations=0)  # no merging: two lesions
    assert (s["tp"], s["fn"]) == (1, 1)


def test_small_lesion_ignored_by_volume_in_mm3():
    gt = _empty()
    _cube(gt, (5, 5, 5))
    gt[20:25, 20:30, 10] = True  # 50 voxels = 50 mm^3: at the threshold, ignored (<=)
    pred = _empty()
    _cube(pred, (5, 5, 5))
    s = L.region_scores(pred, gt)
    assert (s["dice"], s["hd95"], s["fn"], s["ignored"]) == (1.0, 0.0, 0, 1)
    gt[25, 20, 10] = True  # 51 mm^3: counted and missed
    s = L.region_scores(pred, gt)
    assert (s["dice"], s["hd95"], s["fn"]) == (0.5, 187.0, 1)
    # 27 voxels of 2x2x2 mm = 216 mm^3: counted; of 1 mm: ignored
    gt = _empty()
    _cube(gt, (5, 5, 5))
    _cube(gt, (20, 20, 5), size=3)
    assert L.region_scores(pred, gt)["dice"] == 1.0
    assert L.region_scores(pred, gt, (2, 2, 2))["dice"] == pytest.approx(0.5)
    # a prediction touching only an ignored lesion is not a false positive
    _cube(pred, (20, 20, 5), size=3)
    assert L.region_scores(pred, gt)["fp"] == 0
    assert L.region_scores(pred, gt, min_volume=0)["tp"] == 2


def test_empty_cases():
    gt, pred = _empty(), _empty()
    s = L.region_scores(pred, gt)
    assert (s["dice"], s["hd95"]) == (1.0, 0.0)  # both empty: the challenge's 1 / 0
    _cube(pred, (5, 5, 5))
    pred[30, 30, 12] = True
    s = L.region_scores(pred, gt)
    assert (s["dice"], s["hd95"], s["fp"]) == (0.0, 374.0, 2)  # empty GT, 2 components


def test_regions_from_class_maps():
    gt = np.zeros((40, 40, 16), np.uint8)
    _cube(gt, (5, 5, 5), value=2)  # ED: WT only
    _cube(gt, (5, 25, 5), value=3)  # ET: WT, TC, ET
    pred = gt.copy()
    pred[pred == 3] = 1  # ET predicted as NCR: WT and TC right, ET missed
    out = L.evaluate_volume(pred, gt)
    assert list(out) == L.COLUMNS
    assert out["lesionwise_dice_WT"] == 1.0 and out["lesionwise_tp_WT"] == 2
    assert out["lesionwise_dice_TC"] == 1.0 and out["lesionwise_tp_TC"] == 1
    assert (out["lesionwise_dice_ET"], out["lesionwise_hd95_ET"]) == (0.0, 374.0)
    assert out["lesionwise_fn_ET"] == 1


def _challenge_reference(pred, gt, dil=3, thresh=50):
    """A literal port of BraTS-2023-Metrics' get_LesionWiseScores / get_LesionWiseResults
    Dice and counts (cc3d connectivity 26 -> scipy's 3x3x3 structure), unit spacing."""
    s26 = np.ones((3, 3, 3))
    struct = ndimage.generate_binary_structure(3, 2)
    gt_cc = ndimage.label(gt, s26)[0]
    pred_cc = ndimage.label(pred, s26)[0]
    dil_cc = ndimage.label(ndimage.binary_dilation(gt, struct, iterations=dil), s26)[0]
    comb = np.zeros_like(dil_cc)
    for comp in range(1, dil_cc.max() + 1):
        tmp = gt_cc * (dil_cc == comp)
        comb += np.where(tmp > 0, comp, 0)
    tp, rows = [], []
    for comp in range(1, comb.max() + 1):
        g = comb == comp
        gd = ndimage.binary_dilation(g, struct, iterations=dil)
        hits = [c for c in np.unique(pred_cc * gd) if c != 0]
        tp += hits
        p = np.isin(pred_cc, hits)
        rows.append((len(hits), g.sum(), 2 * (p & g).sum() / (p.sum() + g.sum())))
    fp = len(np.unique(pred_cc[np.isin(pred_cc, tp + [0], invert=True)]))
    kept = [r for r in rows if r[1] > thresh]
    n = len(kept) + fp
    dice = sum(r[2] for r in kept) / n if n else 1.0
    return dice, sum(r[0] > 0 for r in kept), sum(r[0] == 0 for r in kept), fp


@pytest.mark.parametrize("seed, dil, thresh", [(3, 3, 50), (4, 3, 50), (2, 1, 10), (5, 2, 20)])
def test_matches_a_port_of_the_challenge_code(seed, dil, thresh):
    rng = np.random.default_rng(seed)
    gt = ndimage.gaussian_filter(rng.random((48, 48, 24)), 2) > 0.535
    pred = ndimage.gaussian_filter(rng.random((48, 48, 24)), 2) > 0.56
    pred[:24] |= gt[:24] & (rng.random((24, 48, 24)) > 0.3)  # lesions at x >= 24 mostly missed
    s = L.region_scores(pred, gt, dilation_iterations=dil, min_volume=thresh)
    dice, tp, fn, fp = _challenge_reference(pred, gt, dil, thresh)
    assert min(s["tp"], s["fn"], s["fp"]) > 0  # a non-trivial case
    assert (s["tp"], s["fn"], s["fp"]) == (tp, fn, fp)
    assert s["dice"] == pytest.approx(dice)


def test_bad_options_are_one_line_errors():
    gt = _empty()
    with pytest.raises(ValueError, match="dilation_neighbours 8"):
        L.region_scores(gt, gt, dilation_neighbours=8)
    with pytest.raises(ValueError, match="dilation_iterations -1"):
        L.region_scores(gt, gt, dilation_iterations=-1)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, np.uint8), np.eye(4)), str(path))


def test_evaluate_cli_lesionwise_columns_and_table(tmp_path):
    gt = np.zeros((40, 40, 16), np.uint8)
    _cube(gt, (5, 5, 5), value=2)
    _cube(gt, (5, 25, 5), value=2)
    pred = np.zeros_like(gt)
    _cube(pred, (5, 5, 5), value=2)  # case A: one of two WT lesions found
    _save(tmp_path / "gt" / "A" / "A_seg.nii.gz", gt)
    _save(tmp_path / "pred" / "A.nii.gz", pred)
    _save(tmp_path / "gt" / "B" / "B_seg.nii.gz", gt)
    _save(tmp_path / "pred" / "B.nii.gz", gt)  # case B: exact
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "brats_jax.evaluate", f"--gt={tmp_path / 'gt'}"]
    base.append(f"--pred={tmp_path / 'pred'}")
    run = subprocess.run(
        [
            *base,
            f"--out={tmp_path / 'm.csv'}",
            "--metrics=lesionwise",
            f"--overlays={tmp_path / 'pics'}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    with open(tmp_path / "m.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert float(rows["A"]["lesionwise_dice_WT"]) == pytest.approx(0.5)
    assert float(rows["A"]["lesionwise_hd95_WT"]) == pytest.approx(187.0)
    assert rows["A"]["lesionwise_fn_WT"] == "1"
    assert float(rows["B"]["lesionwise_dice_WT"]) == 1.0
    assert float(rows["A"]["dice_WT"]) == pytest.approx(2 * 64 / 192)  # standard ones too
    assert "lesion-wise" in run.stdout
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("lesionwise_dice_WT"))
    assert float(line.split()[1]) == pytest.approx(0.75)  # mean of 0.5 and 1
    assert "WT: TP 3 FN 1 FP 0" in run.stdout
    # the pictures' index shows the lesion-wise Dice and the FP / missed counts too (caught:
    # index columns left at the voxel scores)
    page = (tmp_path / "pics" / "index.html").read_text()
    for col in ("lesionwise_dice_WT", "lesionwise_fp_ET", "lesionwise_fn_WT"):
        assert f"<th>{col}</th>" in page
    head = re.findall(r"<th>([^<]*)</th>", page)
    row_a = next(r for r in re.findall(r"<tr>(.*?)</tr>", page, re.S) if "<td>A</td>" in r)
    cells = dict(zip(head, re.findall(r"<td>(.*?)</td>", row_a, re.S), strict=True))
    assert (cells["lesionwise_dice_WT"], cells["lesionwise_fn_WT"]) == ("0.5000", "1")
    plain = subprocess.run(  # default: today's columns only
        [*base, f"--out={tmp_path / 'n.csv'}"], capture_output=True, text=True, env=env
    )
    assert plain.returncode == 0, plain.stderr
    header = (tmp_path / "n.csv").read_text().splitlines()[0]
    assert "lesionwise" not in header and "lesion-wise" not in plain.stdout


def test_summarise_means_dice_hd95_and_sums_counts():
    rows = [
        {
            f"lesionwise_{k}_{r}": v
            for k, v in zip(L._KEYS, (1.0, 0.0, 2, 0, 1), strict=True)
            for r in "WT TC ET".split()
        },
        {
            f"lesionwise_{k}_{r}": v
            for k, v in zip(L._KEYS, (0.5, 187.0, 1, 1, 0), strict=True)
            for r in "WT TC ET".split()
        },
        {"lesionwise_dice_WT": 0.0, "lesionwise_hd95_WT": 374.0},  # a missing case: no counts
    ]
    got = L.summarise(rows)
    assert got["dice"]["WT"] == pytest.approx(0.5) and got["dice"]["TC"] == pytest.approx(0.75)
    assert got["hd95"]["WT"] == pytest.approx(187.0)
    assert (got["tp"]["WT"], got["fn"]["WT"], got["fp"]["WT"]) == (3, 1, 1)


def _kept_lesions(mask):
    """GT lesions (dilation 3 x 18-neighbourhood, 26-connected) of more than 50 voxels."""
    dil = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 2), iterations=3)
    cc = ndimage.label(dil, np.ones((3, 3, 3)))[0] * mask
    return sum(int((cc == j).sum() > 50) for j in range(1, cc.max() + 1))


@pytest.mark.parametrize("perfect", [True, False])
def test_training_test_pass_has_lesionwise_block_and_columns(tmp_path, monkeypatch, perfect):
    from brats_jax import data
    from brats_jax.training import evaluation, run_group
    from configs import unet as unet_config

    run = run_group.build_run(unet_config.get_config("tiny"), tmp_path)
    labels, real_load = {}, data.load_volume

    def load_volume(source, case_id):
        image, label = real_load(source, case_id)
        labels["last"] = label
        return image, label

    def predict_volume(predict, variables, image, **kw):  # the GT itself, or all background
        label = labels["last"] if perfect else np.zeros_like(labels["last"])
        return np.eye(4, dtype=np.float32)[label]

    monkeypatch.setattr(evaluation.data, "load_volume", load_volume)
    monkeypatch.setattr(evaluation.whole_volume, "predict_volume", predict_volume)
    results, _ = evaluation.evaluate_test_volumes(run, None, None)
    assert len(results["per_case"]) >= 1
    kept = {r: [] for r in ("WT", "TC", "ET")}
    for case_id in run.splits.cases["test"]:
        _, label = real_load(run.source, case_id)
        for r, classes in (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))):
            kept[r].append(_kept_lesions(np.isin(label, classes)))
    block = results["lesionwise"]
    assert sum(kept["WT"]) >= 1  # the synthetic tumour is one lesion of > 50 voxels
    for r, counts in kept.items():
        if perfect:
            assert (block["dice"][r], block["hd95"][r], block["fn"][r]) == (1.0, 0.0, 0)
            assert block["tp"][r] == sum(counts)
        else:  # every kept lesion missed: Dice 0 / HD95 374; no lesion: 1 / 0
            assert block["dice"][r] == pytest.approx(np.mean([c == 0 for c in counts]))
            assert block["fn"][r] == sum(counts) and block["tp"][r] == 0
    evaluation.write_per_case_csv(tmp_path / "per_case.csv", results["per_case"])
    header = (tmp_path / "per_case.csv").read_text().splitlines()[0].split(",")
    assert set(L.COLUMNS) <= set(header)


def test_scores_do_not_depend_on_the_empty_space_around():
    """Work is cut to the masks' bounding box: padding the volume changes nothing."""
    rng = np.random.default_rng(3)
    gt = ndimage.gaussian_filter(rng.random((30, 30, 16)), 2) > 0.535
    pred = ndimage.gaussian_filter(rng.random((30, 30, 16)), 2) > 0.56
    pred[:15] |= gt[:15]
    small = L.region_scores(pred, gt, (1.0, 1.5, 2.0))
    pad = ((7, 3), (2, 9), (5, 5))
    big = L.region_scores(np.pad(pred, pad), np.pad(gt, pad), (1.0, 1.5, 2.0))
    assert small == pytest.approx(big)
    # two lesions 6 voxels apart, merged only if the dilation has room to run between them
    gt, pred = _empty(), _empty()
    _cube(gt, (5, 5, 5))
    _cube(gt, (5, 15, 5))
    _cube(pred, (5, 15, 5))
    assert L.region_scores(pred, gt)["tp"] == 1 and L.region_scores(pred, gt)["fn"] == 0
