"""predict checks that it can write its outputs before it loads the model."""

import os
import subprocess
import sys

import pytest

from brats_jax.inference import case_prediction
from brats_jax.runs import train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("which", ["output", "probabilities"])
def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch, which):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(train_state, "load_trained", no_model)
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "x.nii.gz"  # under a file: not writable, even for root
    paths = {"output": tmp_path / "ok.nii.gz", "probabilities": None, which: bad}
    with pytest.raises(OSError) as e:
        case_prediction.predict_case(tmp_path / "run", tmp_path / "case", **paths)
    assert e.value.filename == str(tmp_path / "a_file")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing written, not even ok.nii.gz


def test_cli_says_so_in_one_line(tmp_path):
    (tmp_path / "case").mkdir()
    (tmp_path / "a_file").write_text("")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "brats_jax.predict",
            f"--workdir={tmp_path / 'no_run'}",
            f"--input={tmp_path / 'case'}",
            f"--output={tmp_path / 'a_file' / 'seg.nii.gz'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == f"error: {tmp_path / 'a_file'}: Not a directory (ENOTDIR)"
    assert "Traceback" not in r.stderr and "no_run" not in r.stderr  # found before the model
