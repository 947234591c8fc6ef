"""What the benchmarks run: the model, a plain Adam + mean-CE train step, its state and random
inputs (`python -m brats_jax.bench`, `brats_jax.benchmarking.train`, `benchmarks/`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from brats_jax import NUM_CLASSES, losses, models
from brats_jax.ops.impls import resolve_impl
from brats_jax.runs import train_state
from configs import default as default_config
from configs import unet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(
    model: str,
    *,
    dtype: str = "float32",
    base_features: int | None = None,
    depth: int | None = None,
    preset: str | None = None,
    conv_impl: str = "auto",
    deep_supervision: bool = False,
):
    """The benchmarked flax module: ``models.from_config`` of the default model config with
    these fields (None: the config's default), 4 classes.

    ``base_features``/``depth``/``conv_impl``/``deep_supervision`` apply to the U-Net,
    ``preset`` to TransUNet;
    ``dtype`` is the compute dtype name ("float32" | "bfloat16"; parameters stay float32).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    if model == "transunet" and (
        base_features is not None or depth is not None or deep_supervision
    ):
        raise ValueError("--base-features/--depth/--deep-supervision apply to --model=unet only")
    if model not in ("unet", "transunet"):
        raise ValueError(f"model={model!r}; expected 'unet' or 'transunet'")
    m = default_config.base_config().model
    fields = dict(name=model, dtype=dtype, base_features=base_features, depth=depth, preset=preset)
    m.update({k: v for k, v in fields.items() if v is not None})
    m.deep_supervision = deep_supervision
    return models.from_config(m, ops=resolve_impl(conv_impl))  # "auto" resolved once, here


MODEL_CHOICE = dict(
    model="unet", dtype="float32", base_features=None, depth=None, preset=None, conv_impl="auto",
    deep_supervision=False,
)  # fmt: skip
"""The benchmarks' model keywords (`**model_fields` of each `bench_*`) and their defaults."""


def model_choice(**fields) -> dict:
    """`MODEL_CHOICE` updated with `fields`: the keywords of :func:`build_model`."""
    unknown = sorted(set(fields) - set(MODEL_CHOICE))
    if unknown:
        raise TypeError(f"unknown model keywords {unknown}; expected some of {list(MODEL_CHOICE)}")
    return {**MODEL_CHOICE, **fields}


def init_variables(model, image_size: int, in_channels: int = 4, seed: int = 0) -> dict:
    """Variables of ``model`` for (1, image_size, image_size, in_channels) inputs (jitted init)."""
    k = jax.random.PRNGKey(seed)
    x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
    return jax.jit(lambda: model.init({"params": k, "dropout": k}, x, train=False))()


def mean_ce(logits, labels, params=None) -> jax.Array:
    """Mean softmax cross-entropy of logits (B,H,W,C) against int labels (B,H,W), float32
    scalar (the loss of the benchmark steps; `params` unused, for `deep_supervision_loss`)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(ce)


def make_train_step(model, tx: optax.GradientTransformation):
    """``step(state, image (B,H,W,4) f32, label (B,H,W) int32) -> (state, loss f32 scalar)``.

    A plain Adam + mean-CE step, the exact twin of `benchmarks/torch_unet.py`'s, so the
    framework comparison times the same arithmetic; `bench multirun` times the library's own
    `brats_jax.training.steps.make_train_step`.

    ``state`` is a dict ``{"params", "rest" (non-param collections), "opt_state", "rng"}``;
    loss is the mean softmax cross-entropy over pixels (a deep-supervised U-Net: its weighted
    sum over the decoder levels, `losses.deep_supervision_loss`). Not jitted (callers jit).
    """

    def step(state, image, label):
        rng, drop = jax.random.split(state["rng"])

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, **state["rest"]},
                image,
                train=True,
                rngs={"dropout": drop},
                mutable=["batch_stats"],
            )
            return losses.output_loss(mean_ce, logits, label, None), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        upd, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], upd)
        rest = {**state["rest"], **updates}
        return {"params": params, "rest": rest, "opt_state": opt_state, "rng": rng}, loss

    return step


def init_train_state(model, image_size: int, tx: optax.GradientTransformation, seed: int = 0):
    """The ``state`` dict of :func:`make_train_step` for ``model`` at ``image_size``."""
    variables = init_variables(model, image_size, seed=seed)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    return {
        "params": params,
        "rest": rest,
        "opt_state": jax.jit(tx.init)(params),
        "rng": jax.random.PRNGKey(seed + 1),
    }


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Random image (B,S,S,4) float32 N(0,1) and label (B,S,S) int32 uniform in {0..3}."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch_size, image_size, image_size, 4), dtype=np.float32)
    label = rng.integers(0, NUM_CLASSES, (batch_size, image_size, image_size), dtype=np.int32)
    return jnp.asarray(image), jnp.asarray(label)


def cpu_preset_step_setup(image_size: int = 128, batch_size: int = 8):
    """What the step-cost benchmarks time: ``(model, tx, init, batch)`` for the library's own
    train step (`steps.make_train_step`) with `configs/unet.py:cpu`'s U-Net and optimizer;
    ``init(seed)`` is a fresh jitted `TrainState` at ``image_size``; ``batch`` is
    ``{"image": (B,S,S,4) f32, "label": (B,S,S) int32}`` from :func:`random_batch`."""
    config = unet.get_config("cpu")
    model = train_state.create_model(config)
    tx = train_state.create_optimizer(config.train, 1000)
    init = jax.jit(lambda seed: train_state.init_state(model, tx, seed, image_size=image_size))
    image, label = random_batch(batch_size, image_size)
    return model, tx, init, {"image": image, "label": label}


def num_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
