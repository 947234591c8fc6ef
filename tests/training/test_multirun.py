"""Several runs in one compiled program give the same results as the runs trained alone."""

import json

import jax
import numpy as np
import pytest

from brats_jax.runs import train_state
from brats_jax.training import train

# Tiny runs of 4 steps, validated every 2.
SHORT = {"train.num_steps": 4, "train.eval_every_steps": 2}
RUN_FIELDS = [
    {"train.loss": "ce", "train.learning_rate": 1e-3, "train.seed": 0},
    {"train.loss": "cb_focal", "train.learning_rate": 3e-3, "train.seed": 1,
     "train.beta": 0.99, "train.gamma": 2.0},
    {"train.loss": "dice_ce", "train.learning_rate": 1e-3, "train.seed": 2},
]  # fmt: skip


@pytest.fixture(scope="module")
def run_configs(tiny_config):
    """The configs of RUN_FIELDS, shared by the module's tests."""
    return [tiny_config(**SHORT | fields) for fields in RUN_FIELDS]


def _curves(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {k: [r[k] for r in rows if k in r] for k in ("train_loss", "val_loss", "val_paper_dice")}


@pytest.fixture(scope="module")
def alone(tmp_path_factory, run_configs):
    root = tmp_path_factory.mktemp("alone")
    results = [train.train_and_evaluate(c, root / str(i)) for i, c in enumerate(run_configs)]
    return root, results


@pytest.mark.parametrize("mapping", ["map", "vmap"])
def test_stacked_runs_match_runs_alone(alone, run_configs, tmp_path, mapping):
    root, expected = alone
    workdirs = [tmp_path / str(i) for i in range(len(run_configs))]
    got = train.train_runs(run_configs, workdirs, mapping=mapping)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["steps"] == e["steps"] == 4
        a, b = _curves(root / str(i)), _curves(workdirs[i])
        for key in a:
            assert len(a[key]) == len(b[key]) > 0, key
            np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=2e-4, err_msg=key)
        assert g["paper_dice"] == pytest.approx(e["paper_dice"], abs=2e-3)
        for r in ("WT", "TC", "ET"):
            assert g["dice"][r] == pytest.approx(e["dice"][r], abs=2e-2)
        # Each run has its own outputs, as if trained alone.
        for name in ("results.json", "per_case.csv", "config.json", "checkpoints"):
            assert (workdirs[i] / name).exists()
    # Params of the stacked run's checkpoint equal the lone run's (same seed, data, loss).
    _, _, v_alone = train_state.load_trained(root / "1", step=4)
    _, _, v_group = train_state.load_trained(workdirs[1], step=4)
    for x, y in zip(jax.tree.leaves(v_alone), jax.tree.leaves(v_group), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)


def test_runs_with_different_architectures_are_refused(tmp_path, tiny_config, run_configs):
    other = tiny_config(**SHORT | {"model.base_features": 8})
    with pytest.raises(ValueError, match="must share"):
        train.train_runs([run_configs[0], other], [tmp_path / "a", tmp_path / "b"])


def test_sweep_units_group_by_architecture_and_cap_at_k(tmp_path, tiny_config):
    """`experiments.run --group-size=K` trains runs that share a group key K at a time."""
    from experiments import run as exp_run

    specs = []
    for i, (loss, bs) in enumerate([("ce", 2), ("focal", 2), ("cb_ce", 4), ("dice", 2)]):
        c = tiny_config(**SHORT | {"train.loss": loss, "train.batch_size": bs})
        specs.append(exp_run.PlannedRun(f"r{i}", c, tmp_path / f"r{i}"))
    longer = tiny_config(**SHORT | {"train.batch_size": 2, "train.num_steps": 12})  # other steps
    units = exp_run.plan_units(
        [*specs, exp_run.PlannedRun("r4", longer, tmp_path / "r4")], group_size=3
    )
    assert [[s.name for s in u] for u in units] == [["r0", "r1", "r3"], ["r2"], ["r4"]]
    units = exp_run.plan_units(specs, group_size=2)
    assert [[s.name for s in u] for u in units] == [["r0", "r1"], ["r3"], ["r2"]]
    assert [[s.name for s in u] for u in exp_run.plan_units(specs, group_size=0)] == [
        ["r0"],
        ["r1"],
        ["r2"],
        ["r3"],
    ]
    seen = []
    outcomes = exp_run.execute(
        specs,
        group_size=2,
        train_fn=lambda c, w: seen.append([w.name]),
        train_group_fn=lambda cs, ws, mapping: seen.append([w.name for w in ws]),
    )
    assert seen == [["r0", "r1"], ["r3"], ["r2"]]
    assert [o.name for o in outcomes] == ["r0", "r1", "r2", "r3"]
    assert all(o.status == "done" for o in outcomes)


def test_a_unit_with_a_diverged_run_fails_only_that_run(tmp_path, run_configs):
    """`train_runs` raising `RunsDiverged` (run r0 stopped, r1 trained to the end and was
    tested): r1 is done, r0 failed with the message and its traceback in error.txt; a plain
    exception fails both."""
    from experiments import run as exp_run

    specs = [exp_run.PlannedRun(f"r{i}", run_configs[0], tmp_path / f"r{i}") for i in range(2)]

    def diverged(configs, workdirs, mapping):
        raise train.RunsDiverged("non-finite training loss (nan) at step 3 of r0", [None, {}])

    outcomes = exp_run.execute(specs, group_size=2, train_group_fn=diverged)
    assert [(o.name, o.status) for o in outcomes] == [("r0", "failed"), ("r1", "done")]
    assert outcomes[0].message == "RunsDiverged: non-finite training loss (nan) at step 3 of r0"
    assert "RunsDiverged" in (tmp_path / "r0" / "error.txt").read_text()
    assert not (tmp_path / "r1" / "error.txt").exists()

    def broken(configs, workdirs, mapping):
        raise OSError("disk full")

    outcomes = exp_run.execute(specs, group_size=2, train_group_fn=broken)
    assert [o.status for o in outcomes] == ["failed", "failed"]


def test_a_unit_whose_checkpoints_share_no_step_resumes_run_by_run(tmp_path, run_configs):
    """A unit whose runs saved different steps (one stopped early: it diverged) cannot
    resume as a group: its runs are trained alone, one after the other; a unit sharing a
    step, or new, is trained together."""
    from experiments import run as exp_run

    def unit(name, steps_per_run):
        specs = []
        for i, steps in enumerate(steps_per_run):
            spec = exp_run.PlannedRun(f"{name}{i}", run_configs[0], tmp_path / f"{name}{i}")
            for s in steps:
                (spec.workdir / "checkpoints" / str(s)).mkdir(parents=True)
            specs.append(spec)
        return specs

    seen = []
    for specs in (
        unit("apart", [[2], [4, 6]]),
        unit("shared", [[2, 4], [4]]),
        unit("new", [[], []]),
    ):
        exp_run.execute(
            specs,
            group_size=2,
            train_fn=lambda c, w: seen.append([w.name]),
            train_group_fn=lambda cs, ws, mapping: seen.append([w.name for w in ws]),
        )
    assert seen == [["apart0"], ["apart1"], ["shared0", "shared1"], ["new0", "new1"]]


def test_runs_trained_together_need_their_own_folders(tmp_path, run_configs):
    with pytest.raises(ValueError, match=f"{tmp_path / 'a'} is given twice"):
        train.train_runs(run_configs[:2], [tmp_path / "a", tmp_path / "b" / ".." / "a"])


@pytest.mark.slow
def test_group_resumes_after_a_stop_between_two_runs_saves(
    alone, run_configs, tmp_path, monkeypatch
):
    """Stopped after run 0 saved step 4 but before run 1 did: the rerun redoes step 4 for both
    (run 0's step-4 checkpoint is replaced) and ends as the uninterrupted runs do."""
    from brats_jax.runs.checkpoints import RunCheckpoints

    root, expected = alone
    workdirs = [tmp_path / "0", tmp_path / "1"]
    save = RunCheckpoints.save

    def save_or_stop(self, step, *args, **kwargs):
        if step == 4 and "1" == self.directory.parent.name:
            raise KeyboardInterrupt
        save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", save_or_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train_runs(run_configs[:2], workdirs, mapping="map")
    monkeypatch.setattr(RunCheckpoints, "save", save)
    steps = [sorted(int(p.name) for p in (w / "checkpoints").iterdir()) for w in workdirs]
    assert steps[0][-1] == 4 and steps[1][-1] == 2
    got = train.train_runs(run_configs[:2], workdirs, mapping="map")
    for i in range(2):
        assert got[i]["paper_dice"] == pytest.approx(expected[i]["paper_dice"], abs=2e-3)
        _, _, v_alone = train_state.load_trained(root / str(i), step=4)
        _, _, v_group = train_state.load_trained(workdirs[i], step=4)
        for x, y in zip(jax.tree.leaves(v_alone), jax.tree.leaves(v_group), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)


def test_set_learning_rate_is_the_rate_adam_applies(tiny_config):
    """Adam's first step moves each parameter by lr * sign(grad) (bias-corrected m/sqrt(v))."""
    import jax.numpy as jnp
    import optax

    c = tiny_config(**SHORT)
    tx = train_state.create_optimizer(c.train, total_steps=10)
    params = {"w": jnp.array([1.0, -2.0])}
    state = train_state.set_learning_rate(tx.init(params), 0.5)
    grads = {"w": 2 * params["w"]}  # d/dw of sum(w**2)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(new["w"]), [0.5, -1.5], rtol=1e-5)
    # Per-run rates: a stacked state with rates (0.5, 0.25) moves runs by those amounts.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(params))
    stacked = train_state.set_learning_rate(stacked, jnp.array([0.5, 0.25]))
    step = jax.vmap(lambda s: tx.update(grads, s, params)[0]["w"])
    np.testing.assert_allclose(np.asarray(step(stacked)), [[-0.5, 0.5], [-0.25, 0.25]], rtol=1e-5)
