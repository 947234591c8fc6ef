"""Whole-volume inference: predict every axial slice of a 3D case in fixed-size batches.

One compiled function serves every volume: slices are fed in batches of a fixed size (the
last batch is padded), so a new case never triggers recompilation.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax import outputs
from brats_jax.data.context import context_positions, stack_context
from brats_jax.data.pipeline import pad_batch

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


def make_slice_predictor(model, *, image_size: int, tta: str = "none", output: str = "classes"):
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
    """
    if tta not in _TTA_FLIPS:
        raise ValueError(f"tta {tta!r}: expected one of {TTA_MODES}")
    flips = _TTA_FLIPS[tta]
    outputs.check_output(output)

    @jax.jit
    def predict(variables, images: jax.Array) -> jax.Array:
        height, width = images.shape[1:3]
        x = images
        if image_size and (height, width) != (image_size, image_size):
            x = jax.image.resize(  # as training resized (common.resize_image): no antialias
                x,
                (x.shape[0], image_size, image_size, x.shape[-1]),
                method="linear",
                antialias=False,
            )
        probs = 0.0
        for axes in flips:  # a mirror image in, its probabilities mirrored back
            logits = model.apply(variables, _flip(x, axes), train=False)
            probs += _flip(outputs.probabilities(logits, output), axes)
        probs = probs / len(flips)
        if probs.shape[1:3] != (height, width):
            probs = jax.image.resize(
                probs,
                (probs.shape[0], height, width, probs.shape[-1]),
                method="linear",
                antialias=False,
            )
        return probs

    return predict


def _flip(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.flip(x, axes) if axes else x


def predict_volume(
    predict: SliceFn, variables, volume: np.ndarray, *, batch_size: int, context_slices: int = 0
) -> np.ndarray:
    """Class probabilities for every axial slice of a volume.

    Args:
      predict: a function from `make_slice_predictor`.
      variables: the model's variables ({"params": ..., maybe "batch_stats": ...}).
      volume: float32 (H, W, D, 4) normalised modalities, D = number of axial slices.
      batch_size: slices per call; the last batch is padded to this size.
      context_slices: the run's `data.context_slices` k; each batch's slices are fed with
        their context windows, 4 (2k+1) channels (`data.context`), built per batch.

    Returns:
      float32 (H, W, D, C) probabilities.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected a volume of shape (H, W, D, 4), got {volume.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: expected at least 1 slice per call")
    positions = context_positions(volume.shape[2], context_slices)  # (D, 2k+1)
    out = []
    for start in range(0, len(positions), batch_size):
        chunk = stack_context(volume, positions[start : start + batch_size])  # (n, H, W, C)
        n = chunk.shape[0]
        chunk, _ = pad_batch(chunk, batch_size)  # padding rows' outputs are dropped
        out.append(np.asarray(predict(variables, jnp.asarray(chunk)))[:n])
    return np.moveaxis(np.concatenate(out), 0, 2)
