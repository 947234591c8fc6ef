"""Property tests of ensembles: 1 to 5 stand-in runs with different probabilities.

An ensemble's probabilities are the mean of its runs' probabilities, its labels the argmax
(classes) or nested decoding (regions) of that mean, its uncertainty map the entropy of that
mean, and its uncertainty row's member Dice the mean pairwise whole-tumour Dice of the runs'
own labels. The references are numpy written here; the members differ and their number is
drawn (a mean of two is also the midpoint, a first-two-members or last-member bug hides
there). As in test_predict.py, `train_state.load_trained` serves stand-in runs and
`whole_volume.predict_volume` is replaced by a function of each run's variables.
"""

import csv
import itertools
import pathlib
import tempfile

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brats_jax.inference import case_prediction, ensembles, whole_volume
from brats_jax.inference import uncertainty as unc
from brats_jax.runs import train_state

SHAPE = (12, 10, 6)  # write_nifti_case's default case
RELEASE_2018 = np.array([0, 1, 2, 4])  # training class -> BraTS 2018 file label
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # factory fixtures only
)


@st.composite
def members(draw):
    """(output, list of n distinct (H, W, D, C) float32 probability volumes), n in 1..5."""
    output = draw(st.sampled_from(["classes", "regions"]))
    n = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if output == "classes":
        probs = [rng.dirichlet(np.full(4, 0.6), size=SHAPE) for _ in range(n)]
    else:
        probs = [rng.uniform(0.0, 1.0, size=(*SHAPE, 3)) for _ in range(n)]
    return output, [p.astype(np.float32) for p in probs]


# ------------------------------------------------------------------ references


def ref_labels(probs, output):
    """Training labels of probabilities: argmax, or regions nested ET in TC in WT."""
    if output == "classes":
        return np.argmax(probs, -1)
    wt = probs[..., 0] > 0.5
    tc = wt & (probs[..., 1] > 0.5)
    et = tc & (probs[..., 2] > 0.5)
    return np.select([et, tc, wt], [3, 1, 2], 0)


def decided(probs, output, margin=1e-5):
    """Voxels whose decoding does not hinge on float rounding (no near tie)."""
    if output == "regions":
        return np.all(np.abs(probs - 0.5) > margin, -1)
    top2 = np.sort(probs, -1)[..., -2:]
    return top2[..., 1] - top2[..., 0] > margin


def ref_entropy(probs, output):
    p = np.clip(np.asarray(probs, np.float64), 1e-300, 1.0)
    h = -p * np.log(p)
    if output == "regions":
        q = np.clip(1.0 - np.asarray(probs, np.float64), 1e-300, 1.0)
        h = h - q * np.log(q)
    return h.sum(-1)


def ref_pairwise_wt_dice(label_maps):
    if len(label_maps) < 2:
        return None
    scores = []
    for a, b in itertools.combinations([m > 0 for m in label_maps], 2):
        n = a.sum() + b.sum()
        scores.append(2.0 * np.sum(a & b) / n if n else 1.0)
    return float(np.mean(scores))


# ------------------------------------------------------------------ stand-in runs


def _serve(monkeypatch, stand_in_config, root, output, probs):
    """Run folders under `root`, one per member; returns them comma-separated."""
    config = stand_in_config(**{"model.output": output})
    folders = {}
    for i in range(len(probs)):
        folder = root / f"run{i}"
        folder.mkdir()
        folders[str(folder)] = i

    def load_trained(workdir, step=None):
        return config, object(), {"member": folders[str(workdir)]}

    def predict_volume(predict, variables, image, **kw):
        assert image.shape[:3] == SHAPE
        return probs[variables["member"]].copy()

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(whole_volume, "predict_volume", predict_volume)
    return ",".join(folders)


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj)


@SETTINGS
@given(members())
def test_ensemble_is_the_mean_of_its_members(stand_in_config, write_nifti_case, drawn):
    output, probs = drawn
    mean = np.mean(np.stack(probs).astype(np.float64), 0)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        root = pathlib.Path(tmp)
        runs = _serve(mp, stand_in_config, root, output, probs)
        case = write_nifti_case(root / "data", "Brats18_A_1", background_rows=2)
        ensemble = ensembles.load_ensemble(runs)
        assert len(ensemble.variables) == len(probs)
        image = np.zeros((*SHAPE, 4), np.float32)
        for got, want in zip(ensembles.member_probabilities(ensemble, image), probs, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(
            ensembles.predict_probabilities(ensemble, image), mean, rtol=1e-6, atol=1e-7
        )

        labels = case_prediction.predict_case(
            runs,
            case,
            root / "seg.nii.gz",
            probabilities=root / "probs.nii.gz",
            uncertainty=root / "entropy.nii.gz",
            postprocessing="none",
        )
        np.testing.assert_allclose(_read(root / "probs.nii.gz"), mean, rtol=1e-6, atol=1e-7)
        sure = decided(mean, output)
        want_labels = ref_labels(mean, output)
        np.testing.assert_array_equal(labels[sure], RELEASE_2018[want_labels][sure])
        entropy = _read(root / "entropy.nii.gz")
        np.testing.assert_allclose(entropy, ref_entropy(mean, output), rtol=1e-5, atol=1e-6)
        assert np.all((entropy >= 0) & (entropy <= unc.max_entropy(output) + 1e-6))
        with open(root / "entropy.csv") as f:
            (row,) = list(csv.DictReader(f))
    assert int(row["members"]) == len(probs)
    want_dice = ref_pairwise_wt_dice([ref_labels(p, output) for p in probs])
    if want_dice is None:
        assert row["member_wt_dice"] == ""
    else:
        assert float(row["member_wt_dice"]) == pytest.approx(want_dice, rel=1e-5)
    tumour = want_labels > 0
    if tumour.any() and sure.all():
        want_h = ref_entropy(mean, output)[tumour].mean()
        assert float(row["mean_entropy_tumour"]) == pytest.approx(want_h, rel=1e-5)


@settings(SETTINGS, max_examples=30)
@given(members())
def test_entropy_of_the_mean_is_at_least_the_mean_member_entropy(drawn):
    """Concavity (numpy only): the ensemble's entropy is never below its members' mean
    entropy, equal for one member; the library's entropy equals the closed form."""
    output, probs = drawn
    mean = np.mean(np.stack(probs).astype(np.float64), 0)
    got = unc.entropy(mean, output)
    np.testing.assert_allclose(got, ref_entropy(mean, output), rtol=1e-5, atol=1e-6)
    members_h = np.mean([ref_entropy(p, output) for p in probs], 0)
    assert np.all(ref_entropy(mean, output) >= members_h - 1e-9)
