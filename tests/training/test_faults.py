"""Fast checks of the training loop's fault guarantees (the slow end-to-end versions are in
test_checkpoints.py): a diverged run keeps only finite checkpoints and its rerun finishes; a
failed restore changes nothing in the run folder; a rerun after a corrupt newest checkpoint
writes no metric row twice; a folder held by another live process is refused before anything
is written; the lock is held until the results are written and gone after a run; every
grouped run that diverges loses its condemned checkpoints, a run that diverges in a group
(by its loss or, first, its weights) stops alone while the others train on, and
class-weight rows survive a resume (all slow).
Tiny U-Net (`configs/unet.py:tiny`), 4 steps, no validation or test split (no evaluation
compiles)."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from brats_jax.runs import checkpoints, workdir_lock
from brats_jax.runs.checkpoints import RunCheckpoints, UnreadableCheckpoint
from brats_jax.training import train

REPO = pathlib.Path(__file__).resolve().parents[2]


# `tiny` with 4 steps, a log row and a checkpoint every 2 steps, train split only.
FOUR_STEPS = {
    "data.val_fraction": 0.0,
    "data.test_fraction": 0.0,
    "train.num_steps": 4,
    "train.log_every_steps": 2,
    "train.checkpoint_every_steps": 2,
    "train.keep_checkpoints": 3,
}
# Learning rate 1e6 (the loss turns non-finite within the 4 steps), a checkpoint every step.
DIVERGING = {"train.learning_rate": 1e6, "train.checkpoint_every_steps": 1}


def _rows(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _steps_of(workdir, key: str) -> list[int]:
    """The steps of `metrics.jsonl`'s rows holding `key`, in file order."""
    return [r["step"] for r in _rows(workdir) if key in r]


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _template(workdir):
    """The abstract TrainState of the run in `workdir` (for restoring its checkpoints)."""
    import functools

    from brats_jax.runs import train_state

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model = train_state.create_model(config)
    tx = train_state.create_optimizer(config.train, config.train.num_steps)
    init = functools.partial(
        train_state.init_state, model, tx, 0, image_size=config.data.synthetic_image_size
    )
    return jax.eval_shape(init)


_LOCK_HELD_WHILE_WRITING_RESULTS = []  # finished_run's observation


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config):
    """A finished 4-step tiny run (checkpoints 2 and 4, log rows at 2 and 4); records whether
    its folder was locked while its results were written."""
    workdir = tmp_path_factory.mktemp("fault") / "run"
    write = train.evaluate_and_write

    def spy(run, *args, **kwargs):
        _LOCK_HELD_WHILE_WRITING_RESULTS.append((run.workdir / workdir_lock.LOCK_NAME).exists())
        return write(run, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "evaluate_and_write", spy)
        results = train.train_and_evaluate(tiny_config(**FOUR_STEPS), workdir)
    assert results["steps"] == 4
    return workdir


def test_a_finished_run_leaves_no_lock_and_one_row_per_logged_step(finished_run):
    """The folder is locked until the results are written (no second process may take it
    during the test pass), and free afterwards."""
    assert _LOCK_HELD_WHILE_WRITING_RESULTS == [True]
    assert not (finished_run / workdir_lock.LOCK_NAME).exists()
    assert _steps_of(finished_run, "train_loss") == [2, 4]
    ck = RunCheckpoints(finished_run, read_only=True)
    assert ck.all_steps() == [2, 4]
    ck.close()


def test_diverged_run_keeps_only_finite_checkpoints_and_its_rerun_finishes(tmp_path, tiny_config):
    """Learning rate 1e6: the first non-finite loss at step t comes from the weights of step
    t-1; only checkpoints before t-1 may be kept, each with finite weights; the rerun with a
    sane rate resumes from them and finishes, each step logged once."""
    workdir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"at step (\d+)") as info:
        train.train_and_evaluate(tiny_config(**FOUR_STEPS | DIVERGING), workdir)
    bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    ck = RunCheckpoints(workdir, read_only=True)
    kept = ck.all_steps()
    template = _template(workdir)
    for s in kept:
        state, _ = ck.restore(s, template)
        assert checkpoints.all_finite(state), f"checkpoint {s} holds non-finite weights"
    ck.close()
    assert all(s < bad - 1 for s in kept), (kept, bad)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()
    results = train.train_and_evaluate(
        tiny_config(**FOUR_STEPS | {"train.learning_rate": 1e-3}), workdir
    )
    assert results["steps"] == 4
    train_steps = _steps_of(workdir, "train_loss")
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 4
    assert all(np.isfinite(r["train_loss"]) for r in _rows(workdir) if "train_loss" in r)


def test_a_failed_restore_leaves_config_metrics_and_lock_as_they_were(
    finished_run, tmp_path, tiny_config
):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            (step_dir / "state" / "_METADATA").unlink()
    before = _tree(workdir)
    # a changed config that must not be written
    config = tiny_config(**FOUR_STEPS | {"train.learning_rate": 0.5})
    with pytest.raises(UnreadableCheckpoint, match="no readable checkpoint"):
        train.train_and_evaluate(config, workdir)
    after = _tree(workdir)
    assert after["config.json"] == before["config.json"]
    assert after["metrics.jsonl"] == before["metrics.jsonl"]
    assert workdir_lock.LOCK_NAME not in after  # none before, none after
    assert sorted(after) == sorted(before)


def _truncate_newest(workdir) -> tuple[int, int]:
    """Cuts the newest checkpoint's array files to half (an interrupted copy);
    returns (older step, newest step)."""
    ck = RunCheckpoints(workdir, read_only=True)
    older, newest = ck.all_steps()[-2:]
    ck.close()
    files = [
        p
        for p in (workdir / "checkpoints" / str(newest) / "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return older, newest


def test_a_rerun_with_fewer_steps_than_its_checkpoint_is_refused(
    finished_run, tmp_path, tiny_config
):
    """Checkpoint 4 of a run now configured for 2 steps: a one-line error, nothing changed
    (it used to be restored, trained no further and reported as 4 steps)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    before = _tree(workdir)
    with pytest.raises(ValueError, match=r"checkpoint 4 is past the 2 steps configured now"):
        train.train_and_evaluate(tiny_config(**FOUR_STEPS | {"train.num_steps": 2}), workdir)
    assert _tree(workdir) == before


def test_rerun_after_a_corrupt_newest_checkpoint_writes_no_row_twice(
    finished_run, tmp_path, tiny_config
):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    older, newest = _truncate_newest(workdir)
    assert (older, newest) == (2, 4)
    results = train.train_and_evaluate(tiny_config(**FOUR_STEPS), workdir)
    assert results["steps"] == 4
    assert _steps_of(workdir, "train_loss") == [2, 4]  # step 4 redone, logged once
    ck = RunCheckpoints(workdir, read_only=True)
    assert ck.all_steps() == [2, 4]
    step, state, _ = ck.restore_newest(_template(workdir))
    ck.close()
    assert step == 4 and int(state.step) == 4 and checkpoints.all_finite(state)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()


_HOLD = textwrap.dedent(
    """
    import sys
    from brats_jax.runs.workdir_lock import WorkdirLock
    with WorkdirLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold until told to go
    """
)


def test_training_refuses_a_folder_held_by_a_live_process_before_writing(
    finished_run, tmp_path, tiny_config
):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(workdir)
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid} on host"):
            train.train_and_evaluate(
                tiny_config(**FOUR_STEPS | {"train.learning_rate": 0.5}), workdir
            )
        assert _tree(workdir) == before  # config, metrics, checkpoints and the lock untouched
        lock = json.loads((workdir / workdir_lock.LOCK_NAME).read_text())
        assert (lock["pid"], lock["host"]) == (holder.pid, socket.gethostname())
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_every_grouped_run_that_diverges_loses_its_condemned_checkpoints(tmp_path, tiny_config):
    """Two runs at learning rate 1e6 (seeds 0, 1) both give a non-finite loss at the same
    step t; as if trained alone, neither may keep a checkpoint of step t-1 or later, and the
    error names both."""
    configs = [tiny_config(**FOUR_STEPS | DIVERGING | {"train.seed": s}) for s in (0, 1)]
    workdirs = [tmp_path / "0", tmp_path / "1"]
    with pytest.raises(FloatingPointError) as info:
        train.train_runs(configs, workdirs, mapping="vmap")
    message = str(info.value)
    steps = [int(x) for x in re.findall(r"at step (\d+) of run", message)]
    assert len(steps) == 2 and len(set(steps)) == 1, message
    assert all(str(w) in message for w in workdirs) and "\n" not in message
    for w in workdirs:
        ck = RunCheckpoints(w, read_only=True)
        kept = ck.all_steps()
        ck.close()
        assert all(s < steps[0] - 1 for s in kept), (w, kept, message)


@pytest.mark.slow
def test_a_diverging_run_stops_alone_and_the_group_trains_on(finished_run, tmp_path, tiny_config):
    """A sweep unit of two runs, one at learning rate 1e6: that run stops at its first
    non-finite loss (step t) keeping no checkpoint of step t-1 or later and no row from t
    on; the other trains to the end as it does alone (`finished_run`: the same config) and
    is "done". The rerun skips the finished run and trains the stopped one alone: it fails
    on its own loss again, not because the two runs' checkpoints share no step."""
    from experiments import run as exp_run

    specs = [
        exp_run.PlannedRun(
            "bad", tiny_config(**FOUR_STEPS | {"train.learning_rate": 1e6}), tmp_path / "bad"
        ),
        exp_run.PlannedRun("good", tiny_config(**FOUR_STEPS), tmp_path / "good"),
    ]
    first = exp_run.execute(specs, group_size=2, mapping="vmap")
    assert [o.status for o in first] == ["failed", "done"], first
    step = int(re.search(r"at step (\d+) of run (\S+);", first[0].message)[1])
    assert str(specs[0].workdir) in first[0].message
    assert str(specs[1].workdir) not in first[0].message
    bad, good = (s.workdir for s in specs)
    ck = RunCheckpoints(bad, read_only=True)
    assert all(s < step - 1 for s in ck.all_steps()), (ck.all_steps(), step)
    ck.close()
    assert all(s < step for s in _steps_of(bad, "train_loss"))
    assert not (bad / "results.json").exists() and (bad / "error.txt").exists()
    assert _steps_of(good, "train_loss") == _steps_of(finished_run, "train_loss") == [2, 4]
    np.testing.assert_allclose(
        [r["train_loss"] for r in _rows(good) if "train_loss" in r],
        [r["train_loss"] for r in _rows(finished_run) if "train_loss" in r],
        rtol=2e-3,
    )
    assert json.loads((good / "results.json").read_text())["steps"] == 4
    assert not (good / "error.txt").exists()

    second = exp_run.execute(specs, group_size=2, mapping="vmap")
    assert [o.status for o in second] == ["failed", "skipped"], second
    assert "non-finite training loss" in second[0].message, second[0].message


@pytest.mark.slow
def test_a_run_whose_weights_turn_non_finite_first_stops_alone(tmp_path, monkeypatch, tiny_config):
    """Run 1's update of step 2 makes its weights NaN while its loss of step 2 (from the
    weights of step 1) is finite: at step 2's validation and save it is stopped unvalidated
    and unsaved (not the whole group failing in the checkpoint writer); run 0 finishes."""
    import jax.numpy as jnp

    from brats_jax.training import steps

    make_step, calls = steps.jit_train_step, []

    def poisoning_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def run(state, batch, loss_params):
            state, out = step(state, batch, loss_params)
            calls.append(1)
            if len(calls) == 2:  # run 1's row of every parameter
                nan_row = lambda x: x.at[1].set(jnp.nan)  # noqa: E731
                state = state.replace(params=jax.tree.map(nan_row, state.params))
            return state, out

        return run

    monkeypatch.setattr(steps, "jit_train_step", poisoning_step)
    configs = [tiny_config(**FOUR_STEPS | {"train.eval_every_steps": 2}) for _ in range(2)]
    for c in configs:
        c.data.val_fraction = 0.2
    workdirs = [tmp_path / "0", tmp_path / "1"]
    with pytest.raises(train.RunsDiverged, match=r"non-finite weights at step 2 of run") as info:
        train.train_runs(configs, workdirs, mapping="vmap")
    assert str(workdirs[1]) in str(info.value) and str(workdirs[0]) not in str(info.value)
    assert info.value.results[1] is None and info.value.results[0]["steps"] == 4
    assert _steps_of(workdirs[0], "val_loss") == [2, 4]
    assert _steps_of(workdirs[1], "val_loss") == []  # step 2's weights were NaN
    ck = RunCheckpoints(workdirs[1], read_only=True)
    assert ck.all_steps() == []  # step 2 not saved; nothing older was
    ck.close()


@pytest.mark.slow
def test_class_weight_rows_are_the_same_after_a_resume(tmp_path, monkeypatch, tiny_config):
    """Batch class-balanced CE (weights vary per batch), a row every 4 steps, a checkpoint
    every 3: a run stopped before saving step 6 resumes from 3 and logs what the run that
    was never stopped logs."""
    fields = {"train.loss": "cb_ce", "train.num_steps": 8, "train.log_every_steps": 4,
              "train.checkpoint_every_steps": 3}  # fmt: skip
    config = lambda: tiny_config(**FOUR_STEPS | fields)  # noqa: E731
    train.train_and_evaluate(config(), tmp_path / "clean")
    save = RunCheckpoints.save

    def save_or_stop(self, step, *args, **kwargs):
        if step == 6:
            raise KeyboardInterrupt
        save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", save_or_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config(), tmp_path / "stopped")
    monkeypatch.setattr(RunCheckpoints, "save", save)
    train.train_and_evaluate(config(), tmp_path / "stopped")

    def weights(workdir):
        return [{k: v for k, v in r.items() if k.startswith("class_weight")}
                for r in _rows(workdir) if "train_loss" in r]  # fmt: skip

    clean = weights(tmp_path / "clean")
    assert len(clean) == 2 and len(clean[0]) == 4 and len(set(clean[0].values())) > 1
    assert weights(tmp_path / "stopped") == clean
