"""Segmentation losses: cross-entropy, class-balanced weights, focal, soft Dice, Dice+CE.

Conventions shared by every loss here:

* ``logits``: (B, H, W, C) in any float dtype; everything is computed in float32.
* ``labels``: integer (B, H, W) with values in {0..C-1}. Inside ``jit`` values cannot be
  checked: an out-of-range label has an all-zero one-hot row, so it contributes nothing
  to CE/focal (and counts as "no class" for Dice). Use ``mask`` to ignore pixels instead.
* ``mask``: optional (B, H, W) (bool or float) of pixels to count; broadcastable shapes such as
  (B, 1, 1) work too (e.g. to drop padded samples of an eval batch). ``None`` = all pixels.
* Every loss returns a float32 scalar, is a pure function of arrays, and is safe under
  ``jax.jit``, ``jax.grad`` and ``jax.vmap``. Values and gradients stay finite for
  all-background batches, classes absent from the batch, fully-masked batches (loss 0) and
  extreme logits (log-softmax is used throughout; no ``log(softmax)``).

Region outputs (``model.output="regions"``, :mod:`brats_jax.models.outputs`): three sigmoid channels
WT, TC, ET trained with BCE + soft Dice (:func:`region_bce_dice_loss`, nnU-Net's BraTS loss);
:func:`region_loss_params` maps ``ce``, ``dice`` and ``dice_ce`` onto :class:`LossParams` for
:func:`region_combined_loss`.

Registry (:func:`get_loss`) names: ``ce``, ``cb_ce``, ``focal``, ``cb_focal``, ``dice``,
``dice_ce``. Class-balanced weights come from fixed counts (host, float64,
:func:`class_balanced_weights`) or from each batch's labels (jnp,
:func:`batch_class_balanced_weights`). For sweeps that vmap over runs with *different* losses
in one compiled program, :func:`combined_loss` takes every hyperparameter as an array
(:class:`LossParams`); :func:`loss_params` maps a registry name onto it (see its docstring
for the mapping).
"""

from __future__ import annotations

from brats_jax.losses.class_balanced import (  # noqa: F401
    BATCH_PIXELS,
    CLASS_COUNTS,
    batch_class_balanced_weights,
    class_balanced_weights,
    slice_counts,
)
from brats_jax.losses.core import cross_entropy, dice_ce_loss, dice_loss, focal_loss  # noqa: F401
from brats_jax.losses.deep_supervision import (  # noqa: F401
    deep_supervision_loss,
    deep_supervision_weights,
    downsample_labels,
    output_loss,
)
from brats_jax.losses.regions import (  # noqa: F401
    REGION_LOSS_NAMES,
    loss_for_output,
    region_bce_dice_loss,
    region_combined_loss,
    region_loss_params,
    region_targets,
)
from brats_jax.losses.registry import (  # noqa: F401
    LOSS_NAMES,
    LossParams,
    combined_loss,
    effective_class_weights,
    get_loss,
    loss_params,
    stack_loss_params,
)

__all__ = [
    "LOSS_NAMES",
    "REGION_LOSS_NAMES",
    "BATCH_PIXELS",
    "CLASS_COUNTS",
    "LossParams",
    "batch_class_balanced_weights",
    "class_balanced_weights",
    "combined_loss",
    "cross_entropy",
    "dice_ce_loss",
    "deep_supervision_loss",
    "deep_supervision_weights",
    "dice_loss",
    "downsample_labels",
    "effective_class_weights",
    "focal_loss",
    "get_loss",
    "loss_for_output",
    "loss_params",
    "output_loss",
    "region_bce_dice_loss",
    "region_combined_loss",
    "region_loss_params",
    "region_targets",
    "slice_counts",
    "stack_loss_params",
]
