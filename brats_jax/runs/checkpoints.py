"""Orbax checkpoints of a training run: the last K steps plus the best by validation Dice.

Each checkpoint holds the whole `TrainState` (params, BatchNorm statistics, optimizer state,
step, RNG key) and the data iterator's state, so a rerun resumes exactly. Orbax writes
each step into a temporary folder and renames it when complete, so an interrupted save
is never read back as valid.

Faults a run meets are kept out of the checkpoints or skipped when reading them back:

* A state with a non-finite weight or optimizer moment is never saved (`save` raises
  FloatingPointError). The loss of step t is computed with the weights of step t - 1, so a
  non-finite loss at step t also condemns the (finite but diverging) checkpoint of step
  t - 1: `drop_diverged(t)` deletes the checkpoints of steps >= t - 1.
* A checkpoint that cannot be read (truncated data file, deleted metadata) raises a
  one-line `UnreadableCheckpoint`; `restore_newest`, `restore_runs` and
  `restore_for_inference` skip it with a one-line warning and use the next older one.
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from brats_jax.models import transunet

VAL_METRIC = "val_paper_dice"
# files of a step folder whose absence explains a failed restore better than orbax's error
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt")


class UnreadableCheckpoint(ValueError):  # noqa: N818  (reads as the fault it names)
    """A checkpoint step whose files cannot be read back (message: step, folder, reason)."""


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    ok = [jnp.all(jnp.isfinite(x)) for x in leaves]
    return jnp.all(jnp.stack(ok)) if ok else jnp.array(True)


def all_finite(tree) -> bool:
    """True when every floating-point leaf of `tree` (params, optimizer state, ...) is finite.

    Integer leaves (step counters) and PRNG keys are ignored; one jitted reduction on device.
    """
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(_all_finite(leaves))


def _reason(e: BaseException) -> str:
    """One line of an exception (tensorstore errors span many lines): type and first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _unreadable_metrics(directory: pathlib.Path) -> str:
    """The message for a step whose metrics file is not JSON (a cut or emptied file)."""
    for path in sorted(directory.glob("*/metrics/metrics")):
        try:
            json.loads(path.read_text())
        except ValueError:
            return (
                f"{path}: not JSON (a cut write?), so no checkpoint of {directory} can be "
                f"listed; delete {path.parent.parent} to use the others"
            )
    return f"{directory}: a checkpoint's metrics file is not JSON"


class RunCheckpoints:
    """Checkpoints of one run in `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, read_only: bool = False):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=max(1, keep)),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[VAL_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=lambda m: m[VAL_METRIC],  # without it orbax does not store the metrics
            keep_checkpoints_without_metrics=True,
            enable_async_checkpointing=False,
            create=not read_only,
            read_only=read_only,
            # orbax warns when it turns the default 1 into the 0 of a read-only manager
            save_interval_steps=0 if read_only else 1,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data")
            )
        except json.JSONDecodeError as e:  # orbax reads every step's metrics here
            raise UnreadableCheckpoint(_unreadable_metrics(self.directory)) from e

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the highest validation Dice (else the newest), or None."""
        best, best_value = None, None
        for step in self.manager.all_steps():
            try:
                metrics = self.manager.metrics(step)
            except Exception:  # unreadable metadata: not a candidate for best
                continue
            if metrics and VAL_METRIC in metrics:
                if best_value is None or metrics[VAL_METRIC] > best_value:
                    best, best_value = step, metrics[VAL_METRIC]
        return best if best is not None else self.latest_step()

    def discard_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (a run resumed with others from an
        older step recomputes them); returns the deleted steps."""
        newer = sorted(s for s in self.manager.all_steps() if s > step)
        for s in newer:
            self.manager.delete(s)
        return newer

    def drop_diverged(self, first_bad_loss_step: int) -> int | None:
        """Deletes the checkpoints a non-finite loss at `first_bad_loss_step` condemns.

        The loss of step t is computed with the weights saved as step t - 1, so the
        checkpoints of steps >= t - 1 (the best-by-validation one too, when among them) are
        deleted. Returns the newest kept step, or None when no checkpoint is left.
        """
        self.discard_after(first_bad_loss_step - 2)
        return self.latest_step()

    def save(self, step: int, state, data_state: dict, metrics: dict | None = None) -> None:
        """Save `state` (a pytree of arrays) and `data_state` (JSON) as `step`.

        Raises FloatingPointError, writing nothing, when a floating-point leaf of `state` is
        not finite (diverged weights are never kept as a checkpoint); an OSError of the
        write (full disk) names the step's folder when orbax's names no file.
        """
        if not all_finite(state):
            kept = self.latest_step()
            raise FloatingPointError(
                f"step {step}: the weights or optimizer state hold non-finite values; not "
                "saved. "
                + (
                    f"The newest good checkpoint is step {kept} in {self.directory}"
                    if kept is not None
                    else f"No checkpoint is kept in {self.directory}"
                )
            )
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
                ),
                metrics=metrics,
                force=True,
            )
            self.manager.wait_until_finished()
        except OSError as e:  # orbax's metadata writes (full disk) name no file
            if e.filename or not e.errno:
                raise
            raise OSError(e.errno, os.strerror(e.errno), str(self.directory / str(step))) from e

    def restore(self, step: int, template):
        """Restore `(state, data_state)` of `step`; `template` gives structure and shardings.

        Raises UnreadableCheckpoint (one line: step, folder, reason) when the step's files
        cannot be read or do not match `template`; ValueError listing the saved steps when
        there is no checkpoint of `step`.
        """
        if not (self.directory / str(step)).exists():
            raise ValueError(f"no checkpoint {step} in {self.directory}; saved: {self.all_steps()}")
        abstract = jax.tree.map(
            lambda x: (
                x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)
            ),
            template,
        )
        try:
            try:
                restored = self._restore_items(step, abstract)
            except Exception:
                if not transunet.is_stacked(abstract):
                    raise
                # a TransUNet checkpoint written before the transformer blocks were scanned
                restored = self._restore_items(step, _per_block_template(abstract))
                restored.state = transunet.upgrade_params(restored.state)
        except Exception as e:  # tensorstore, orbax and pytree errors of many types
            missing = [f for f in _REQUIRED_FILES if not (self.directory / str(step) / f).exists()]
            reason = f"{', '.join(missing)} missing" if missing else _reason(e)
            raise UnreadableCheckpoint(
                f"checkpoint {step} in {self.directory} is unreadable: {reason}"
            ) from e
        if restored.state is None or restored.data is None:
            raise UnreadableCheckpoint(
                f"checkpoint {step} in {self.directory} is unreadable: an item is missing"
            )
        return restored.state, restored.data

    def _restore_items(self, step: int, abstract):
        return self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )

    def restore_newest(self, template, *, at_most: int | None = None):
        """`(step, state, data_state)` of the newest readable step (<= `at_most` if given).

        Unreadable steps are skipped, each with a one-line warning ("checkpoint N is
        unreadable: <reason>; resuming from M"). Returns None when there is no checkpoint;
        raises UnreadableCheckpoint when there are some but none is readable (so a rerun
        does not silently start over on top of them).
        """
        got = restore_runs([self], [template], at_most=at_most)
        if got is None:
            return None
        step, states, data_states = got
        return step, states[0], data_states[0]

    def restore_for_inference(self, template, *, step: int | None = None):
        """`(step, state)` for prediction: `step` if given, else the best checkpoint, else
        (when the best is unreadable) the newest readable one, with a warning saying so."""
        if step is not None:
            return step, self.restore(step, template)[0]
        best = self.best_step()
        if best is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            return best, self.restore(best, template)[0]
        except UnreadableCheckpoint as e:
            older = [s for s in self.all_steps() if s != best]
            if not older:
                raise
            logging.warning("best %s; using the newest readable checkpoint instead", e)
        got = restore_runs(
            [self], [template], steps=sorted(older, reverse=True), purpose="predicting"
        )
        step, states, _ = got
        logging.warning("predicting with checkpoint %d instead of the best (%d)", step, best)
        return step, states[0]

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def restore_runs(
    ckpts, templates, *, at_most: int | None = None, steps=None, purpose: str = "resuming"
):
    """Restore several runs trained together from the newest step all of them can read.

    Args:
      ckpts: one RunCheckpoints per run; templates: one state template per run.
      at_most: only steps <= this are candidates.
      steps: candidate steps, tried in the order given (default: the steps every run has,
        newest first).
      purpose: the verb of the warning for a skipped step ("...; resuming from M").

    Returns:
      `(step, [state per run], [data_state per run])`, or None when the runs have no
      checkpoint at all. A step some run cannot read is skipped with a one-line warning.

    Raises:
      UnreadableCheckpoint: checkpoints exist but no candidate step is readable by every run.
      ValueError: the runs have checkpoints but share no step.
    """
    if steps is None:
        per_run = [set(c.all_steps()) for c in ckpts]
        if not any(per_run):
            return None
        common = set.intersection(*per_run)
        if not common:
            raise ValueError(
                "the runs' checkpoints share no step, so they cannot resume together: "
                + ", ".join(
                    f"{c.directory}: {sorted(s)}" for c, s in zip(ckpts, per_run, strict=True)
                )
                + "; resume them one by one (experiments.run --group-size=1)"
            )
        steps = sorted((s for s in common if at_most is None or s <= at_most), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = [c.restore(step, t) for c, t in zip(ckpts, templates, strict=True)]
        except UnreadableCheckpoint as e:
            failures.append(str(e))
            continue
        for failure in failures:
            logging.warning("%s; %s from %d", failure, purpose, step)
        return step, [r[0] for r in restored], [r[1] for r in restored]
    where = ", ".join(str(c.directory) for c in ckpts)
    if not failures:
        raise UnreadableCheckpoint(f"no checkpoint at or before step {at_most} in {where}")
    raise UnreadableCheckpoint(
        f"no readable checkpoint in {where} ({failures[0]}); "
        "move the checkpoints folder away to start the run over"
    )


def _per_block_template(abstract):
    """The per-block (unscanned) TransUNet layout of a stacked abstract state, each leaf
    with the sharding of the template's first leaf (states are replicated or on one device)."""
    sharding = getattr(jax.tree.leaves(abstract)[0], "sharding", None)
    shapes = jax.eval_shape(transunet.per_block_params, abstract)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
