"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The train and eval steps are `jax.jit`-compiled with the state donated, data-parallel over
every device through a one-axis `Mesh` ("data"): batches are sharded along their first axis,
parameters and optimizer state are replicated. Multi-host runs call
`jax.distributed.initialize()` first (see `main.py`); each host then reads its own part of
every global batch.
"""

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from brats_jax import NUM_CLASSES, data, fileio, inference, losses, metrics, models, plots
from brats_jax.checkpoints import VAL_METRIC, RunCheckpoints
from brats_jax.metric_writer import MetricWriter


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; checkpointed whole."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    model_state: Any  # non-parameter variables, e.g. {"batch_stats": ...} or {}
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw PRNG key; per-step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------- building blocks


def create_model(model_config: ml_collections.ConfigDict):
    """The Flax module named by `model_config.name` with its config fields as arguments."""
    m = model_config
    if m.name == "unet":
        kwargs = dict(
            base_features=m.base_features, depth=m.depth, norm=m.norm, padding=m.padding
        )
    elif m.name == "transunet":
        kwargs = dict(preset=m.preset, n_skip=m.n_skip)
    else:
        raise ValueError(f"unknown model.name {m.name!r}; expected 'unet' or 'transunet'")
    return models.create_model(
        m.name, num_classes=NUM_CLASSES, dtype=jnp.dtype(m.dtype), **kwargs
    )


def create_loss(train_config: ml_collections.ConfigDict, class_counts: np.ndarray):
    """The registry loss named by `train_config.loss` with its parameters from the config."""
    t = train_config
    params = {
        "ce": {},
        "cb_ce": {"beta": t.beta, "class_counts": class_counts},
        "focal": {"gamma": t.gamma},
        "cb_focal": {"gamma": t.gamma, "beta": t.beta, "class_counts": class_counts},
        "dice": {},
        "dice_ce": {"dice_weight": t.dice_weight},
    }
    if t.loss not in params:
        raise ValueError(f"unknown train.loss {t.loss!r}; expected one of {sorted(params)}")
    return losses.get_loss(t.loss, **params[t.loss])


def create_optimizer(train_config: ml_collections.ConfigDict, total_steps: int):
    """optax Adam/AdamW with an optional warmup + cosine schedule and gradient clipping."""
    t = train_config
    if t.schedule == "constant":
        lr = t.learning_rate
    elif t.schedule == "warmup_cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, t.warmup_steps, max(total_steps, t.warmup_steps + 1)
        )
    else:
        raise ValueError(f"unknown train.schedule {t.schedule!r}; expected constant|warmup_cosine")
    if t.optimizer == "adam":
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
        if t.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(t.weight_decay), opt)
    elif t.optimizer == "adamw":
        opt = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=t.weight_decay)
    else:
        raise ValueError(f"unknown train.optimizer {t.optimizer!r}; expected adam|adamw")
    if t.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), opt)
    return opt


def current_learning_rate(opt_state) -> float:
    """The learning rate stored by `optax.inject_hyperparams` somewhere in `opt_state`."""
    for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.InjectHyperparamsState)
    ):
        if isinstance(leaf, optax.InjectHyperparamsState):
            return float(leaf.hyperparams["learning_rate"])
    return float("nan")


def init_state(model, tx, *, seed: int, image_size: int) -> TrainState:
    """Initial `TrainState` for `(1, image_size, image_size, 4)` inputs."""
    rng = jax.random.PRNGKey(seed)
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    x = jnp.zeros((1, image_size, image_size, 4), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": dropout_rng}, x, train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        rng=state_rng,
    )


def make_train_step(model, tx, loss_fn):
    """`step(state, batch) -> (state, {"loss", "grad_norm"})`, pure; jit it with shardings."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_of(params):
            logits, updates = model.apply(
                {"params": params, **state.model_state},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=list(state.model_state.keys()),
            )
            return loss_fn(logits, batch["label"]), updates

        (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, param_updates),
            model_state={**state.model_state, **updates},
            opt_state=opt_state,
        )
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return step


def make_eval_step(model, loss_fn):
    """`step(state, batch) -> {"loss_sum", "slices", "confusion"}` over valid slices only."""

    def step(state: TrainState, batch: dict) -> dict:
        logits = model.apply(
            {"params": state.params, **state.model_state}, batch["image"], train=False
        )
        valid = batch["valid"]
        pixel_mask = jnp.broadcast_to(valid[:, None, None], batch["label"].shape)
        per_slice = jax.vmap(lambda lg, lb: loss_fn(lg[None], lb[None]))(logits, batch["label"])
        pred = jnp.argmax(logits, axis=-1)
        return {
            "loss_sum": jnp.sum(jnp.where(valid, per_slice, 0.0)),
            "slices": jnp.sum(valid),
            "confusion": metrics.confusion_matrix(
                pred, batch["label"], NUM_CLASSES, mask=pixel_mask
            ),
        }

    return step


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What `train_and_evaluate` builds once and the loop uses."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: Mesh
    source: Any
    splits: Any
    model: Any
    loss_fn: Any
    tx: Any
    steps_per_epoch: int
    total_steps: int

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def device_batch(self, batch: dict) -> dict:
        """Global jax.Arrays, sharded over "data", from this host's part of a batch."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k]))
            for k in ("image", "label", "valid")
            if k in batch
        }


def _total_steps(config, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    return int(config.train.num_epochs) * steps_per_epoch


def build_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Run:
    """Data, model, loss and optimizer for `config`; validates batch size against devices."""
    devices = jax.devices()
    batch_size = config.train.batch_size
    if batch_size % len(devices):
        raise ValueError(
            f"train.batch_size={batch_size} does not divide by the {len(devices)} devices; "
            "use a multiple of the device count"
        )
    if config.eval.batch_size % len(devices):
        raise ValueError(
            f"eval.batch_size={config.eval.batch_size} does not divide by the "
            f"{len(devices)} devices"
        )
    mesh = Mesh(np.asarray(devices), ("data",))
    source = data.make_source(config.data)
    splits = data.build_splits(source, config.data)
    steps_per_epoch = max(1, len(splits.train) // batch_size)
    total_steps = _total_steps(config, steps_per_epoch)
    if total_steps <= 0:
        raise ValueError("nothing to train: set train.num_epochs or train.num_steps > 0")
    counts = data.class_pixel_counts(source, splits.train)
    loss_fn = create_loss(config.train, counts)
    model = create_model(config.model)
    tx = create_optimizer(config.train, total_steps)
    return Run(
        config, pathlib.Path(workdir), mesh, source, splits, model, loss_fn, tx,
        steps_per_epoch, total_steps,
    )  # fmt: skip


def _image_size(run: Run) -> int:
    size = run.config.data.image_size
    if size:
        return size
    return int(run.source[0]["image"].shape[0])


def evaluate_slices(run: Run, eval_step, state: TrainState, indices: np.ndarray) -> dict:
    """Loss, the study's Dice and region Dice pooled over the slices `indices`."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    loss_sum, count = 0.0, 0
    batches = data.eval_batches(
        run.source,
        indices,
        batch_size=run.config.eval.batch_size // jax.process_count(),
        image_size=run.config.data.image_size,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    for i, batch in enumerate(batches):
        if run.config.eval.max_val_batches and i >= run.config.eval.max_val_batches:
            break
        out = jax.device_get(eval_step(state, run.device_batch(batch)))
        confusion += np.asarray(out["confusion"], np.int64)
        loss_sum += float(out["loss_sum"])
        count += int(out["slices"])
    region = metrics.region_dice_from_confusion(confusion)
    class_dice = metrics.dice_from_confusion(confusion)
    return {
        "loss": loss_sum / max(count, 1),
        "paper_dice": float(metrics.paper_dice_from_confusion(confusion)),
        "tumour_dice": float(np.mean(class_dice[1:])),
        **{f"dice_{k}": float(v) for k, v in region.items()},
    }


def evaluate_test_volumes(run: Run, state: TrainState) -> dict:
    """Per-3D-volume BraTS metrics on the test cases, plus the study's slice metric.

    Every slice of each test case (pruned or not) is predicted and the slices are stacked
    back into the volume. The study's metric (`paper_dice`) is the mean over the test
    split's (pruned) slices of the per-slice 4-class Dice, as the study computed it.
    """
    variables = {"params": state.params, **state.model_state}
    predict = inference.make_slice_predictor(
        run.model, variables, image_size=run.config.data.image_size
    )
    spacing = getattr(run.source, "spacing", (1.0, 1.0, 1.0))
    kept = set(np.asarray(run.splits.test).tolist())
    per_case, slice_scores, figure_slices = [], [], []
    for case_id in run.splits.cases["test"]:
        image, label = data.load_volume(run.source, case_id)
        probs = inference.predict_volume(predict, image, batch_size=run.config.eval.batch_size)
        pred = np.argmax(probs, axis=-1).astype(np.int32)
        row = {"case_id": case_id, **metrics.evaluate_volume(pred, label, spacing=spacing,
                                                             hd95_mode=run.config.eval.hd95_mode)}
        per_case.append(row)
        for z, idx in enumerate(data.case_indices(run.source, case_id)):
            if int(idx) in kept:
                slice_scores.append(
                    float(metrics.paper_dice(pred[:, :, z], label[:, :, z], NUM_CLASSES))
                )
        z = int(np.argmax((label > 0).sum(axis=(0, 1))))
        figure_slices.append((case_id, z, image[:, :, z, 0], label[:, :, z], pred[:, :, z]))
    regions = ("WT", "TC", "ET")
    summary = {
        "paper_dice": float(np.mean(slice_scores)) if slice_scores else float("nan"),
        "class_dice": [
            float(np.nanmean([r[f"class_dice_{c}"] for r in per_case])) if per_case else None
            for c in range(NUM_CLASSES)
        ],
        "dice": {r: _mean(per_case, f"dice_{r}") for r in regions},
        "hd95": {r: _mean(per_case, f"hd95_{r}") for r in regions},
        "sensitivity": {r: _mean(per_case, f"sensitivity_{r}") for r in regions},
        "specificity": {r: _mean(per_case, f"specificity_{r}") for r in regions},
        "num_test_cases": len(per_case),
        "num_test_slices": len(slice_scores),
        "per_case": per_case,
    }
    return summary, figure_slices


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _write_per_case_csv(path: pathlib.Path, rows: list[dict]) -> None:
    if not rows:
        fileio.write_text(path, "case_id\n")
        return
    keys = list(rows[0])
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join(_fmt(r[k]) for k in keys))
    fileio.write_text(path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints), then test.

    Writes `config.json`, `metrics.jsonl`, TensorBoard events, `checkpoints/`,
    `results.json`, `per_case.csv` and figures into `workdir`. Returns the results dict.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = build_run(config, workdir)
    is_main = jax.process_index() == 0
    if is_main:
        fileio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
        logging.info(
            "data: %d train / %d val / %d test slices; %d cases test; %d steps (%d per epoch)",
            len(run.splits.train), len(run.splits.val), len(run.splits.test),
            len(run.splits.cases["test"]), run.total_steps, run.steps_per_epoch,
        )  # fmt: skip

    image_size = _image_size(run)
    state = init_state(run.model, run.tx, seed=config.train.seed, image_size=image_size)
    state = jax.device_put(state, run.replicated)
    train_iter = data.make_train_iterator(
        run.source,
        run.splits.train,
        config.data,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    ckpts = RunCheckpoints(workdir, keep=config.train.keep_checkpoints)
    start = ckpts.latest_step()
    if start is not None:
        state, data_state = ckpts.restore(start, state)
        train_iter.set_state(data_state)
        logging.info("resumed from step %d in %s", start, ckpts.directory)

    state_shardings = jax.tree.map(lambda _: run.replicated, state)
    batch_shardings = {"image": run.batch_sharding, "label": run.batch_sharding}
    train_step = jax.jit(
        make_train_step(run.model, run.tx, run.loss_fn),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, run.replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(make_eval_step(run.model, run.loss_fn))
    writer = MetricWriter(workdir, enabled=is_main)

    step = int(state.step)
    eval_every = config.train.eval_every_steps or run.steps_per_epoch
    pending = []  # (step, loss) not yet checked for finiteness
    last_saved = start
    t_log, n_log = time.perf_counter(), 0
    bar = tqdm(total=run.total_steps, initial=step, disable=not is_main, unit="step",
               dynamic_ncols=True)  # fmt: skip

    def check_pending():
        for s, loss in pending:
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite training loss ({value}) at step {s}; stopping. The last good "
                    f"checkpoint (step {last_saved}) is kept in {ckpts.directory}"
                )
        pending.clear()

    try:
        while step < run.total_steps:
            batch = next(train_iter)
            state, out = train_step(state, run.device_batch(batch))
            step += 1
            n_log += 1
            if len(pending) >= 1:
                check_pending()
            pending.append((step, out["loss"]))
            bar.update(1)
            if step % config.train.log_every_steps == 0 or step == run.total_steps:
                check_pending()
                elapsed = time.perf_counter() - t_log
                scalars = {
                    "train_loss": float(out["loss"]),
                    "grad_norm": float(out["grad_norm"]),
                    "learning_rate": current_learning_rate(state.opt_state),
                    "slices_per_s": n_log * config.train.batch_size / max(elapsed, 1e-9),
                    "epoch": step / run.steps_per_epoch,
                }
                writer.write(step, scalars)
                bar.set_postfix(loss=f"{scalars['train_loss']:.4f}")
                t_log, n_log = time.perf_counter(), 0
            val = None
            if (step % eval_every == 0 or step == run.total_steps) and len(run.splits.val):
                val = evaluate_slices(run, eval_step, state, run.splits.val)
                writer.write(step, {f"val_{k}": v for k, v in val.items()})
            if step % config.train.checkpoint_every_steps == 0 or step == run.total_steps or (
                step % run.steps_per_epoch == 0
            ):
                check_pending()
                ckpt_metrics = {VAL_METRIC: val["paper_dice"]} if val else None
                ckpts.save(step, state, train_iter.get_state(), ckpt_metrics)
                last_saved = step
        check_pending()
    finally:
        bar.close()
        ckpts.close()

    results, figure_slices = evaluate_test_volumes(run, state) if run.splits.cases["test"] else (
        {"paper_dice": None, "per_case": []}, [])  # fmt: skip
    results["steps"] = step
    if is_main:
        fileio.write_json(workdir / "results.json", results)
        _write_per_case_csv(workdir / "per_case.csv", results["per_case"])
        plots.learning_curves(workdir / "metrics.jsonl", workdir / "learning_curves.png")
        if figure_slices:
            plots.overlay_grid(
                figure_slices[: config.eval.num_figure_slices], workdir / "test_slices.png"
            )
    writer.close()
    return results


def load_trained(workdir: str | pathlib.Path, *, step: int | None = None):
    """`(config, model, variables)` from a run's best checkpoint (or `step`) for inference."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no training run in {workdir}: {config_path.name} is missing")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    ckpts = RunCheckpoints(workdir, read_only=True)
    step = ckpts.best_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
    model = create_model(config.model)
    size = config.data.image_size or (
        config.data.synthetic_image_size if config.data.source == "synthetic" else 240
    )
    tx = create_optimizer(config.train, max(1, config.train.num_steps))
    template = jax.eval_shape(
        functools.partial(init_state, model, tx, seed=0, image_size=size)
    )
    template = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_single_device()), template
    )
    state, _ = ckpts.restore(step, template)
    ckpts.close()
    return config, model, {"params": state.params, **state.model_state}


def _single_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
