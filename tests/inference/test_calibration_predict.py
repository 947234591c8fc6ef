"""Temperature scaling in prediction: a run's calibration.json scales the probabilities and
the entropy predict writes (not the labels), each ensemble member by its own file, with an
off switch; `temperature.fit_run` recovers a temperature that drew a case's labels.

Trained runs are stand-ins (`train_state.load_trained` patched): pointwise models whose
logits follow from the case's normalised input, so the expected values are computed here in
numpy from `brats.load_case`'s image, at the case's own size (`data.image_size` 0).
"""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
from scipy import special

from brats_jax.data import brats
from brats_jax.inference import calibration_file, case_prediction, ensembles, temperature
from brats_jax.runs import train_state


class _Scale:
    """logits = input (4 modalities) times `scale`: 4 class logits."""

    def apply(self, variables, x, train):
        return x * variables["scale"]


class _Reversed:
    """logits = the modalities in reverse order times `scale` (argmaxes unlike `_Scale`'s)."""

    def apply(self, variables, x, train):
        return x[..., ::-1] * variables["scale"]


class _Regions:
    """3 region logits: the first three modalities times `scale`."""

    def apply(self, variables, x, train):
        return x[..., :3] * variables["scale"]


@pytest.fixture
def runs(tmp_path, monkeypatch, stand_in_config):
    """`add(name, model, scale, output, temperature)` -> a stand-in run folder; a temperature
    (a number, or a dict per region) is written to its calibration.json."""
    table = {}

    def load_trained(workdir, step=None):
        config, model, scale = table[str(workdir)]
        return config, model, {"scale": np.float32(scale)}

    monkeypatch.setattr(train_state, "load_trained", load_trained)

    def add(name, model=None, scale=1.0, output="classes", temp=None):
        path = tmp_path / name
        path.mkdir()
        fields = {"data.image_size": 0, "model.output": output, "model.stand_in": name}
        config = stand_in_config(**fields)  # its own model config: its own predictor
        table[str(path)] = (config, model or _Scale(), scale)
        if temp is not None:
            record = {"output": output, "temperature": temp}
            (path / calibration_file.CALIBRATION_FILE).write_text(json.dumps(record))
        return str(path)

    return add


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _image(case):
    return brats.load_case(case, normalization="brain").image


def test_predict_writes_softmax_of_logits_over_t_and_the_off_switch_the_plain_one(
    runs, tmp_path, write_nifti_case
):
    """calibration.json T = 2.5: probabilities softmax(3 x / 2.5) and entropy of those;
    calibration=False: softmax(3 x). The labels are the same either way.
    Catches: the file not read, logits multiplied by T, the off switch ignored."""
    run = runs("r", scale=3.0, temp=2.5)
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    z = 3.0 * _image(case)
    out = {}
    for on in (True, False):
        p, u = tmp_path / f"p{on}.nii.gz", tmp_path / f"u{on}.nii.gz"
        out[on] = case_prediction.predict_case(
            run, case, tmp_path / f"s{on}.nii.gz", probabilities=p, uncertainty=u,
            calibration=on,
        )  # fmt: skip
        expected = special.softmax(z / (2.5 if on else 1.0), axis=-1)
        np.testing.assert_allclose(_read(p), expected, atol=1e-5)
        entropy = -(expected * np.log(expected)).sum(-1)
        np.testing.assert_allclose(_read(u), entropy, atol=1e-4)
    np.testing.assert_array_equal(out[True], out[False])


def test_regions_get_one_temperature_each_and_keep_their_masks(runs, tmp_path, write_nifti_case):
    """T = (WT 0.5, TC 2, ET 4): probabilities sigmoid(2 x_r / T_r); the label map equals the
    unscaled one's and its regions are where the logits are > 0.
    Catches: the regions' temperatures in the wrong order."""
    temps = {"WT": 0.5, "TC": 2.0, "ET": 4.0}
    run = runs("r", model=_Regions(), scale=2.0, output="regions", temp=temps)
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    z = 2.0 * _image(case)[..., :3]
    p = tmp_path / "p.nii.gz"
    labels = case_prediction.predict_case(run, case, tmp_path / "s.nii.gz", probabilities=p)
    np.testing.assert_allclose(_read(p), special.expit(z / np.array([0.5, 2.0, 4.0])), atol=1e-5)
    wt, tc, et = (z[..., 0] > 0), (z[..., 1] > 0), (z[..., 2] > 0)
    expected = np.where(wt & tc & et, 4, np.where(wt & tc, 1, np.where(wt, 2, 0)))
    np.testing.assert_array_equal(labels, expected)


def test_ensemble_scales_each_member_by_its_own_file_and_labels_stay_unscaled(
    runs, tmp_path, write_nifti_case
):
    """Member 1 (T = 6) and member 2 (no file) whose argmaxes differ: probabilities written
    = mean(softmax(z1 / 6), softmax(z2)); labels = argmax of mean(softmax(z1), softmax(z2)),
    which differs from the argmax of the written mean at some voxels here.
    Catches: labels decoded from the scaled probabilities, member 2 given member 1's T."""
    r1 = runs("r1", model=_Scale(), scale=2.0, temp=6.0)
    r2 = runs("r2", model=_Reversed(), scale=1.5)
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    x = _image(case)
    z1, z2 = 2.0 * x, 1.5 * x[..., ::-1]
    p = tmp_path / "p.nii.gz"
    labels = case_prediction.predict_case(f"{r1},{r2}", case, tmp_path / "s.nii.gz",
                                          probabilities=p)  # fmt: skip
    scaled = (special.softmax(z1 / 6.0, axis=-1) + special.softmax(z2, axis=-1)) / 2
    plain = (special.softmax(z1, axis=-1) + special.softmax(z2, axis=-1)) / 2
    np.testing.assert_allclose(_read(p), scaled, atol=1e-5)
    expected = plain.argmax(-1)
    assert (scaled.argmax(-1) != expected).any()  # the test can tell the two apart
    expected[expected == 3] = 4
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"output": "classes"}), "no 'temperature'"),
        (json.dumps({"temperature": -1.0}), "positive finite"),
        (json.dumps({"temperature": "2"}), "positive finite"),
        (json.dumps({"output": "regions", "temperature": {"WT": 1.0}}), "for model.output"),
        (json.dumps({"temperature": {"WT": 1.0, "TC": 1.0}}), r"expected \{WT, TC, ET: T\}"),
    ],
)
def test_malformed_calibration_file_is_one_line_naming_it(runs, tmp_path, content, why):
    """A bad calibration.json: one line naming the file and what is wrong, before anything
    is written. Catches: a KeyError / TypeError traceback, a negative T used."""
    output = "regions" if "WT" in content else "classes"
    run = runs("r", model=_Regions() if output == "regions" else None, output=output)
    path = calibration_file.path_of(run)
    path.write_text(content)
    if "for model.output" in why:  # a regions file in a classes run
        run2 = runs("r2")
        calibration_file.path_of(run2).write_text(content)
        output, path, why = "classes", calibration_file.path_of(run2), "fitted for model.output"
    with pytest.raises(ValueError, match=why) as e:
        calibration_file.load(path.parent, output)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_malformed_file_stops_predict_before_writing(runs, tmp_path, write_nifti_case):
    run = runs("r")
    calibration_file.path_of(run).write_text(json.dumps({"temperature": 0}))
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    out = tmp_path / "s.nii.gz"
    with pytest.raises(ValueError, match="calibration.json"):
        case_prediction.predict_case(run, case, out, probabilities=tmp_path / "p.nii.gz")
    assert not out.exists()
    case_prediction.predict_case(run, case, out, probabilities=tmp_path / "p.nii.gz",
                                 calibration=False)  # fmt: skip
    assert out.exists()


def test_fit_run_recovers_the_temperature_that_drew_the_labels(runs, tmp_path, write_nifti_case):
    """A case whose brain labels are sampled from softmax(3 x / 2) (background rows 0): the
    fit gives T within 5% of 2, the record says which case and voxels, and calibration.json
    round-trips. Catches: the fit on probabilities or on background voxels too, the wrong
    voxels paired with the labels, a T saved that load reads differently."""
    run = runs("r", scale=3.0)
    case = write_nifti_case(tmp_path, "Brats18_A_1", shape=(48, 48, 16), background_rows=6)
    x = _image(case)
    p = special.softmax(3.0 * x / 2.0, axis=-1)
    rng = np.random.default_rng(0)
    label = (rng.uniform(size=(*p.shape[:3], 1)) < np.cumsum(p, -1)).argmax(-1)
    label[:6] = 0
    release = np.array([0, 1, 2, 4], np.uint8)[label]
    nib.save(nib.Nifti1Image(release, np.diag([-1.0, -1.0, 1.0, 1.0])),
             str(case / "Brats18_A_1_seg.nii.gz"))  # fmt: skip
    record = temperature.fit_run(run, [str(case)], log=lambda *_: None)
    assert record["temperature"] == pytest.approx(2.0, rel=0.05)
    assert record["fitted_on"]["cases"] == ["Brats18_A_1"]
    assert record["fitted_on"]["num_voxels"] == 42 * 48 * 16  # the brain rows only
    assert record["after"]["nll"] < record["before"]["nll"]
    calibration_file.save(run, record)
    np.testing.assert_allclose(calibration_file.load(run, "classes"), [record["temperature"]] * 4)


def test_fit_run_without_cases_or_validation_cases_names_the_flag(runs):
    with pytest.raises(ValueError, match="--cases: give the fitting cases"):
        temperature.fit_run(runs("r"), [])


class _Ramp:
    """Position-dependent logits: the input times `scale` plus a ramp along x, one slope per
    class, so a left-right mirror view gives other logits."""

    def apply(self, variables, x, train):
        ramp = np.arange(x.shape[1], dtype=np.float32)[:, None, None] * np.float32(0.3)
        return x * variables["scale"] + ramp * np.array([1.0, -0.5, 2.0, 0.75], np.float32)


def test_scaled_probabilities_are_of_the_logits_the_fit_sees_with_flips(
    runs, tmp_path, write_nifti_case
):
    """tta=flips: the fit's logits are the mean of the view's and the mirror view's logits
    (mirrored back), by hand; predict's scaled probabilities are softmax of that mean / T
    (T = 3), not the mean of each view's softmax(z / T).
    Catches: the temperature applied per view before averaging (then the fitted T describes
    other probabilities than the ones written)."""
    run = runs("r", model=_Ramp(), scale=1.5, temp=3.0)
    seg = np.zeros((12, 10, 6), np.uint8)  # the fit reads labelled cases
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2, seg=seg)
    x = _image(case)

    def logits(v):
        ramp = 0.3 * np.arange(v.shape[0])[:, None, None, None]
        return 1.5 * v + ramp * np.array([1.0, -0.5, 2.0, 0.75])

    mean = (logits(x) + logits(x[::-1])[::-1]) / 2
    config, model, variables = train_state.load_trained(run)
    predict = temperature.logit_predictor(config, model, tta="flips")
    _, z = temperature.case_logits(predict, config, variables, case)
    np.testing.assert_allclose(z, mean, atol=1e-4)
    p = tmp_path / "p.nii.gz"
    case_prediction.predict_case(run, case, tmp_path / "s.nii.gz", probabilities=p, tta="flips")
    np.testing.assert_allclose(_read(p), special.softmax(mean / 3.0, axis=-1), atol=1e-5)
    per_view = (
        special.softmax(logits(x) / 3, -1) + special.softmax(logits(x[::-1])[::-1] / 3, -1)
    ) / 2
    assert np.abs(per_view - special.softmax(mean / 3.0, axis=-1)).max() > 1e-3  # tells apart


def test_calibrate_command_writes_the_file_predict_then_uses(
    runs, tmp_path, write_nifti_case, capsys, run_command
):
    """`python -m brats_jax.calibrate` (main, in process) on a labelled case writes
    calibration.json, says the temperature, and `predict --probabilities` then writes
    softmax(z / T) with that T; `--calibration=false` the plain softmax.
    Catches: the command not saving, predict's flag not reaching predict_case."""
    from brats_jax import calibrate, predict

    run = runs("r", scale=2.0)
    seg = np.zeros((12, 10, 6), np.uint8)
    seg[4:8, 3:7, 2:4] = 2
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2, seg=seg)
    run_command(calibrate, f"--workdir={run}", f"--cases={case}")
    t = json.loads(calibration_file.path_of(run).read_text())["temperature"]
    assert f"T = {t:.3f}" in capsys.readouterr().out
    assert (pathlib.Path(run) / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    z = 2.0 * _image(case)
    for flag, temp in (("--calibration=true", t), ("--calibration=false", 1.0)):
        p = tmp_path / f"p{temp}.nii.gz"
        out = tmp_path / "s.nii.gz"
        run_command(
            predict,
            f"--workdir={run}",
            f"--input={case}",
            f"--output={out}",
            f"--probabilities={p}",
            flag,
        )
        np.testing.assert_allclose(_read(p), special.softmax(z / temp, axis=-1), atol=1e-5)


def test_temperatures_are_read_only_when_asked_and_member_labels_stay_unscaled(
    runs, tmp_path, write_nifti_case
):
    """Member 1 has T = 0.5 (sharpening), member 2 no file, member 3 T = 3. Loaded without
    asking, no run is calibrated; with `calibration=True` member 1 gets T = 0.5 per class.
    `predict_calibrated`'s member labels are each member's argmax of its own logits, its
    scaled probabilities the mean of the three (bugs caught: calibration read by default; the
    labels decoded from all 2C channels, where T < 1 puts the maximum among the scaled ones,
    giving labels 4..7; the mean taken over two members)."""
    r1 = runs("r1", model=_Scale(), scale=2.0, temp=0.5)
    r2 = runs("r2", model=_Reversed(), scale=1.5)
    r3 = runs("r3", model=_Scale(), scale=0.7, temp=3.0)
    assert not ensembles.is_calibrated(ensembles.load_ensemble([r1, r2, r3]))
    ens = ensembles.load_ensemble([r1, r2, r3], calibration=True)
    np.testing.assert_array_equal(ens.temperatures[0], [0.5] * 4)
    assert ens.temperatures[1] is None
    x = _image(write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2))
    member_labels = []
    plain, scaled = ensembles.predict_calibrated(ens, x, member_labels=member_labels)
    z1, z2, z3 = 2.0 * x, 1.5 * x[..., ::-1], 0.7 * x
    for got, z in zip(member_labels, (z1, z2, z3), strict=True):
        np.testing.assert_array_equal(got, z.argmax(-1))
    want = (
        special.softmax(z1 / 0.5, axis=-1)
        + special.softmax(z2, axis=-1)
        + special.softmax(z3 / 3.0, axis=-1)
    ) / 3
    np.testing.assert_allclose(scaled, want, atol=1e-5)
