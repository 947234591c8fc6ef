"""Training and evaluation: `train_and_evaluate(config, workdir)` and `train_runs(...)`.

The train and eval steps are `jax.jit`-compiled with the state donated, data-parallel over
every device through a one-axis `Mesh` ("data"): batches are sharded along their batch axis,
parameters and optimizer state are replicated. Multi-host runs call
`jax.distributed.initialize()` first (see `main.py`); each host then reads its own part of
every global batch.

`train_runs` trains K runs of one architecture in one compiled program (for sweeps): their
states are stacked along a leading run axis and the step is mapped over runs with
`jax.lax.map` (default) or `jax.vmap` (vmapped weights become grouped convolutions, which
were slower on both a CPU and an H200 for the U-Net; see `default_mapping`). Each run
keeps its own learning rate, loss and class weights (as arrays: `losses.combined_loss`),
seed and data order, and writes its own checkpoints, metrics and results exactly as if
trained alone.
"""

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct, traverse_util
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
            features=m.base_features,
            depth=m.depth,
            norm=m.norm,
            padding=m.padding,
            conv_impl=m.get("conv_impl", "auto"),
        )
    elif m.name == "transunet":
        kwargs = dict(preset=m.preset, n_skip=m.n_skip)
    else:
        raise ValueError(f"unknown model.name {m.name!r}; expected 'unet' or 'transunet'")
    return models.create_model(m.name, num_classes=NUM_CLASSES, dtype=jnp.dtype(m.dtype), **kwargs)


def create_loss_params(train_config: ml_collections.ConfigDict, slice_class_counts: np.ndarray):
    """`losses.LossParams` of the registry loss `train_config.loss` with the config's values.

    `slice_class_counts`: (N, C) pixels per class of each training slice. What the cb_*
    losses count as n_i is `train.class_counts`: "batch_pixels" (each batch's pixels, in the
    jitted step), "split_pixels" (the split's pixels) or "split_slices" (its slices holding
    the class); the split_* weights are computed once, on the host in float64.
    """
    t = train_config
    mode = t.get("class_counts", losses.BATCH_PIXELS)
    split = {"split_pixels": lambda c: c.sum(0), "split_slices": losses.slice_counts}
    if mode != losses.BATCH_PIXELS and mode not in split:
        raise ValueError(
            f"unknown train.class_counts {mode!r}; expected batch_pixels|split_pixels|split_slices"
        )
    counts = mode if mode == losses.BATCH_PIXELS else split[mode](np.asarray(slice_class_counts))
    params = {
        "ce": {},
        "cb_ce": {"beta": t.beta, "class_counts": counts},
        "focal": {"gamma": t.gamma},
        "cb_focal": {"gamma": t.gamma, "beta": t.beta, "class_counts": counts},
        "dice": {},
        "dice_ce": {"dice_weight": t.dice_weight, "ce_weight": 1.0 - t.dice_weight},
    }
    if t.loss not in params:
        raise ValueError(f"unknown train.loss {t.loss!r}; expected one of {sorted(params)}")
    return losses.loss_params(t.loss, NUM_CLASSES, **params[t.loss])


def _schedule_shape(train_config, total_steps: int):
    """The learning-rate multiplier schedule (peak 1), or None for a constant rate."""
    t = train_config
    if t.schedule == "constant":
        return None
    if t.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, t.warmup_steps, max(total_steps, t.warmup_steps + 1)
        )
    raise ValueError(f"unknown train.schedule {t.schedule!r}; expected constant|warmup_cosine")


def create_optimizer(train_config: ml_collections.ConfigDict, total_steps: int):
    """Adam or AdamW (optional clipping, weight decay, warmup + cosine) with an injectable rate.

    Same arithmetic as `optax.adam`/`optax.adamw`; the peak learning rate lives in the
    optimizer state (`set_learning_rate`), so stacked runs can each have their own.
    """
    t = train_config
    parts = []
    if t.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
    if t.optimizer == "adam":
        if t.weight_decay:
            parts.append(optax.add_decayed_weights(t.weight_decay))  # L2, as torch's Adam
        parts.append(optax.scale_by_adam())
    elif t.optimizer == "adamw":
        parts += [optax.scale_by_adam(), optax.add_decayed_weights(t.weight_decay)]
    else:
        raise ValueError(f"unknown train.optimizer {t.optimizer!r}; expected adam|adamw")
    shape = _schedule_shape(t, total_steps)
    if shape is not None:
        parts.append(optax.scale_by_schedule(shape))
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=-float(t.learning_rate)))
    return optax.chain(*parts)


_HYPERPARAM_STATES = tuple(
    cls
    for cls in (
        getattr(optax, "InjectHyperparamsState", None),
        getattr(optax, "InjectStatefulHyperparamsState", None),
    )
    if cls is not None
)


def set_learning_rate(opt_state, learning_rate):
    """`opt_state` with its injected peak learning rate replaced (scalar or per-run array)."""

    def is_hp(x):
        return isinstance(x, _HYPERPARAM_STATES)

    def replace(leaf):
        if is_hp(leaf):
            hp = dict(leaf.hyperparams)
            hp["step_size"] = -jnp.asarray(learning_rate, jnp.float32)
            return leaf._replace(hyperparams=hp)
        return leaf

    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_hp) if is_hp(x)]
    if len(found) != 1:
        raise ValueError(
            f"expected one injected learning rate in the optimizer state, found {len(found)}"
        )
    return jax.tree.map(replace, opt_state, is_leaf=is_hp)


def learning_rate_at(train_config, total_steps: int, step: int) -> float:
    """The learning rate applied at optimizer step `step` (for logging)."""
    shape = _schedule_shape(train_config, total_steps)
    scale = 1.0 if shape is None else float(shape(step))
    return float(train_config.learning_rate) * scale


def init_state(model, tx, seed, *, image_size: int) -> TrainState:
    """Initial `TrainState` for `(1, image_size, image_size, 4)` inputs; `seed` may be traced."""
    rng = jax.random.PRNGKey(seed)
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    x = jnp.zeros((1, image_size, image_size, 4), jnp.float32)
    variables = dict(model.init({"params": init_rng, "dropout": dropout_rng}, x, train=False))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        rng=state_rng,
    )


def with_pretrained(state: TrainState, tx, config, image_size: int) -> TrainState:
    """`state` with its TransUNet parameters from `config.model.pretrained_path` (Google's
    R50+ViT-B_16.npz, see `models.load_pretrained`) and a fresh optimizer state for them.

    `image_size`: the model's input size in pixels (token grid = image_size / 16).
    """
    path = pathlib.Path(config.model.pretrained_path)
    if config.model.name != "transunet":
        raise ValueError(
            f"model.pretrained_path is for TransUNet (Google's R50+ViT-B_16.npz); "
            f"model.name is {config.model.name!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained_path {path} does not exist; expected Google's R50+ViT-B_16.npz"
        )
    grid = (image_size // 16, image_size // 16)
    params, report = models.load_pretrained(jax.device_get(state.params), path, grid=grid)
    logging.info("pretrained weights from %s: %s", path, report.summary())
    params = jax.tree.map(jnp.asarray, params)
    opt_state = set_learning_rate(tx.init(params), config.train.learning_rate)
    return state.replace(params=params, opt_state=opt_state)


def make_train_step(model, tx):
    """`step(state, batch, loss_params) -> (state, {"loss", "grad_norm", "class_weights"})`;
    pure, jit it. `class_weights`: (C,) class weights the loss gave this batch."""

    def step(state: TrainState, batch: dict, loss_params) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_of(params):
            logits, updates = model.apply(
                {"params": params, **state.model_state},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=list(state.model_state.keys()),
            )
            return losses.combined_loss(logits, batch["label"], loss_params), updates

        (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, param_updates),
            model_state={**state.model_state, **updates},
            opt_state=opt_state,
        )
        weights = losses.effective_class_weights(batch["label"], loss_params)
        return new_state, {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "class_weights": weights,
        }

    return step


def map_over_runs(step, mapping: str):
    """Lift `step(*args)` to stacked runs: "vmap", "map" (`lax.map`, sequential) or "none"."""
    if mapping == "none":
        return step
    if mapping == "vmap":
        return jax.vmap(step)
    if mapping == "map":
        return lambda *args: jax.lax.map(lambda a: step(*a), args)
    raise ValueError(f"unknown mapping {mapping!r}; expected none|vmap|map")


def make_eval_step(model):
    """`step(state, batch, loss_params) -> {"loss_sum", "paper_dice_sum", "slices",
    "confusion"}` over the batch's valid slices (sums; the confusion matrix is pooled)."""

    def step(state: TrainState, batch: dict, loss_params) -> dict:
        logits = model.apply(
            {"params": state.params, **state.model_state}, batch["image"], train=False
        )
        valid = batch["valid"]
        per_slice = jax.vmap(lambda lg, lb: losses.combined_loss(lg[None], lb[None], loss_params))(
            logits, batch["label"]
        )
        pred = jnp.argmax(logits, axis=-1)
        return {
            "loss_sum": jnp.sum(jnp.where(valid, per_slice, 0.0)),
            "paper_dice_sum": jnp.sum(
                jnp.where(valid, metrics.paper_dice(pred, batch["label"], NUM_CLASSES), 0.0)
            ),
            "slices": jnp.sum(valid),
            "confusion": metrics.confusion_matrix(
                pred, batch["label"], NUM_CLASSES, mask=valid[:, None, None]
            ),
        }

    return step


# ----------------------------------------------------------------------------- one run's data


@dataclasses.dataclass
class Run:
    """One run's config, workdir, data and loss; several may train together."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    source: Any
    splits: Any
    loss_params: Any
    steps_per_epoch: int
    total_steps: int


def _warn_config_changes(path: pathlib.Path, new: dict) -> list[str]:
    """Logs (and returns) the fields in which `new` differs from an existing run's config."""
    if not path.exists():
        return []
    try:
        old = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".")
    except (OSError, ValueError):
        return []
    new = traverse_util.flatten_dict(new, sep=".")
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        logging.warning(
            "%s: resuming with a changed config: %s",
            path.parent,
            ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed),
        )
    return changed


def _check_config(config) -> None:
    for field in ("train.log_every_steps", "train.checkpoint_every_steps", "eval.batch_size"):
        section, name = field.split(".")
        if config[section][name] < 1:
            raise ValueError(f"{field}={config[section][name]}; expected at least 1")
    n = jax.device_count()
    for field in ("train.batch_size", "eval.batch_size"):
        section, name = field.split(".")
        value = config[section][name]
        if value % n:
            raise ValueError(
                f"{field}={value} does not divide by the {n} devices; "
                "use a multiple of the device count"
            )


def build_run(config: ml_collections.ConfigDict, workdir, *, source=None) -> Run:
    """Data splits, loss parameters and step counts of one run (`source` may be shared)."""
    _check_config(config)
    source = data.make_source(config.data) if source is None else source
    splits = data.build_splits(source, config.data)
    steps_per_epoch = max(1, len(splits.train) // config.train.batch_size)
    if config.train.num_steps > 0:
        total_steps = int(config.train.num_steps)
    else:
        total_steps = int(config.train.num_epochs) * steps_per_epoch
    if total_steps <= 0:
        raise ValueError("nothing to train: set train.num_epochs or train.num_steps > 0")
    counts = source.table.class_counts[np.asarray(splits.train, np.int64)]
    loss_params = create_loss_params(config.train, counts)
    return Run(
        config, pathlib.Path(workdir), source, splits, loss_params, steps_per_epoch, total_steps
    )


def _native_size(run: Run) -> int:
    return int(run.config.data.image_size or run.source[0]["image"].shape[0])


# Fields that runs trained together must share (they may differ in everything else:
# learning rate, loss and its parameters, seed, data split and order).
SHARED_FIELDS = (
    "model",
    "data.image_size",
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
)


def _field(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def group_key(config: ml_collections.ConfigDict) -> str:
    """Runs with equal keys can be trained together by `train_runs`."""
    return json.dumps([_field(config, f) for f in SHARED_FIELDS], sort_keys=True, default=str)


# ----------------------------------------------------------------------------- evaluation


def evaluate_slices(run: Run, eval_step, state: TrainState, indices) -> dict:
    """Metrics over the slices `indices`: mean loss, the study's Dice (`paper_dice`: mean over
    slices of the per-slice 4-class Dice, as the study and the test's `paper_dice` compute
    it; it picks the best checkpoint), and Dice pooled over all slices (`pooled_dice`,
    `tumour_dice` without background, region `dice_WT/TC/ET`)."""
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    loss_sum, dice_sum, count = 0.0, 0.0, 0
    mesh = _mesh()
    num_batches = -(-len(indices) // run.config.eval.batch_size)
    if run.config.eval.max_val_batches:
        num_batches = min(num_batches, run.config.eval.max_val_batches)
    for batch in _host_eval_batches(run, indices, num_batches):
        out = jax.device_get(eval_step(state, _device_batch(mesh, batch), run.loss_params))
        confusion += np.asarray(out["confusion"], np.int64)
        loss_sum += float(out["loss_sum"])
        dice_sum += float(out["paper_dice_sum"])
        count += int(out["slices"])
    class_dice = metrics.dice_from_confusion(confusion)
    return {
        "loss": loss_sum / max(count, 1),
        "paper_dice": dice_sum / max(count, 1),
        "pooled_dice": float(np.mean(class_dice)),
        "tumour_dice": float(np.mean(class_dice[1:])),
        **{f"dice_{k}": float(v) for k, v in metrics.region_dice_from_confusion(confusion).items()},
    }


def _host_eval_batches(run: Run, indices, num_batches: int):
    """This host's part of `num_batches` global evaluation batches over `indices`.

    Global batch b holds indices[b*G:(b+1)*G] (G = eval.batch_size); host p reads its
    contiguous part of each. Every host yields exactly `num_batches` batches (padding ones
    have `valid` False), as the sharded eval step needs.
    """
    global_bs, hosts = run.config.eval.batch_size, jax.process_count()
    local_bs = global_bs // hosts
    padded = np.full(num_batches * global_bs, -1, np.int64)
    n = min(len(indices), len(padded))
    padded[:n] = np.asarray(indices, np.int64)[:n]
    mine = padded.reshape(num_batches, hosts, local_bs)[:, jax.process_index()].reshape(-1)
    mine = mine[mine >= 0]
    size = run.config.data.image_size
    last = None
    for last in data.eval_batches(run.source, mine, batch_size=local_bs, image_size=size):
        yield last
        num_batches -= 1
    if num_batches > 0:  # this host ran out of real slices: feed all-invalid batches
        if last is None:
            first = data.eval_batches(run.source, np.asarray(indices[:1]), batch_size=local_bs,
                                      image_size=size)  # fmt: skip
            last = next(iter(first))
        for _ in range(num_batches):
            yield {**last, "valid": np.zeros(local_bs, bool)}


def evaluate_test_volumes(run: Run, predict, variables) -> tuple[dict, list]:
    """Per-3D-volume BraTS metrics on the test cases, plus the study's slice metric.

    Every slice of each test case (pruned or not) is predicted and the slices are stacked
    back into the volume. The study's metric (`paper_dice`) is the mean over the test
    split's (pruned) slices of the per-slice 4-class Dice, as the study computed it; beside
    it, `paper_dice_absent_excluded` (classes absent from a slice's target and prediction
    left out instead of scored 1) and `pooled_dice_4class` (one Dice per class pooled over
    those slices' pixels, `pooled_class_dice`, then their mean).
    Returns `(results, figure_slices)`.
    """
    spacing = getattr(run.source, "spacing", (1.0, 1.0, 1.0))
    kept = set(np.asarray(run.splits.test).tolist())
    per_case, slice_scores, excluded, pooled, figure_slices = [], [], [], 0, []
    for case_id in run.splits.cases["test"]:
        image, label = data.load_volume(run.source, case_id)
        probs = inference.predict_volume(
            predict, variables, image, batch_size=run.config.eval.batch_size
        )
        pred = np.argmax(probs, axis=-1).astype(np.int32)
        scores = metrics.evaluate_volume(
            pred, label, spacing=spacing, hd95_mode=run.config.eval.hd95_mode
        )
        per_case.append({"case_id": case_id, **scores})
        zs = [z for z, i in enumerate(data.case_indices(run.source, case_id)) if int(i) in kept]
        r = metrics.slice_dice_readings(np.moveaxis(pred[..., zs], -1, 0),
                                        np.moveaxis(label[..., zs], -1, 0))  # fmt: skip
        slice_scores += r["absent_one"].tolist()
        excluded += r["absent_excluded"].tolist()
        pooled = pooled + r["confusion"]
        z = int(np.argmax((label > 0).sum(axis=(0, 1))))
        figure_slices.append((case_id, z, image[:, :, z, 0], label[:, :, z], pred[:, :, z]))
    regions = tuple(metrics.REGIONS)
    results = {
        "paper_dice": float(np.mean(slice_scores)) if slice_scores else None,
        # the two readings the study leaves open (EXPERIMENTS.md): absent classes left out of
        # each slice's mean; one Dice per class pooled over all test slices' pixels
        "paper_dice_absent_excluded": float(np.mean(excluded)) if excluded else None,
        "pooled_dice_4class": float(metrics.paper_dice_pooled(pooled)) if excluded else None,
        "pooled_class_dice": metrics.dice_from_confusion(pooled).tolist() if excluded else [],
        "class_dice": [_mean(per_case, f"class_dice_{c}") for c in range(NUM_CLASSES)],
        "dice": {r: _mean(per_case, f"dice_{r}") for r in regions},
        "hd95": {r: _mean(per_case, f"hd95_{r}") for r in regions},
        "sensitivity": {r: _mean(per_case, f"sensitivity_{r}") for r in regions},
        "specificity": {r: _mean(per_case, f"specificity_{r}") for r in regions},
        "num_test_cases": len(per_case),
        "num_test_slices": len(slice_scores),
        "per_case": per_case,
    }
    return results, figure_slices


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def _write_per_case_csv(path: pathlib.Path, rows: list[dict]) -> None:
    keys = list(rows[0]) if rows else ["case_id"]
    lines = [",".join(keys)]
    for r in rows:
        lines.append(
            ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        )
    fileio.write_text(path, "\n".join(lines) + "\n")


def _write_outputs(run: Run, results: dict, figure_slices: list) -> None:
    workdir = run.workdir
    _write_per_case_csv(workdir / "per_case.csv", results["per_case"])
    plots.learning_curves(workdir / "metrics.jsonl", workdir / "learning_curves.png")
    if figure_slices:
        n = run.config.eval.num_figure_slices
        plots.overlay_grid(figure_slices[:n], workdir / "test_slices.png")
    fileio.write_json(workdir / "results.json", results)  # last: it marks the run finished


# ----------------------------------------------------------------------------- the loop


def _mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def _device_batch(mesh: Mesh, batch: dict, *, stacked: bool = False) -> dict:
    """Global jax.Arrays from this host's part of a batch, sharded along the batch axis."""
    spec = P(None, "data") if stacked else P("data")
    sharding = NamedSharding(mesh, spec)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in ("image", "label", "valid")
        if k in batch
    }


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def _resume_step(ckpts: list[RunCheckpoints]) -> int | None:
    """The newest step every run has a checkpoint of (None: start from scratch)."""
    steps = [set(c.manager.all_steps()) for c in ckpts]
    if not any(steps):
        return None
    common = set.intersection(*steps)
    if not common:
        raise ValueError(
            "the runs' checkpoints share no step, so they cannot resume together: "
            + ", ".join(f"{c.directory}: {sorted(s)}" for c, s in zip(ckpts, steps, strict=True))
            + "; resume them one by one (without --vmap)"
        )
    return max(common)


def default_mapping() -> str:
    """ "map" (`lax.map`): measured faster than "vmap" on both backends we could test.

    vmapping K parameter sets turns every convolution into a grouped convolution: for the
    study's U-Net at 240 px, batch 1, 8 runs, one vmapped step took 0.57x the throughput of
    8 single steps on an H200 and far less on a CPU, while `lax.map` (one compiled program,
    runs in sequence) gave 1.09x on the H200 (BENCHMARKS.md). "vmap" stays available for
    small models and TPUs, where it may win.
    """
    return "map"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Train `config` in `workdir` (resuming if it holds checkpoints), then test.

    Writes `config.json`, `metrics.jsonl`, TensorBoard events, `checkpoints/`,
    `results.json`, `per_case.csv` and figures into `workdir`. Returns the results dict.
    """
    return train_runs([config], [workdir], mapping="none")[0]


def train_runs(configs, workdirs, *, mapping: str = "auto") -> list[dict]:
    """Train several runs of one architecture in lockstep in one compiled program.

    Args:
      configs: run configs; they must agree on `SHARED_FIELDS` (`group_key`).
      workdirs: one output folder per run (resumed when it holds checkpoints).
      mapping: "vmap", "map" (`lax.map`), "auto" (`default_mapping()`), or "none" for a
        single unstacked run.

    Returns:
      Each run's results dict, as `train_and_evaluate` returns it.
    """
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("train_runs needs one workdir per config, and at least one config")
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"runs trained together must share {', '.join(SHARED_FIELDS)}")
    mapping = default_mapping() if mapping == "auto" else mapping
    if mapping == "none" and len(configs) != 1:
        raise ValueError('mapping="none" trains exactly one run')
    stacked = mapping != "none"

    sources: dict[str, Any] = {}
    runs = []
    for config, workdir in zip(configs, workdirs, strict=True):
        key = config.data.to_json_best_effort(sort_keys=True)
        if key not in sources:
            sources[key] = data.make_source(config.data)
        runs.append(build_run(config, workdir, source=sources[key]))
    total_steps = {r.total_steps for r in runs}
    spe = {r.steps_per_epoch for r in runs}
    if len(total_steps) > 1 or len(spe) > 1:
        raise ValueError("runs trained together must have the same number of steps and epochs")
    total_steps, steps_per_epoch = total_steps.pop(), spe.pop()
    cfg = runs[0].config
    is_main = jax.process_index() == 0
    for run in runs:
        run.workdir.mkdir(parents=True, exist_ok=True)
        if is_main:
            new_json = run.config.to_json_best_effort(indent=2)
            _warn_config_changes(run.workdir / "config.json", json.loads(new_json))
            fileio.write_text(run.workdir / "config.json", new_json)
        logging.info(
            "%s: %d train / %d val / %d test slices, %d test cases; %d steps (%d per epoch)",
            run.workdir,
            len(run.splits.train),
            len(run.splits.val),
            len(run.splits.test),
            len(run.splits.cases["test"]),
            total_steps,
            steps_per_epoch,
        )

    mesh = _mesh()
    replicated = NamedSharding(mesh, P())
    model = create_model(cfg.model)
    tx = create_optimizer(cfg.train, total_steps)
    init = jax.jit(functools.partial(init_state, model, tx, image_size=_native_size(runs[0])))
    states = [
        state.replace(opt_state=set_learning_rate(state.opt_state, r.config.train.learning_rate))
        for r, state in ((r, init(r.config.train.seed)) for r in runs)
    ]
    iterators = [
        data.make_train_iterator(
            r.source,
            r.splits.train,
            r.config.data,
            batch_size=r.config.train.batch_size,
            seed=r.config.train.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        for r in runs
    ]
    ckpts = [RunCheckpoints(r.workdir, keep=cfg.train.keep_checkpoints) for r in runs]
    start = _resume_step(ckpts)
    if start is not None:
        for i, (r, c) in enumerate(zip(runs, ckpts, strict=True)):
            if discarded := c.discard_after(start):
                logging.info("%s: steps %s are redone from step %d", r.workdir, discarded, start)
            states[i], data_state = c.restore(start, states[i])
            # the configured learning rate, not the checkpoint's (config.json says this one)
            states[i] = states[i].replace(
                opt_state=set_learning_rate(states[i].opt_state, r.config.train.learning_rate)
            )
            iterators[i].set_state(data_state)
        logging.info("resumed %d run(s) from step %d", len(runs), start)
    elif cfg.model.pretrained_path:
        states = [
            with_pretrained(s, tx, r.config, _native_size(r))
            for r, s in zip(runs, states, strict=True)
        ]
    state = _stack(states) if stacked else states[0]
    loss_params = (
        losses.stack_loss_params([r.loss_params for r in runs])
        if stacked
        else (runs[0].loss_params)
    )
    state = jax.device_put(state, replicated)
    loss_params = jax.device_put(loss_params, replicated)
    del states

    state_sharding = jax.tree.map(lambda _: replicated, state)
    batch_sharding = NamedSharding(mesh, P(None, "data") if stacked else P("data"))
    train_step = jax.jit(
        map_over_runs(make_train_step(model, tx), mapping),
        in_shardings=(
            state_sharding,
            {"image": batch_sharding, "label": batch_sharding},
            jax.tree.map(lambda _: replicated, loss_params),
        ),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(make_eval_step(model))
    writers = [MetricWriter(r.workdir, enabled=is_main) for r in runs]
    run_state = (lambda s, i: _unstack(s, i)) if stacked else (lambda s, i: s)

    step = start or 0
    eval_every = cfg.train.eval_every_steps or steps_per_epoch
    pending: list = []  # (step, losses) not yet checked for finiteness
    weight_log: list = []  # each step's effective class weights since the last log row
    last_saved = start
    t_log, n_log = time.perf_counter(), 0
    bar = tqdm(
        total=total_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True
    )

    def check_pending():
        for s, loss in pending:
            values = np.atleast_1d(np.asarray(loss, np.float64))
            for i, value in enumerate(values):
                if not np.isfinite(value):
                    raise FloatingPointError(
                        f"non-finite training loss ({value}) at step {s} of run "
                        f"{runs[i].workdir}; stopping. The last good checkpoint "
                        f"(step {last_saved}) is kept in {ckpts[i].directory}"
                    )
        pending.clear()

    try:
        while step < total_steps:
            batches = [next(it) for it in iterators]
            batch = _stack_batches(batches) if stacked else batches[0]
            state, out = train_step(state, _device_batch(mesh, batch, stacked=stacked), loss_params)
            step += 1
            n_log += 1
            if pending:
                check_pending()
            pending.append((step, out["loss"]))
            weight_log.append(out["class_weights"])
            bar.update(1)
            if step % cfg.train.log_every_steps == 0 or step == total_steps:
                check_pending()
                out = jax.device_get(out)
                w = np.asarray(jax.device_get(weight_log)).reshape(len(weight_log), len(runs), -1)
                with np.errstate(invalid="ignore"):  # mean over the steps a class had weight
                    mean_w = w.sum(0) / (w > 0).sum(0)  # (runs, C); NaN (null): never present
                weight_log.clear()
                elapsed = max(time.perf_counter() - t_log, 1e-9)
                for i, (run, writer) in enumerate(zip(runs, writers, strict=True)):
                    writer.write(
                        step,
                        {
                            "train_loss": float(np.atleast_1d(out["loss"])[i]),
                            "grad_norm": float(np.atleast_1d(out["grad_norm"])[i]),
                            "learning_rate": learning_rate_at(
                                run.config.train, total_steps, step - 1
                            ),
                            "slices_per_s": n_log * cfg.train.batch_size * len(runs) / elapsed,
                            "epoch": step / steps_per_epoch,
                            **{f"class_weight_{c}": v for c, v in enumerate(mean_w[i])},
                        },
                    )
                bar.set_postfix(loss=f"{float(np.mean(out['loss'])):.4f}")
                t_log, n_log = time.perf_counter(), 0
            val = [None] * len(runs)
            if step % eval_every == 0 or step == total_steps:
                for i, run in enumerate(runs):
                    if len(run.splits.val):
                        val[i] = evaluate_slices(
                            run, eval_step, run_state(state, i), run.splits.val
                        )
                        writers[i].write(step, {f"val_{k}": v for k, v in val[i].items()})
            if (
                step % cfg.train.checkpoint_every_steps == 0
                or step == total_steps
                or step % steps_per_epoch == 0
                or any(v is not None for v in val)  # so the best checkpoint can be kept
            ):
                check_pending()
                for i, (it, c) in enumerate(zip(iterators, ckpts, strict=True)):
                    m = {VAL_METRIC: val[i]["paper_dice"]} if val[i] else None
                    c.save(step, run_state(state, i), it.get_state(), m)
                last_saved = step
        check_pending()
    finally:
        bar.close()
        for c in ckpts:
            c.close()
        for w in writers:
            w.close()

    predict = inference.make_slice_predictor(model, image_size=cfg.data.image_size)
    all_results = []
    for i, run in enumerate(runs):
        s = run_state(state, i)
        variables = {"params": s.params, **s.model_state}
        if run.splits.cases["test"]:
            results, figure_slices = evaluate_test_volumes(run, predict, variables)
        else:
            results, figure_slices = {"paper_dice": None, "per_case": []}, []
        results["steps"] = step
        if is_main:
            _write_outputs(run, results, figure_slices)
        all_results.append(results)
    return all_results


def _stack_batches(batches: list[dict]) -> dict:
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in ("image", "label")}


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
    template = jax.eval_shape(functools.partial(init_state, model, tx, 0, image_size=size))
    template = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_single_device()), template
    )
    state, _ = ckpts.restore(step, template)
    ckpts.close()
    return config, model, {"params": state.params, **state.model_state}


def _single_device():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
