"""Losses of (B, H, W, C) class logits against integer labels: cross-entropy, focal, soft
Dice and Dice + CE, with the helpers the other loss modules share.

Conventions: see :mod:`brats_jax.losses`."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[..., jax.Array]

# Smallest value (1 - p_t) may take inside the focal modulating factor. Keeps the gradient
# of (1 - p_t) ** gamma finite for 0 <= gamma < 1 when p_t rounds to 1 (the factor is then
# 1e-30 ** gamma instead of 0, multiplied by -log p_t = 0: the value is unchanged).
_FOCAL_EPS = 1e-30

NORMALIZATIONS = ("pixels", "weights")


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
