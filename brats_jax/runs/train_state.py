"""What a run trains: `TrainState`, the optimizer (schedules, injected learning rate), the loss
parameters, initial and pretrained state, and loading a trained run back for inference."""

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from brats_jax import NUM_CLASSES, config_fields, data, losses, models, runtime
from brats_jax.models import outputs
from brats_jax.runs.checkpoints import RunCheckpoints


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; checkpointed whole."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    model_state: Any  # non-parameter variables, e.g. {"batch_stats": ...} or {}
    opt_state: Any
    rng: jax.Array  # uint32 (2,) raw PRNG key; per-step keys are fold_in(rng, step)


def create_model(config: ml_collections.ConfigDict, *, ops: str | None = None):
    """The Flax module of a run's `config.model`, with the ops of `runtime.resolve_ops`
    (or `ops`, e.g. "gemm" for grouped runs: `steps.model_ops_for`)."""
    return models.from_config(config.model, ops=ops or runtime.resolve_ops(config))


def create_loss_params(
    train_config: ml_collections.ConfigDict, slice_class_counts: np.ndarray, output="classes"
):
    """`losses.LossParams` of the registry loss `train_config.loss` with the config's values.

    `output` (`model.output`): "regions" maps ce, dice and dice_ce onto the region BCE + Dice
    loss (`losses.region_loss_params`); the class-balanced and focal losses are an error.

    `slice_class_counts`: (N, C) pixels per class of each training slice. What the cb_*
    losses count as n_i is `train.class_counts`: "batch_pixels" (each batch's pixels, in the
    jitted step), "split_pixels" (the split's pixels) or "split_slices" (its slices holding
    the class); the split_* weights are computed once, on the host in float64.
    """
    t = train_config
    if outputs.check_output(output) == "regions":
        if t.loss not in losses.REGION_LOSS_NAMES:
            raise ValueError(
                f"train.loss {t.loss!r} is not available with model.output 'regions'; "
                f"expected one of {', '.join(losses.REGION_LOSS_NAMES)}"
            )
        return losses.region_loss_params(t.loss, dice_weight=t.dice_weight)
    mode = t.get("class_counts", losses.BATCH_PIXELS)
    split = {"split_pixels": lambda c: c.sum(0), "split_slices": losses.slice_counts}
    if mode not in losses.CLASS_COUNTS:
        raise ValueError(
            f"unknown train.class_counts {mode!r}; expected {'|'.join(losses.CLASS_COUNTS)}"
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


SCHEDULES = ("constant", "warmup_cosine")  # train.schedule
OPTIMIZERS = ("adam", "adamw")  # train.optimizer


def _schedule_shape(train_config, total_steps: int):
    """The learning-rate multiplier schedule (peak 1), or None for a constant rate."""
    t = train_config
    if t.schedule == "constant":
        return None
    if t.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, t.warmup_steps, max(total_steps, t.warmup_steps + 1)
        )
    raise ValueError(f"unknown train.schedule {t.schedule!r}; expected {'|'.join(SCHEDULES)}")


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
        raise ValueError(
            f"unknown train.optimizer {t.optimizer!r}; expected {'|'.join(OPTIMIZERS)}"
        )
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


def init_state(model, tx, seed, *, image_size: int, in_channels: int = 4) -> TrainState:
    """Initial `TrainState` for `(1, image_size, image_size, in_channels)` inputs
    (`data.input_channels(config)`); `seed` may be traced."""
    rng = jax.random.PRNGKey(seed)
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
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
    params, report = models.load_pretrained(
        jax.device_get(state.params),
        path,
        grid=grid,
        root_conv=config.model.get("pretrained_root_conv", "mean"),
        context_slices=data.context_slices(config),
    )
    logging.info("pretrained weights from %s: %s", path, report.summary())
    params = jax.tree.map(jnp.asarray, params)
    opt_state = set_learning_rate(tx.init(params), config.train.learning_rate)
    return state.replace(params=params, opt_state=opt_state)


def input_size(config) -> int:
    """The slice size (pixels, square) a run's model takes: `data.image_size`, or for runs on
    native-size slices (image_size 0) the source's size (`data.synthetic_image_size`, else
    BraTS's 240)."""
    return config.data.image_size or (
        config.data.synthetic_image_size if config.data.source == "synthetic" else 240
    )


def load_trained(workdir: str | pathlib.Path, *, step: int | None = None):
    """`(config, model, variables)` from a run's best checkpoint (or `step`) for inference.

    Reads run folders of every version (`config_fields.upgrade_legacy`: an old `config.json`
    with `model.conv_impl` keeps its ops as `runtime.ops`).
    """
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no training run in {workdir}: {config_path.name} is missing")
    saved = config_fields.upgrade_legacy(json.loads(config_path.read_text()))
    config = ml_collections.ConfigDict(saved)
    ckpts = RunCheckpoints(workdir, read_only=True)
    if ckpts.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
    model = create_model(config)
    size = input_size(config)
    tx = create_optimizer(config.train, max(1, config.train.num_steps))
    init = functools.partial(
        init_state, model, tx, 0, image_size=size, in_channels=data.input_channels(config)
    )
    template = jax.eval_shape(init)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one_device), template
    )
    # the best checkpoint (or `step`); an unreadable one falls back to the newest readable
    _, state = ckpts.restore_for_inference(template, step=step)
    ckpts.close()
    return config, model, {"params": state.params, **state.model_state}
