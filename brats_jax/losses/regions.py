"""Region outputs (``model.output = "regions"``): BCE + soft Dice over the nested WT, TC, ET
channels (nnU-Net's BraTS loss) and their :class:`LossParams`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from brats_jax.labels import REGIONS
from brats_jax.losses.core import LossFn, _safe_divide
from brats_jax.losses.registry import (
    LossParams,
    combined_loss,
    loss_params,
)

REGION_LOSS_NAMES = ("ce", "dice", "dice_ce")


def region_targets(labels: jax.Array) -> jax.Array:
    """(B, H, W, 3) float32 region masks WT, TC, ET (`labels.REGIONS`) of labels (B, H, W)
    int in the training classes {0..3}: WT = {1,2,3}, TC = {1,3}, ET = {3}."""
    labels = jnp.asarray(labels)
    return jnp.stack([jnp.isin(labels, jnp.asarray(c)) for c in REGIONS.values()], axis=-1).astype(
        jnp.float32
    )


def region_bce_dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    bce_weight: float | jax.Array = 1.0,
    dice_weight: float | jax.Array = 1.0,
    mask: jax.Array | None = None,
    smooth_nr: float | jax.Array = 1e-5,
    smooth_dr: float | jax.Array = 1e-5,
) -> jax.Array:
    """``bce_weight * BCE + dice_weight * (1 - mean_r D_r)`` of region logits, float32 scalar.

    nnU-Net's BraTS loss (``DC_and_BCE_loss``, weights 1 and 1 there): with ``p = sigmoid``
    of the logits and ``g = region_targets(labels)``,

    * BCE: binary cross-entropy (``optax.sigmoid_binary_cross_entropy``, stable for extreme
      logits) averaged over the counted pixels and the 3 regions;
    * Dice: **batch** soft Dice per region, ``D_r = (2 sum p g + smooth_nr) / (sum p + sum g
      + smooth_dr)`` with sums over B, H, W (one Dice per region for the whole batch, as
      nnU-Net's ``batch_dice``; linear denominators), averaged over WT, TC, ET. A region absent
      from the batch's labels scores D ~ 1 only while it is predicted nowhere.

    Args:
      logits: (B, H, W, 3) float (WT, TC, ET); labels: (B, H, W) int in {0..3}.
      bce_weight, dice_weight: the two terms' weights (may be traced arrays).
      mask: optional (B, H, W) (or broadcastable) pixels to count; a fully masked batch
        gives BCE 0 and a Dice term 1 - smooth_nr / smooth_dr (0 at equal smoothing).
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels)
    if logits.shape != (*labels.shape, len(REGIONS)):
        raise ValueError(
            f"region logits must be labels' shape {labels.shape} + (3,); got {logits.shape}"
        )
    g = region_targets(labels)
    m = jnp.ones(labels.shape, jnp.float32) if mask is None else mask
    m = jnp.broadcast_to(jnp.asarray(m).astype(jnp.float32), labels.shape)[..., None]
    bce = optax.sigmoid_binary_cross_entropy(logits, g)
    bce = _safe_divide(jnp.sum(bce * m), jnp.sum(m) * g.shape[-1])
    p, g = jax.nn.sigmoid(logits) * m, g * m
    axes = tuple(range(p.ndim - 1))
    dice = (2.0 * jnp.sum(p * g, axes) + smooth_nr) / (
        jnp.sum(p, axes) + jnp.sum(g, axes) + smooth_dr
    )
    return bce_weight * bce + dice_weight * jnp.mean(1.0 - dice)


def region_combined_loss(
    logits: jax.Array, labels: jax.Array, params: LossParams, mask: jax.Array | None = None
) -> jax.Array:
    """:func:`region_bce_dice_loss` with the weights and smoothing of ``params`` (from
    :func:`region_loss_params`): ``ce_weight`` weighs BCE, ``dice_weight`` the Dice term;
    the other fields are unused. Same signature as :func:`combined_loss` (vmaps over runs)."""
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return region_bce_dice_loss(
        logits,
        labels,
        bce_weight=p.ce_weight,
        dice_weight=p.dice_weight,
        mask=mask,
        smooth_nr=p.smooth_nr,
        smooth_dr=p.smooth_dr,
    )


def region_loss_params(name: str, dice_weight: float = 0.5) -> LossParams:
    """:class:`LossParams` of a region loss for :func:`region_combined_loss`.

    ``ce`` -> BCE only; ``dice`` -> soft Dice only; ``dice_ce`` -> ``(1 - dice_weight) * BCE
    + dice_weight * Dice`` (as the classes' ``dice_ce`` with ``train.dice_weight``). The
    class-balanced and focal losses have no region form (ValueError). The unused fields
    hold the ``ce`` values (class_weights ones (4,), batch_counts 0), so region runs stack
    like class runs and :func:`effective_class_weights` reports ones for them.
    """
    if name not in REGION_LOSS_NAMES:
        raise ValueError(
            f"loss {name!r} has no region form; region losses: {', '.join(REGION_LOSS_NAMES)}"
        )
    weights = {"ce": (1.0, 0.0), "dice": (0.0, 1.0), "dice_ce": (1.0 - dice_weight, dice_weight)}
    ce_w, dice_w = weights[name]
    return loss_params("ce")._replace(
        ce_weight=jnp.asarray(ce_w, jnp.float32),
        dice_weight=jnp.asarray(dice_w, jnp.float32),
        dice_batch=jnp.asarray(1.0, jnp.float32),
    )


def loss_for_output(output: str) -> LossFn:
    """The array-parameterised loss ``f(logits, labels, params, mask=None)`` of a model
    output kind: :func:`combined_loss` for "classes", :func:`region_combined_loss` for
    "regions"."""
    return {"classes": combined_loss, "regions": region_combined_loss}[output]
