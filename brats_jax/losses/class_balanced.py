"""Class-balanced weights (Cui et al. 2019): from fixed counts (host, float64) or from each
batch's labels (jnp), and the per-slice counts they may be built from."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax import NUM_CLASSES
from brats_jax.losses.core import _check_beta, _onehot_and_mask, _safe_divide

# ``class_counts`` value of the cb_* losses asking for weights from each batch's labels.
BATCH_PIXELS = "batch_pixels"
CLASS_COUNTS = (BATCH_PIXELS, "split_pixels", "split_slices")  # train.class_counts


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
        # beta is given exactly, so log(beta) is as exact as log1p(-(1 - beta)) near 1
        denom = -np.expm1(np.where(present, n, 1.0) * math.log(beta))  # 1 - beta**n > 0
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
