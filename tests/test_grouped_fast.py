"""Grouped runs through the training loop, fast: `train.train_runs(mapping="grouped")` (the
im2col GEMM ops under vmap) ends as the runs trained alone, and a group stopped between two
runs' saves of one step resumes to the same end. Two tiny runs (own loss, learning rate and
seed), 2 steps, a checkpoint every step, one test case, no validation split."""

import json

import jax
import numpy as np
import pytest

from brats_jax.runs import train_state
from brats_jax.runs.checkpoints import RunCheckpoints
from brats_jax.training import train
from configs import unet

STEPS = 2


def _config(loss: str, lr: float, seed: int):
    c = unet.get_config("tiny")
    c.data.val_fraction = 0.0
    c.train.loss = loss
    c.train.learning_rate = lr
    c.train.seed = seed
    c.train.num_steps = STEPS
    c.train.log_every_steps = 1
    c.train.checkpoint_every_steps = 1
    return c


RUNS = [_config("ce", 1e-3, 0), _config("dice_ce", 3e-3, 1)]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """Each run trained by itself (plain XLA convolutions): folder and results."""
    root = tmp_path_factory.mktemp("alone")
    return root, [train.train_and_evaluate(c, root / str(i)) for i, c in enumerate(RUNS)]


def _train_losses(workdir) -> list[float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _assert_same_as_alone(alone, workdirs, got):
    root, expected = alone
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["steps"] == e["steps"] == STEPS
        want, have = _train_losses(root / str(i)), _train_losses(workdirs[i])
        assert len(want) == len(have) == STEPS
        np.testing.assert_allclose(have, want, rtol=2e-3, atol=2e-4)
        assert g["paper_dice"] == pytest.approx(e["paper_dice"], abs=2e-3)
        for r in ("WT", "TC", "ET"):
            assert g["dice"][r] == pytest.approx(e["dice"][r], abs=2e-2)
        _, _, v_alone = train_state.load_trained(root / str(i), step=STEPS)
        _, _, v_group = train_state.load_trained(workdirs[i], step=STEPS)
        for x, y in zip(jax.tree.leaves(v_alone), jax.tree.leaves(v_group), strict=True):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-5)


def test_grouped_train_runs_equal_the_single_runs(alone, tmp_path):
    workdirs = [tmp_path / str(i) for i in range(len(RUNS))]
    got = train.train_runs(RUNS, workdirs, mapping="grouped")
    _assert_same_as_alone(alone, workdirs, got)


def test_grouped_runs_resume_after_a_stop_between_two_saves(alone, tmp_path, monkeypatch):
    """Stopped after run 0 saved the last step but before run 1 did: the rerun redoes that
    step for both (run 0's checkpoint of it is replaced) and ends as the runs alone do."""
    workdirs = [tmp_path / "0", tmp_path / "1"]
    save = RunCheckpoints.save

    def save_or_stop(self, step, *args, **kwargs):
        if step == STEPS and self.directory.parent.name == "1":
            raise KeyboardInterrupt
        save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", save_or_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train_runs(RUNS, workdirs, mapping="grouped")
    monkeypatch.setattr(RunCheckpoints, "save", save)
    steps = [sorted(int(p.name) for p in (w / "checkpoints").iterdir()) for w in workdirs]
    assert steps == [[1, 2], [1]]
    got = train.train_runs(RUNS, workdirs, mapping="grouped")
    _assert_same_as_alone(alone, workdirs, got)
