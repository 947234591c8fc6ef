"""predict --postprocessing=auto for an ensemble: its runs' post-processing when they agree.

Run folders hold a hand-made `config.json` (and maybe a `postprocessing.json`); the stand-in
`train_state.load_trained` reads that config.json as the real one does and serves a pointwise
model, and `whole_volume.predict_volume` returns fixed probabilities whose argmax is a 27-voxel
ED tumour plus a 1-voxel NCR island (`test_predict._island_probabilities`).
"""

import json
import pathlib

import ml_collections
import numpy as np
import pytest
from test_predict import _island_probabilities, _ScaleModel, _write_case

from brats_jax import config_fields
from brats_jax.inference import case_prediction, postprocess, postprocess_choice, whole_volume
from brats_jax.runs import train_state


def _member(root, name, largest_only, tuned=None):
    """A run folder: config.json with `postprocess.largest_component_only`, optional tuned file."""
    folder = root / name
    folder.mkdir()
    config = {
        "data": {"image_size": 16, "source": "nifti"},
        "eval": {"batch_size": 4},
        "model": {"name": "unet", "base_features": 8},
        "postprocess": {"largest_component_only": largest_only, "min_component_voxels": 0,
                        "connectivity": 26, "et_min_voxels": 0},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    if tuned is not None:
        postprocess.save(folder / postprocess.POSTPROCESSING_FILE, tuned)
    return str(folder)


@pytest.fixture
def case(tmp_path, monkeypatch):
    """(case folder, labels with the island, labels without it)."""

    def load_trained(workdir, step=None):
        saved = json.loads((pathlib.Path(workdir) / "config.json").read_text())
        config = ml_collections.ConfigDict(config_fields.upgrade_legacy(saved))
        return config, _ScaleModel(), {"scale": np.float32(1.0)}

    labels, probs = _island_probabilities()
    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *a, **k: probs)
    island_free = labels.copy()
    island_free[10, 8, 5] = 0
    return _write_case(tmp_path, "Brats18_A_1", 0), labels, island_free


def test_agreeing_config_fields_are_applied_to_the_ensemble(case, tmp_path):
    folder, labels, island_free = case
    f0, f1 = _member(tmp_path, "f0", True), _member(tmp_path, "f1", True)
    out = tmp_path / "seg.nii.gz"
    got = case_prediction.predict_case(f"{f0},{f1}", folder, out)  # auto
    np.testing.assert_array_equal(got, island_free)
    kept = case_prediction.predict_case(f"{f0},{f1}", folder, out, postprocessing="none")
    np.testing.assert_array_equal(kept, labels)


def test_members_that_differ_are_a_one_line_error_naming_them(case, tmp_path):
    folder, _, _ = case
    f0, f1, f2 = (_member(tmp_path, n, v) for n, v in (("f0", True), ("f1", False), ("f2", True)))
    with pytest.raises(ValueError) as e:
        case_prediction.predict_case(f"{f0},{f1},{f2}", folder, tmp_path / "seg.nii.gz")
    msg = str(e.value)
    assert "\n" not in msg and "--postprocessing=FILE" in msg
    assert f"runs {f1} differ" in msg and f"from {f0}" in msg and f2 not in msg


def test_equal_postprocessing_files_are_applied_over_differing_config_fields(case, tmp_path):
    folder, labels, island_free = case
    tuned = postprocess.PostprocessConfig(min_component_voxels=2)  # drops the 1-voxel island
    f0 = _member(tmp_path, "f0", False, tuned=tuned)
    f1 = _member(tmp_path, "f1", True, tuned=tuned)
    got = case_prediction.predict_case([f0, f1], folder, tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(got, island_free)
    assert postprocess_choice.resolve_postprocessing([f0, f1], "auto") == tuned


def test_a_tuned_file_equal_to_the_other_runs_config_fields_agrees(tmp_path):
    tuned = postprocess.PostprocessConfig(largest_component_only=True)
    f0 = _member(tmp_path, "f0", False, tuned=tuned)
    f1 = _member(tmp_path, "f1", True)  # no file: its config's fields, the same thresholds
    assert postprocess_choice.resolve_postprocessing(f"{f0},{f1}", "auto") == tuned
