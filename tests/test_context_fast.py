"""2.5D end to end (`data.context_slices` = 1), fast: a 2-step tiny run's test pass and
`predict` give the argmax of `whole_volume.predict_volume` run as a plain 2D model on windows
stacked here by hand with numpy (slices z-1, z, z+1, indices clamped at the volume's ends,
slice-major channels: `brats_jax.data.context`)."""

import nibabel as nib
import numpy as np
import pytest

from brats_jax import metrics
from brats_jax.data import brats, load_volume, make_source
from brats_jax.inference import case_prediction, ensembles, whole_volume
from brats_jax.labels import to_release_labels
from brats_jax.models import outputs
from brats_jax.runs import train_state
from brats_jax.training import train
from configs import unet


def _hand_stacked(volume: np.ndarray) -> np.ndarray:
    """(H, W, D, 4) -> (H, W, D, 12): channels [4j, 4j+4) are slice clamp(z-1+j)'s."""
    d = volume.shape[2]
    below = volume[:, :, [max(z - 1, 0) for z in range(d)]]
    above = volume[:, :, [min(z + 1, d - 1) for z in range(d)]]
    return np.concatenate([below, volume, above], axis=-1)


def _modality_major(volume: np.ndarray) -> np.ndarray:
    """A wrong order (each modality's three slices together), to show the check can fail."""
    x = _hand_stacked(volume).reshape(*volume.shape[:3], 3, 4)
    return np.swapaxes(x, -1, -2).reshape(*volume.shape[:3], 12)


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    """A 2-step tiny run with k = 1 (no validation split); what its test pass saw."""
    config = unet.get_config("tiny")
    config.data.context_slices = 1
    config.data.val_fraction = 0.0
    config.train.num_steps = 2
    config.train.checkpoint_every_steps = 2
    workdir = tmp_path_factory.mktemp("context") / "run"
    seen = {"probs": [], "labels": []}
    predict_volume, evaluate_volume = whole_volume.predict_volume, metrics.evaluate_volume

    def record_probs(*args, **kwargs):
        seen["probs"].append(predict_volume(*args, **kwargs))
        return seen["probs"][-1]

    def record_labels(pred, label, **kwargs):
        seen["labels"].append(np.asarray(pred))
        return evaluate_volume(pred, label, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(whole_volume, "predict_volume", record_probs)
        mp.setattr(metrics, "evaluate_volume", record_labels)
        results = train.train_and_evaluate(config, workdir)
    return config, workdir, results, seen


def _plain_2d(workdir):
    """The run's model as a 2D predictor of 12-channel slices, and its variables."""
    config, model, variables = train_state.load_trained(workdir)
    fn = whole_volume.make_slice_predictor(
        model, image_size=config.data.image_size, output=outputs.of_config(config.model)
    )
    return fn, variables, config.eval.batch_size


def test_test_pass_is_the_argmax_of_hand_stacked_windows(context_run):
    config, workdir, results, seen = context_run
    case_ids = [r["case_id"] for r in results["per_case"]]
    assert case_ids and len(seen["probs"]) == len(seen["labels"]) == len(case_ids)
    fn, variables, batch = _plain_2d(workdir)
    source = make_source(config.data)
    for cid, probs, labels in zip(case_ids, seen["probs"], seen["labels"], strict=True):
        image, _ = load_volume(source, cid)
        want = whole_volume.predict_volume(fn, variables, _hand_stacked(image), batch_size=batch)
        np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(labels, np.argmax(want, axis=-1))
        wrong = whole_volume.predict_volume(fn, variables, _modality_major(image), batch_size=batch)
        assert np.abs(wrong - want).max() > 1e-4  # the order matters to this model


def test_predict_is_the_argmax_of_hand_stacked_windows(context_run, tmp_path):
    _, workdir, _, _ = context_run
    case = tmp_path / "Brats18_X_1_1"
    case.mkdir()
    rng, shape = np.random.default_rng(0), (40, 36, 5)
    for mod in ("t1", "t1ce", "t2", "flair"):
        vol = rng.normal(100, 20, shape).astype(np.float32)
        nib.save(
            nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])),
            str(case / f"Brats18_X_1_1_{mod}.nii.gz"),
        )
    written = case_prediction.predict_case(
        workdir, case, tmp_path / "seg.nii.gz", probabilities=tmp_path / "p.nii.gz"
    )
    fn, variables, batch = _plain_2d(workdir)
    ens = ensembles.load_ensemble(str(workdir))
    loaded = brats.load_case(
        case,
        require_label=False,
        normalization=ensembles.input_normalization(ens.config.data.source),
    )
    image = loaded.image
    want = whole_volume.predict_volume(fn, variables, _hand_stacked(image), batch_size=batch)
    probs = np.asarray(nib.load(str(tmp_path / "p.nii.gz")).dataobj)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    labels = np.argmax(want, axis=-1)
    np.testing.assert_array_equal(written, to_release_labels(labels, loaded.naming))
    saved = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(saved, written)
