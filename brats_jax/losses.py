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

Region outputs (``model.output="regions"``, :mod:`brats_jax.outputs`): three sigmoid channels
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

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from brats_jax import NUM_CLASSES
from brats_jax.metrics import REGIONS

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
    "dice_loss",
    "effective_class_weights",
    "focal_loss",
    "get_loss",
    "loss_for_output",
    "loss_params",
    "region_bce_dice_loss",
    "region_combined_loss",
    "region_loss_params",
    "region_targets",
    "slice_counts",
    "stack_loss_params",
]

LossFn = Callable[..., jax.Array]

# Smallest value (1 - p_t) may take inside the focal modulating factor. Keeps the gradient
# of (1 - p_t) ** gamma finite for 0 <= gamma < 1 when p_t rounds to 1 (the factor is then
# 1e-30 ** gamma instead of 0, multiplied by -log p_t = 0: the value is unchanged).
_FOCAL_EPS = 1e-30

NORMALIZATIONS = ("pixels", "weights")

# ``class_counts`` value of the cb_* losses asking for weights from each batch's labels.
BATCH_PIXELS = "batch_pixels"
CLASS_COUNTS = (BATCH_PIXELS, "split_pixels", "split_slices")  # train.class_counts


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _prepare(logits, labels, mask):
    """float32 log-probs (B,H,W,C), one-hot (B,H,W,C) float32, mask (B,H,W) float32."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(f"logits must be (B, H, W, C); got shape {logits.shape}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} must equal logits shape without the class axis "
            f"{logits.shape[:-1]}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array; got dtype {labels.dtype}")
    num_classes = logits.shape[-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot, m = _onehot_and_mask(labels, num_classes, mask)
    return logp, onehot, m


def _onehot_and_mask(labels, num_classes, mask):
    """one-hot (B,H,W,C) float32 of ``labels`` and the float32 mask (B,H,W) (ones for None)."""
    labels = jnp.asarray(labels)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if mask is None:
        return onehot, jnp.ones(labels.shape, jnp.float32)
    return onehot, jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), labels.shape)


def _safe_divide(num, den):
    """num / den, 0 where den == 0, with finite gradients everywhere."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _class_weight_vector(class_weights, num_classes):
    if class_weights is None:
        return jnp.ones((num_classes,), jnp.float32)
    w = jnp.asarray(class_weights, jnp.float32)
    if w.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},) to match the logits' class axis; "
            f"got {w.shape}"
        )
    return w


def _check_beta(beta) -> float:
    beta = float(beta)
    if not (0.0 <= beta < 1.0) or math.isnan(beta):
        raise ValueError(f"beta must be in [0, 1); got {beta!r}")
    return beta


def _check_normalize(normalize):
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
    return normalize == "weights"


def _weighted_mean(per_pixel, onehot, m, w, by_weights):
    """Sum of ``w_y * m * per_pixel`` divided by sum(m) or by sum(w_y * m). Traced flag ok."""
    wy = jnp.sum(onehot * w, axis=-1)  # (B,H,W); 0 for out-of-range labels
    num = jnp.sum(wy * m * per_pixel)
    den = jnp.where(by_weights, jnp.sum(wy * m), jnp.sum(m))
    return _safe_divide(num, den)


# --------------------------------------------------------------------------------------------
# Class-balanced weights (host, float64)
# --------------------------------------------------------------------------------------------


def class_balanced_weights(counts: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """Cui et al. (2019) effective-number class weights, normalised to mean 1.

    ``w_c = (1 - beta) / (1 - beta ** n_c)``, then scaled so that ``sum(w) = C`` (mean 1).
    Computed on the host in float64 with ``1 - beta**n = -expm1(n * log1p(-(1 - beta)))``,
    stable for counts up to 1e10 and beta up to 1 - 1e-9 (float32 cannot even represent
    such betas; a float32 computation silently returns equal weights).

    Args:
      counts: (C,) non-negative numbers of *samples* per class. The unit is the caller's
        choice and it matters (``train.class_counts``): ``split_pixels`` passes the training
        split's pixel counts, ``split_slices`` the number of its slices containing each class
        (:func:`slice_counts`). Pitfall (FACTS §3): ``beta**n ~ exp(-n(1-beta))``, so with
        pixel counts in the millions every beta <= 0.9999 (the study's grid 0.5, 0.75, 0.99
        included) gives weights equal to ~1e-12, and thousands of slices give 0.99**1000 ~
        4e-5: class balancing is then a no-op. The default ``batch_pixels`` counts each
        batch's pixels instead (:func:`batch_class_balanced_weights`, in the jitted step).
      beta: in [0, 1). beta = 0 gives equal weights; beta -> 1 gives inverse-frequency weights.

    Returns:
      (C,) float64 weights with mean 1 over the classes present. A class with count 0 (absent
      from the training data) gets weight **0**: its un-normalised weight would be infinite,
      but since no pixel carries that label, the weight never multiplies a loss term in CE or
      focal loss, so 0 is the harmless finite choice. The present classes are then normalised
      to sum to the number of present classes (= C when every class is present, the usual
      case), so equal counts always give weights 1.

    Raises:
      ValueError: counts not 1-D, negative, non-finite or all zero; beta outside [0, 1).
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array (C,); got shape {n.shape}")
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"counts must be finite and >= 0; got {n.tolist()}")
    beta = _check_beta(beta)
    present = n > 0
    if not present.any():
        raise ValueError(f"counts are all zero ({n.tolist()}): cannot compute class weights")
    one_minus_beta = 1.0 - beta
    if beta == 0.0:
        raw = np.where(present, 1.0, 0.0)  # (1 - 0) / (1 - 0**n) = 1 for n > 0
    else:
        log_beta = math.log1p(-one_minus_beta) if beta > 0.5 else math.log(beta)
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = -np.expm1(np.where(present, n, 1.0) * log_beta)  # 1 - beta**n > 0
            raw = np.where(present, one_minus_beta / denom, 0.0)
    return raw * (present.sum() / raw.sum())


def slice_counts(per_slice_class_counts: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Number of slices containing each class: the "slice" unit for class-balanced weights.

    Args:
      per_slice_class_counts: (N, C) integer pixel counts per slice and class (e.g.
        ``source.table.class_counts[indices]`` of the training split).
      min_pixels: a slice counts for a class when it has at least this many of its pixels.

    Returns:
      (C,) int64: for each class, the number of the N slices containing it. Pass it as
      ``class_counts`` to ``get_loss("cb_ce", beta=..., class_counts=...)``.
    """
    c = np.asarray(per_slice_class_counts)
    if c.ndim != 2:
        raise ValueError(f"per_slice_class_counts must be (N, C); got shape {c.shape}")
    return (c >= min_pixels).sum(axis=0).astype(np.int64)


def _batch_weights(onehot, m, beta):
    """Class-balanced weights (C,) float32 from the counted pixels of one batch (see below)."""
    n = jnp.sum(onehot * m[..., None], axis=tuple(range(onehot.ndim - 1)))  # (C,) pixels
    present = n > 0
    beta = jnp.asarray(beta, jnp.float32)
    # log(beta) with beta = 0 clamped to log(tiny) ~ -87: beta**n is then 0 for every n >= 1
    log_beta = jnp.log(jnp.maximum(beta, jnp.finfo(jnp.float32).tiny))
    one_minus_beta_n = -jnp.expm1(jnp.where(present, n, 1.0) * log_beta)  # > 0, never 0/0
    raw = jnp.where(present, (1.0 - beta) / one_minus_beta_n, 0.0)
    return jax.lax.stop_gradient(_safe_divide(raw * jnp.sum(present), jnp.sum(raw)))


def batch_class_balanced_weights(
    labels: jax.Array,
    beta: float | jax.Array,
    mask: jax.Array | None = None,
    num_classes: int = NUM_CLASSES,
) -> jax.Array:
    """Cui et al. weights from the current batch's pixel counts (``class_counts="batch_pixels"``).

    ``n_c`` = number of counted pixels of class c in the whole batch (at batch size 1: in the
    slice); ``w_c = (1 - beta) / (1 - beta ** n_c)`` with ``1 - beta**n = -expm1(n log beta)``
    in float32 (exact pixel counts up to 2**24 per batch; beta = 0 gives equal weights). As in
    :func:`class_balanced_weights`, a class absent from the batch gets weight 0 and the present
    classes are renormalised to sum to their number. Jit/vmap-safe; ``beta`` may be traced.
    Example: beta 0.99, 20 ET pixels beside 50,000 background pixels: raw weights 0.0549 vs
    0.0100, i.e. ET pixels weigh 5.5x a background pixel; at beta 0.5 both raw weights are 0.5.

    Args:
      labels: (B, H, W) int in {0..C-1}; mask: optional (B, H, W) pixels to count (masked
        pixels, e.g. of padded samples, are not counted); beta: scalar in [0, 1).

    Returns:
      (C,) float32 weights (no gradient flows through them); all zeros for an empty batch.
    """
    return _batch_weights(*_onehot_and_mask(labels, num_classes, mask), beta)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize: str = "pixels",
) -> jax.Array:
    """Pixel-wise softmax cross-entropy, optionally class-weighted. Returns a float32 scalar.

    ``loss = sum_i m_i w_{y_i} (-log p_{i,y_i}) / Z``.

    Args:
      logits: (B, H, W, C) float (any dtype; computed in float32).
      labels: (B, H, W) int in {0..C-1}.
      class_weights: optional (C,) weights w (e.g. :func:`class_balanced_weights`).
      mask: optional (B, H, W) pixels to count.
      normalize: ``"pixels"`` (default): Z = number of counted pixels, as in Cui et al.'s
        official code (weights change the loss scale, mean weight 1 keeps it comparable);
        ``"weights"``: Z = sum_i m_i w_{y_i}, as ``torch.nn.CrossEntropyLoss(weight=...)``.
        Both coincide without weights.
    """
    by_weights = _check_normalize(normalize)
    logp, onehot, m = _prepare(logits, labels, mask)
    w = _class_weight_vector(class_weights, logits.shape[-1])
    nll = -jnp.sum(onehot * logp, axis=-1)
    return _weighted_mean(nll, onehot, m, w, by_weights)


def _focal_terms(logp, onehot, gamma):
    """Per-pixel focal term -(1 - p_t)**gamma * log p_t (float32, finite gradients)."""
    logp_t = jnp.sum(onehot * logp, axis=-1)
    one_minus_pt = -jnp.expm1(logp_t)  # accurate even when p_t ~ 1
    factor = jnp.power(jnp.maximum(one_minus_pt, _FOCAL_EPS), gamma)
    return -factor * logp_t


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    gamma: float = 1.0,
    class_weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize: str = "pixels",
) -> jax.Array:
    """Softmax focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)**gamma log p_t``, float32 scalar.

    ``alpha_t`` = ``class_weights[y]`` (1 without weights). ``gamma = 0`` equals
    :func:`cross_entropy` exactly (same arguments). Normalisation as in :func:`cross_entropy`.
    ``gamma`` may be a traced scalar (>= 0).

    Args:
      logits: (B, H, W, C) float; labels: (B, H, W) int; mask: optional (B, H, W).
    """
    by_weights = _check_normalize(normalize)
    logp, onehot, m = _prepare(logits, labels, mask)
    w = _class_weight_vector(class_weights, logits.shape[-1])
    per_pixel = _focal_terms(logp, onehot, jnp.asarray(gamma, jnp.float32))
    return _weighted_mean(per_pixel, onehot, m, w, by_weights)


def _mean_over_counted_samples(per_sample, m):
    """Mean of (B,) ``per_sample`` over the samples with a pixel to count in ``m`` (B, H, W);
    fully masked (padded) samples do not count; 0 when none counts."""
    counted = (jnp.sum(m, axis=tuple(range(1, m.ndim))) > 0).astype(jnp.float32)
    return _safe_divide(jnp.sum(counted * per_sample), jnp.sum(counted))


def _dice_per_class(probs, onehot, m, squared, batch, smooth_nr, smooth_dr):
    """Soft Dice (B, C), or (C,) when ``batch``, from probabilities (B, H, W, C)."""
    p = probs * m[..., None]
    g = onehot * m[..., None]
    axes = tuple(range(0 if batch else 1, p.ndim - 1))
    inter = jnp.sum(p * g, axis=axes)
    lin = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes)
    den = jnp.sum(p * p, axis=axes) + jnp.sum(g * g, axis=axes) if squared else lin
    return (2.0 * inter + smooth_nr) / (den + smooth_dr)


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    include_background: bool = True,
    squared: bool = False,
    batch: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Soft multi-class Dice loss on softmax probabilities (Milletari et al.), float32 scalar.

    Per class c: ``D_c = (2 sum p_c g_c + smooth_nr) / (sum p_c + sum g_c + smooth_dr)``
    (``squared``: ``sum p_c**2 + sum g_c**2`` in the denominator), sums over H, W of each
    sample (``batch=True``: over B, H, W, one Dice per class for the batch);
    ``loss = mean over (samples,) classes of (1 - D_c)``; fully masked (padded) samples are
    left out of the mean over samples (loss 0 when every sample is masked). A class absent
    from both a sample's labels and (nearly) its prediction scores D ~ 1 thanks to the
    smoothing terms; with a tiny ``smooth_nr`` an absent class still pushes its probabilities
    towards 0. Same defaults as MONAI's ``DiceLoss(softmax=True)``.

    Args:
      logits: (B, H, W, C) float; labels: (B, H, W) int; mask: optional (B, H, W) pixels
        to count (masked pixels contribute to neither p nor g).
      include_background: False drops class 0 from the mean.
    """
    logp, onehot, m = _prepare(logits, labels, mask)
    d = _dice_per_class(jnp.exp(logp), onehot, m, bool(squared), bool(batch), smooth_nr, smooth_dr)
    if not include_background:
        if d.shape[-1] < 2:
            raise ValueError("include_background=False needs at least 2 classes")
        d = d[..., 1:]
    if batch:
        return jnp.mean(1.0 - d)
    return _mean_over_counted_samples(jnp.mean(1.0 - d, axis=-1), m)


def dice_ce_loss(
    logits: jax.Array,
    labels: jax.Array,
    ce_weight: float = 0.5,
    dice_weight: float = 0.5,
    class_weights: jax.Array | None = None,
    include_background: bool = True,
    squared: bool = True,
    batch: bool = True,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    mask: jax.Array | None = None,
) -> jax.Array:
    """TransUNet's loss: ``ce_weight * CE + dice_weight * Dice`` (default 0.5 + 0.5), float32.

    Defaults reproduce TransUNet's ``DiceLoss`` (official code: softmax, background included,
    squared denominators, sums over the whole batch, smooth 1e-5) and unweighted CE; pass
    ``class_weights`` for a weighted CE term (pixel normalisation).
    """
    ce = cross_entropy(logits, labels, class_weights=class_weights, mask=mask)
    dl = dice_loss(
        logits,
        labels,
        include_background=include_background,
        squared=squared,
        batch=batch,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        mask=mask,
    )
    return ce_weight * ce + dice_weight * dl


# --------------------------------------------------------------------------------------------
# Array-parameterised loss for vmapped sweeps
# --------------------------------------------------------------------------------------------


class LossParams(NamedTuple):
    """Every loss hyperparameter as an array, so that runs with different losses vmap.

    All fields are float32 arrays: scalars () except ``class_weights`` (C,) and
    ``dice_class_mask`` (C,). Stack several with :func:`stack_loss_params` (leading run axis).

    Fields:
      ce_weight: weight of the focal/CE term.        gamma: focal exponent (0 = CE).
      class_weights: (C,) alpha_t / CE weights.       ce_by_weights: 1 = divide by sum of weights.
      batch_counts: 1 = class weights from each batch's pixel counts with ``beta``
        (:func:`batch_class_balanced_weights`; ``class_weights`` unused), 0 = ``class_weights``.
      beta: class-balancing beta for ``batch_counts`` (0 otherwise).
      dice_weight: weight of the soft Dice term.      dice_squared: 1 = squared denominators.
      dice_batch: 1 = one Dice per class over the batch, 0 = per sample.
      dice_class_mask: (C,) 1 for classes in the Dice mean (0 for background when excluded).
      smooth_nr, smooth_dr: Dice smoothing terms.
    """

    ce_weight: jax.Array
    gamma: jax.Array
    class_weights: jax.Array
    ce_by_weights: jax.Array
    dice_weight: jax.Array
    dice_squared: jax.Array
    dice_batch: jax.Array
    dice_class_mask: jax.Array
    smooth_nr: jax.Array
    smooth_dr: jax.Array
    batch_counts: jax.Array
    beta: jax.Array


def _effective_weights(onehot, m, p):
    """(C,) weights a batch's pixels get under float32 params ``p`` (fixed or per batch)."""
    return jnp.where(p.batch_counts > 0, _batch_weights(onehot, m, p.beta), p.class_weights)


def effective_class_weights(
    labels: jax.Array, params: LossParams, mask: jax.Array | None = None
) -> jax.Array:
    """The (C,) class weights :func:`combined_loss` applies to this batch under ``params``.

    ``params.class_weights`` for fixed weights (all ones for unweighted losses), else the
    per-batch weights (:func:`batch_class_balanced_weights`: 0 for classes absent from the
    batch). labels: (B, H, W) int; mask: optional (B, H, W). Jit/vmap-safe, float32.
    """
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    onehot, m = _onehot_and_mask(labels, p.class_weights.shape[-1], mask)
    return _effective_weights(onehot, m, p)


def combined_loss(
    logits: jax.Array,
    labels: jax.Array,
    params: LossParams,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``ce_weight * focal(gamma, class_weights) + dice_weight * soft_dice``, float32 scalar.

    Every hyperparameter is an array in ``params``, so one compiled program serves all
    registry losses and ``jax.vmap(combined_loss, in_axes=(0, 0, 0))`` trains several runs
    with different losses at once. Both terms are always computed (a zero weight multiplies a
    finite value), which costs one extra reduction over the batch. Build ``params`` with
    :func:`loss_params`; it equals ``get_loss(name, **kw)`` for every registry name.

    Args:
      logits: (B, H, W, C) float; labels: (B, H, W) int; mask: optional (B, H, W).
      params: :class:`LossParams` with ``class_weights.shape == (C,)``.
    """
    logp, onehot, m = _prepare(logits, labels, mask)
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    w = _effective_weights(onehot, m, p)
    focal = _weighted_mean(_focal_terms(logp, onehot, p.gamma), onehot, m, w, p.ce_by_weights > 0)
    probs = jnp.exp(logp) * m[..., None]
    g = onehot * m[..., None]
    spatial = tuple(range(1, probs.ndim - 1))
    inter = jnp.sum(probs * g, axis=spatial)  # (B, C)
    lin = jnp.sum(probs, axis=spatial) + jnp.sum(g, axis=spatial)
    sq = jnp.sum(probs * probs, axis=spatial) + jnp.sum(g * g, axis=spatial)
    den = jnp.where(p.dice_squared > 0, sq, lin)
    dice_sample = (2.0 * inter + p.smooth_nr) / (den + p.smooth_dr)  # (B, C)
    dice_batch = (2.0 * inter.sum(0) + p.smooth_nr) / (den.sum(0) + p.smooth_dr)  # (C,)
    cm = p.dice_class_mask
    loss_sample = _mean_over_counted_samples(jnp.sum((1.0 - dice_sample) * cm, -1) / jnp.sum(cm), m)
    loss_batch = jnp.sum((1.0 - dice_batch) * cm) / jnp.sum(cm)
    dice = jnp.where(p.dice_batch > 0, loss_batch, loss_sample)
    return p.ce_weight * focal + p.dice_weight * dice


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_DICE_DEFAULTS = dict(
    include_background=True, squared=False, batch=False, smooth_nr=1e-5, smooth_dr=1e-5
)
_DICE_CE_DEFAULTS = dict(
    ce_weight=0.5,
    dice_weight=0.5,
    include_background=True,
    squared=True,
    batch=True,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
)
# name -> {parameter: default}. cb_* need (beta and class_counts) or class_weights.
_REGISTRY: dict[str, dict[str, Any]] = {
    "ce": dict(normalize="pixels"),
    "cb_ce": dict(beta=None, class_counts=None, class_weights=None, normalize="pixels"),
    "focal": dict(gamma=1.0, normalize="pixels"),
    "cb_focal": dict(
        gamma=1.0, beta=None, class_counts=None, class_weights=None, normalize="pixels"
    ),
    "dice": dict(_DICE_DEFAULTS),
    "dice_ce": dict(_DICE_CE_DEFAULTS),
}
LOSS_NAMES = tuple(_REGISTRY)


def _resolve(name: str, params: dict[str, Any]) -> dict[str, Any]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    valid = _REGISTRY[name]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for loss {name!r}; valid: {sorted(valid) or 'none'}"
        )
    kw = dict(valid)
    kw.update({k: v for k, v in params.items() if v is not None})
    if "normalize" in kw:
        _check_normalize(kw["normalize"])
    if name.startswith("cb_"):
        has_w = kw["class_weights"] is not None
        has_counts = kw["class_counts"] is not None or kw["beta"] is not None
        if has_w and has_counts:
            raise ValueError(
                f"loss {name!r}: give either class_weights or (beta and class_counts), not both"
            )
        if not has_w and (kw["beta"] is None or kw["class_counts"] is None):
            raise ValueError(
                f"loss {name!r} needs beta and class_counts (C,) or {BATCH_PIXELS!r} (or "
                f"class_weights); got beta={kw['beta']!r}, class_counts={kw['class_counts']!r}"
            )
        counts = kw.pop("class_counts")
        kw["batch_beta"] = None
        if isinstance(counts, str):
            if counts != BATCH_PIXELS:
                raise ValueError(
                    f"loss {name!r}: class_counts must be (C,) counts or {BATCH_PIXELS!r}; "
                    f"got {counts!r}"
                )
            _check_beta(kw["beta"])
            kw["batch_beta"] = float(kw["beta"])
        elif not has_w:
            kw["class_weights"] = class_balanced_weights(counts, kw["beta"])
        kw.pop("beta")
        if kw["class_weights"] is not None:
            kw["class_weights"] = np.asarray(kw["class_weights"], np.float32)
            if kw["class_weights"].ndim != 1:
                raise ValueError(
                    f"loss {name!r}: class_weights must be 1-D (C,); "
                    f"got {kw['class_weights'].shape}"
                )
    if "gamma" in kw and float(kw["gamma"]) < 0:
        raise ValueError(f"loss {name!r}: gamma must be >= 0; got {kw['gamma']}")
    return kw


def get_loss(name: str, **params: Any) -> LossFn:
    """Loss registry used by configs: returns ``loss_fn(logits, labels, mask=None) -> scalar``.

    Names and parameters (defaults):

    * ``ce``: unweighted cross-entropy; ``normalize="pixels"``.
    * ``cb_ce``: class-balanced CE; ``beta`` and ``class_counts`` (C,) (weights from
      :func:`class_balanced_weights`, computed once here on the host in float64), or ``beta``
      and ``class_counts="batch_pixels"`` (weights from each batch's labels,
      :func:`batch_class_balanced_weights`), or ``class_weights`` (C,);
      ``normalize="pixels"`` (or ``"weights"``, PyTorch's).
    * ``focal``: ``gamma=1.0`` (the study's value), ``normalize``.
    * ``cb_focal``: ``gamma=1.0``, ``beta``/``class_counts`` or ``class_weights``, ``normalize``.
    * ``dice``: ``include_background=True, squared=False, batch=False, smooth_nr=1e-5,
      smooth_dr=1e-5`` (:func:`dice_loss`).
    * ``dice_ce``: ``ce_weight=0.5, dice_weight=0.5`` and TransUNet's Dice settings
      ``include_background=True, squared=True, batch=True, smooth_nr=smooth_dr=1e-5``.

    Parameters passed as ``None`` count as not given. An unknown name or parameter raises
    ``ValueError`` listing the valid ones.
    """
    kw = _resolve(name, params)
    if name == "ce":
        return lambda logits, labels, mask=None: cross_entropy(
            logits, labels, mask=mask, normalize=kw["normalize"]
        )

    def weights(labels, mask, num_classes):
        if kw.get("batch_beta") is None:
            return kw.get("class_weights")
        return batch_class_balanced_weights(labels, kw["batch_beta"], mask, num_classes)

    if name == "cb_ce":
        return lambda logits, labels, mask=None: cross_entropy(
            logits,
            labels,
            weights(labels, mask, logits.shape[-1]),
            mask=mask,
            normalize=kw["normalize"],
        )
    if name in ("focal", "cb_focal"):
        return lambda logits, labels, mask=None: focal_loss(
            logits,
            labels,
            gamma=kw["gamma"],
            class_weights=weights(labels, mask, logits.shape[-1]),
            mask=mask,
            normalize=kw["normalize"],
        )
    if name == "dice":
        return lambda logits, labels, mask=None: dice_loss(logits, labels, mask=mask, **kw)
    return lambda logits, labels, mask=None: dice_ce_loss(logits, labels, mask=mask, **kw)


def loss_params(name: str, num_classes: int = NUM_CLASSES, **params: Any) -> LossParams:
    """Map a registry loss onto :class:`LossParams` for :func:`combined_loss`.

    Same names and parameters as :func:`get_loss`; ``combined_loss(x, y, loss_params(name,
    **kw))`` equals ``get_loss(name, **kw)(x, y)``. Mapping:

    ======== ========= ===== ============== ========== ======================================
    name     ce_weight gamma class_weights  dice_wt    dice settings
    ======== ========= ===== ============== ========== ======================================
    ce       1         0     ones           0          (unused)
    cb_ce    1         0     CB weights     0          (unused)
    focal    1         gamma ones           0          (unused)
    cb_focal 1         gamma CB weights     0          (unused)
    dice     0         0     ones           1          as given (per-sample, linear default)
    dice_ce  ce_weight 0     ones           dice_wt    as given (TransUNet: batch, squared)
    ======== ========= ===== ============== ========== ======================================

    ``ce_by_weights`` is 1 for ``normalize="weights"``; ``dice_class_mask`` is all ones, or
    zero at class 0 for ``include_background=False``. ``class_counts="batch_pixels"`` sets
    ``batch_counts`` 1 and ``beta`` (class_weights then ones, unused).
    """
    kw = _resolve(name, params)
    f = lambda v: jnp.asarray(v, jnp.float32)
    weights = kw.get("class_weights")
    if weights is None:
        weights = np.ones((num_classes,), np.float32)
    elif len(weights) != num_classes:
        raise ValueError(
            f"loss {name!r}: class_weights has {len(weights)} entries, expected {num_classes}"
        )
    is_dice = name in ("dice", "dice_ce")
    cmask = np.ones((num_classes,), np.float32)
    if is_dice and not kw["include_background"]:
        cmask[0] = 0.0
    ce_w = {"dice": 0.0, "dice_ce": kw.get("ce_weight", 0.0)}.get(name, 1.0)
    dice_w = {"dice": 1.0, "dice_ce": kw.get("dice_weight", 0.0)}.get(name, 0.0)
    return LossParams(
        ce_weight=f(ce_w),
        gamma=f(kw.get("gamma", 0.0)),
        class_weights=f(weights),
        ce_by_weights=f(kw.get("normalize", "pixels") == "weights"),
        dice_weight=f(dice_w),
        dice_squared=f(bool(kw["squared"]) if is_dice else False),
        dice_batch=f(bool(kw["batch"]) if is_dice else False),
        dice_class_mask=f(cmask),
        smooth_nr=f(kw["smooth_nr"] if is_dice else 1e-5),
        smooth_dr=f(kw["smooth_dr"] if is_dice else 1e-5),
        batch_counts=f(kw.get("batch_beta") is not None),
        beta=f(kw.get("batch_beta") or 0.0),
    )


def stack_loss_params(params: Sequence[LossParams]) -> LossParams:
    """Stack several :class:`LossParams` along a new leading run axis (for ``jax.vmap``)."""
    if not params:
        raise ValueError("stack_loss_params needs at least one LossParams")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params)


# --------------------------------------------------------------------------------------------
# Region outputs (model.output = "regions")
# --------------------------------------------------------------------------------------------

REGION_LOSS_NAMES = ("ce", "dice", "dice_ce")


def region_targets(labels: jax.Array) -> jax.Array:
    """(B, H, W, 3) float32 region masks WT, TC, ET (`metrics.REGIONS`) of labels (B, H, W)
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


# --------------------------------------------------------------------------------------------
# Deep supervision (model.deep_supervision)
# --------------------------------------------------------------------------------------------


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """(num_outputs,) float64 loss weights of logits at resolutions 1, 1/2, 1/4, ...: nnU-Net's.

    nnU-Net v2 (``nnUNetTrainer._build_loss``) weighs its ``n`` decoder outputs ``1 / 2**i``,
    sets the lowest resolution's weight to 0 and normalises to sum 1. The U-Net here does not
    build that zero-weight head, so its ``num_outputs = n - 1`` weights are ``2**-i`` for
    ``i < num_outputs``, normalised: the same numbers.
    """
    if num_outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, got {num_outputs}")
    w = 0.5 ** np.arange(num_outputs, dtype=np.float64)
    return w / w.sum()


def downsample_labels(labels: jax.Array, factor: int) -> jax.Array:
    """(B, H/f, W/f) nearest down-sampling of (B, H, W) labels as nnU-Net's targets.

    nnU-Net (batchgeneratorsv2 ``DownsampleSegForDSTransform``) uses torch's
    ``interpolate(mode="nearest-exact")``: output pixel ``d`` reads input ``floor((d + 0.5) f)``,
    i.e. ``labels[:, f//2::f, f//2::f]`` for a whole factor ``f`` (``f = 1``: unchanged).
    """
    f = int(factor)
    if f < 1 or labels.shape[1] % f or labels.shape[2] % f:
        raise ValueError(f"labels {labels.shape[1:]} cannot be down-sampled by {factor}")
    return labels[:, f // 2 :: f, f // 2 :: f]


def deep_supervision_loss(
    loss_fn: LossFn, outputs: Sequence[jax.Array], labels: jax.Array, params, weights=None
) -> jax.Array:
    """``sum_i weights[i] * loss_fn(outputs[i], downsample_labels(labels, H / H_i), params)``.

    outputs: logits at decreasing resolution, ``(B, H, W, C), (B, H/2, W/2, C), ...`` (the U-Net's
    train-mode output with ``deep_supervision``); labels: (B, H, W) int at full resolution
    (region targets are made from the down-sampled labels by ``loss_fn``). ``weights``: one per
    output, default :func:`deep_supervision_weights`. Float32 scalar; jit/vmap-safe.
    """
    if weights is None:
        weights = deep_supervision_weights(len(outputs))
    if len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} deep-supervision weights for {len(outputs)} outputs")
    total = jnp.zeros((), jnp.float32)
    for w, logits in zip(weights, outputs, strict=True):
        target = downsample_labels(labels, labels.shape[1] // logits.shape[1])
        total = total + jnp.float32(w) * loss_fn(logits, target, params)
    return total


def output_loss(loss_fn: LossFn, outputs, labels: jax.Array, params) -> jax.Array:
    """``loss_fn(outputs, labels, params)`` for one logits array; for a tuple of them (a
    deep-supervised U-Net in training) :func:`deep_supervision_loss`. Float32 scalar."""
    if isinstance(outputs, tuple):
        return deep_supervision_loss(loss_fn, outputs, labels, params)
    return loss_fn(outputs, labels, params)
