"""The training loop: `train_and_evaluate(config, workdir)` for one run and
`train_runs(configs, workdirs)` for K runs of one architecture in one compiled program.

Data flows one way: `RunGroup.next_batch()` (grain pipeline -> device batch) -> the jitted
train step (`steps`) -> losses checked finite (a run whose loss is not stops alone) ->
per-run scalars to the metric writers, at intervals validation
(`evaluation.evaluate_slices`) and checkpoints (`RunGroup.save`); after the last step each
run is tested on whole volumes (`evaluation.evaluate_and_write`).

Grouped runs (sweeps) have their states stacked along a leading run axis and the step is
mapped over runs with `jax.lax.map` (default) or `jax.vmap` (`steps.default_mapping`). Each
run keeps its own learning rate, loss and class weights (as arrays:
`losses.combined_loss`), seed and data order, and writes its own checkpoints, metrics and
results exactly as if trained alone. Multi-host runs call `runtime.setup(distributed=True)`
first; each host then reads its own part of every global batch.
"""

import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from brats_jax.data import augment
from brats_jax.data.patches import inference_window
from brats_jax.inference import whole_volume
from brats_jax.models import outputs
from brats_jax.runs.train_state import learning_rate_at
from brats_jax.training import config_choices, steps
from brats_jax.training.evaluation import evaluate_and_write
from brats_jax.training.run_group import RunGroup


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints), then test.

    Writes `config.json`, `metrics.jsonl`, TensorBoard events, `checkpoints/`,
    `results.json`, `per_case.csv` and figures into `workdir`. Returns the results dict.
    """
    return train_runs([config], [workdir], mapping="none")[0]


def train_runs(configs, workdirs, *, mapping: str = "auto") -> list[dict]:
    """Train several runs of one architecture in lockstep in one compiled program.

    Args:
      configs: run configs; they must agree on `run_group.SHARED_FIELDS` (`group_key`).
      workdirs: one output folder per run (resumed when it holds checkpoints).
      mapping: "vmap", "map" (`lax.map`), "auto" (`steps.default_mapping()`), or "none" for
        a single unstacked run.

    Returns:
      Each run's results dict, as `train_and_evaluate` returns it.

    Raises:
      RunsDiverged: some runs stopped on a non-finite loss; the others trained to the end
        and were tested (their results are in the exception).
      FloatingPointError: every run stopped on a non-finite loss.
    """
    for config, workdir in zip(configs, workdirs, strict=True):  # misspelt names fail first
        config_choices.check_choices(config, what=str(workdir) if len(configs) > 1 else "")
    mapping = steps.default_mapping() if mapping == "auto" else mapping
    group = RunGroup.create(configs, workdirs, mapping=mapping)
    try:  # the run folders stay locked until their results are written
        step = _train_loop(group)
        results = _test_runs(group, step)
    finally:
        group.close()
    if group.diverged:
        raise RunsDiverged(
            f"{'; '.join(group.diverged.values())}; the group's other "
            f"{len(group.training())} run(s) finished",
            results,
        )
    return results


class RunsDiverged(FloatingPointError):
    """Some runs of a group stopped on a non-finite training loss and the others finished.

    The message names each stopped run, the step and its newest good checkpoint;
    `results[i]` is run i's results dict, None for a stopped run. A run that stops alone
    (or a group whose runs all stop) raises a plain FloatingPointError.
    """

    def __init__(self, message: str, results: list[dict | None]):
        super().__init__(message)
        self.results = results


def _test_runs(group: RunGroup, step: int) -> list[dict]:
    """Each run's test pass with the weights it is tested with (`tested_state`) and its
    result files (`evaluate_and_write`), None for a stopped run; `step`: the steps trained."""
    tested = {i: group.tested_state(i, step) for i in group.training()}
    cfg = group.config
    predict = whole_volume.make_slice_predictor(
        group.model,
        image_size=cfg.data.image_size,
        tta=cfg.eval.get("tta", "none"),
        output=outputs.of_config(cfg.model),
        window=inference_window(cfg),
    )
    results = [None] * len(group.runs)
    for i, (s, tested_step, selected_by) in tested.items():
        variables = {"params": s.params, **s.model_state}
        results[i] = evaluate_and_write(
            group.runs[i], predict, variables, step, tested_step=tested_step,
            selected_by=selected_by,
        )  # fmt: skip
    return results


class _Intervals:
    """When to log, validate and checkpoint (every N steps, and at the end)."""

    def __init__(self, group: RunGroup):
        t = group.config.train
        self.total, self.epoch = group.total_steps, group.steps_per_epoch
        self.log, self.ckpt = t.log_every_steps, t.checkpoint_every_steps
        self.eval = t.eval_every_steps or self.epoch

    def log_now(self, step: int) -> bool:
        return step % self.log == 0 or step == self.total

    def eval_now(self, step: int) -> bool:
        return step % self.eval == 0 or step == self.total

    def save_now(self, step: int, validated: bool) -> bool:
        # after a validation too, so the best checkpoint can be kept
        last = step == self.total
        return step % self.ckpt == 0 or last or step % self.epoch == 0 or validated


class _LossGuard:
    """Checks training losses for NaN/inf one step late (so the host never waits on the
    device) and before every log or checkpoint. A non-finite loss at step t condemns the
    weights of step t-1 too: each run whose loss it is loses those checkpoints and stops
    (`RunGroup.drop_diverged`; so does a run whose weights are non-finite at a validation
    or a save) while the others train on; when no run is left, raises FloatingPointError
    naming each run's newest good checkpoint."""

    def __init__(self, group: RunGroup):
        self.group, self.pending = group, []

    def add(self, step: int, loss) -> None:
        self.check()
        self.pending.append((step, loss))

    def check(self, weights_step: int | None = None) -> None:
        """Checks the queued losses, and with `weights_step` the state of that step
        (`RunGroup.stop_non_finite`: before a validation or a save)."""
        for s, loss in self.pending:
            for i, v in enumerate(self.group.per_run(loss)):
                if not np.isfinite(v) and i not in self.group.diverged:
                    self.group.drop_diverged(i, s, f"non-finite training loss ({v}) at step {s}")
        self.pending.clear()
        if weights_step is not None:
            self.group.stop_non_finite(weights_step)
        if not self.group.training():
            raise FloatingPointError("; ".join(self.group.diverged.values()))


def _train_loop(group: RunGroup) -> int:
    """Train `group` to its last step; returns the number of steps taken."""
    output = outputs.of_config(group.config.model)  # shared by the group (SHARED_FIELDS)
    train_step = steps.jit_train_step(
        group.model,
        group.tx,
        group.mesh,
        group.state,
        group.loss_params,
        group.mapping,
        output,
        augment.from_config(group.config),  # shared by the group (SHARED_FIELDS)
    )
    eval_step = jax.jit(steps.make_eval_step(group.model, output))
    when, guard = _Intervals(group), _LossGuard(group)
    step = group.start_step or 0
    t_log, n_log, weights = time.perf_counter(), 0, []  # weights: each step's class weights
    is_main = jax.process_index() == 0
    with tqdm(total=when.total, initial=step, disable=not is_main, unit="step",
              dynamic_ncols=True) as bar:  # fmt: skip
        while step < when.total:
            group.state, out = train_step(group.state, group.next_batch(), group.loss_params)
            step, n_log = step + 1, n_log + 1
            guard.add(step, out["loss"])
            weights.append(out["class_weights"])
            bar.update(1)
            if when.log_now(step):
                guard.check()
                out = {**jax.device_get(out), "class_weights": _mean_weights(group, weights)}
                _log_train(group, step, out, n_log, time.perf_counter() - t_log)
                loss = np.mean([group.per_run(out["loss"])[i] for i in group.training()])
                bar.set_postfix(loss=f"{loss:.4f}")
                t_log, n_log, weights = time.perf_counter(), 0, []
            val = [None] * len(group.runs)
            if when.eval_now(step):
                guard.check(weights_step=step)  # a diverged run is not validated
                val = group.evaluate(step, eval_step)
                for line in _validation_lines(group, step, val) if is_main else ():
                    bar.write(line)  # above the progress bar, which stays whole
            if when.save_now(step, any(v is not None for v in val)):
                guard.check(weights_step=step)
                group.save(step, val)
                weights = []  # a resumed run starts its window here too
        guard.check()
    return step


def _validation_lines(group: RunGroup, step: int, val: list) -> list[str]:
    """The console line of each run validated at `step` (`RunGroup.evaluate`'s metrics):
    its paper Dice (the one that picks the tested checkpoint), the pooled region Dice and
    the loss; a group's runs are named by their folders."""
    lines = []
    for run, v in zip(group.runs, val, strict=True):
        if v is None:
            continue
        who = f"{run.workdir.name}: " if len(group.runs) > 1 else ""
        regions = " ".join(f"{r} {v[f'dice_{r}']:.4f}" for r in ("WT", "TC", "ET"))
        lines.append(
            f"{who}step {step}: val paper Dice {v['paper_dice']:.4f} | {regions} | "
            f"loss {v['loss']:.4f}"
        )
    return lines


def _mean_weights(group: RunGroup, weights: list) -> np.ndarray:
    """(K, C) mean effective class weight of each run over the steps in `weights` (each (C,)
    or (K, C)), counting only the steps in which the class had a weight (NaN: never)."""
    w = np.asarray(jax.device_get(weights), np.float64).reshape(len(weights), len(group.runs), -1)
    with np.errstate(invalid="ignore"):
        return w.sum(0) / (w > 0).sum(0)


def _log_train(group: RunGroup, step: int, out: dict, n_steps: int, seconds: float) -> None:
    """Per-run training scalars at `step`: loss, gradient norm, learning rate, throughput
    (slices per second of all runs over the `n_steps` steps since the last log), epoch, and
    the mean effective class weights `class_weight_c` (`losses.effective_class_weights`) over
    the steps since the last log or checkpoint (a resumed run starts at a checkpoint, so it
    logs the same means)."""
    t = group.config.train
    rate = n_steps * t.batch_size * len(group.runs) / max(seconds, 1e-9)
    group.write(
        step,
        [
            {
                "train_loss": loss,
                "grad_norm": norm,
                "learning_rate": learning_rate_at(run.config.train, group.total_steps, step - 1),
                "slices_per_s": rate,
                "epoch": step / group.steps_per_epoch,
                **{f"class_weight_{c}": float(v) for c, v in enumerate(w)},
            }
            for run, loss, norm, w in zip(
                group.runs,
                group.per_run(out["loss"]),
                group.per_run(out["grad_norm"]),
                out["class_weights"],
                strict=True,
            )  # fmt: skip
        ],
    )
