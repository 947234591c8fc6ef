"""Losses chosen by name (`train.loss`): the registry of :func:`get_loss`, and the
array-parameterised :func:`combined_loss` whose :class:`LossParams` let runs with different
losses share one compiled (vmapped) step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax import NUM_CLASSES
from brats_jax.losses.class_balanced import (
    BATCH_PIXELS,
    _batch_weights,
    batch_class_balanced_weights,
    class_balanced_weights,
)
from brats_jax.losses.core import (
    LossFn,
    _check_beta,
    _check_normalize,
    _focal_terms,
    _mean_over_counted_samples,
    _onehot_and_mask,
    _prepare,
    _weighted_mean,
    cross_entropy,
    dice_ce_loss,
    dice_loss,
    focal_loss,
)


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
