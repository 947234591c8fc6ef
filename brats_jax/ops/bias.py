"""Adding a per-channel bias, with a bias gradient that XLA:CPU computes fast.

The gradient of ``y + bias`` w.r.t. ``bias`` (C,) is ``dy.sum((0, 1, 2))`` over (B,H,W,C).
XLA:CPU splits that reduction over the three outer axes into a reduce-window and a reduce
(~5 ms for a (4,128,128,64) float32 cotangent on 2 cores); summing the (B*H, W*C) view over
its rows and then the W blocks is one contiguous pass (~1.7 ms). Same sum, another order
(float32 rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bias_add_xla(y: Array, bias: Array) -> Array:
    """y (..., C) + bias (C,), differentiated by XLA."""
    return y + bias


@jax.custom_vjp
def bias_add_fast(y: Array, bias: Array) -> Array:
    """y (B,H,W,C) + bias (C,); the bias gradient sums rows of the (B*H, W*C) view."""
    return y + bias


def _bias_fwd(y, bias):
    return y + bias, bias


def _bias_bwd(bias, dy):
    b, h, w, c = dy.shape
    db = jnp.sum(dy.reshape(b * h, w * c), axis=0, dtype=jnp.float32).reshape(w, c).sum(axis=0)
    return dy, db.astype(bias.dtype)


bias_add_fast.defvjp(_bias_fwd, _bias_bwd)
