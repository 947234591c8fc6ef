"""Whole-volume inference: predict every axial slice of a 3D case in fixed-size batches.

One compiled function serves every volume: slices are fed in batches of a fixed size (the
last batch is padded), so a new case never triggers recompilation. A model trained on
patches may see each slice through a sliding window of the patch size (`window`), tiled as
nnU-Net tiles (half-overlapping windows, Gaussian weights); the windows' probabilities are
averaged (nnU-Net averages logits and takes the softmax once).
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax.data.context import context_positions, stack_context
from brats_jax.data.pipeline import pad_batch
from brats_jax.models import outputs

SliceFn = Callable[[dict, jax.Array], jax.Array]


TTA_MODES = ("none", "flips", "flips_ud")
# Mirrored copies per mode, as axes of a (B, H, W, C) slice batch to flip: axis 1 is the
# NIfTI voxel axis 0 (x, left-right, the axis `data.random_flip` flips), axis 2 is y
# (anterior-posterior, "up-down" in a displayed axial slice).
_TTA_FLIPS = {
    "none": ((),),
    "flips": ((), (1,)),
    "flips_ud": ((), (1,), (2,), (1, 2)),
}


def tta_flip_axes(tta: str) -> tuple[tuple[int, ...], ...]:
    """The mirror images a `tta` mode averages: per view, the axes of a (B, H, W, C) slice
    batch flipped (() = the slices as they are); ValueError for an unknown mode."""
    if tta not in _TTA_FLIPS:
        raise ValueError(f"tta {tta!r}: expected one of {TTA_MODES}")
    return _TTA_FLIPS[tta]


def window_starts(size: int, window: int) -> list[int]:
    """Offsets (pixels) of the sliding windows of `window` pixels along an axis of `size`:
    the fewest windows that overlap by at least half a window (nnU-Net's tile_step_size 0.5:
    ceil((size - window) / (window / 2)) + 1 of them), evenly spaced from 0 to size - window,
    rounded. E.g. (240, 128) -> [0, 56, 112]."""
    if not 0 < window <= size:
        raise ValueError(
            f"sliding window of {window} px over {size} px: expected 0 < window <= size"
        )
    n = math.ceil((size - window) / (window / 2)) + 1
    if n == 1:
        return [0]
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def gaussian_weights(window: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """(window, window) float32 tile weights: exp(-d^2 / (2 sigma^2)), d the distance in
    pixels from the tile's centre, sigma = window * sigma_scale, maximum 1 at the centre
    (nnU-Net's `compute_gaussian`, written in closed form), so a tile's borders, where its
    convolutions see padding, count least where tiles overlap."""
    sigma = window * sigma_scale
    d = np.arange(window) - (window - 1) / 2
    g = np.exp(-(d**2) / (2 * sigma**2))
    return np.outer(g, g).astype(np.float32) / np.float32(g.max() ** 2)


def _windowed(probabilities: Callable, x: jax.Array, window: int) -> jax.Array:
    """`probabilities` (a (n, w, w, C) -> (n, w, w, K) function) of the (B, H, W, C) slices
    `x` through sliding `window` tiles (`window_starts`), their outputs averaged with
    `gaussian_weights` where they overlap. One model call per tile position (`lax.map`)."""
    height, width = x.shape[1:3]
    offsets = [(y, z) for y in window_starts(height, window) for z in window_starts(width, window)]
    tiles = jnp.stack([x[:, y : y + window, z : z + window] for y, z in offsets])
    probs = jax.lax.map(probabilities, tiles)  # (T, B, w, w, K)
    weight = jnp.asarray(gaussian_weights(window))[:, :, None]
    total = jnp.zeros((*x.shape[:3], probs.shape[-1]), probs.dtype)
    norm = jnp.zeros((height, width, 1), jnp.float32)
    for t, (y, z) in enumerate(offsets):
        total = total.at[:, y : y + window, z : z + window].add(probs[t] * weight)
        norm = norm.at[y : y + window, z : z + window].add(weight)
    return total / norm


def make_slice_predictor(
    model,
    *,
    image_size: int,
    tta: str = "none",
    output: str = "classes",
    window: int = 0,
    logits: bool = False,
):
    """Jitted `f(variables, images (B,H,W,4) float32) -> probabilities (B,H,W,C) float32`.

    `output` (the config's `model.output`): "classes" gives softmax probabilities of the 4
    classes, "regions" sigmoid probabilities of WT, TC, ET (`outputs.probabilities`); turn
    either into labels with `outputs.labels_from_probabilities`.

    Slices of any native size H,W are resized to `image_size` (0 = native) before the model,
    bilinearly without antialiasing as training resizes them (`data.resize_image`), and the
    class probabilities are resized back to H,W (bilinear on probabilities), so the
    output is at the input's resolution. `variables` is an argument, not a constant, so
    one compilation serves every checkpoint of the same architecture.

    `tta` (test-time augmentation): "none"; "flips" averages the probabilities of the slices
    and of their left-right mirror images (mirrored back); "flips_ud" also of the up-down and
    of the both-ways mirror images (4 model calls per batch). All inside the one function.

    `window` > 0 (pixels, at `image_size`; `data.patches.inference_window` of a run): the
    model sees each (resized) slice through sliding windows of that size (`window_starts`,
    `gaussian_weights`: nnU-Net's sliding-window inference), not whole; 0 = whole slices.

    `logits=True` returns the logits instead of probabilities: mirror views and windows
    averaged, resized back alike (the order nnU-Net uses: it averages and resamples logits).
    Temperature scaling (`brats_jax.inference.temperature`): `f(variables, images,
    temperature)` with a (C,) float32 array returns (B,H,W,2C) from the same model calls:
    channels :C the probabilities as above, channels C: softmax / sigmoid of those logits
    divided by `temperature` (per channel): exactly the probabilities a temperature fitted on
    the `logits=True` output describes. (At T = 1 they differ from channels :C only where
    views, windows or resizing mix neighbouring logits, i.e. at boundaries.)
    """
    flips = tta_flip_axes(tta)
    outputs.check_output(output)

    @jax.jit
    def predict(variables, images: jax.Array, temperature=None) -> jax.Array:
        height, width = images.shape[1:3]
        x = images
        if image_size and (height, width) != (image_size, image_size):
            x = jax.image.resize(  # as training resized (common.resize_image): no antialias
                x,
                (x.shape[0], image_size, image_size, x.shape[-1]),
                method="linear",
                antialias=False,
            )

        def model_probs(images):
            z = model.apply(variables, images, train=False)
            if logits:
                return z.astype(jnp.float32)
            p = outputs.probabilities(z, output)
            if temperature is None:
                return p
            return jnp.concatenate([p, z.astype(jnp.float32)], -1)  # logits: scaled at the end

        probs = 0.0
        for axes in flips:  # a mirror image in, its probabilities mirrored back
            flipped = _flip(x, axes)
            p = _windowed(model_probs, flipped, window) if window else model_probs(flipped)
            probs += _flip(p, axes)
        probs = probs / len(flips)
        if probs.shape[1:3] != (height, width):
            probs = jax.image.resize(
                probs,
                (probs.shape[0], height, width, probs.shape[-1]),
                method="linear",
                antialias=False,
            )
        if temperature is not None:  # the averaged, resized logits / T -> probabilities
            c = probs.shape[-1] // 2
            scaled = outputs.probabilities(probs[..., c:] / temperature, output)
            probs = jnp.concatenate([probs[..., :c], scaled], -1)
        return probs

    return predict


def _flip(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.flip(x, axes) if axes else x


def predict_volume(
    predict: SliceFn,
    variables,
    volume: np.ndarray,
    *,
    batch_size: int,
    context_slices: int = 0,
    temperature=None,
) -> np.ndarray:
    """Class probabilities for every axial slice of a volume.

    Args:
      predict: a function from `make_slice_predictor`.
      variables: the model's variables ({"params": ..., maybe "batch_stats": ...}).
      volume: float32 (H, W, D, 4) normalised modalities, D = number of axial slices.
      batch_size: slices per call; the last batch is padded to this size.
      context_slices: the run's `data.context_slices` k; each batch's slices are fed with
        their context windows, 4 (2k+1) channels (`data.context`), built per batch.
      temperature: None, or (C,) temperatures: `predict`'s third argument (then 2C channels
        come back, see `make_slice_predictor`).

    Returns:
      float32 (H, W, D, C) probabilities (2C with a temperature; C logits from a
      `logits=True` predictor).
    """
    if volume.ndim != 4:
        raise ValueError(f"expected a volume of shape (H, W, D, 4), got {volume.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1 slice per call")
    positions = context_positions(volume.shape[2], context_slices)  # (D, 2k+1)
    slices = np.ascontiguousarray(np.moveaxis(volume, 2, 0), np.float32)  # (D, H, W, 4)
    args = () if temperature is None else (jnp.asarray(temperature, jnp.float32),)
    pending = []  # each batch is dispatched without waiting for the one before (JAX runs
    # calls asynchronously), so the next batch is stacked while the model computes
    for start in range(0, len(positions), batch_size):
        chunk = stack_context(slices, positions[start : start + batch_size])  # (n, H, W, C)
        n = chunk.shape[0]
        chunk, _ = pad_batch(chunk, batch_size)  # padding rows' outputs are dropped
        pending.append((predict(variables, jnp.asarray(chunk), *args), n))
    out = np.concatenate([np.asarray(probs)[:n] for probs, n in pending])
    return np.moveaxis(out, 0, 2)
