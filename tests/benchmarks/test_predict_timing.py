"""benchmarks/predict_timing.py at tiny scale: its timed phases come from wrapped library
functions that must change nothing (the segmentation equals `predict_case`'s, the functions
are put back), its compile split and summaries are arithmetic checked by hand. No timing
assertions."""

import math

import nibabel as nib
import numpy as np
import pytest

from benchmarks import predict_timing
from brats_jax.inference import case_prediction, ensembles, whole_volume


def test_split_compile_and_summaries_by_hand():
    # first call 5 s, the others 1, 2, 4.5 (median 2, mean 2.5): compile 3, steady 12.5 - 3
    assert predict_timing.split_compile([5.0, 1.0, 2.0, 4.5]) == (3.0, 9.5)
    assert predict_timing.split_compile([4.0]) == (0.0, 4.0)  # one call: nothing to split
    assert predict_timing.split_compile([1.0, 2.0, 2.0]) == (0.0, 5.0)  # never negative
    rows = [{"read": 3.0, "n": 2}, {"read": 1.0}, {"read": 2.0, "write": 0.5}]
    s = predict_timing.summarise(rows)
    assert s["read"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert s["write"] == {"median": 0.5, "min": 0.5, "max": 0.5}  # only one repeat had it
    table = predict_timing.markdown([{"run": "r", "tta": "none", "what": "w", "rows": rows}])
    # columns: imports, load_model, read, compile, infer, postprocess, write, wall
    assert table.splitlines()[2] == "| r | none | w |  |  | 2.00 (1.00-3.00) |  |  |  | 0.50 |  |"
    per_case = [{"wall": 20.0, "per_case": 2.0}, {"wall": 30.0, "per_case": 3.0}]
    table = predict_timing.markdown([{"run": "r", "what": "folder", "rows": per_case}])
    assert table.splitlines()[2].endswith("| 2.50 (2.00-3.00) |")  # wall: per case


@pytest.fixture(scope="module")
def small_case(tmp_path_factory, write_nifti_case):
    root = tmp_path_factory.mktemp("timing_case")
    return write_nifti_case(root, "Brats18_T_1", shape=(32, 32, 6), background_rows=4)


def test_timed_predict_writes_what_predict_case_writes(tiny_run, small_case, tmp_path):
    workdir, _ = tiny_run
    before = (ensembles.load_ensemble, whole_volume.predict_volume, case_prediction.write_case)
    got = predict_timing.child_jax(str(workdir), str(small_case), tmp_path / "timed.nii.gz",
                                   tta="flips")  # fmt: skip
    assert (ensembles.load_ensemble, whole_volume.predict_volume,
            case_prediction.write_case) == before  # fmt: skip
    case_prediction.predict_case(str(workdir), str(small_case), tmp_path / "ref.nii.gz",
                                 tta="flips")  # fmt: skip
    timed, ref = (
        np.asarray(nib.load(tmp_path / f).dataobj) for f in ("timed.nii.gz", "ref.nii.gz")
    )
    np.testing.assert_array_equal(timed, ref)
    # tiny's eval.batch_size is 4: 6 slices are 2 model calls (the second padded)
    assert got["model_calls"] == math.ceil(6 / 4)
    assert {"imports", "load_model", "read", "compile", "infer", "write"} <= set(got)


def test_torch_twin_segments_the_case_under_monai(tiny_run, small_case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    workdir, _ = tiny_run
    got = predict_timing.child_torch(str(workdir), str(small_case), tmp_path / "t.nii.gz",
                                     tta="flips", batch_size=4)  # fmt: skip
    seg = nib.load(tmp_path / "t.nii.gz")
    assert seg.shape == (32, 32, 6) and set(np.unique(seg.dataobj)) <= {0, 1, 2, 3}
    assert {"imports", "load_model", "read", "infer", "write"} <= set(got)
