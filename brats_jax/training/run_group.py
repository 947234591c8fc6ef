"""A group of training runs trained in lockstep (K >= 1): each run's config, data and loss
(`Run`), and the `RunGroup` that owns their state (stacked along a run axis when K runs are
mapped over), per-run views of it, data iterators, checkpoints and metric writers.

One run is a group of one with mapping "none" (its state is not stacked), so the training
loop reads the same for one run and for K.
"""

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from brats_jax import config_fields, data, fileio, losses
from brats_jax.data import augment
from brats_jax.data.patches import check_patch_config, inference_window
from brats_jax.inference import postprocess
from brats_jax.models import outputs
from brats_jax.runs.checkpoints import (
    VAL_METRIC,
    RunCheckpoints,
    UnreadableCheckpoint,
    all_finite,
    restore_runs,
)
from brats_jax.runs.train_state import (
    TrainState,
    create_loss_params,
    create_model,
    create_optimizer,
    init_state,
    set_learning_rate,
    with_pretrained,
)
from brats_jax.runs.workdir_lock import WorkdirLock
from brats_jax.runtime import resolve_ops
from brats_jax.training import evaluation, steps
from brats_jax.training.metric_writer import MetricWriter
from brats_jax.training.validation_overlays import ValidationOverlays

# Fields that runs trained together must share (they may differ in everything else:
# learning rate, loss and its parameters, seed, data split and order).
SHARED_FIELDS = (
    "model",
    "runtime",
    "data.image_size",
    "data.context_slices",
    "data.patch_size",  # the train step's input shape (foreground_* may differ)
    "train.batch_size",
    "train.num_steps",
    "train.num_epochs",
    "train.optimizer",
    "train.schedule",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip_norm",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "eval",
    "augment",  # the compiled step holds the augmentation (each run draws its own)
)


def group_key(config: ml_collections.ConfigDict) -> str:
    """Runs with equal keys can be trained together (`RunGroup`)."""
    fields = [f for f in SHARED_FIELDS if f.split(".")[0] in config]
    values = [config_fields.get_field(config, f) for f in fields]
    return json.dumps(values, sort_keys=True, default=str)


def shared_field_diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    """The dotted fields under `SHARED_FIELDS` in which configs `a` and `b` differ."""
    diff = []
    for f in SHARED_FIELDS:
        if f.split(".")[0] not in a and f.split(".")[0] not in b:
            continue
        va, vb = (config_fields.get_field(c, f) if f.split(".")[0] in c else None for c in (a, b))
        if isinstance(va, dict) and isinstance(vb, dict):
            diff += [f"{f}.{k}" for k, _, _ in config_fields.config_diff(va, vb)]
        elif va != vb:
            diff.append(f)
    return diff


@dataclasses.dataclass
class Run:
    """One training run: its config, workdir, data and loss; several may train together."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    source: Any
    splits: Any
    loss_params: Any
    steps_per_epoch: int
    total_steps: int

    @property
    def image_size(self) -> int:
        """The model's input size in pixels (`data.image_size`, else the source's native)."""
        return int(self.config.data.image_size or self.source[0]["image"].shape[0])


def _check_config(config) -> None:
    data.context_slices(config)  # a bad data.context_slices fails before any data is read
    check_patch_config(config, config.data.image_size)  # the native size: in build_run
    inference_window(config)  # eval.sliding_window without patches fails before training
    augment.from_config(config)  # so does a bad augment.* field
    postprocess.from_config(config)  # and a bad postprocess.* field (test pass)
    for field in ("train.log_every_steps", "train.checkpoint_every_steps", "eval.batch_size"):
        value = config_fields.get_field(config, field)
        if value < 1:
            raise ValueError(f"{field}={value}; expected at least 1")
    if (k := config.eval.get("num_overlay_slices", 0)) < 0:
        raise ValueError(f"eval.num_overlay_slices={k}; expected 0 (off) or more slices")
    n = jax.device_count()
    for field in ("train.batch_size", "eval.batch_size"):
        value = config_fields.get_field(config, field)
        if value % n:
            raise ValueError(
                f"{field}={value} does not divide by the {n} devices; "
                "use a multiple of the device count"
            )


def build_run(config: ml_collections.ConfigDict, workdir, *, source=None) -> Run:
    """Data splits, loss parameters and step counts of one run (`source` may be shared)."""
    _check_config(config)
    source = data.make_source(config.data) if source is None else source
    if not config.data.image_size:
        check_patch_config(config, int(source[0]["image"].shape[0]))
    splits = data.build_splits(source, config.data)
    steps_per_epoch = max(1, len(splits.train) // config.train.batch_size)
    if config.train.num_steps > 0:
        total_steps = int(config.train.num_steps)
    else:
        total_steps = int(config.train.num_epochs) * steps_per_epoch
    if total_steps <= 0:
        raise ValueError("nothing to train: set train.num_epochs or train.num_steps > 0")
    counts = source.table.class_counts[np.asarray(splits.train, np.int64)]  # (N, C)
    loss_params = create_loss_params(config.train, counts, outputs.of_config(config.model))
    return Run(
        config, pathlib.Path(workdir), source, splits, loss_params, steps_per_epoch, total_steps
    )


def _warn_config_changes(path: pathlib.Path, new: dict) -> list[str]:
    """Logs (and returns) the fields in which `new` differs from an existing run's config."""
    if not path.exists():
        return []
    try:
        old = config_fields.upgrade_legacy(json.loads(path.read_text()))
    except (OSError, ValueError):
        return []
    diff = config_fields.config_diff(old, new)
    if diff:
        logging.warning(
            "%s: resuming with a changed config: %s",
            path.parent,
            ", ".join(config_fields.format_diff(diff)),
        )
    return [k for k, _, _ in diff]


def _build_runs(configs, workdirs) -> list[Run]:
    """`build_run` of each config, sharing one data source among configs that read the same
    one (equal `data.source_key`: a sweep over splits, folds or pruning opens it once)."""
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("train_runs needs one workdir per config, and at least one config")
    folders = [os.path.abspath(w) for w in workdirs]  # a/../b is b
    if dup := sorted({w for w in folders if folders.count(w) > 1}):
        raise ValueError(f"runs trained together need their own folders; {dup[0]} is given twice")
    if len({group_key(c) for c in configs}) > 1:
        i = next(i for i, c in enumerate(configs) if group_key(c) != group_key(configs[0]))
        raise ValueError(
            f"runs trained together must share {', '.join(SHARED_FIELDS)}; run {i} differs "
            f"from run 0 in {', '.join(shared_field_diff(configs[0], configs[i]))}"
        )
    sources: dict[str, Any] = {}  # one source (one cache folder) per `data.source_key`
    runs = []
    for config, workdir in zip(configs, workdirs, strict=True):
        key = data.source_key(config.data)
        if key not in sources:
            sources[key] = data.make_source(config.data)
        runs.append(build_run(config, workdir, source=sources[key]))
    if len({(r.total_steps, r.steps_per_epoch) for r in runs}) > 1:
        raise ValueError("runs trained together must have the same number of steps and epochs")
    return runs


def _write_config(run: Run, total_steps: int, start_step: int | None) -> None:
    """`config.json` into the run's folder and its `metrics.jsonl` cut after `start_step`
    (host 0; called once the restore succeeded), and a log line with the split sizes."""
    if jax.process_index() == 0:
        new_json = run.config.to_json_best_effort(indent=2)
        fileio.write_text(run.workdir / "config.json", new_json)
        # a resumed run rewrites the rows after its checkpoint: no step appears twice
        fileio.drop_jsonl_rows_after(run.workdir / "metrics.jsonl", start_step or 0)
    s = run.splits
    logging.info(
        "%s: %d train / %d val / %d test slices, %d test cases; %d steps (%d per epoch)",
        run.workdir, len(s.train), len(s.val), len(s.test), len(s.cases["test"]),
        total_steps, run.steps_per_epoch,
    )  # fmt: skip


@dataclasses.dataclass
class RunGroup:
    """K runs of one architecture trained in lockstep by one compiled step.

    `state` and `loss_params` are stacked along a leading run axis unless `mapping` is
    "none" (a single run). `view(i)` is run i's own `TrainState`; `next_batch()` the device
    batch of all runs; `write`, `evaluate`, `save` act per run into each run's folder.
    A run whose loss turns non-finite is stopped alone (`drop_diverged`): its row keeps
    being computed (the compiled step is the group's) but it writes, validates, saves and
    tests nothing more, and the other runs end as if trained alone.
    Build with `RunGroup.create`; `close()` when done.
    """

    runs: list[Run]
    mapping: str
    model: Any
    tx: Any
    mesh: Any
    state: Any
    loss_params: Any
    iterators: list
    checkpoints: list[RunCheckpoints]
    writers: list[MetricWriter]
    start_step: int | None
    locks: contextlib.ExitStack  # the runs' `WorkdirLock`s, released by `close()`
    overlays: dict = dataclasses.field(default_factory=dict)  # run -> ValidationOverlays
    # run index -> why it stopped (`drop_diverged`): it trains on, inert, writing nothing
    diverged: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def create(cls, configs, workdirs, *, mapping: str) -> "RunGroup":
        """Build the runs, write their `config.json`, and restore their newest common
        checkpoint or initialise them (seeded per run; pretrained weights if configured).

        `mapping`: "none" (one run, unstacked), "map", "vmap" or "grouped"
        (`steps.map_over_runs`). Each run folder is locked (`WorkdirLock`) until `close()`.
        """
        if mapping == "none" and len(configs) != 1:
            raise ValueError('mapping="none" trains exactly one run')
        runs = _build_runs(configs, workdirs)
        is_main = jax.process_index() == 0
        locks = contextlib.ExitStack()  # released by close(), or here if building fails
        try:
            for run in runs:  # one process per run folder (other hosts share host 0's lock)
                run.workdir.mkdir(parents=True, exist_ok=True)
                if is_main:
                    locks.enter_context(WorkdirLock(run.workdir))
                    _warn_config_changes(
                        run.workdir / "config.json", json.loads(run.config.to_json_best_effort())
                    )
            return cls._build(runs, mapping, locks)
        except BaseException:
            locks.close()
            raise

    @classmethod
    def _build(cls, runs: list[Run], mapping: str, locks) -> "RunGroup":
        cfg = runs[0].config
        model = create_model(cfg, ops=steps.model_ops_for(mapping, resolve_ops(cfg)))
        tx = create_optimizer(cfg.train, runs[0].total_steps)
        iterators = [_train_iterator(r) for r in runs]
        ckpts = [RunCheckpoints(r.workdir, keep=cfg.train.keep_checkpoints) for r in runs]
        states, start = _initial_states(runs, model, tx, ckpts, iterators)
        for run in runs:  # only now: a failed restore leaves config.json as it was
            _write_config(run, runs[0].total_steps, start)
        stacked = mapping != "none"
        state = steps.stack_trees(states) if stacked else states[0]
        loss_params = [r.loss_params for r in runs]
        loss_params = losses.stack_loss_params(loss_params) if stacked else loss_params[0]
        mesh = steps.data_mesh()
        replicated = NamedSharding(mesh, P())
        return cls(
            runs=runs,
            mapping=mapping,
            model=model,
            tx=tx,
            mesh=mesh,
            state=jax.device_put(state, replicated),
            loss_params=jax.device_put(loss_params, replicated),
            iterators=iterators,
            checkpoints=ckpts,
            writers=[MetricWriter(r.workdir, enabled=jax.process_index() == 0) for r in runs],
            start_step=start,
            locks=locks,
        )

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The first run's config (the fields in `SHARED_FIELDS` are the same in all)."""
        return self.runs[0].config

    @property
    def total_steps(self) -> int:
        """Optimizer steps each run takes."""
        return self.runs[0].total_steps

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the training split."""
        return self.runs[0].steps_per_epoch

    def view(self, i: int) -> TrainState:
        """Run i's `TrainState` (a row of the stacked state, or the state of a single run)."""
        return self.state if self.mapping == "none" else steps.tree_row(self.state, i)

    def next_batch(self) -> dict:
        """The next training batch of every run on the devices ((K, B, ...) when stacked)."""
        batches = [next(it) for it in self.iterators]
        if self.mapping == "none":
            return steps.device_batch(self.mesh, batches[0])
        keys = [k for k in steps.BATCH_ARRAYS if k in batches[0]]
        stacked = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}
        return steps.device_batch(self.mesh, stacked, stacked=True)

    def per_run(self, value) -> list[float]:
        """A step output (scalar, or (K,) when stacked) as one float per run."""
        return [float(v) for v in np.atleast_1d(np.asarray(value))]

    def training(self) -> list[int]:
        """The indices of the runs still training (not `diverged`)."""
        return [i for i in range(len(self.runs)) if i not in self.diverged]

    def write(self, step: int, scalars: list[dict]) -> None:
        """Write run i's `scalars[i]` at `step` to its metric writer (runs still training)."""
        for i in self.training():
            self.writers[i].write_scalars(step, scalars[i])

    def evaluate(self, step: int, eval_step) -> list[dict | None]:
        """Validation metrics of each run (None for a run without a validation split or
        stopped), written as `val_*` scalars at `step`."""
        out = []
        for i, run in enumerate(self.runs):
            val = None
            if len(run.splits.val) and i not in self.diverged:
                val = evaluation.evaluate_slices(run, eval_step, self.view(i), run.splits.val)
                self.writers[i].write_scalars(step, {f"val_{k}": v for k, v in val.items()})
                self._write_overlays(i, step)
            out.append(val)
        return out

    def _write_overlays(self, i: int, step: int) -> None:
        """Run i's fixed validation slices with its predictions to TensorBoard
        (`eval.num_overlay_slices`; one host: the forward runs where the writer writes)."""
        run = self.runs[i]
        if not run.config.eval.get("num_overlay_slices", 0) or jax.process_count() > 1:
            return
        if i not in self.overlays:  # the slices are chosen once per run; one compilation
            shared = next(iter(self.overlays.values()), None)
            self.overlays[i] = ValidationOverlays(run, self.model, shared and shared.predict)
        self.writers[i].write_images(step, self.overlays[i].images(self.view(i)))

    def save(self, step: int, val: list[dict | None]) -> None:
        """Checkpoint every run still training at `step` (state, data iterator, validation
        Dice if any)."""
        for i in self.training():
            m = {VAL_METRIC: val[i]["paper_dice"]} if val[i] else None
            self.checkpoints[i].save(step, self.view(i), self.iterators[i].get_state(), m)

    def stop_non_finite(self, step: int) -> None:
        """Stops (`drop_diverged`) each run still training whose weights or optimizer state
        at `step` are non-finite while its loss was not (that loss came from the weights of
        step - 1, whose update went wrong)."""
        for i in self.training():
            if not all_finite(self.view(i)):
                self.drop_diverged(i, step, f"non-finite weights at step {step}")

    def tested_state(self, i: int, final_step: int) -> tuple[TrainState, int, str]:
        """`(state, tested_step, selected_by)`: the weights run i is tested with, as
        `predict` uses them. With a validation split, the checkpoint with the best validation
        `paper_dice` (the standard protocol); without one, the final step's weights."""
        run, c = self.runs[i], self.checkpoints[i]
        if not len(run.splits.val):
            return self.view(i), final_step, "final step (no validation split)"
        best = c.best_step()
        by = f"best validation {VAL_METRIC}"
        if best is None or best == final_step:
            return self.view(i), final_step, by
        try:
            _, state = c.restore_for_inference(self.view(i), step=best)
        except UnreadableCheckpoint as e:
            logging.warning("%s; testing the final step's weights instead", e)
            return self.view(i), final_step, f"final step (best checkpoint unreadable: {e})"
        return state, best, by

    def close(self) -> None:
        """Finish checkpoint writes, close the metric writers, release the run folders."""
        try:
            for c in self.checkpoints:
                c.close()
            for w in self.writers:
                w.close()
        finally:
            self.locks.close()

    def drop_diverged(self, i: int, first_bad_loss_step: int, reason: str) -> str:
        """Stops run i, whose training loss at `first_bad_loss_step` is (or, from non-finite
        weights, will be) non-finite: deletes the checkpoints that loss condemns
        (`RunCheckpoints.drop_diverged`) and records in `diverged[i]` (returned) the
        `reason` ("non-finite ... at step t"), the run and its newest good checkpoint."""
        c = self.checkpoints[i]
        kept = c.drop_diverged(first_bad_loss_step)
        where = (
            "no good checkpoint is kept; the rerun starts from scratch"
            if kept is None
            else f"the newest good checkpoint is step {kept} in {c.directory}"
        )
        self.diverged[i] = f"{reason} of run {self.runs[i].workdir}; stopping: {where}"
        logging.warning("%s", self.diverged[i])
        return self.diverged[i]


def _train_iterator(run: Run):
    return data.make_train_iterator(
        run.source,
        run.splits.train,
        run.config.data,
        batch_size=run.config.train.batch_size,
        seed=run.config.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )


def _initial_states(runs, model, tx, ckpts, iterators) -> tuple[list, int | None]:
    """Each run's state: restored from the newest step all runs have (iterators too), else
    freshly initialised with its seed (and pretrained weights when configured); each with
    its configured learning rate. Returns `(states, resumed step or None)`."""
    size, channels = runs[0].image_size, data.input_channels(runs[0].config)
    init = jax.jit(functools.partial(init_state, model, tx, image_size=size, in_channels=channels))
    states = [
        s.replace(opt_state=set_learning_rate(s.opt_state, r.config.train.learning_rate))
        for r, s in ((r, init(r.config.train.seed)) for r in runs)
    ]
    restored = restore_runs(ckpts, states)  # newest step all runs can read, or None
    start = None if restored is None else restored[0]
    if start is not None and start > runs[0].total_steps:
        raise ValueError(
            f"{runs[0].workdir}: checkpoint {start} is past the {runs[0].total_steps} steps "
            "configured now (train.num_steps or num_epochs lowered?); raise them, or train "
            "into another --workdir"
        )
    if restored is not None:
        for i, (r, c) in enumerate(zip(runs, ckpts, strict=True)):
            if discarded := c.discard_after(start):
                logging.info("%s: steps %s are redone from step %d", r.workdir, discarded, start)
            # the configured learning rate, not the checkpoint's (config.json says this one)
            states[i] = restored[1][i].replace(
                opt_state=set_learning_rate(restored[1][i].opt_state, r.config.train.learning_rate)
            )
            iterators[i].set_state(restored[2][i])
        logging.info("resumed %d run(s) from step %d", len(runs), start)
    elif runs[0].config.model.pretrained_path:
        states = [
            with_pretrained(s, tx, r.config, r.image_size)
            for r, s in zip(runs, states, strict=True)
        ]
    return states, start
