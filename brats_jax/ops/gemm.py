"""Convolution as one GEMM over im2col patches, so that K stacked runs become batched GEMMs.

``jax.vmap`` over runs (one set of weights per run) turns ``lax.conv_general_dilated`` into a
grouped convolution (``feature_group_count=K``), which cuDNN runs slowly, and ``lax.map``
runs the K programs one after another. Written as

    patches = im2col(x)                     (B, H', W', kh*kw*Cin)
    y = patches @ kernel.reshape(-1, Cout)  (B, H', W', Cout)

the convolution has no convolution primitive left: under ``jax.vmap`` over runs the matrix
product becomes one batched GEMM ``einsum('kbpi,kio->kbpo')`` (batch dimension = the run),
and so do its two gradients (``dpatches = dy @ W^T``, ``dW = patches^T @ dy``), whose im2col
transpose is a sum of padded slices. The 2x2 stride-2 transposed convolution
(:func:`~brats_jax.ops.upconv.upconv2x2_xla`) and the 1x1 head already are single einsums.

For one run on its own the library's convolutions (cuDNN / XLA:CPU) are faster: this
formulation is for K stacked runs (a model built with ``conv_impl="gemm"``, its train step
mapped with ``jax.vmap`` over runs). Patches take kh*kw times the activation memory of a layer.
Results equal ``lax.conv_general_dilated``'s up to float32 summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _pads(padding, kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":
        return ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
    (a, b), (c, d) = padding
    return (int(a), int(b)), (int(c), int(d))


def im2col(x: Array, kernel_hw: Sequence[int], strides: Sequence[int], padding) -> Array:
    """Patches of x (B,H,W,C) for a (kh,kw) kernel -> (B,H',W',kh*kw*C).

    Channel index ``(i*kw + j)*C + c`` holds ``xpad[b, h*sh + i, w*sw + j, c]``, the order of
    an HWIO kernel reshaped to (kh*kw*C, Cout). ``padding``: "VALID", "SAME" or
    ((lo,hi),(lo,hi)) zero paddings, as ``lax.conv_general_dilated``.
    """
    kh, kw = kernel_hw
    sh, sw = strides
    ph, pw = _pads(padding, kh, kw)
    if any(ph) or any(pw):
        x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    _, hp, wp, _ = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if kh == kw == 1 and sh == sw == 1:
        return x
    views = [
        lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, x.shape[3]),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(views, axis=-1)


def conv2d_gemm(x: Array, kernel: Array, strides: Sequence[int] = (1, 1), padding="VALID") -> Array:
    """x (B,H,W,Cin), kernel (kh,kw,Cin,Cout) -> (B,H',W',Cout) as im2col + one matrix product.

    Same signature and values (to float32 rounding) as
    :func:`~brats_jax.ops.conv.conv2d_xla`; under ``jax.vmap`` with a batched kernel it is a
    batched GEMM instead of a grouped convolution.
    """
    kh, kw, cin, cout = kernel.shape
    patches = im2col(x, (kh, kw), tuple(strides), padding)
    return jnp.einsum("bhwi,io->bhwo", patches, kernel.reshape(kh * kw * cin, cout))
