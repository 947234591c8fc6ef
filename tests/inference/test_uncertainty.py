"""predict --uncertainty: entropy maps and per-case summaries against closed forms.

Stand-in runs as in tests/inference/test_predict.py (`train_state.load_trained` patched): a
pointwise model whose logits are its input times `variables["scale"]`, or
`whole_volume.predict_volume` patched to return hand-made per-run probabilities.
"""

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from brats_jax import predict
from brats_jax.inference import case_lists, case_prediction, whole_volume
from brats_jax.inference import uncertainty as U
from brats_jax.runs import train_state

SHAPE = (12, 10, 6)
AFFINE = np.array([[-2.0, 0, 0, -10], [0, -1.0, 0, 5], [0, 0, 1.0, 3], [0, 0, 0, 1]])  # LPS
# The cases' `write_nifti_case` arguments: N(0.5, 1) modalities, x 0, 1 outside the brain.
CASE = {"shape": SHAPE, "mean": 0.5, "std": 1.0, "background_rows": 2, "affine": AFFINE}


class _ScaleModel:
    def __init__(self, channels=4):
        self.channels = channels

    def apply(self, variables, x, train):
        return x[..., : self.channels] * variables["scale"]


@pytest.fixture
def runs(tmp_path, monkeypatch, stand_in_config):
    """add(name, scale, output, image_size=16) -> a run folder that
    `train_state.load_trained` serves."""
    table = {}

    def load_trained(workdir, step=None):
        config, scale = table[str(workdir)]
        model = _ScaleModel(3 if config.model.output == "regions" else 4)
        return config, model, {"scale": np.float32(scale)}

    monkeypatch.setattr(train_state, "load_trained", load_trained)

    def add(name, scale=1.0, output="classes", image_size=16):
        path = tmp_path / name
        path.mkdir()
        config = stand_in_config(
            **{"model.base_features": 8, "model.output": output, "data.image_size": image_size}
        )
        table[str(path)] = (config, scale)
        return str(path)

    return add


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _hand_entropy(p):
    """-sum p log p over the last axis, 0 log 0 = 0 (numpy by hand)."""
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)


def test_identical_members_give_one_members_entropy(runs, tmp_path, write_nifti_case):
    r1, r2 = runs("r1", scale=2.0), runs("r2", scale=2.0)
    case = write_nifti_case(tmp_path, "Brats18_A_1", **CASE)
    case_prediction.predict_case(
        r1, case, tmp_path / "a.nii.gz", probabilities=tmp_path / "p.nii.gz"
    )
    out = tmp_path / "u" / "ent.nii.gz"
    case_prediction.predict_case(f"{r1},{r2}", case, tmp_path / "b.nii.gz", uncertainty=out)
    h = _read(out)
    assert h.dtype == np.float32 and h.shape == SHAPE
    expected = _hand_entropy(_read(tmp_path / "p.nii.gz"))
    assert expected.max() > 0.3  # not a trivially confident case
    np.testing.assert_allclose(h, expected, atol=1e-5)
    (row,) = _rows(tmp_path / "u" / "ent.csv")  # the CSV beside the file
    assert float(row["member_wt_dice"]) == 1.0 and row["members"] == "2"


def test_three_different_members_entropy_of_their_mean_and_pairwise_dice(
    runs, tmp_path, write_nifti_case
):
    """Runs of scales 1, 2 and -1 at native size: the map is the entropy of the mean of
    the three softmax(scale x), by hand; the CSV's member Dice is the mean WT Dice of the 3
    pairs of the runs' own argmaxes (scales 1 and 2 agree, -1 is the argmin), by hand."""
    from brats_jax.data import brats

    scales = (1.0, 2.0, -1.0)
    members = ",".join(runs(f"r{i}", scale=s, image_size=0) for i, s in enumerate(scales))
    case = write_nifti_case(tmp_path, "Brats18_A_1", **CASE)
    out = tmp_path / "u" / "ent.nii.gz"
    labels = case_prediction.predict_case(
        members, case, tmp_path / "b.nii.gz", uncertainty=out, postprocessing="none"
    )
    x = brats.load_case(case, require_label=False, normalization="brain").image
    probs = [_softmax(np.float64(s) * x) for s in scales]
    mean = np.mean(probs, 0)
    h = _read(out)
    np.testing.assert_allclose(h, _hand_entropy(mean), atol=1e-5)
    assert np.abs(_hand_entropy(mean) - _hand_entropy(probs[0])).max() > 0.1  # not member 1's
    wt = [np.argmax(p, -1) > 0 for p in probs]
    pairs = ((wt[0], wt[1]), (wt[0], wt[2]), (wt[1], wt[2]))
    dice = [2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in pairs]
    assert dice[0] == 1.0 and dice[1] < 0.9  # two agree, the third does not
    (row,) = _rows(tmp_path / "u" / "ent.csv")
    assert row["members"] == "3"
    assert float(row["member_wt_dice"]) == pytest.approx(np.mean(dice), rel=1e-5)
    tumour = labels > 0
    assert tumour.any()
    assert float(row["mean_entropy_tumour"]) == pytest.approx(
        _hand_entropy(mean)[tumour].mean(), rel=1e-4
    )


def _slab_labels():
    """Two runs' labels: NCR at x 2..5 and at x 4..7 (all y, z); they overlap at x 4, 5."""
    a = np.zeros(SHAPE, np.int64)
    b = np.zeros(SHAPE, np.int64)
    a[2:6] = 1
    b[4:8] = 1
    return a, b


def test_two_disagreeing_members_closed_form_and_csv(runs, tmp_path, monkeypatch, write_nifti_case):
    r1, r2 = runs("r1", scale=1.0), runs("r2", scale=2.0)
    a, b = _slab_labels()
    by_scale = {1.0: np.eye(4, dtype=np.float32)[a], 2.0: np.eye(4, dtype=np.float32)[b]}
    monkeypatch.setattr(
        whole_volume, "predict_volume", lambda p, v, *x, **k: by_scale[float(v["scale"])]
    )
    data = tmp_path / "data"
    write_nifti_case(data, "Brats18_A_1", **CASE)
    write_nifti_case(data, "Brats18_B_1", seed=1, **CASE)
    cases = case_lists.cases_from_input(str(data))
    udir = tmp_path / "unc"
    case_prediction.predict_cases(
        f"{r1},{r2}", cases, tmp_path / "seg", uncertainty_dir=udir, postprocessing="none"
    )
    img = nib.load(str(udir / "Brats18_A_1.nii.gz"))
    np.testing.assert_allclose(img.affine, AFFINE)  # the input's grid
    assert img.get_data_dtype() == np.float32
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == U.DESCRIPTION
    h = np.asarray(img.dataobj)
    # where the runs differ: p = (1/2, 1/2, 0, 0) -> log 2 nats; where they agree: 0
    differ = a != b
    np.testing.assert_allclose(h[differ], math.log(2), atol=1e-6)
    np.testing.assert_allclose(h[~differ], 0.0, atol=1e-6)
    rows = _rows(udir / U.CSV_FILE)
    assert list(rows[0]) == list(U.COLUMNS)
    assert [r["case_id"] for r in rows] == ["Brats18_A_1", "Brats18_B_1"]
    r = rows[0]
    # averaged labels: NCR only at x 4, 5 (ties at x 2, 3, 6, 7 go to background):
    # 2 * 10 * 6 voxels of 2 x 1 x 1 mm = 240 mm^3 = 0.24 ml; entropy 0 there
    assert float(r["tumour_volume_ml"]) == pytest.approx(0.24)
    assert float(r["mean_entropy_tumour"]) == pytest.approx(0.0, abs=1e-6)
    # WT Dice of the two runs' own labels: 2 * 2 slabs / (4 + 4) slabs
    assert float(r["member_wt_dice"]) == pytest.approx(0.5)
    assert r["members"] == "2"


def test_region_entropy_closed_form():
    p = np.array([[0.5, 0.5, 0.5], [1.0, 0.0, 0.5], [0.2, 0.9, 0.0]])
    h = U.entropy(p, "regions")

    def b(q):
        return 0.0 if q in (0.0, 1.0) else -q * math.log(q) - (1 - q) * math.log(1 - q)

    np.testing.assert_allclose(h[0], 3 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(h[1], math.log(2), rtol=1e-6)
    np.testing.assert_allclose(h[2], b(0.2) + b(0.9), rtol=1e-6)
    assert U.max_entropy("regions") == pytest.approx(3 * math.log(2))
    np.testing.assert_allclose(U.entropy([0.25] * 4, "classes"), math.log(4), rtol=1e-6)
    with pytest.raises(ValueError, match="expected 3 channels"):
        U.entropy(np.ones((2, 4)) / 4, "regions")


def test_region_runs_write_the_summed_binary_entropy(runs, tmp_path, write_nifti_case):
    run = runs("r", scale=1.5, output="regions")
    case = write_nifti_case(tmp_path, "Brats18_A_1", **CASE)
    out, probs = tmp_path / "u.nii.gz", tmp_path / "p.nii.gz"
    case_prediction.predict_case(
        run, case, tmp_path / "s.nii.gz", probabilities=probs, uncertainty=out
    )
    p = _read(probs).astype(np.float64)
    assert p.shape == (*SHAPE, 3) and 0.01 < p.min() and p.max() < 0.99  # not saturated
    expected = _hand_entropy(np.stack([p, 1 - p], -1)).sum(-1)
    np.testing.assert_allclose(_read(out), expected, atol=1e-5)
    (row,) = _rows(tmp_path / "u.csv")
    assert row["member_wt_dice"] == "" and row["members"] == "1"  # one run: no agreement


def test_case_row_uncertain_share_and_pairwise_dice_by_hand():
    h = np.zeros((4, 1, 1), np.float32)
    h[:, 0, 0] = [0.1, 0.8, 0.7, 1.0]  # threshold log 2 = 0.693: 0.8, 0.7, 1.0 above
    brain = np.array([True, True, False, True]).reshape(4, 1, 1)
    labels = np.array([0, 2, 2, 0]).reshape(4, 1, 1)
    m1 = np.array([0, 1, 1, 0]).reshape(4, 1, 1)
    m2 = np.array([0, 2, 0, 0]).reshape(4, 1, 1)
    m3 = np.zeros((4, 1, 1), int)
    row = U.case_row("c", h, labels, brain, (1.0, 2.0, 5.0), "classes", [m1, m2, m3])
    assert row["uncertain_share_brain"] == pytest.approx(2 / 3)  # 0.8 and 1.0 of 3 in brain
    assert row["mean_entropy_tumour"] == pytest.approx(0.75)
    assert row["tumour_volume_ml"] == pytest.approx(2 * 10 / 1000)
    # pairs: (m1, m2) 2*1/(2+1); (m1, m3) 0; (m2, m3) 0
    assert row["member_wt_dice"] == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert U.pairwise_wt_dice([m3, m3]) == 1.0  # both empty
    assert U.pairwise_wt_dice([m1]) is None
    empty = U.case_row("e", h, m3, brain, (1, 1, 1), "classes")
    assert empty["mean_entropy_tumour"] is None and empty["tumour_volume_ml"] == 0.0


def test_a_coin_flip_is_uncertain_for_both_output_kinds():
    """Entropy log 2 is the bar: classes split 50/50 between two labels, or WT at 0.5 with
    TC, ET certain, count; WT at 0.4 (binary entropy 0.673 nats) does not."""
    classes = np.array([[0.5, 0.5, 0, 0], [0.9, 0.1, 0, 0]], np.float32)
    regions = np.array([[0.5, 0.0, 0.0], [0.4, 0.0, 0.0]], np.float32)
    for probs, output in ((classes, "classes"), (regions, "regions")):
        h = U.entropy(probs, output).reshape(2, 1, 1)
        row = U.case_row("c", h, np.zeros((2, 1, 1)), np.ones((2, 1, 1), bool), (1, 1, 1), output)
        assert row["uncertain_share_brain"] == 0.5, output


def test_cli_uncertainty_must_match_the_output_kind(runs, tmp_path, write_nifti_case, run_command):
    run = runs("r")
    case = write_nifti_case(tmp_path, "Brats18_A_1", **CASE)
    for output, unc, message in (
        (tmp_path / "s.nii.gz", tmp_path / "udir", "give a .nii or .nii.gz file"),
        (tmp_path / "segs", tmp_path / "u.nii.gz", "give a folder when --output is a folder"),
    ):
        with pytest.raises(Exception, match=message):
            run_command(
                predict,
                f"--workdir={run}",
                f"--input={case}",
                f"--output={output}",
                f"--uncertainty={unc}",
            )


def test_cli_writes_the_uncertainty_folder(runs, tmp_path, write_nifti_case, run_command):
    run = runs("r")
    data = tmp_path / "data"
    write_nifti_case(data, "Brats18_A_1", **CASE)
    udir = tmp_path / "udir"
    run_command(
        predict,
        f"--workdir={run}",
        f"--input={data}",
        f"--output={tmp_path / 'segs'}",
        f"--uncertainty={udir}",
    )
    assert sorted(p.name for p in udir.iterdir()) == ["Brats18_A_1.nii.gz", U.CSV_FILE]
    assert [r["case_id"] for r in _rows(udir / U.CSV_FILE)] == ["Brats18_A_1"]


def test_by_case_keys_rows_by_case_id_without_repeating_it():
    """The index page's extra columns: one entry per case, the case ID not repeated as a
    column (a plain `{r["case_id"]: r}` would show it twice)."""
    from brats_jax.inference import uncertainty

    rows = [{"case_id": "A", "members": 2, "member_wt_dice": 0.5}, {"case_id": "B", "members": 1}]
    assert uncertainty.by_case(rows) == {
        "A": {"members": 2, "member_wt_dice": 0.5},
        "B": {"members": 1},
    }
