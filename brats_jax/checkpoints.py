"""Orbax checkpoints of a training run: the last K steps plus the best by validation Dice.

Each checkpoint holds the whole `TrainState` (params, BatchNorm statistics, optimizer state,
step, RNG key) and the data iterator's state, so a rerun resumes exactly. Orbax writes
each step into a temporary folder and renames it when complete, so an interrupted save
is never read back as valid.
"""

import pathlib

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

VAL_METRIC = "val_paper_dice"


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
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the highest validation Dice (else the newest), or None."""
        best, best_value = None, None
        for step in self.manager.all_steps():
            metrics = self.manager.metrics(step)
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

    def save(self, step: int, state, data_state: dict, metrics: dict | None = None) -> None:
        """Save `state` (a pytree of arrays) and `data_state` (JSON) as `step`."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            metrics=metrics,
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, template):
        """Restore `(state, data_state)` of `step`; `template` gives structure and shardings."""
        abstract = jax.tree.map(
            lambda x: (
                x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)
            ),
            template,
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
