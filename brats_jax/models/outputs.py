"""What a network's output channels mean (`model.output`) and how they become labels.

Two kinds:

* ``"classes"`` (the study's): 4 softmax channels, the training classes {0 background,
  1 NCR/NET, 2 ED, 3 ET}; labels are the argmax.
* ``"regions"`` (nnU-Net's way of training BraTS): 3 independent sigmoid channels, the BraTS
  regions in `labels.REGIONS` order (WT, TC, ET); labels are decoded by
  :func:`regions_to_labels` with ET inside TC inside WT.

Every function here works on numpy arrays (host) and on jax arrays (inside ``jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax import NUM_CLASSES
from brats_jax.labels import REGIONS

OUTPUTS = ("classes", "regions")
REGION_CHANNELS = tuple(REGIONS)  # ("WT", "TC", "ET"): the channel order of region outputs
_CHANNELS = {"classes": NUM_CLASSES, "regions": len(REGION_CHANNELS)}


def check_output(output: str) -> str:
    """`output` if it is a known kind, else a one-line ValueError naming model.output."""
    if output not in OUTPUTS:
        raise ValueError(f"model.output {output!r}: expected one of {', '.join(OUTPUTS)}")
    return output


def of_config(model_config) -> str:
    """The validated output kind of a config's `model` section; "classes" for run folders
    written before the field existed."""
    return check_output(model_config.get("output", "classes"))


def num_channels(output: str) -> int:
    """Output channels of the network: 4 for "classes", 3 for "regions"."""
    return _CHANNELS[check_output(output)]


def probabilities(logits, output: str):
    """float32 probabilities (..., C) of logits (..., C): softmax over the classes, or an
    independent sigmoid per region."""
    x = jnp.asarray(logits).astype(jnp.float32)
    if check_output(output) == "regions":
        return jax.nn.sigmoid(x)
    return jax.nn.softmax(x, axis=-1)


def regions_to_labels(probs, threshold: float = 0.5):
    """Training labels (...) int32 of region probabilities (..., 3) in WT, TC, ET order.

    A region is predicted where its probability exceeds `threshold`, then nested: ET only
    inside TC, TC only inside WT (an inconsistent pixel loses the inner region). Labels:
    ET -> 3, TC but not ET -> 1 (NCR/NET), WT but not TC -> 2 (ED), else 0.
    numpy in -> numpy out; jax in -> jax out.
    """
    xp = jnp if isinstance(probs, jax.Array) else np
    probs = xp.asarray(probs)
    if probs.shape[-1] != len(REGION_CHANNELS):
        raise ValueError(f"region probabilities must be (..., 3) WT, TC, ET; got {probs.shape}")
    wt = probs[..., 0] > threshold
    tc = (probs[..., 1] > threshold) & wt
    et = (probs[..., 2] > threshold) & tc
    return xp.where(et, 3, xp.where(tc, 1, xp.where(wt, 2, 0))).astype(xp.int32)


def labels_from_probabilities(probs, output: str):
    """Training labels (...) int32 in {0..3} of probabilities (..., C) of either kind
    (argmax of class probabilities, :func:`regions_to_labels` of region probabilities), e.g.
    of :func:`probabilities` or of an ensemble's averaged probabilities."""
    xp = jnp if isinstance(probs, jax.Array) else np
    if check_output(output) == "regions":
        return regions_to_labels(probs)
    return xp.argmax(xp.asarray(probs), axis=-1).astype(xp.int32)
