"""Uncertainty values and files (`inference/uncertainty.py`) by hand: the entropy bounds,
clipping, the CSV's number format and the CSV's name beside a NIfTI file."""

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from brats_jax.inference import uncertainty as U


def test_max_entropy_of_both_kinds():
    assert U.max_entropy("classes") == pytest.approx(math.log(4), rel=1e-12)
    assert U.max_entropy("regions") == pytest.approx(3 * math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="model.output 'x'"):
        U.max_entropy("x")


def test_entropy_clips_to_zero_one_and_is_float32():
    # a softmax can round a certain class to 1 + 1e-7; clipped, it is certain (entropy 0)
    p = np.array([[1.0 + 1e-7, -1e-8, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]])
    h = U.entropy(p, "classes")
    assert h.dtype == np.float32 and h.shape == (2,)
    assert h[0] == 0.0
    np.testing.assert_allclose(h[1], 0.5 * math.log(2) + 0.5 * math.log(4), rtol=1e-6)
    r = U.entropy(np.array([1.0 + 1e-6, 0.5, -1e-6]), "regions")
    np.testing.assert_allclose(r, math.log(2), rtol=1e-6)
    with pytest.raises(ValueError) as err:
        U.entropy(np.ones((2, 3)) / 3, "classes")
    assert str(err.value) == "probabilities (2, 3): expected 4 channels for model.output='classes'"


def test_uncertain_share_counts_entropy_at_log_2_in_float32():
    h = np.array([np.float32(math.log(2)), 0.69, 0.0], np.float32).reshape(3, 1, 1)
    brain = np.ones((3, 1, 1), bool)
    row = U.case_row("c", h, np.zeros((3, 1, 1)), brain, (1, 1, 1), "classes")
    assert row["uncertain_share_brain"] == pytest.approx(1 / 3)  # log 2 counts, 0.69 not
    none = U.case_row("c", h, np.zeros((3, 1, 1)), ~brain, (1, 1, 1), "classes")
    assert none["uncertain_share_brain"] is None
    assert list(row) == list(U.COLUMNS) and row["members"] == 0 and row["member_wt_dice"] is None


def test_csv_numbers_to_six_digits_and_none_empty(tmp_path):
    rows = [
        {"case_id": "A", "tumour_volume_ml": 12.3456789, "mean_entropy_tumour": None,
         "uncertain_share_brain": 1 / 3, "members": 2, "member_wt_dice": 0.5},
    ]  # fmt: skip
    path = tmp_path / "u.csv"
    U.write_csv(rows, path)
    text = path.read_text().splitlines()
    assert text[0] == ",".join(U.COLUMNS)
    assert text[1] == "A,12.3457,,0.333333,2,0.5"
    with open(path, newline="") as f:
        assert next(csv.DictReader(f))["members"] == "2"


def test_csv_path_beside_the_nifti():
    assert U.csv_path("out/u/Brats_1.nii.gz").as_posix() == "out/u/Brats_1.csv"
    assert U.csv_path("Brats_1.nii").as_posix() == "Brats_1.csv"
    assert U.csv_path("a.b/x.y.nii.gz").as_posix() == "a.b/x.y.csv"


def test_write_case_writes_float32_entropy_on_the_input_grid(tmp_path):
    class Case:  # the fields of a brats.CaseData that write_case reads
        case_id = "K"
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        header = nib.Nifti1Header()
        brain = np.ones((2, 1, 1), bool)

    Case.header.set_data_shape((2, 1, 1))
    Case.header.set_zooms((2.0, 2.0, 3.0))
    probs = np.array([[0.5, 0.5, 0, 0], [1, 0, 0, 0]], np.float32).reshape(2, 1, 1, 4)
    labels = np.array([1, 0]).reshape(2, 1, 1)
    row = U.write_case(Case, labels, probs, "classes", tmp_path / "K.nii.gz")
    img = nib.load(tmp_path / "K.nii.gz")
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_fdata()[:, 0, 0], [math.log(2), 0.0], rtol=1e-6)
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == U.DESCRIPTION
    assert row["case_id"] == "K" and row["uncertain_share_brain"] == 0.5
    assert row["tumour_volume_ml"] == pytest.approx(12 / 1000)  # one 2x2x3 mm voxel
    assert row["mean_entropy_tumour"] == pytest.approx(math.log(2), rel=1e-6)


def test_write_nifti_stores_float32_whatever_it_is_given(tmp_path):
    class Case:
        affine = np.eye(4)
        header = nib.Nifti1Header()

    U.write_nifti(np.full((2, 2, 1), 0.25, np.float64), Case, tmp_path / "h.nii.gz")
    img = nib.load(tmp_path / "h.nii.gz")
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.get_fdata(), np.full((2, 2, 1), 0.25))


def test_uncertain_bar_is_inclusive_and_an_integer_brain_mask_is_a_mask():
    bar = U.UNCERTAIN_NATS * (1 - 1e-6)
    h = np.array([bar, np.nextafter(bar, 0), 1.0, 0.0]).reshape(4, 1, 1)
    brain = np.array([1, 1, 0, 1]).reshape(4, 1, 1)  # 0/1 integers, as read from a file
    row = U.case_row("c", h, np.zeros((4, 1, 1)), brain, (1, 1, 1), "classes")
    assert row["uncertain_share_brain"] == pytest.approx(1 / 3)  # the bar itself counts
