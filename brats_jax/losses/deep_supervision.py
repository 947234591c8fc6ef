"""Deep supervision (``model.deep_supervision``): nnU-Net's per-level weights, labels
nearest-down-sampled to each level, the summed loss."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax.losses.core import LossFn


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
