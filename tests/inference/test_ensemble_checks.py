"""Ensembles (`inference/ensembles.py`) with stand-in runs: what the runs must share, the
predictors they share, each run's batch size and context, and the mean over the runs.
`train_state.load_trained` serves hand-written configs; `whole_volume` is replaced."""

import json

import numpy as np
import pytest

from brats_jax.inference import ensembles, whole_volume
from brats_jax.runs import train_state


def _serve(monkeypatch, stand_in_config, tmp_path, fields_per_run, probs=None):
    """One run folder per entry of `fields_per_run` (dotted config fields); returns their
    paths and the recorded calls {"predictors": [...], "volumes": [...]}."""
    folders, configs = [], {}
    for i, fields in enumerate(fields_per_run):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        folders.append(str(folder))
        configs[str(folder)] = stand_in_config(**fields)
    calls = {"predictors": [], "volumes": [], "steps": []}

    def load_trained(workdir, step=None):
        calls["steps"].append(step)
        return configs[str(workdir)], f"model{workdir[-1]}", {"member": int(workdir[-1])}

    def make_slice_predictor(model, **kw):
        calls["predictors"].append((model, kw))
        return f"predictor{len(calls['predictors'])}"

    def predict_volume(predict, variables, image, *, batch_size, context_slices):
        calls["volumes"].append((predict, variables["member"], batch_size, context_slices))
        return probs[variables["member"]]

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(whole_volume, "make_slice_predictor", make_slice_predictor)
    monkeypatch.setattr(whole_volume, "predict_volume", predict_volume)
    return folders, calls


def test_input_normalization_and_modality_dropout_flags():
    assert ensembles.input_normalization("kaggle_h5") == "slice"
    assert ensembles.input_normalization("nifti") == "brain"
    assert ensembles.input_normalization("synthetic") == "brain"
    on = {"augment": {"modality_dropout_p": 0.25}}
    off = {"augment": {"modality_dropout_p": 0.0}}
    assert ensembles.trained_with_modality_dropout([on, on])
    assert not ensembles.trained_with_modality_dropout([on, off])
    assert not ensembles.trained_with_modality_dropout([on, {}])  # an old run: no dropout
    assert not ensembles.trained_with_modality_dropout([])
    assert ensembles.trained_with_modality_dropout(iter([on]))


def test_saved_configs_reads_each_runs_json(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model": {"name": "unet"}}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{broken")
    got = ensembles.saved_configs(f"{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'c'}")
    assert got == [{"model": {"name": "unet"}}, {}, {}]


@pytest.mark.parametrize(
    "fields, what, mine, first",
    [
        ({"data.image_size": 32}, "data.image_size", 32, 16),
        ({"data.source": "kaggle_h5"}, "input normalization", "'slice'", "'brain'"),
        ({"model.output": "regions"}, "model.output", "'regions'", "'classes'"),
    ],
)
def test_runs_must_share_size_normalization_and_output(
    monkeypatch, stand_in_config, tmp_path, fields, what, mine, first
):
    folders, _ = _serve(monkeypatch, stand_in_config, tmp_path, [{}, {}, fields])
    with pytest.raises(ValueError) as err:
        ensembles.load_ensemble(",".join(folders))
    mine = mine if isinstance(mine, str) else repr(mine)
    first = first if isinstance(first, str) else repr(first)
    assert str(err.value) == (
        f"--workdir {folders[2]}: {what} {mine} differs from {folders[0]}'s {first}; "
        "an ensemble's runs must share it"
    )


def test_no_workdir_is_an_error():
    with pytest.raises(ValueError) as err:
        ensembles.load_ensemble(" , ")
    assert str(err.value) == "--workdir: expected a run folder (or several, comma-separated)"


def test_runs_share_a_predictor_per_model_config_and_keep_their_context(
    monkeypatch, stand_in_config, tmp_path
):
    runs = [{}, {"model.width": 8}, {"data.context_slices": 1}, {"augment.modality_dropout_p": 0.5}]
    folders, calls = _serve(monkeypatch, stand_in_config, tmp_path, runs)
    ens = ensembles.load_ensemble(folders, tta="flips", step=7)
    assert ens.workdirs == tuple(folders) and ens.config is ens.configs[0]
    # runs 0, 2, 3 have the same model section: one predictor; run 1 its own
    assert ens.predictors == ("predictor1", "predictor2", "predictor1", "predictor1")
    (m0, kw0), (m1, _) = calls["predictors"]
    assert (m0, m1) == ("model0", "model1")
    assert kw0 == {"image_size": 16, "tta": "flips", "output": "classes", "window": 0}
    assert ens.context_slices == (0, 0, 1, 0)
    assert [v["member"] for v in ens.variables] == [0, 1, 2, 3]
    assert ens.missing_ok is False  # only one run trained with modality dropout
    assert calls["steps"] == [7, 7, 7, 7]


def test_equal_model_sections_share_a_predictor_whatever_their_key_order(
    monkeypatch, stand_in_config, tmp_path
):
    runs = [{"model.width": 8, "model.depth": 2}, {"model.depth": 2, "model.width": 8}]
    folders, calls = _serve(monkeypatch, stand_in_config, tmp_path, runs)
    assert ensembles.load_ensemble(folders).predictors == ("predictor1", "predictor1")
    assert len(calls["predictors"]) == 1


def test_sliding_window_argument_overrides_the_runs_choice(monkeypatch, stand_in_config, tmp_path):
    # the run slides windows but has no training patch: only an override of False works
    folders, calls = _serve(monkeypatch, stand_in_config, tmp_path, [{"eval.sliding_window": True}])
    ensembles.load_ensemble(folders, sliding_window=False)
    assert calls["predictors"][0][1]["window"] == 0
    with pytest.raises(Exception, match="sliding_window=True needs data.patch_size"):
        ensembles.load_ensemble(folders)


def test_predict_probabilities_is_the_mean_and_members_decode_alone(
    monkeypatch, stand_in_config, tmp_path
):
    p0 = np.array([[[[0.7, 0.1, 0.1, 0.1]]], [[[0.1, 0.1, 0.1, 0.7]]]], np.float32)
    p1 = np.array([[[[0.1, 0.5, 0.3, 0.1]]], [[[0.1, 0.1, 0.2, 0.6]]]], np.float32)
    p2 = np.array([[[[0.1, 0.2, 0.6, 0.1]]], [[[0.1, 0.1, 0.6, 0.2]]]], np.float32)
    runs = [{}, {"data.context_slices": 2}, {"eval.batch_size": 9}]
    folders, calls = _serve(monkeypatch, stand_in_config, tmp_path, runs, probs=[p0, p1, p2])
    ens = ensembles.load_ensemble(folders)
    labels = []
    image = np.zeros((2, 1, 1, 4), np.float32)
    mean = ensembles.predict_probabilities(ens, image, member_labels=labels)
    np.testing.assert_allclose(mean, (p0 + p1 + p2) / 3, rtol=1e-6)
    assert [lab.ravel().tolist() for lab in labels] == [[0, 3], [1, 3], [2, 2]]
    # the first run's eval.batch_size serves every run; each run gets its own context
    assert [c[1:] for c in calls["volumes"]] == [(0, 4, 0), (1, 4, 2), (2, 4, 0)]
    assert [c[0] for c in calls["volumes"]] == list(ens.predictors)
    calls["volumes"].clear()
    assert len(list(ensembles.member_probabilities(ens, image, batch_size=3))) == 3
    assert {c[2] for c in calls["volumes"]} == {3}
    calls["volumes"].clear()
    list(ensembles.member_probabilities(ens, image))  # no batch size: the first run's
    assert {c[2] for c in calls["volumes"]} == {4}
    # an Ensemble made without contexts: context 0 for every run
    calls["volumes"].clear()
    list(ensembles.member_probabilities(ens._replace(context_slices=()), image))
    assert [c[3] for c in calls["volumes"]] == [0, 0, 0]
    with pytest.raises(ValueError):  # as many variables as predictors
        list(ensembles.member_probabilities(ens._replace(variables=ens.variables[:2]), image))
    calls["volumes"].clear()
    ensembles.predict_probabilities(ens, image, batch_size=2)
    assert {c[2] for c in calls["volumes"]} == {2}
    # no member labels asked for: none collected, the same mean
    np.testing.assert_allclose(ensembles.predict_probabilities(ens, image), mean, rtol=1e-6)


def test_missing_ok_when_every_run_trained_with_modality_dropout(
    monkeypatch, stand_in_config, tmp_path
):
    on = {"augment.modality_dropout_p": 0.5}
    folders, _ = _serve(monkeypatch, stand_in_config, tmp_path, [on, on])
    assert ensembles.load_ensemble(folders).missing_ok is True
    assert ensembles.load_ensemble(folders[:1]).missing_ok is True


def test_an_ensemble_built_without_temperatures_averages_its_runs(stand_in_config, monkeypatch):
    """`Ensemble(...)` written by hand leaves `temperatures` at its default (): each run is
    then uncalibrated, calibrated or not (bug caught: the fallback for a missing temperature
    tuple broken, an error before any run predicts; the mean taken over two runs). Three runs
    of constant probabilities: the mean, and the same again as the calibrated half at T = 1."""
    probs = {m: np.full((2, 2, 3, 4), v, np.float32) for m, v in enumerate((0.1, 0.4, 0.7))}

    def predict_volume(predict, variables, image, *, batch_size, context_slices, temperature=None):
        p = probs[variables["member"]]
        return p if temperature is None else np.concatenate([p, p / temperature], -1)

    monkeypatch.setattr(whole_volume, "predict_volume", predict_volume)
    config = stand_in_config()
    members = tuple({"member": m} for m in range(3))
    ensemble = ensembles.Ensemble(("a", "b", "c"), config, ("p",) * 3, members)
    image = np.zeros((2, 2, 3, 4), np.float32)
    np.testing.assert_allclose(ensembles.predict_probabilities(ensemble, image), 0.4, rtol=1e-6)
    plain, calibrated = ensembles.predict_calibrated(ensemble, image)
    np.testing.assert_allclose(plain, 0.4, rtol=1e-6)
    np.testing.assert_allclose(calibrated, 0.4, rtol=1e-6)
