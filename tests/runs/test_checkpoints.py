"""Checkpoint faults: diverged states are never saved, a non-finite loss condemns the
checkpoint it was computed from, and unreadable checkpoints are skipped in one line."""

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from brats_jax.runs import checkpoints as C
from brats_jax.runs.checkpoints import RunCheckpoints, UnreadableCheckpoint


def _state(value: float) -> dict:
    """A hand-built stand-in for a TrainState: params, optimizer moments, an int step."""
    return {
        "params": {"w": jnp.full((3, 2), value, jnp.float32), "b": jnp.zeros((2,), jnp.bfloat16)},
        "opt": {"mu": jnp.full((3, 2), value / 10, jnp.float32), "count": jnp.array(7, jnp.int32)},
        "step": jnp.array(int(value), jnp.int32),
    }


def _save_steps(workdir, steps, *, keep=10, metrics=None):
    ck = RunCheckpoints(workdir, keep=keep)
    for s in steps:
        m = None if metrics is None else metrics.get(s)
        ck.save(s, _state(float(s)), {"position": s}, m)
    return ck


def _truncate_data_files(step_dir: pathlib.Path, keep: float = 0.5) -> None:
    """Cut every array data file of a step to `keep` of its size (an interrupted copy)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_all_finite_sees_one_bad_float_anywhere(bad):
    assert C.all_finite(_state(1.0))
    for path in (("params", "w"), ("opt", "mu")):
        s = _state(1.0)
        s[path[0]][path[1]] = s[path[0]][path[1]].at[2, 1].set(bad)
        assert not C.all_finite(s)
    s = _state(1.0)
    s["params"]["b"] = s["params"]["b"].at[0].set(bad)  # bfloat16 leaves count too
    assert not C.all_finite(s)
    assert C.all_finite({"count": jnp.array(3), "key": jax.random.key(0)})  # no floats


def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path):
    ck = RunCheckpoints(tmp_path)
    bad = _state(1.0)
    bad["opt"]["mu"] = bad["opt"]["mu"].at[0, 0].set(np.inf)
    with pytest.raises(FloatingPointError, match="step 3: .*non-finite"):
        ck.save(3, bad, {"position": 3})
    assert ck.all_steps() == []
    assert not [p for p in (tmp_path / "checkpoints").iterdir()]  # no step, no tmp folder
    ck.close()


def test_drop_diverged_deletes_the_step_the_bad_loss_came_from(tmp_path):
    # best by validation is step 4; a non-finite loss at step 5 (weights of step 4) drops 4+5
    ck = _save_steps(tmp_path, [2, 3, 4, 5], metrics={4: {C.VAL_METRIC: 0.9}})
    assert ck.best_step() == 4
    assert ck.drop_diverged(5) == 3
    assert ck.all_steps() == [2, 3]
    assert ck.best_step() == 3  # no validated step left: the newest
    state, data = ck.restore(3, _state(0.0))
    assert float(state["params"]["w"][0, 0]) == 3.0 and data == {"position": 3}
    assert ck.drop_diverged(3) is None  # loss of step 3 bad: step 2 is gone too
    assert ck.all_steps() == []
    ck.close()


def test_a_cut_metrics_file_is_named_in_one_line(tmp_path):
    ck = _save_steps(tmp_path, [1, 2], metrics={2: {C.VAL_METRIC: 0.5}})
    ck.close()
    cut = tmp_path / "checkpoints" / "2" / "metrics" / "metrics"
    cut.write_text("")
    with pytest.raises(UnreadableCheckpoint, match=f"^{cut}: not JSON .*delete {cut.parents[1]}"):
        RunCheckpoints(tmp_path)
    shutil.rmtree(cut.parents[1])  # as the message says
    ck = RunCheckpoints(tmp_path)
    assert ck.all_steps() == [1]
    with pytest.raises(ValueError, match=r"^no checkpoint 2 in .*; saved: \[1\]$"):
        ck.restore(2, _state(0.0))  # e.g. predict --step=2
    ck.close()


def _no_step_written_twice(metrics_jsonl) -> bool:
    """Each scalar appears at most once per step in `metrics.jsonl` (train and validation
    rows of one step hold different keys)."""
    seen = set()
    for line in pathlib.Path(metrics_jsonl).read_text().splitlines():
        row = json.loads(line)
        for key in row:
            if key != "step":
                if (row["step"], key) in seen:
                    return False
                seen.add((row["step"], key))
    return True


@pytest.mark.slow
def test_diverging_run_keeps_no_diverged_checkpoint_and_a_rerun_finishes(tmp_path):
    """Learning rate 1e6: the loss of step t is NaN, and the finite checkpoint of step t-1
    (weights ~1e6) is what produced it. It must not be kept as "good": the rerun with a sane
    learning rate then finishes instead of failing the same way."""
    from brats_jax.training import train
    from configs import unet

    c = unet.get_config("tiny")
    c.train.learning_rate = 1e6
    c.train.checkpoint_every_steps = 1
    c.train.num_steps = 4
    with pytest.raises(FloatingPointError) as info:
        train.train_and_evaluate(c, tmp_path)
    message = str(info.value)
    bad_step = int(re.search(r"at step (\d+)", message).group(1))
    assert "step None" not in message and "\n" not in message
    ck = RunCheckpoints(tmp_path, read_only=True)
    kept = ck.all_steps()
    ck.close()
    assert all(s < bad_step - 1 for s in kept)
    if kept:
        assert f"the newest good checkpoint is step {max(kept)}" in message
    else:
        assert "no good checkpoint is kept; the rerun starts from scratch" in message
    c.train.learning_rate = 1e-3
    results = train.train_and_evaluate(c, tmp_path)
    assert results["steps"] == 4 and np.isfinite(results["paper_dice"])
    assert _no_step_written_twice(tmp_path / "metrics.jsonl")


def test_restore_of_a_truncated_step_is_one_line(tmp_path):
    ck = _save_steps(tmp_path, [1, 2])
    _truncate_data_files(ck.directory / "2")
    with pytest.raises(UnreadableCheckpoint, match=r"^checkpoint 2 in .* is unreadable: \w+") as e:
        ck.restore(2, _state(0.0))
    assert "\n" not in str(e.value)
    step, state, data = ck.restore_newest(_state(0.0))
    assert step == 1 and data == {"position": 1}
    assert float(state["params"]["w"][0, 0]) == 1.0
    ck.close()


def test_restore_newest_skips_a_step_with_a_missing_file_and_says_so(tmp_path, caplog):
    ck = _save_steps(tmp_path, [1, 2, 3])
    (ck.directory / "3" / "data" / "metadata").unlink()  # the data iterator's state
    with caplog.at_level("WARNING"):
        step, state, _ = ck.restore_newest(_state(0.0))
    assert step == 2 and float(state["opt"]["mu"][0, 0]) == pytest.approx(0.2)
    assert any(
        r.getMessage().startswith("checkpoint 3 in ")
        and "is unreadable: " in r.getMessage()
        and r.getMessage().endswith("; resuming from 2")
        for r in caplog.records
    )
    assert ck.restore_newest(_state(0.0), at_most=1)[0] == 1
    ck.close()


def test_restore_newest_none_without_checkpoints_and_one_line_when_all_unreadable(tmp_path):
    ck = RunCheckpoints(tmp_path)
    assert ck.restore_newest(_state(0.0)) is None
    ck.save(1, _state(1.0), {"position": 1})
    _truncate_data_files(ck.directory / "1")
    with pytest.raises(UnreadableCheckpoint, match="no readable checkpoint .*checkpoint 1 "):
        ck.restore_newest(_state(0.0))
    ck.close()


def test_restore_runs_uses_the_newest_step_every_run_can_read(tmp_path):
    a = _save_steps(tmp_path / "a", [1, 2, 3])
    b = _save_steps(tmp_path / "b", [1, 2, 3])
    _truncate_data_files(b.directory / "3")
    step, states, datas = C.restore_runs([a, b], [_state(0.0), _state(0.0)])
    assert step == 2 and datas == [{"position": 2}, {"position": 2}]
    a.close()
    b.close()


def test_inference_falls_back_from_an_unreadable_best_to_the_newest_readable(tmp_path, caplog):
    ck = _save_steps(tmp_path, [1, 2, 3, 4], metrics={2: {C.VAL_METRIC: 0.8}})
    assert ck.restore_for_inference(_state(0.0))[0] == 2
    _truncate_data_files(ck.directory / "2", keep=0.0)
    with caplog.at_level("WARNING"):
        step, state = ck.restore_for_inference(_state(0.0))
    assert step == 4 and float(state["params"]["w"][0, 0]) == 4.0
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint 2 in " in messages and "instead of the best (2)" in messages
    with pytest.raises(UnreadableCheckpoint, match="checkpoint 2 "):
        ck.restore_for_inference(_state(0.0), step=2)  # an explicit step is not replaced
    ck.close()


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    from brats_jax.training import train
    from configs import unet

    c = unet.get_config("tiny")
    c.train.num_steps = 4
    c.train.checkpoint_every_steps = 2
    c.train.keep_checkpoints = 3
    workdir = tmp_path_factory.mktemp("tiny")
    train.train_and_evaluate(c, workdir)
    return workdir


def _tiny_template(workdir):
    import functools
    import json

    import ml_collections

    from brats_jax.runs import train_state

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model = train_state.create_model(config)
    tx = train_state.create_optimizer(config.train, config.train.num_steps)
    return jax.eval_shape(
        functools.partial(
            train_state.init_state, model, tx, 0, image_size=config.data.synthetic_image_size
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "no_metadata"])
def test_real_run_resumes_from_the_older_checkpoint(checkpointed_run, tmp_path, damage, caplog):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(checkpointed_run, workdir)
    ck = RunCheckpoints(workdir)
    older, newest = ck.all_steps()[-2:]
    if damage == "truncate":
        _truncate_data_files(ck.directory / str(newest))
    else:
        (ck.directory / str(newest) / "state" / "_METADATA").unlink()
    template = _tiny_template(workdir)
    reason = "state/_METADATA missing$" if damage == "no_metadata" else ""
    with pytest.raises(
        UnreadableCheckpoint, match=rf"^checkpoint {newest} in \S+ is unreadable: {reason}"
    ):
        ck.restore(newest, template)
    with caplog.at_level("WARNING"):
        step, state, data = ck.restore_newest(template)
    assert step == older and int(state.step) == older and C.all_finite(state)
    assert any(r.getMessage().endswith(f"resuming from {older}") for r in caplog.records)
    # the best (the newest here, or the older one) is unreadable or is the older: the older
    step, state = ck.restore_for_inference(template)
    assert step == older and int(state.step) == older
    ck.close()
    # the same command again: resumes from the older step, finishes, no step written twice
    from brats_jax.training import train

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    results = train.train_and_evaluate(config, workdir)
    assert results["steps"] == config.train.num_steps
    assert _no_step_written_twice(workdir / "metrics.jsonl")


@pytest.mark.slow
def test_a_run_whose_checkpoints_are_all_unreadable_stops_without_touching_config(
    checkpointed_run, tmp_path
):
    """The failed rerun must not rewrite config.json before the restore succeeded."""
    import shutil

    from brats_jax.training import train

    workdir = tmp_path / "run"
    shutil.copytree(checkpointed_run, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            (step_dir / "state" / "_METADATA").unlink()
    before = (workdir / "config.json").read_text()
    config = ml_collections.ConfigDict(json.loads(before))
    config.train.learning_rate = 0.5  # a changed config that must not be written
    with pytest.raises(UnreadableCheckpoint, match="no readable checkpoint"):
        train.train_and_evaluate(config, workdir)
    assert (workdir / "config.json").read_text() == before
    assert not (workdir / ".lock").exists()  # the lock is released on the way out
