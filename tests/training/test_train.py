"""End-to-end tests of the main job on the `tiny` preset: train, resume, test, predict."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import jax
import nibabel as nib
import numpy as np
import pytest

from brats_jax.runs import train_state
from brats_jax.training import evaluation, run_group, steps, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_outputs_written(tiny_run):
    workdir, results = tiny_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "results.json",
        "per_case.csv",
        "learning_curves.png",
        "test_slices.png",
    ):
        assert (workdir / name).exists(), name
    saved = json.loads((workdir / "results.json").read_text())
    assert set(saved["dice"]) == {"WT", "TC", "ET"} and set(saved["hd95"]) == {"WT", "TC", "ET"}
    assert len(saved["class_dice"]) == 4
    assert saved["steps"] == 6
    # One CSV row per test case (each a case the split put in test); the summary's region and
    # class scores are the means over those rows of the finite values (HD95 of an empty
    # region is not averaged in), read back from the CSV; paper_dice itself is recomputed from
    # the predictions in test_test_metrics_come_from_the_checkpoint_validation_picked.
    with open(workdir / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(saved["per_case"]) == saved["num_test_cases"] >= 1
    assert [r["case_id"] for r in rows] == [c["case_id"] for c in saved["per_case"]]

    def column_mean(key):
        vals = [float(r[key]) for r in rows if r[key] not in ("", "None", "nan")]
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else None

    for region in ("WT", "TC", "ET"):
        for metric in ("dice", "hd95", "sensitivity", "specificity"):
            want = column_mean(f"{metric}_{region}")
            got = saved[metric][region]
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-5), (
                metric,
                region,
            )
    for c in range(4):
        assert saved["class_dice"][c] == pytest.approx(column_mean(f"class_dice_{c}"), rel=1e-5)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_paper_dice" in r for r in logged) and any("train_loss" in r for r in logged)
    assert (workdir / "tensorboard").is_dir()


def test_best_checkpoint_is_the_best_validation_step(tiny_run):
    """Validation at steps 3 and 6: the best of them is kept (with its metric) and chosen."""
    from brats_jax.runs.checkpoints import VAL_METRIC, RunCheckpoints

    workdir, _ = tiny_run
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_paper_dice"] for r in logged if "val_paper_dice" in r}
    assert sorted(val) == [3, 6]
    best = max(val, key=val.get)
    ckpts = RunCheckpoints(workdir, read_only=True)
    assert best in ckpts.manager.all_steps()
    assert ckpts.best_step() == best
    assert ckpts.manager.metrics(best)[VAL_METRIC] == pytest.approx(val[best])


def test_rerun_of_finished_run_resumes_without_training(tiny_run, tmp_path, tiny_config):
    workdir, results = tiny_run
    again = train.train_and_evaluate(tiny_config(), workdir)
    assert again["steps"] == results["steps"]
    assert again["paper_dice"] == pytest.approx(results["paper_dice"], abs=1e-6)


def _final_params(workdir):
    _, _, variables = train_state.load_trained(workdir, step=None)
    return variables


def test_killed_run_resumes_to_identical_result(tmp_path, tiny_config):
    """SIGKILL mid-training, rerun: same final parameters and metrics as one clean run."""
    overrides = {
        "train.num_steps": 30,
        "train.checkpoint_every_steps": 2,
        "train.eval_every_steps": 1000,
        "data.val_fraction": 0.0,
    }
    clean = tmp_path / "clean"
    expected = train.train_and_evaluate(tiny_config(**overrides), clean)

    killed = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "brats_jax.main",
        "--config=configs/unet.py:tiny",
        f"--workdir={killed}",
    ] + [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "6").exists():
        assert proc.poll() is None, "training subprocess ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "run finished before the kill"

    resumed = train.train_and_evaluate(tiny_config(**overrides), killed)
    assert resumed["steps"] == expected["steps"] == 30
    a, b = _final_params(clean), _final_params(killed)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert resumed["paper_dice"] == pytest.approx(expected["paper_dice"], abs=1e-5)


def test_non_finite_loss_stops_with_step(tmp_path, tiny_config):
    config = tiny_config(**{"train.learning_rate": 1e30, "train.num_steps": 20})
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train.train_and_evaluate(config, tmp_path)


def test_bad_intervals_and_distributed_without_workdir_are_errors(tmp_path, tiny_config):
    for field in ("train.log_every_steps", "train.checkpoint_every_steps", "eval.batch_size"):
        with pytest.raises(ValueError, match=rf"{field}=0; expected at least 1"):
            run_group.build_run(tiny_config(**{field: 0}), tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "brats_jax.main", "--config=configs/unet.py:tiny", "--distributed"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode != 0 and "--distributed needs --workdir" in proc.stderr


def test_resuming_with_a_changed_config_names_the_changes(tmp_path, tiny_config):
    old = tiny_config()
    (tmp_path / "config.json").write_text(old.to_json_best_effort())
    new = json.loads(tiny_config(**{"train.learning_rate": 0.5}).to_json_best_effort())
    new["data"]["extra"] = 1
    assert run_group._warn_config_changes(tmp_path / "config.json", new) == [
        "data.extra",
        "train.learning_rate",
    ]
    assert run_group._warn_config_changes(tmp_path / "none.json", new) == []


def test_batch_not_divisible_by_devices_is_an_error(tmp_path, monkeypatch, tiny_config):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda *a: 3)
    with pytest.raises(ValueError, match="does not divide"):
        run_group.build_run(tiny_config(), tmp_path)


AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS's voxel order
AFFINE[:3, 3] = (-120, -120, 0)
CASE_SHAPE = (40, 36, 5)  # not the model's size: the prediction is resized back


@pytest.fixture
def case_2018(tmp_path, write_nifti_case):
    """A random 2018-named case folder `tmp_path/Brats18_X_1_1` of shape CASE_SHAPE, stored
    with AFFINE."""
    return write_nifti_case(tmp_path, "Brats18_X_1_1", shape=CASE_SHAPE, background_rows=4,
                            modalities=("t1", "t1ce", "t2", "flair"), affine=AFFINE)  # fmt: skip


def test_predict_writes_nifti_in_release_convention(tiny_run, tmp_path, case_2018):
    """Predict a tiny 2018-style case: input shape, affine and label set {0,1,2,4} survive."""
    from brats_jax.inference import case_prediction

    workdir, _ = tiny_run
    case, affine, shape = case_2018, AFFINE, CASE_SHAPE
    out = tmp_path / "pred" / "seg.nii.gz"
    probs_out = tmp_path / "pred" / "probs.nii.gz"
    labels = case_prediction.predict_case(workdir, case, out, probabilities=probs_out)
    img = nib.load(str(out))
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, affine)
    values = set(np.unique(np.asarray(img.dataobj)).tolist())
    assert values <= {0, 1, 2, 4}
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    probs = np.asarray(nib.load(str(probs_out)).dataobj)
    assert probs.shape == (*shape, 4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    # The written labels are the argmax of the written probabilities, mapped 3 -> 4.
    expected = np.argmax(probs, -1)
    expected[expected == 3] = 4
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


def test_predict_cli_takes_modality_files_of_any_name(tiny_run, tmp_path, case_2018):
    """`--flair/--t1/--t1ce/--t2` files named freely predict as the folder does."""
    from brats_jax.inference import case_prediction

    workdir, _ = tiny_run
    case = case_2018
    from_folder = case_prediction.predict_case(workdir, case, tmp_path / "folder.nii.gz")
    files = []
    for mod in ("flair", "t1", "t1ce", "t2"):
        renamed = tmp_path / f"scan_{mod.upper()}.nii.gz"
        (case / f"Brats18_X_1_1_{mod}.nii.gz").rename(renamed)
        files.append(f"--{mod}={renamed}")
    out = tmp_path / "out" / "seg.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "brats_jax.predict", f"--workdir={workdir}", *files,
         f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), from_folder)
    both = subprocess.run(
        [sys.executable, "-m", "brats_jax.predict", f"--workdir={workdir}", f"--input={case}",
         files[0], f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert both.returncode != 0 and "either --input or the modality files" in both.stderr


def test_predict_cli_label_convention_follows_naming(
    tiny_run, tmp_path, monkeypatch, case_2018, run_command
):
    """The written labels are the release's: a folder named the 2018 way gets ET = 4, files
    given with --naming=2023 get ET = 3 (model output replaced by known probabilities)."""
    from brats_jax import predict
    from brats_jax.inference import whole_volume

    workdir, _ = tiny_run
    case, shape = case_2018, CASE_SHAPE
    classes = np.arange(np.prod(shape)).reshape(shape) % 4  # every class present
    probs = np.eye(4, dtype=np.float32)[classes] * 0.7 + 0.075
    monkeypatch.setattr(whole_volume, "predict_volume", lambda *a, **k: probs)
    files = [f"--{m}={case}/Brats18_X_1_1_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")]
    runs = {
        "folder": ([f"--input={case}"], np.array([0, 1, 2, 4])[classes]),
        "files_2023": ([*files, "--naming=2023"], classes),
        "files_default": (files, np.array([0, 1, 2, 4])[classes]),
    }
    for name, (args, expected) in runs.items():
        out = tmp_path / f"{name}.nii.gz"
        run_command(predict, f"--workdir={workdir}", f"--output={out}", *args)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), expected, name)


def test_predict_normalizes_input_as_the_run_was_trained(
    tiny_run, tmp_path, monkeypatch, case_2018
):
    """A run trained on Kaggle slices gets per-slice z-scored input (the release's own), a
    NIfTI- or synthetic-trained run the volume's brain z-score."""
    import shutil

    from brats_jax.inference import case_prediction, whole_volume

    workdir, _ = tiny_run
    case = case_2018
    seen = []

    def fake_predict_volume(predict_fn, variables, volume, *, batch_size, context_slices=0):
        seen.append(volume)
        return np.full(volume.shape[:3] + (4,), 0.25, np.float32)

    monkeypatch.setattr(whole_volume, "predict_volume", fake_predict_volume)
    kaggle_run = tmp_path / "kaggle_run"
    shutil.copytree(workdir, kaggle_run)
    config = json.loads((kaggle_run / "config.json").read_text())
    config["data"]["source"] = "kaggle_h5"
    (kaggle_run / "config.json").write_text(json.dumps(config))
    case_prediction.predict_case(workdir, case, tmp_path / "a.nii.gz")
    case_prediction.predict_case(kaggle_run, case, tmp_path / "b.nii.gz")
    raw = np.asarray(nib.load(str(case / "Brats18_X_1_1_t1ce.nii.gz")).dataobj, np.float64)
    brain = np.zeros(raw.shape, bool)
    for mod in ("flair", "t1", "t1ce", "t2"):
        brain |= np.asarray(nib.load(str(case / f"Brats18_X_1_1_{mod}.nii.gz")).dataobj) != 0
    by_slice = (raw - raw.mean((0, 1))) / raw.std((0, 1))
    by_brain = (raw - raw[brain].mean()) / raw[brain].std()
    np.testing.assert_allclose(seen[0][..., 2], by_brain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen[1][..., 2], by_slice, rtol=1e-5, atol=1e-5)


def test_resume_uses_the_configured_learning_rate(tmp_path, tiny_config):
    """Resumed with train.learning_rate=0 (as config.json then says), the parameters stay
    those of the checkpoint: the rate restored with the optimizer state is replaced."""
    keep = {"train.keep_checkpoints": 10, "data.val_fraction": 0.0, "data.test_fraction": 0.0}
    train.train_and_evaluate(tiny_config(**{"train.num_steps": 4}, **keep), tmp_path)
    results = train.train_and_evaluate(
        tiny_config(**{"train.num_steps": 8, "train.learning_rate": 0.0}, **keep), tmp_path
    )
    # without a validation split the final step's weights are tested, and said so
    assert results["tested_step"] == 8 and results["selected_by"].startswith("final step")
    assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.0
    _, _, at4 = train_state.load_trained(tmp_path, step=4)
    _, _, at8 = train_state.load_trained(tmp_path, step=8)
    for x, y in zip(jax.tree.leaves(at4), jax.tree.leaves(at8), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_transunet_starts_from_pretrained_path(tmp_path, monkeypatch, tiny_config, vit_checkpoint):
    """model.pretrained_path loads the R50+ViT npz into the initial state (position embedding
    resized to the 2x2 grid of 32 px inputs), with a fresh optimizer state; train_runs uses
    it on a fresh start."""
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", seed=3, **vit_checkpoint.TINY)
    c = tiny_config(model="transunet", **{"model.pretrained_path": str(tmp_path / "vit.npz")})
    model, tx = train_state.create_model(c), train_state.create_optimizer(c.train, 10)
    state = jax.jit(lambda seed: train_state.init_state(model, tx, seed, image_size=32))(0)
    loaded = train_state.with_pretrained(state, tx, c, 32)
    for key in (
        "conv_root/kernel",
        "Transformer/posembed_input/pos_embedding",
        "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel",
        "block2/unit1/gn2/scale",
    ):
        np.testing.assert_allclose(
            vit_checkpoint.get(loaded.params, key),
            vit_checkpoint.expected_value(key, arrays[key], 2, 4),
            rtol=1e-5, atol=1e-6, err_msg=key,
        )  # fmt: skip
    # a fresh optimizer state: Adam's moments are zeros of the parameters' shapes
    moments = [x for x in jax.tree.leaves(loaded.opt_state) if np.ndim(x) > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(loaded.params))
    assert not any(np.asarray(x).any() for x in moments)
    c.model.pretrained_path = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match=r"model.pretrained_path .*missing\.npz"):
        train_state.with_pretrained(state, tx, c, 32)
    u = tiny_config(**{"model.pretrained_path": str(tmp_path / "vit.npz")})
    with pytest.raises(ValueError, match="is for TransUNet"):
        train_state.with_pretrained(state, tx, u, 32)

    class Loaded(Exception):
        pass

    def fake(state, tx, config, image_size):
        raise Loaded(config.model.pretrained_path, image_size)

    monkeypatch.setattr(run_group, "with_pretrained", fake)
    with pytest.raises(Loaded) as e:
        train.train_and_evaluate(u, tmp_path / "run")
    assert e.value.args == (str(tmp_path / "vit.npz"), 32)


def test_cut_metrics_line_is_skipped_and_results_come_last(tmp_path, monkeypatch, tiny_config):
    """A line cut by a killed run does not break the curves; results.json (the sweep's
    "finished" mark) is written only after the other outputs."""
    from brats_jax.figures import plots

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "train_loss": 0.5}\n{"step": 2, "train_lo'
        '{"step": 3, "train_loss": 0.25, "val_paper_dice": null}\n'
    )
    curves = plots.read_metrics(path)
    np.testing.assert_array_equal(curves["train_loss"][0], [1])
    np.testing.assert_array_equal(curves["train_loss"][1], [0.5])
    monkeypatch.setattr(plots, "overlay_grid", lambda *a: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        train.train_and_evaluate(tiny_config(**{"train.num_steps": 2}), tmp_path / "run")
    assert (tmp_path / "run" / "per_case.csv").exists()
    assert not (tmp_path / "run" / "results.json").exists()


def test_validation_paper_dice_is_the_mean_over_slices(tiny_run, tmp_path):
    """val paper_dice (which picks the best checkpoint) is the study's metric: the mean over
    slices of the per-slice 4-class Dice (absent in both -> 1), as the test's paper_dice;
    pooled_dice pools one confusion matrix. Reference computed here in numpy."""
    from brats_jax import data

    workdir, _ = tiny_run
    config, model, variables = train_state.load_trained(workdir)
    run = run_group.build_run(config, tmp_path)
    state = train_state.TrainState(
        step=0, params=variables["params"], model_state={}, opt_state=None, rng=None
    )
    got = evaluation.evaluate_slices(
        run, jax.jit(steps.make_eval_step(model)), state, run.splits.val
    )
    per_slice, confusion = [], np.zeros((4, 4), np.int64)
    for batch in data.eval_batches(
        run.source, run.splits.val, batch_size=4, image_size=config.data.image_size
    ):
        pred = np.argmax(np.asarray(model.apply(variables, batch["image"], train=False)), -1)
        for p, t in zip(pred[batch["valid"]], batch["label"][batch["valid"]], strict=True):
            dice = [
                1.0 if (p == c).sum() + (t == c).sum() == 0
                else 2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum())
                for c in range(4)
            ]  # fmt: skip
            per_slice.append(np.mean(dice))
            np.add.at(confusion, (t.ravel(), p.ravel()), 1)
    assert len(per_slice) == len(run.splits.val) > 1
    assert got["paper_dice"] == pytest.approx(np.mean(per_slice), abs=1e-5)
    tp = np.diag(confusion)
    pooled = 2 * tp / (confusion.sum(0) + confusion.sum(1))
    assert got["pooled_dice"] == pytest.approx(np.mean(np.where(np.isnan(pooled), 1, pooled)))


def test_test_metrics_come_from_the_checkpoint_validation_picked(
    tiny_run, tmp_path, recompute_test_pass
):
    """The test pass scores the best-validation checkpoint (the one `predict` uses): its
    step is in results.json, and the study's metric and its two readings, recomputed here
    from that checkpoint's predictions with numpy, match."""
    from brats_jax.runs.checkpoints import RunCheckpoints

    workdir, _ = tiny_run
    saved = json.loads((workdir / "results.json").read_text())
    ckpts = RunCheckpoints(workdir, read_only=True)
    assert saved["tested_step"] == ckpts.best_step()  # the step predict loads
    assert saved["selected_by"] == "best validation val_paper_dice"
    want = recompute_test_pass(workdir, tmp_path)
    assert saved["num_test_slices"] == want["num_test_slices"] == want["num_kept"] > 1
    assert saved["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6)
    assert saved["paper_dice_absent_excluded"] == pytest.approx(
        want["paper_dice_absent_excluded"], abs=1e-6
    )
    assert saved["pooled_class_dice"] == pytest.approx(want["pooled_class_dice"], abs=1e-6)


@pytest.fixture(scope="module")
def early_best_run(tmp_path_factory, tiny_config):
    """A tiny run (validation at steps 3 and 6, checkpoints at 2, 3, 4, 6, only the newest
    kept by "last K") whose validation paper_dice is patched to 0.9 at step 3 and 0.1 at
    step 6: the best step is an early one, not the final one."""
    workdir = tmp_path_factory.mktemp("early_best")
    real = evaluation.evaluate_slices
    seen = []

    def patched(run, eval_step, state, indices):
        out = dict(real(run, eval_step, state, indices))
        seen.append(int(np.asarray(state.step)))
        out["paper_dice"] = 0.9 if seen[-1] == 3 else 0.1
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "evaluate_slices", patched)
        results = train.train_and_evaluate(tiny_config(**{"train.keep_checkpoints": 1}), workdir)
    assert seen == [3, 6]
    return workdir, results


def test_an_early_best_step_is_tested_kept_and_predicted_with(
    early_best_run, tmp_path, recompute_test_pass
):
    """best (3) != final (6): results.json names step 3 and its metrics are step 3's
    recomputed, not step 6's; checkpoint 3 survived "last 1" deletion; predict loads it."""
    from brats_jax.runs.checkpoints import RunCheckpoints

    workdir, results = early_best_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["tested_step"] == results["tested_step"] == 3
    assert saved["selected_by"] == "best validation val_paper_dice"
    ckpts = RunCheckpoints(workdir, read_only=True)
    assert ckpts.all_steps() == [3, 6]  # 2 and 4 went, the older best stayed
    assert ckpts.best_step() == 3
    at3 = recompute_test_pass(workdir, tmp_path, step=3)
    at6 = recompute_test_pass(workdir, tmp_path, step=6)
    assert abs(at3["paper_dice"] - at6["paper_dice"]) > 1e-4  # the two steps score apart
    for key in ("paper_dice", "paper_dice_absent_excluded"):
        assert saved[key] == pytest.approx(at3[key], abs=1e-6), key
        assert saved[key] != pytest.approx(at6[key], abs=1e-6), key
    assert saved["pooled_class_dice"] == pytest.approx(at3["pooled_class_dice"], abs=1e-6)
    _, _, chosen = train_state.load_trained(workdir)
    _, _, v3 = train_state.load_trained(workdir, step=3)
    for x, y in zip(jax.tree.leaves(chosen), jax.tree.leaves(v3), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_predict_missing_checkpoint_is_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        train_state.load_trained(tmp_path)


def _run_main(workdir, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m brats_jax.main` on the tiny preset with `--config.` overrides."""
    return subprocess.run(
        [sys.executable, "-m", "brats_jax.main", "--config=configs/unet.py:tiny",
         f"--workdir={workdir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def test_main_unknown_config_field_is_one_line_error(tmp_path):
    proc = _run_main(tmp_path, "--config.train.no_such_field=1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config field")
    assert "no_such_field" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_main_missing_data_root_is_one_line_error(tmp_path):
    proc = _run_main(
        tmp_path, "--config.data.source=kaggle_h5", f"--config.data.root={tmp_path / 'nope'}"
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nope" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path):
    """Data parallel over 2 CPU devices gives the same loss curve as 1 device."""
    script = (
        "import json,sys; from brats_jax.training import train; from configs import unet;"
        "c=unet.get_config('tiny'); c.train.num_steps=8; c.train.log_every_steps=1;"
        "c.data.test_fraction=0.0; r=train.train_and_evaluate(c, sys.argv[1]);"
        "import jax; print(jax.device_count())"
    )
    curves = {}
    for n in (1, 2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
        }
        wd = tmp_path / f"dev{n}"
        out = subprocess.run(
            [sys.executable, "-c", script, str(wd)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == str(n)
        rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
        curves[n] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(curves[1]) == 8
    np.testing.assert_allclose(curves[1], curves[2], rtol=2e-4, atol=1e-5)


def test_eval_batches_split_across_hosts_cover_every_slice_once(tmp_path, monkeypatch, tiny_config):
    """Each of 2 hosts yields the same number of batches; together they hold each slice once."""
    import jax

    run = run_group.build_run(tiny_config(**{"eval.batch_size": 4}), tmp_path)
    indices = np.arange(11)  # 3 global batches of 4, the last one padded
    seen, counts = [], []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for host in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        batches = list(evaluation._host_eval_batches(run, indices, num_batches=3))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape[0] == 2
            for case, z, ok in zip(b["case_id"], b["slice_index"], b["valid"], strict=True):
                if ok:
                    seen.append((str(case), int(z)))
    assert counts == [3, 3]
    table = run.source.table
    expected = [(str(table.case_id[i]), int(table.slice_index[i])) for i in indices]
    assert sorted(seen) == sorted(expected)


def test_main_log_filter_drops_only_routine_orbax_lines():
    import logging

    from brats_jax.cli import keep_log_record

    def rec(path, level, msg):
        return logging.LogRecord("x", level, path, 1, msg, None, None)

    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not keep_log_record(rec(orbax, logging.INFO, "Saving checkpoint at step 5"))
    assert not keep_log_record(
        rec(orbax, logging.WARNING, "Requested `tracked_metric`; did not provide metrics.")
    )
    assert keep_log_record(rec(orbax, logging.WARNING, "Checkpoint directory is not writable"))
    assert keep_log_record(rec("/work/brats_jax/train.py", logging.INFO, "step 5"))


def test_old_run_folder_with_model_conv_impl_resumes_and_predicts(tiny_run, tmp_path, tiny_config):
    """Run folders written before `model.conv_impl` became `runtime.ops` still load for
    prediction (same weights) and resume training from their last checkpoint."""
    import shutil

    workdir, _ = tiny_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    saved = json.loads((old / "config.json").read_text())
    saved["model"]["conv_impl"] = saved.pop("runtime")["ops"]
    (old / "config.json").write_text(json.dumps(saved))
    config, _, v_old = train_state.load_trained(old, step=6)
    assert config.runtime.ops == "auto" and "conv_impl" not in config.model
    _, _, v_new = train_state.load_trained(workdir, step=6)
    for x, y in zip(jax.tree.leaves(v_old), jax.tree.leaves(v_new), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    results = train.train_and_evaluate(tiny_config(**{"train.num_steps": 8}), old)
    assert results["steps"] == 8
    logged = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    trained_steps = [r["step"] for r in logged if "train_loss" in r]
    assert trained_steps == [2, 4, 6, 8]  # resumed at 6: steps 1-6 were not trained again


def test_test_pass_applies_the_config_postprocessing(tiny_run, tmp_path):
    """With `postprocess` fields set, the test pass scores the post-processed volumes: each
    case's metrics equal `metrics.evaluate_volume` of the thresholded prediction after
    `postprocess.apply`, and results.json records the thresholds."""
    from scipy import ndimage

    from brats_jax import data, metrics
    from brats_jax.inference import postprocess, whole_volume
    from brats_jax.training import evaluation

    workdir, _ = tiny_run
    config, model, variables = train_state.load_trained(workdir)
    with config.unlocked():
        config.postprocess.min_component_voxels = 40
        config.postprocess.et_min_voxels = 30
    run = run_group.build_run(config, tmp_path)
    predict = whole_volume.make_slice_predictor(model, image_size=config.data.image_size)
    results, _ = evaluation.evaluate_test_volumes(run, predict, variables)
    assert results["postprocessing"] == {
        "min_component_voxels": 40,
        "largest_component_only": False,
        "connectivity": 26,
        "et_min_voxels": 30,
    }
    changed = 0
    for row, case_id in zip(results["per_case"], run.splits.cases["test"], strict=True):
        image, label = data.load_volume(run.source, case_id)
        raw = np.argmax(whole_volume.predict_volume(predict, variables, image, batch_size=4), -1)
        cleaned = raw.copy()
        wt = raw > 0  # hand-written rule: components of WT (26-conn.) under 40 voxels go,
        comps, n = ndimage.label(wt, structure=np.ones((3, 3, 3)))  # except the largest
        sizes = np.bincount(comps.ravel(), minlength=n + 1)
        sizes[0] = 0
        small = (comps > 0) & (sizes[comps] < 40) & (comps != np.argmax(sizes))
        cleaned[small] = 0
        if 0 < (cleaned == 3).sum() < 30:
            cleaned[cleaned == 3] = 1
        changed += int((cleaned != raw).any())
        want = metrics.evaluate_volume(cleaned, label)
        assert row["dice_WT"] == pytest.approx(want["dice_WT"])
        assert row["hd95_ET"] == pytest.approx(want["hd95_ET"])
        np.testing.assert_array_equal(
            postprocess.apply(raw, postprocess.from_config(config)), cleaned
        )
    assert changed  # the thresholds did something on these cases


def test_old_run_folder_without_model_output_loads_as_classes(tiny_run, tmp_path, case_2018):
    """Run folders written before `model.output` existed are 4-class runs: they load (same
    weights) and predict as before."""
    import shutil

    workdir, _ = tiny_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    saved = json.loads((old / "config.json").read_text())
    assert saved["model"].pop("output") == "classes"
    (old / "config.json").write_text(json.dumps(saved))
    config, _, v_old = train_state.load_trained(old, step=6)
    assert config.model.output == "classes"  # config_fields.ADDED_FIELDS: what it trained as
    _, _, v_new = train_state.load_trained(workdir, step=6)
    for x, y in zip(jax.tree.leaves(v_old), jax.tree.leaves(v_new), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    case = case_2018
    from brats_jax.inference import case_prediction

    labels = case_prediction.predict_case(old, case, tmp_path / "old.nii.gz")
    np.testing.assert_array_equal(
        labels, case_prediction.predict_case(workdir, case, tmp_path / "n.nii.gz")
    )


def test_test_summary_is_the_mean_over_cases_of_the_finite_scores():
    """results.json's region, class and lesion-wise scores over three hand-made cases: means
    over the cases whose score is finite (an HD95 left None/inf is not averaged in), lesion
    counts summed, paper_dice the mean over all test slices (not a mean of case means)."""
    nan, inf = float("nan"), float("inf")
    rows = []
    for i, (dice_wt, hd_et, lw_fp) in enumerate([(0.9, 3.0, 1), (0.6, inf, 0), (0.3, 9.0, 4)]):
        row = {"case_id": f"c{i}"}
        for r in ("WT", "TC", "ET"):
            row |= {f"dice_{r}": dice_wt, f"hd95_{r}": hd_et if r == "ET" else 2.0 * (i + 1)}
            row |= {f"sensitivity_{r}": 0.5 + 0.1 * i, f"specificity_{r}": 1.0 - 0.01 * i}
            row |= {f"lesionwise_dice_{r}": dice_wt / 2, f"lesionwise_hd95_{r}": 10.0 * i}
            row |= {f"lesionwise_{k}_{r}": n for k, n in (("tp", 2), ("fn", i), ("fp", lw_fp))}
        row |= {f"class_dice_{c}": [1.0, 0.2, nan, 0.4][c] * (i + 1) / 3 for c in range(4)}
        rows.append(row)
    readings = {
        "absent_one": [1.0, 0.5, 0.5, 0.2],  # four slices of unequal cases
        "absent_excluded": [0.8, 0.5, 0.5, 0.2],
        "confusion": np.array([[5, 1, 0, 0], [1, 3, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]),
    }
    got = evaluation._summarise(rows, readings)
    assert got["dice"]["WT"] == pytest.approx(0.6)
    assert got["hd95"]["ET"] == pytest.approx(6.0)  # (3 + 9) / 2: inf is left out
    assert got["hd95"]["TC"] == pytest.approx(4.0)  # (2 + 4 + 6) / 3
    assert got["sensitivity"]["TC"] == pytest.approx(0.6)
    assert got["specificity"]["ET"] == pytest.approx(0.99)
    assert got["class_dice"][0] == pytest.approx(2 / 3) and got["class_dice"][2] is None
    assert got["class_dice"][3] == pytest.approx(0.4 * 2 / 3)
    assert got["paper_dice"] == pytest.approx(2.2 / 4)
    assert got["paper_dice_absent_excluded"] == pytest.approx(2.0 / 4)
    assert got["pooled_class_dice"] == pytest.approx([10 / 12, 6 / 8, 1.0, 1.0])
    assert got["lesionwise"]["dice"]["ET"] == pytest.approx(0.3)
    assert got["lesionwise"]["hd95"]["WT"] == pytest.approx(10.0)
    assert (got["lesionwise"]["fp"]["TC"], got["lesionwise"]["fn"]["WT"]) == (5, 3)
    assert got["num_test_cases"] == 3 and got["num_test_slices"] == 4
