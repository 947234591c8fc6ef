"""NIfTI case discovery, loading, label conventions and error messages (tiny files)."""

import gzip

import numpy as np
import pytest

from brats_jax.data import (
    DataError,
    case_from_files,
    find_cases,
    load_case,
)
from brats_jax.labels import to_release_labels, to_train_labels


@pytest.mark.parametrize("naming,ext", [("2018", ".nii.gz"), ("2018", ".nii"), ("2023", ".nii.gz")])
def test_both_namings_load_and_remap(tmp_path, naming, ext, write_labelled_case):
    d, raws, lab = write_labelled_case(tmp_path, "C1", naming, ext)
    (cases,) = [find_cases(tmp_path)]
    assert [c.case_id for c in cases] == ["C1"] and cases[0].naming == naming
    data = load_case(cases[0])
    assert data.image.shape == write_labelled_case.shape + (4,) and data.image.dtype == np.float32
    assert data.label.dtype == np.int32
    # remap by hand: 4 -> 3 (2018-2021); 2023 already 3
    assert set(np.unique(data.label)) == {0, 1, 2, 3}
    assert (data.label[10:12, 6:8, 3] == 3).all() and (data.label[8:10, 6:8, 2] == 2).all()
    # channel order flair, t1, t1ce, t2 and z-score over brain voxels (any modality non-zero)
    brain = np.zeros(write_labelled_case.shape, bool)
    for r in raws.values():
        brain |= r != 0
    for k, m in enumerate(("flair", "t1", "t1ce", "t2")):
        x = raws[m].astype(np.float64)
        expect = (x - x[brain].mean()) / x[brain].std()
        np.testing.assert_allclose(data.image[..., k], expect, rtol=1e-5, atol=1e-5)


def test_release_labels_round_trip():
    y = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(to_release_labels(y, "2018"), [0, 1, 2, 4])
    np.testing.assert_array_equal(to_release_labels(y, "2023"), [0, 1, 2, 3])
    np.testing.assert_array_equal(to_train_labels(np.array([0, 1, 2, 4]), "2018"), y)


def test_case_355_segm_quirk(tmp_path, write_labelled_case):
    write_labelled_case(
        tmp_path, "BraTS20_Training_355", ext=".nii", seg_name="W39_1998.09.19_Segm.nii"
    )
    (case,) = find_cases(tmp_path)
    assert case.seg.name == "W39_1998.09.19_Segm.nii"
    assert load_case(case).label.max() == 3


def test_cases_found_nested_and_sorted(tmp_path, write_labelled_case):
    write_labelled_case(tmp_path / "release", "B", "2018")
    write_labelled_case(tmp_path / "release", "A", "2023")
    assert [c.case_id for c in find_cases(tmp_path)] == ["A", "B"]


def test_missing_root_and_modality(tmp_path, write_labelled_case):
    with pytest.raises(DataError, match="does not exist"):
        find_cases(tmp_path / "nope")
    d, _, _ = write_labelled_case(tmp_path, "C1")
    (d / "C1_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=r"C1.*t1ce.*C1_t1ce\.nii"):
        find_cases(tmp_path)


def test_shape_and_affine_mismatch(tmp_path, write_labelled_case):
    write_labelled_case(tmp_path / "a", "C1", t2=np.ones((16, 16, 7), np.int16))
    with pytest.raises(DataError, match=r"C1_t2\.nii\.gz has shape \(16, 16, 7\)"):
        load_case(tmp_path / "a" / "C1")
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[0, 3] = 5.0
    write_labelled_case(tmp_path / "b", "C2", t1_affine=aff)
    with pytest.raises(DataError, match=r"C2_t1\.nii\.gz affine differs"):
        load_case(tmp_path / "b" / "C2")
    write_labelled_case(tmp_path / "c", "C3", seg=np.zeros((16, 16, 7), np.int16))
    with pytest.raises(DataError, match=r"label C3_seg\.nii\.gz has shape \(16, 16, 7\)"):
        load_case(tmp_path / "c" / "C3")
    write_labelled_case(
        tmp_path / "d", "C4", t1ce=np.ones((*write_labelled_case.shape, 2), np.int16)
    )
    with pytest.raises(DataError, match=r"C4_t1ce\.nii\.gz: expected a 3-D volume"):
        load_case(tmp_path / "d" / "C4")


def test_non_finite_and_bad_labels(tmp_path, write_labelled_case):
    x = np.ones(write_labelled_case.shape, np.float32)
    x[1, 1, 1] = np.nan
    write_labelled_case(tmp_path / "a", "C1", flair=x)
    with pytest.raises(DataError, match=r"C1_flair\.nii\.gz.*non-finite"):
        load_case(tmp_path / "a" / "C1")
    lab = write_labelled_case.label("2018")
    lab[0, 0, 0] = 3  # 3 is unused in 2018-2021 releases
    write_labelled_case(tmp_path / "b", "C2", seg=lab)
    with pytest.raises(DataError, match=r"C2.*unknown label values \[3\].*\[0, 1, 2, 4\]"):
        load_case(tmp_path / "b" / "C2")
    lab = write_labelled_case.label("2023")
    lab[0, 0, 0] = 5
    write_labelled_case(tmp_path / "c", "C3", "2023", seg=lab)
    with pytest.raises(DataError, match=r"C3.*unknown label values \[5\]"):
        load_case(tmp_path / "c" / "C3")


def test_corrupt_gzip(tmp_path, write_labelled_case):
    d, _, _ = write_labelled_case(tmp_path, "C1")
    p = d / "C1_t2.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(DataError, match=r"C1_t2\.nii\.gz"):
        load_case(d)
    p.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(DataError, match=r"C1_t2\.nii\.gz"):
        load_case(d)


def test_missing_label_required(tmp_path, write_labelled_case):
    write_labelled_case(tmp_path, "C1", seg=None)
    (case,) = find_cases(tmp_path)
    assert case.seg is None and load_case(case).label is None
    with pytest.raises(DataError, match=r"missing label file C1_seg"):
        load_case(case, require_label=True)


def test_case_from_files_any_names_loads_like_the_folder(tmp_path, write_labelled_case):
    """A new patient's files with their own names load exactly as the BraTS folder does."""
    d, _, _ = write_labelled_case(tmp_path, "C1")
    other = tmp_path / "patient 7"
    other.mkdir()
    files = {}
    for m, name in {"flair": "FLAIR", "t1": "T1_pre", "t1ce": "T1_gd", "t2": "T2"}.items():
        files[m] = other / f"{name}.nii.gz"
        (d / f"C1_{m}.nii.gz").rename(files[m])
    case = case_from_files(files)
    assert case.case_id == "FLAIR" and case.naming == "2018" and case.seg is None
    data = load_case(case)
    assert data.label is None and data.image.shape == write_labelled_case.shape + (4,)
    assert case_from_files(files, naming="2023", case_id="P7").case_id == "P7"
    for m, p in files.items():  # move back; the folder's load must give the same image
        p.rename(d / f"C1_{m}.nii.gz")
    np.testing.assert_array_equal(data.image, load_case(d).image)


def test_case_from_files_errors_name_the_problem(tmp_path, write_labelled_case):
    d, _, _ = write_labelled_case(tmp_path, "C1")
    files = {m: d / f"C1_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")}
    with pytest.raises(DataError, match=r"missing \['t2'\]"):
        case_from_files({k: v for k, v in files.items() if k != "t2"})
    with pytest.raises(DataError, match=r"unknown \['dwi'\]"):
        case_from_files({**files, "dwi": files["t1"]})
    with pytest.raises(DataError, match=r"t1ce file .*nope\.nii\.gz does not exist"):
        case_from_files({**files, "t1ce": tmp_path / "nope.nii.gz"})
    with pytest.raises(DataError, match=r"naming '2020'"):
        case_from_files(files, naming="2020")


def test_slice_normalization_closed_form(tmp_path, write_labelled_case):
    """normalization="slice": each axial slice of each modality z-scored over all its pixels
    (population std), a constant slice -> 0; the brain z-score stays the default."""
    flair = np.zeros(write_labelled_case.shape, np.int16)
    flair[..., 1] = 5  # constant slice -> 0
    flair[0, 0, 2], flair[1, 0, 2] = 3, 1  # slice 2: two non-zero pixels among 256
    d, raws, _ = write_labelled_case(tmp_path, "C1", flair=flair)
    img = load_case(d, normalization="slice").image
    np.testing.assert_array_equal(img[..., 0, 0], 0.0)
    np.testing.assert_array_equal(img[..., 1, 0], 0.0)
    n = write_labelled_case.shape[0] * write_labelled_case.shape[1]
    mean = 4 / n
    std = np.sqrt((9 + 1) / n - mean**2)
    assert img[0, 0, 2, 0] == pytest.approx((3 - mean) / std, rel=1e-6)
    assert img[5, 5, 2, 0] == pytest.approx(-mean / std, rel=1e-6)
    t1 = raws["t1"].astype(np.float64)[..., 3]
    np.testing.assert_allclose(img[..., 3, 1], (t1 - t1.mean()) / t1.std(), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(load_case(d).image, img)
    with pytest.raises(ValueError, match="normalization 'volume'"):
        load_case(d, normalization="volume")


def test_a_case_folder_given_as_dot_is_named_after_the_folder(
    tmp_path, monkeypatch, write_labelled_case
):
    d, _, _ = write_labelled_case(tmp_path, "C1")
    monkeypatch.chdir(d)
    assert load_case(".").case_id == "C1"
    assert [c.case_id for c in find_cases(".")] == ["C1"]
