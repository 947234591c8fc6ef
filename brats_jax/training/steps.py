"""The jitted steps: one training step and one evaluation step, their mapping over stacked
runs, and the device placement (a one-axis "data" mesh) of states and batches.

Batches are sharded along their batch axis over every device; parameters and optimizer
state are replicated. For K runs trained together the state, loss parameters and batches
carry a leading run axis and the step is mapped over it (`map_over_runs`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from brats_jax import losses, metrics
from brats_jax.data import augment
from brats_jax.models import outputs
from brats_jax.runs.train_state import TrainState

AUGMENT_STREAM = 0x41554720  # folded into state.rng for the augmentation keys ("AUG ")


def make_train_step(model, tx, output: str = "classes", augment_cfg=None):
    """`step(state, batch, loss_params) -> (state, {"loss", "grad_norm", "class_weights"})`;
    pure, jit it. `class_weights`: (C,) class weights the loss gave this batch (ones for
    region outputs, which weigh no class), from its full-resolution labels. `output`: the
    config's `model.output` (static), which picks the loss (`losses.loss_for_output`). A
    model with deep supervision returns a tuple of logits in training: the loss is
    `losses.deep_supervision_loss` of it (each level's loss weighs classes from its own
    down-sampled labels where the weights come from the batch, `class_counts="batch_pixels"`;
    `class_weights` reports the full-resolution ones). `augment_cfg`: an
    `augment.AugmentConfig` (static; None = no augmentation): each sample is augmented on
    the device with keys from fold_in(fold_in(state.rng, AUGMENT_STREAM), state.step), a
    stream apart from the dropout key fold_in(state.rng, state.step), which stays as it was.

    `batch`: image float32 (B,H,W,4(2k+1)) (k = `data.context_slices`), label int32 (B,H,W),
    optional background float32 (B,4(2k+1)) (patches: the fill for spatial augmentation);
    loss and grad norm are scalars.
    """

    loss_fn = losses.loss_for_output(outputs.check_output(output))
    augment_cfg = augment_cfg or augment.AugmentConfig()

    def step(state: TrainState, batch: dict, loss_params) -> tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        if augment_cfg.enabled:
            key = jax.random.fold_in(jax.random.fold_in(state.rng, AUGMENT_STREAM), state.step)
            image, label = augment.augment_batch(
                key, batch["image"], batch["label"], augment_cfg, batch.get("background")
            )
            batch = {**batch, "image": image, "label": label}

        def loss_of(params):
            logits, updates = model.apply(
                {"params": params, **state.model_state},
                batch["image"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=list(state.model_state.keys()),
            )
            # deep supervision: a tuple of logits at decreasing resolution
            return losses.output_loss(loss_fn, logits, batch["label"], loss_params), updates

        (loss, updates), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, param_updates),
            model_state={**state.model_state, **updates},
            opt_state=opt_state,
        )
        return new_state, {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "class_weights": losses.effective_class_weights(batch["label"], loss_params),
        }

    return step


EvalMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    paper_dice=metrics.MeanPaperDice,
    confusion=metrics.ConfusionMatrix,
)
"""The validation metrics (a `clu.metrics.Collection`): mean per-slice loss, the study's
per-slice Dice averaged over slices, and the pooled confusion matrix."""


def make_eval_step(model, output: str = "classes"):
    """`step(state, batch, loss_params) -> EvalMetrics` over the batch's valid slices.

    `batch`: image (B,H,W,4(2k+1)), label (B,H,W), valid (B,) bool (padding slices are False and
    not counted). Merge the results of all batches with `EvalMetrics.merge`. `output`: the
    config's `model.output`: the loss is that output's training loss, the Dice scores are of
    the labels decoded from its probabilities (`outputs.labels_from_probabilities`).
    """
    loss_fn = losses.loss_for_output(outputs.check_output(output))

    def step(state: TrainState, batch: dict, loss_params):
        logits = model.apply(
            {"params": state.params, **state.model_state}, batch["image"], train=False
        )
        per_slice = jax.vmap(lambda lg, lb: loss_fn(lg[None], lb[None], loss_params))(
            logits, batch["label"]
        )
        pred = outputs.labels_from_probabilities(outputs.probabilities(logits, output), output)
        labels, valid = batch["label"], batch["valid"]
        return EvalMetrics.empty().replace(
            loss=clu_metrics.Average.from_model_output(per_slice, mask=valid),
            paper_dice=metrics.MeanPaperDice.from_model_output(
                labels, predictions=pred, valid=valid
            ),
            confusion=metrics.ConfusionMatrix.from_model_output(
                labels, predictions=pred, valid=valid
            ),
        )

    return step


MAPPINGS = ("none", "map", "vmap", "grouped")


def map_over_runs(step, mapping: str):
    """Lift `step(*args)` to stacked runs: "vmap", "grouped" (vmap of a model built with the
    "gemm" ops, so the K runs' convolutions are batched GEMMs: `model_ops_for`), "map"
    (`lax.map`, sequential) or "none"."""
    if mapping == "none":
        return step
    if mapping in ("vmap", "grouped"):
        return jax.vmap(step)
    if mapping == "map":
        return lambda *args: jax.lax.map(lambda a: step(*a), args)
    raise ValueError(f"unknown mapping {mapping!r}; expected one of {MAPPINGS}")


def model_ops_for(mapping: str, ops: str) -> str:
    """The ops implementation a model trained with `mapping` uses: "gemm" (im2col + one
    matrix product per convolution) for "grouped", else `ops` (`runtime.resolve_ops`)."""
    return "gemm" if mapping == "grouped" else ops


def default_mapping() -> str:
    """ "map" (`lax.map`): measured faster than "vmap" on both backends we could test.

    vmapping K parameter sets turns every convolution into a grouped convolution: for the
    study's U-Net at 240 px, batch 1, 8 runs, one vmapped step took 0.57x the throughput of
    8 single steps on an H200 and far less on a CPU, while `lax.map` (one compiled program,
    runs in sequence) gave 1.09x on the H200 (BENCHMARKS.md). "vmap" stays available for
    small models and TPUs, where it may win.
    """
    return "map"


def data_mesh() -> Mesh:
    """A one-axis mesh named "data" over every device of every host."""
    return Mesh(np.asarray(jax.devices()), ("data",))


BATCH_ARRAYS = ("image", "label", "valid", "background")  # what goes to the devices


def device_batch(mesh: Mesh, batch: dict, *, stacked: bool = False) -> dict:
    """Global jax.Arrays from this host's part of a batch, sharded along the batch axis
    (axis 1 when `stacked`: the batch of K runs, (K, B, ...))."""
    spec = P(None, "data") if stacked else P("data")
    sharding = NamedSharding(mesh, spec)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in BATCH_ARRAYS
        if k in batch
    }


def jit_train_step(
    model,
    tx,
    mesh: Mesh,
    state,
    loss_params,
    mapping: str,
    output: str = "classes",
    augment_cfg=None,
):
    """The train step jitted for `state`/`loss_params` replicated on `mesh` (state donated),
    mapped over runs by `mapping` ("none" for one unstacked run); `output`: `model.output`;
    `augment_cfg`: `augment.from_config(config)` (shared by the group)."""
    replicated = NamedSharding(mesh, P())
    state_sharding = jax.tree.map(lambda _: replicated, state)
    batch_sharding = NamedSharding(mesh, P(None, "data") if mapping != "none" else P("data"))
    return jax.jit(
        map_over_runs(make_train_step(model, tx, output, augment_cfg), mapping),
        in_shardings=(
            state_sharding,
            batch_sharding,  # every array of the batch dict
            jax.tree.map(lambda _: replicated, loss_params),
        ),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )


def stack_trees(trees):
    """One pytree whose leaves are the `trees`' leaves stacked along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def tree_row(tree, i: int):
    """Row `i` of a stacked pytree (see `stack_trees`)."""
    return jax.tree.map(lambda x: x[i], tree)
