"""predict: many cases in one call, ensembles, test-time flips and tuned post-processing.

The trained run is replaced by a stand-in (`train_state.load_trained` patched): a pointwise
model whose logits are its input times `variables["scale"]`, so the tests need no
training and their expected values follow from the input.
"""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from brats_jax import config_fields, predict
from brats_jax.inference import (
    case_prediction,
    ensembles,
    postprocess,
    postprocess_choice,
    whole_volume,
)
from brats_jax.runs import train_state

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS's voxel order, as write_nifti_case writes


class _ScaleModel:
    def apply(self, variables, x, train):
        return x * variables["scale"]


class _RampModel:
    """Position-dependent stand-in: logits = input times `scale` plus a ramp along x (rows)
    and y (columns), a different one per class (`_ramp`): mirroring changes its output."""

    def apply(self, variables, x, train):
        return x * variables["scale"] + jnp.asarray(_ramp(*x.shape[1:3]))[None]


def _ramp(h, w):
    """(H, W, 4) float32: 0.5 x - 0.25 y, times (1, -0.5, 2, 0.75) per class."""
    ramp = 0.5 * np.arange(h)[:, None] - 0.25 * np.arange(w)[None, :]
    return (ramp[..., None] * np.array([1.0, -0.5, 2.0, 0.75])).astype(np.float32)


@pytest.fixture
def runs(tmp_path, monkeypatch, stand_in_config):
    """Run folders -> (config, scale); `load_trained` serves them; predictors are recorded."""
    table = {}
    made = []

    def load_trained(workdir, step=None):
        config, scale, model = table[str(workdir)]
        return config, model, {"scale": np.float32(scale)}

    real = whole_volume.make_slice_predictor

    def make_slice_predictor(model, **kw):
        made.append(real(model, **kw))
        return made[-1]

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(whole_volume, "make_slice_predictor", make_slice_predictor)

    def add(name, scale=1.0, model=None, image_size=16, source="nifti", postprocess=None):
        path = tmp_path / name
        path.mkdir()
        fields = {"data.image_size": image_size, "data.source": source, "model.base_features": 8}
        if postprocess is not None:
            fields["postprocess"] = postprocess
        table[str(path)] = (stand_in_config(**fields), scale, model or _ScaleModel())
        return str(path)

    return add, made


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_many_cases_one_output_each_compiled_once(runs, tmp_path, write_nifti_case):
    add, made = runs
    run = add("run")
    data = tmp_path / "data"
    folders = [
        write_nifti_case(data / "HGG", "Brats18_A_1", background_rows=2),
        write_nifti_case(data / "HGG", "Brats18_B_1", seed=1, background_rows=2),
        write_nifti_case(
            data, "BraTS-GLI-00001-000", seed=2, background_rows=2, naming="2023", shape=(12, 10, 9)
        ),
    ]
    out = tmp_path / "out"
    written = case_prediction.predict_cases(run, [str(f) for f in folders], out)
    assert [p.name for p in written] == [f"{f.name}.nii.gz" for f in folders]
    assert len(made) == 1 and made[0]._cache_size() == 1  # depths 6 and 9: one compilation
    for folder, path in zip(folders, written, strict=True):
        alone = case_prediction.predict_case(run, folder, tmp_path / "alone.nii.gz")
        np.testing.assert_array_equal(_read(path), alone)
    assert set(np.unique(_read(written[2]))) <= {0, 1, 2, 3}  # the 2023 case keeps ET = 3


def _hand_labels(case, scales=(1.0,)):
    """The 2018 labels of a case under ScaleModel runs of `scales` at native size, by hand:
    argmax of the mean over the runs of softmax(scale x), x the case's brain-z-scored input
    (H, W, D, 4); class 3 (ET) written as 4."""
    from brats_jax.data import brats

    x = brats.load_case(case, require_label=False, normalization="brain").image
    mean = np.mean([_softmax(np.float64(s) * x) for s in scales], 0)
    labels = np.argmax(mean, -1)
    labels[labels == 3] = 4
    return labels, mean


def test_cli_folder_of_cases_and_a_comma_separated_list(
    runs, tmp_path, monkeypatch, write_nifti_case, run_command
):
    """Both spellings of --input write each case's own segmentation: the argmax of the
    stand-in's softmax(x) by hand (native size, so no resizing), not the other case's. The
    second call also gives --probabilities (those softmaxes), --batch_size=3 and --step=7
    (not their defaults), which reach the model call and the checkpoint loader."""
    add, _ = runs
    run = add("run", image_size=0)
    data = tmp_path / "data"
    a = write_nifti_case(data / "HGG", "Brats18_A_1", background_rows=2)
    b = write_nifti_case(data / "LGG", "Brats18_B_1", seed=1, background_rows=2)
    want = {f.name: _hand_labels(f) for f in (a, b)}
    assert (want["Brats18_A_1"][0] != want["Brats18_B_1"][0]).any()
    assert all(len(np.unique(w[0])) == 4 for w in want.values())
    seen = {"step": [], "batch_size": []}
    load, volume = train_state.load_trained, whole_volume.predict_volume

    def load_trained(workdir, step=None):
        seen["step"].append(step)
        return load(workdir, step)

    def predict_volume(*args, **kw):
        seen["batch_size"].append(kw["batch_size"])
        return volume(*args, **kw)

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(whole_volume, "predict_volume", predict_volume)
    probs = tmp_path / "p2"
    for given, out, extra in (
        (str(data), tmp_path / "o1", []),
        (f"{a},{b}", tmp_path / "o2", [f"--probabilities={probs}", "--batch_size=3", "--step=7"]),
    ):
        run_command(predict, f"--workdir={run}", f"--input={given}", f"--output={out}", *extra)
        assert sorted(p.name for p in out.iterdir()) == ["Brats18_A_1.nii.gz", "Brats18_B_1.nii.gz"]
        for case_id, (labels, _) in want.items():
            np.testing.assert_array_equal(_read(out / f"{case_id}.nii.gz"), labels)
    for case_id, (_, mean) in want.items():
        np.testing.assert_allclose(_read(probs / f"{case_id}.nii.gz"), mean, atol=1e-5)
    assert seen == {"step": [None, 7], "batch_size": [4, 4, 3, 3]}  # the run's eval: 4


@pytest.mark.parametrize("scales", [(2.0,), (1.0, 3.0, -2.0), (0.5, 1.0, 3.0, -2.0)])
def test_ensemble_averages_probabilities_and_shares_the_compiled_function(
    runs, tmp_path, write_nifti_case, scales
):
    """1, 3 and 4 runs with different weights: the written probabilities are the mean of
    the runs' softmax(scale x), by hand in numpy (a sum over 2, the largest member, the
    mean of logits or one member alone each differ), the labels its argmax; one predictor."""
    add, made = runs
    members = [add(f"r{i}", scale=s, image_size=0) for i, s in enumerate(scales)]
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    pe = tmp_path / "pe.nii.gz"
    labels = case_prediction.predict_case(
        ",".join(members), case, tmp_path / "e.nii.gz", probabilities=pe
    )
    assert len(made) == 1  # same model config: one predictor serves every run's variables
    expected, mean = _hand_labels(case, scales)
    np.testing.assert_allclose(_read(pe), mean, atol=1e-5)
    np.testing.assert_array_equal(labels, expected)
    if len(scales) > 1:  # the members disagree: the mean is not any one of them
        alone = [_hand_labels(case, (s,))[0] for s in scales]
        assert all((a != expected).any() for a in alone)


def test_ensemble_runs_must_share_image_size_and_normalization(runs, tmp_path):
    add, _ = runs
    r1, r2, r3 = add("r1"), add("r2", image_size=32), add("r3", source="kaggle_h5")
    with pytest.raises(ValueError, match=r"r2: data.image_size 32 differs from .*r1's 16"):
        ensembles.load_ensemble(f"{r1},{r2}")
    with pytest.raises(ValueError, match="r3: input normalization 'slice' differs"):
        ensembles.load_ensemble([r1, r3])


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_tta_flag_reaches_the_predictor(runs, tmp_path, write_nifti_case):
    """predict_case(tta="flips_ud") with a position-dependent stand-in at native size: the
    written probabilities are the mean of the 4 views' softmax mirrored back, by hand in
    numpy on the case's normalised input, and differ from the plain ones."""
    from brats_jax.data import brats

    add, _ = runs
    run = add("run", scale=0.5, model=_RampModel(), image_size=0)
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    plain = case_prediction.predict_case(
        run, case, tmp_path / "a.nii.gz", probabilities=tmp_path / "pa.nii.gz"
    )
    tta = case_prediction.predict_case(
        run, case, tmp_path / "b.nii.gz", probabilities=tmp_path / "pb.nii.gz", tta="flips_ud"
    )
    image = brats.load_case(case, require_label=False, normalization="brain").image
    x = np.moveaxis(image, 2, 0).astype(np.float64)  # (D, H, W, 4) axial slices
    ramp = _ramp(*x.shape[1:3])[None]
    views = [np.flip(_softmax(np.flip(x, a) * 0.5 + ramp), a) for a in [(), (1,), (2,), (1, 2)]]
    want_tta = np.moveaxis(np.mean(views, 0), 0, 2)  # back to (H, W, D, 4)
    want_plain = np.moveaxis(_softmax(x * 0.5 + ramp), 0, 2)
    np.testing.assert_allclose(_read(tmp_path / "pa.nii.gz"), want_plain, atol=1e-5)
    np.testing.assert_allclose(_read(tmp_path / "pb.nii.gz"), want_tta, atol=1e-5)
    assert np.abs(want_tta - want_plain).max() > 0.05
    for labels, probs in ((plain, want_plain), (tta, want_tta)):
        expected = np.argmax(probs, -1)
        expected[expected == 3] = 4
        np.testing.assert_array_equal(labels, expected)
    assert (plain != tta).any()


def _island_probabilities(shape=(12, 10, 6)):
    """Probabilities whose argmax is a 3x3x3 ED tumour and a 1-voxel NCR island."""
    labels = np.zeros(shape, np.int64)
    labels[3:6, 3:6, 1:4] = 2
    labels[10, 8, 5] = 1
    return labels, (np.eye(4, dtype=np.float32)[labels] * 0.6 + 0.1)


def test_postprocessing_json_in_the_run_is_applied_unless_disabled(
    runs, tmp_path, monkeypatch, write_nifti_case
):
    add, _ = runs
    run, other = add("run"), add("other")
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    labels, probs = _island_probabilities()
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *a, **k: probs)
    island_free = labels.copy()
    island_free[10, 8, 5] = 0
    out = tmp_path / "seg.nii.gz"
    # no postprocessing.json yet: nothing changes
    np.testing.assert_array_equal(case_prediction.predict_case(run, case, out), labels)
    cfg = postprocess.PostprocessConfig(min_component_voxels=2)
    postprocess.save(f"{run}/{postprocess.POSTPROCESSING_FILE}", cfg)
    np.testing.assert_array_equal(case_prediction.predict_case(run, case, out), island_free)
    np.testing.assert_array_equal(_read(out), island_free)
    np.testing.assert_array_equal(
        case_prediction.predict_case(run, case, out, postprocessing="none"), labels
    )
    # an ensemble whose runs differ (`other` has no choice) is an error unless given the file
    with pytest.raises(ValueError, match=r"ensemble runs .*other differ in post-processing"):
        case_prediction.predict_case(f"{run},{other}", case, out)
    given = case_prediction.predict_case(
        f"{run},{other}", case, out, postprocessing=f"{run}/{postprocess.POSTPROCESSING_FILE}"
    )
    np.testing.assert_array_equal(given, island_free)


def test_tune_postprocessing_cli_stores_the_choice_that_predict_applies(
    runs, tmp_path, monkeypatch, capsys, write_nifti_case, run_command
):
    from brats_jax import tune_postprocessing as tune

    add, _ = runs
    run = add("run")
    labels, probs = _island_probabilities()
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *a, **k: probs)
    data = tmp_path / "data"
    gt = labels.astype(np.int16)
    gt[10, 8, 5] = 0  # the island is a false positive
    for cid in ("Brats18_A_1", "Brats18_B_1"):
        write_nifti_case(data, cid, background_rows=2, seg=gt)
    run_command(
        tune,
        f"--workdir={run}",
        f"--cases=Brats18_A_1,{data / 'Brats18_B_1'}",
        f"--data_root={data}",
        "--min_component_voxels=2,100",
        "--et_min_voxels=5",
    )
    stored = json.loads((tmp_path / "run" / postprocess.POSTPROCESSING_FILE).read_text())
    # 2 voxels removes the 1-voxel island (100 would remove the 27-voxel tumour too; keeping
    # the largest ties and comes later); no ET anywhere: the ET step ties "off" and is kept
    assert stored["postprocessing"] == {
        "min_component_voxels": 2,
        "largest_component_only": False,
        "connectivity": 26,
        "et_min_voxels": 5,
    }
    assert stored["tuning"]["cases"] == ["Brats18_A_1", "Brats18_B_1"]
    assert stored["tuning"]["score_after"] == pytest.approx(1.0)
    # with the NCR island: WT Dice 2*27/(27+28), TC 0 (GT has none), ET absent from both: 1
    assert stored["tuning"]["score_before"] == pytest.approx((54 / 55 + 0 + 1) / 3)
    printed = capsys.readouterr().out
    assert "wrote" in printed and "warning" not in printed
    out = case_prediction.predict_case(run, data / "Brats18_A_1", tmp_path / "seg.nii.gz")
    assert out[10, 8, 5] == 0 and (out > 0).sum() == 27
    # the run was tested on Brats18_B_1 (its results.json; no data.test_cases: a drawn split)
    (tmp_path / "run" / "results.json").write_text(
        json.dumps({"per_case": [{"case_id": "Brats18_B_1"}]})
    )
    run_command(tune, f"--workdir={run}", "--cases=Brats18_A_1,Brats18_B_1", f"--data_root={data}")
    assert "warning: tuning on the run's test case(s) ['Brats18_B_1']" in capsys.readouterr().out


def test_auto_postprocessing_prefers_the_tuned_file_then_the_config_fields(tmp_path, tiny_config):
    from brats_jax.inference import postprocess

    config = tiny_config(**{"postprocess.largest_component_only": True})
    run = tmp_path / "run"
    run.mkdir()
    fields = postprocess_choice.resolve_postprocessing(str(run), "auto", config)
    assert fields == postprocess.PostprocessConfig(largest_component_only=True)
    assert postprocess_choice.resolve_postprocessing(str(run), "none", config).is_identity
    tuned = postprocess.PostprocessConfig(min_component_voxels=7)
    postprocess.save(run / postprocess.POSTPROCESSING_FILE, tuned)
    assert postprocess_choice.resolve_postprocessing(str(run), "auto", config) == tuned
    both = f"{run},{run}"  # two runs that agree
    assert postprocess_choice.resolve_postprocessing(both, "auto", config) == tuned


def test_ensemble_runs_whose_postprocessing_acts_the_same_agree(tmp_path):
    """Fields that change nothing do not make runs differ: connectivity without a component
    step, min_component_voxels under largest_component_only; a field that acts still does."""
    P = postprocess.PostprocessConfig
    pairs = [
        (P(et_min_voxels=100), P(et_min_voxels=100, connectivity=6), True),
        (P(largest_component_only=True, min_component_voxels=5),
         P(largest_component_only=True, min_component_voxels=50), True),
        (P(min_component_voxels=5, connectivity=6), P(min_component_voxels=5), False),
        (P(et_min_voxels=100), P(et_min_voxels=50), False),
    ]  # fmt: skip
    for i, (a, b, agree) in enumerate(pairs):
        runs = [tmp_path / f"{i}{name}" for name in "ab"]
        for run, cfg in zip(runs, (a, b), strict=True):
            run.mkdir()
            postprocess.save(run / postprocess.POSTPROCESSING_FILE, cfg)
        if agree:
            chosen = postprocess_choice.resolve_postprocessing(f"{runs[0]},{runs[1]}")
            assert chosen.effective() == a.effective() == b.effective()
        else:
            with pytest.raises(ValueError, match="differ in post-processing"):
                postprocess_choice.resolve_postprocessing(f"{runs[0]},{runs[1]}")


def test_outputs_show_their_own_value_range_not_the_input_images(
    runs, tmp_path, monkeypatch, write_nifti_case
):
    """The input's display range (cal_min/cal_max 0..999 here) is not copied: labels 0..ET
    (4 for 2018 names, 3 for 2023), probabilities 0..1, uncertainty unset (0, 0)."""
    add, _ = runs
    run = add("run")
    labels, probs = _island_probabilities()
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *a, **k: probs)
    for naming, case_id, et in (("2018", "Brats18_A_1", 4), ("2023", "BraTS-GLI-00001-000", 3)):
        case = write_nifti_case(tmp_path / naming, case_id, background_rows=2, naming=naming)
        for path in case.iterdir():
            img = nib.load(str(path))
            img.header["cal_min"], img.header["cal_max"] = 0, 999
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), AFFINE, img.header), str(path))
        out, prob, unc = (tmp_path / naming / f"{n}.nii.gz" for n in ("seg", "prob", "unc"))
        case_prediction.predict_case(run, case, out, probabilities=prob, uncertainty=unc)
        for path, want in ((out, (0, et)), (prob, (0, 1)), (unc, (0, 0))):
            header = nib.load(str(path)).header
            assert (float(header["cal_min"]), float(header["cal_max"])) == want, path.name


def test_config_postprocess_fields_reach_predict(runs, tmp_path, monkeypatch, write_nifti_case):
    """cpu_best's rule: a run config with postprocess.largest_component_only=True and no
    postprocessing.json: --postprocessing=auto drops the 1-voxel island (the 27-voxel
    tumour is the largest component), none keeps it."""
    add, _ = runs
    fields = {"largest_component_only": True, "min_component_voxels": 0,
              "connectivity": 26, "et_min_voxels": 0}  # fmt: skip
    run = add("run", postprocess=fields)
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    labels, probs = _island_probabilities()
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *a, **k: probs)
    assert not (tmp_path / "run" / postprocess.POSTPROCESSING_FILE).exists()
    out = tmp_path / "seg.nii.gz"
    auto = case_prediction.predict_case(run, case, out)
    assert auto[10, 8, 5] == 0 and (auto == 2).sum() == 27 and (auto > 0).sum() == 27
    np.testing.assert_array_equal(_read(out), auto)
    kept = case_prediction.predict_case(run, case, out, postprocessing="none")
    np.testing.assert_array_equal(kept, labels)
    assert kept[10, 8, 5] == 1


def test_ensemble_labels_are_the_argmax_of_the_mean_probabilities(
    runs, tmp_path, monkeypatch, write_nifti_case
):
    """Three members whose argmaxes disagree at known voxels (probabilities given by hand):
    the ensemble's label is the argmax of their mean, written in the 2018 convention. Each
    voxel is one that a wrong reduction gets wrong (named on its line)."""
    add, _ = runs
    shape = (12, 10, 6)
    member = {s: np.empty((*shape, 4), np.float32) for s in (1.0, 2.0, 3.0)}
    for p in member.values():
        p[:] = (0.97, 0.01, 0.01, 0.01)
    # voxel: (member 1, 2, 3) probabilities -> the label of their mean, by hand
    cases = {
        # mean (.1, .2, .4, .3): ED; the classwise max (.1, .5, .45, .5) says NCR
        (1, 1, 1): ((0.1, 0.5, 0.4, 0.0), (0.1, 0.05, 0.35, 0.5), (0.1, 0.05, 0.45, 0.4), 2),
        # mean (.33, .1, .1, .47): ET = 4; the first two alone (.45, .1, .1, .35): background
        (2, 3, 4): ((0.7, 0.1, 0.1, 0.1), (0.2, 0.1, 0.1, 0.6), (0.1, 0.1, 0.1, 0.7), 4),
        # mean (.6, .4, 0, 0): background; a majority vote says NCR
        (5, 5, 2): ((0.4, 0.6, 0.0, 0.0), (0.4, 0.6, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), 0),
        # mean (.60, .36, .02, .02): background; the mean of log-probabilities says NCR
        (7, 2, 0): ((0.9, 0.09, 0.005, 0.005), (0.9, 0.09, 0.005, 0.005),
                    (0.001, 0.9, 0.05, 0.049), 0),
        # mean (.1, .57, .25, .08): NCR; the last member alone says ED
        (9, 8, 5): ((0.1, 0.8, 0.05, 0.05), (0.1, 0.7, 0.1, 0.1), (0.1, 0.2, 0.6, 0.1), 1),
    }  # fmt: skip
    expected = np.zeros(shape, np.int64)
    for voxel, (*probs, label) in cases.items():
        for s, p in zip((1.0, 2.0, 3.0), probs, strict=True):
            member[s][voxel] = p
        expected[voxel] = label
    monkeypatch.setattr(
        whole_volume, "predict_volume", lambda f, v, *a, **k: member[float(v["scale"])]
    )
    runs_ = ",".join(add(f"r{s:g}", scale=s) for s in (1.0, 2.0, 3.0))
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    labels = case_prediction.predict_case(runs_, case, tmp_path / "e.nii.gz")
    np.testing.assert_array_equal(labels, expected)


def _stored_as(folder, case_id, transform, affine):
    """A copy of case folder `folder` as `case_id` with every volume's voxels reordered by
    the numpy function `transform` and stored with `affine` (the same anatomy)."""
    out = folder.parent / case_id
    out.mkdir()
    for path in folder.iterdir():
        data = transform(np.asarray(nib.load(str(path)).dataobj))
        name = path.name.replace(folder.name, case_id)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(out / name))
    return out


def test_cases_stored_in_another_voxel_order_get_the_same_segmentation(
    runs, tmp_path, write_nifti_case
):
    """The same anatomy stored in BraTS's LPS order, in RAS (axes 0, 1 flipped, as MONAI's
    `Orientationd("RAS")` writes it) and sagittally (axes 0, 2 swapped): a position-
    dependent stand-in sees the same LPS input, so the three outputs coincide voxel for
    voxel in world space, and each is written on its input's grid (shape, affine)."""
    add, _ = runs
    run = add("run", scale=0.5, model=_RampModel(), image_size=0)
    lps = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    ras_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ras_affine[:3, 3] = (-11, -9, 0)  # voxel (11, 9, 0) in RAS is voxel (0, 0, 0) in LPS
    ras = _stored_as(lps, "Brats18_R_1", lambda a: a[::-1, ::-1], ras_affine)
    sag_affine = np.array([[0, 0, -1.0, 0], [0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    sag = _stored_as(lps, "Brats18_S_1", lambda a: np.swapaxes(a, 0, 2), sag_affine)
    in_lps = {}
    for folder in (lps, ras, sag):
        out = tmp_path / f"{folder.name}_seg.nii.gz"
        labels = case_prediction.predict_case(run, folder, out)
        written, given = nib.load(str(out)), nib.load(str(folder / f"{folder.name}_t1.nii.gz"))
        assert written.shape == given.shape and np.allclose(written.affine, given.affine)
        np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
        in_lps[folder.name] = np.asarray(written.dataobj)
    assert len(np.unique(in_lps["Brats18_A_1"])) > 1  # the ramp gives several labels
    np.testing.assert_array_equal(in_lps["Brats18_R_1"][::-1, ::-1], in_lps["Brats18_A_1"])
    np.testing.assert_array_equal(np.swapaxes(in_lps["Brats18_S_1"], 0, 2), in_lps["Brats18_A_1"])


def test_a_label_file_of_another_convention_does_not_stop_prediction(
    runs, tmp_path, write_nifti_case
):
    """A new patient's folder may hold a seg file predict does not need (here with label 3,
    not a BraTS 2018 label): the case is segmented, as without it."""
    add, _ = runs
    run = add("run")
    case = write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2)
    without = case_prediction.predict_case(run, case, tmp_path / "a.nii.gz")
    seg = np.zeros((12, 10, 6), np.int16)
    seg[5, 5, 3] = 3
    nib.save(nib.Nifti1Image(seg, AFFINE), str(case / "Brats18_A_1_seg.nii.gz"))
    np.testing.assert_array_equal(
        case_prediction.predict_case(run, case, tmp_path / "b.nii.gz"), without
    )


def test_parts_sharing_a_folder_keep_every_case_in_their_summaries(
    runs, tmp_path, write_nifti_case, run_command
):
    """`--num_parts=2` on one `--uncertainty` and `--overlays` folder: each part's summary
    has its own name, so together they hold both cases (one file each would keep one)."""
    import csv

    add, _ = runs
    run = add("run")
    data = tmp_path / "data"
    for i, cid in enumerate(("Brats18_A_1", "Brats18_B_1")):
        write_nifti_case(data, cid, seed=i, background_rows=2)
    unc, pics = tmp_path / "unc", tmp_path / "pics"
    for part in (0, 1):
        run_command(
            predict,
            f"--workdir={run}",
            f"--input={data}",
            "--num_parts=2",
            f"--part_id={part}",
            f"--output={tmp_path / 'out'}",
            f"--uncertainty={unc}",
            f"--overlays={pics}",
        )
    rows = [r["case_id"] for f in sorted(unc.glob("*.csv")) for r in csv.DictReader(open(f))]
    assert rows == ["Brats18_A_1", "Brats18_B_1"]
    pages = sorted(p.name for p in pics.glob("*.html"))
    assert pages == ["index-part0-of-2.html", "index-part1-of-2.html"]
    assert "Brats18_B_1" in (pics / "index-part1-of-2.html").read_text()


def test_every_command_imports_into_one_process():
    """Commands that share flags (--workdir, --tta, --step, --batch_size, --overlays) can be
    imported into one process, in either order, with no DuplicateFlagError."""
    names = ["predict", "evaluate", "tune_postprocessing", "main"]
    repo = pathlib.Path(__file__).resolve().parents[2]
    for order in (names, names[::-1]):
        code = "import " + ", ".join(f"brats_jax.{n}" for n in order)
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def member(tmp_path, stand_in_config):
    """`member(name, largest_only, tuned=None)`: a run folder in tmp_path: config.json with
    `postprocess.largest_component_only`, an optional tuned file."""

    def make(name, largest_only, tuned=None):
        folder = tmp_path / name
        folder.mkdir()
        config = stand_in_config(**{
            "model.base_features": 8,
            "postprocess": {"largest_component_only": largest_only, "min_component_voxels": 0,
                            "connectivity": 26, "et_min_voxels": 0},
        })  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        if tuned is not None:
            postprocess.save(folder / postprocess.POSTPROCESSING_FILE, tuned)
        return str(folder)

    return make


def _disagreeing_members(probs, shift=0.38):
    """Three members' (H, W, D, 4) probabilities from `probs` (rows of 0.7 / 0.1): member k
    moves `shift` from the top class to class (top + k + 1) % 4, so each alone has another
    argmax at every voxel (0.48 > 0.32) while their mean keeps `probs`' (top 0.32, the
    others 0.1 + 0.38 / 3); their classwise max has no single winner (0.48 three times)."""
    top = np.argmax(probs, -1)
    eye = np.eye(4, dtype=np.float32)
    return [probs + shift * (eye[(top + k + 1) % 4] - eye[top]) for k in range(3)]


@pytest.fixture
def case(tmp_path, monkeypatch, write_nifti_case):
    """(case folder, labels with the island, labels without it). Run `f<k>` serves member k
    of `_disagreeing_members` of the island probabilities."""

    def load_trained(workdir, step=None):
        saved = json.loads((pathlib.Path(workdir) / "config.json").read_text())
        config = ml_collections.ConfigDict(config_fields.upgrade_legacy(saved))
        k = int(pathlib.Path(workdir).name[1:])
        return config, _ScaleModel(), {"scale": np.float32(k)}

    labels, probs = _island_probabilities()
    members = _disagreeing_members(probs)
    for m in members:
        assert (np.argmax(m, -1) != labels).all() and np.allclose(m.sum(-1), 1, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(np.mean(members, 0), -1), labels)
    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(
        whole_volume, "predict_volume", lambda f, v, *a, **k: members[int(v["scale"])]
    )
    island_free = labels.copy()
    island_free[10, 8, 5] = 0
    return write_nifti_case(tmp_path, "Brats18_A_1", background_rows=2), labels, island_free


def test_agreeing_config_fields_are_applied_to_the_ensemble(case, member, tmp_path):
    folder, labels, island_free = case
    runs = ",".join(member(f"f{k}", True) for k in range(3))  # members that disagree
    out = tmp_path / "seg.nii.gz"
    got = case_prediction.predict_case(runs, folder, out)  # auto
    np.testing.assert_array_equal(got, island_free)
    np.testing.assert_array_equal(_read(out), island_free)
    kept = case_prediction.predict_case(runs, folder, out, postprocessing="none")
    np.testing.assert_array_equal(kept, labels)


def test_members_that_differ_are_a_one_line_error_naming_them(case, member, tmp_path):
    folder, _, _ = case
    f0, f1, f2 = (member(n, v) for n, v in (("f0", True), ("f1", False), ("f2", True)))
    with pytest.raises(ValueError) as e:
        case_prediction.predict_case(f"{f0},{f1},{f2}", folder, tmp_path / "seg.nii.gz")
    msg = str(e.value)
    assert "\n" not in msg and "--postprocessing=FILE" in msg
    assert f"runs {f1} differ" in msg and f"from {f0}" in msg and f2 not in msg


def test_equal_postprocessing_files_are_applied_over_differing_config_fields(
    case, member, tmp_path
):
    folder, labels, island_free = case
    tuned = postprocess.PostprocessConfig(min_component_voxels=2)  # drops the 1-voxel island
    f0 = member("f0", False, tuned=tuned)
    f1 = member("f1", True, tuned=tuned)
    f2 = member("f2", True, tuned=tuned)
    got = case_prediction.predict_case([f0, f1, f2], folder, tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(got, island_free)
    assert postprocess_choice.resolve_postprocessing([f0, f1, f2], "auto") == tuned


def test_a_tuned_file_equal_to_the_other_runs_config_fields_agrees(member):
    tuned = postprocess.PostprocessConfig(largest_component_only=True)
    f0 = member("f0", False, tuned=tuned)
    f1 = member("f1", True)  # no file: its config's fields, the same thresholds
    assert postprocess_choice.resolve_postprocessing(f"{f0},{f1}", "auto") == tuned
