"""Building blocks shared by the models: padded convolutions with a swappable implementation,
the 2x2 stride-2 transposed convolution, weight-standardised convolution and align-corners
bilinear up-sampling.

Every layer takes NHWC activations and HWIO kernels, keeps its parameters in ``param_dtype``
(float32) and computes in ``dtype`` (e.g. bfloat16) when one is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brats_jax.ops.impls import IMPLS, get_ops

Array = jax.Array
Dtype = Any

PADDING_MODES = ("reflect", "zero", "valid")

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
"""He (Kaiming) normal initialiser for ReLU networks: variance 2 / fan_in."""


class Conv2D(nn.Module):
    """k x k convolution (stride 1 or more) with reflect / zero / no padding and optional bias;
    ``impl`` selects the implementation (see :mod:`brats_jax.ops.impls`).

    x: (B,H,W,Cin) -> (B,H',W',features); with padding "reflect" or "zero" and stride 1 the
    output has the input's size (odd k). Parameters: ``kernel`` (k,k,Cin,features), ``bias``.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: str = "zero"
    use_bias: bool = True
    impl: str = "xla"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = he_normal
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.padding not in PADDING_MODES:
            raise ValueError(f"Conv2D padding={self.padding!r}; expected one of {PADDING_MODES}")
        if self.impl not in IMPLS:
            raise ValueError(f"Conv2D impl={self.impl!r}; expected one of {IMPLS}")
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        lo, hi = (k - 1) // 2, k // 2
        ops = get_ops(self.impl)
        if self.padding == "reflect" and k > 1:
            if lo != hi:
                raise ValueError(f"Conv2D: reflect padding needs an odd kernel size, got {k}")
            x = ops.reflect_pad(x, (lo, lo))
            padding = "VALID"
        elif self.padding == "zero":
            padding = ((lo, hi), (lo, hi))
        else:
            padding = "VALID"
        y = ops.conv(x, kernel, (self.strides, self.strides), padding)
        if bias is not None:
            y = ops.bias_add(y, bias)
        return y


class UpConv2x2(nn.Module):
    """2x2 transposed convolution with stride 2 (the U-Net up-sampling), as matrix products.

    x: (B,H,W,Cin) -> (B,2H,2W,features) with
    ``y[b, 2h+i, 2w+j, :] = x[b, h, w, :] @ kernel[i, j] + bias`` (= PyTorch
    ``ConvTranspose2d(Cin, features, 2, stride=2)`` with
    ``weight[c, d, i, j] = kernel[i, j, c, d]``). ``impl``: see :mod:`brats_jax.ops.impls`.
    """

    features: int
    use_bias: bool = True
    impl: str = "xla"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.impl not in IMPLS:
            raise ValueError(f"UpConv2x2 impl={self.impl!r}; expected one of {IMPLS}")
        kernel = self.param(
            "kernel", self.kernel_init, (2, 2, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        ops = get_ops(self.impl)
        y = ops.upconv(x, kernel)
        if bias is not None:
            y = ops.bias_add(y, bias)
        return y


def standardize_weight(kernel: Array, eps: float = 1e-5) -> Array:
    """Weight standardisation of an HWIO kernel per output channel, in float32.

    ``(w - mean) / sqrt(var + eps)`` over (H, W, Cin) with the biased variance, as the
    official TransUNet ``StdConv2d`` does (Google's JAX code uses ``/ (std + 1e-5)``;
    the two differ by < 1e-4 relative for any trained kernel).
    """
    w = kernel.astype(jnp.float32)
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    return (w - mean) * jax.lax.rsqrt(var + eps)


class StdConv(nn.Module):
    """Weight-standardised convolution (BiT / ResNet v2), no bias, explicit symmetric padding.

    x: (B,H,W,Cin) -> (B,floor((H+2p-k)/s)+1, ..., features).
    Parameter ``kernel`` (k,k,Cin,features). ``impl``: the convolution of
    :mod:`brats_jax.ops.impls` ("xla" default; "gemm" for K stacked runs under vmap).
    """

    features: int
    kernel_size: int
    strides: int = 1
    pad: int = 0
    eps: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        kernel = standardize_weight(kernel, self.eps)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        p = self.pad
        return get_ops(self.impl).conv(x, kernel, (self.strides, self.strides), ((p, p), (p, p)))


def align_corners_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of 1-D linear interpolation with align_corners=True semantics.

    Output sample i sits at source coordinate ``i * (n_in - 1) / (n_out - 1)`` (0 when
    n_out == 1). Returns ``(lo, hi, frac)``: int32 (n_out,), int32 (n_out,), float32 (n_out,)
    with ``out[i] = (1 - frac[i]) * in[lo[i]] + frac[i] * in[hi[i]]``.
    """
    if n_out == 1 or n_in == 1:
        src = np.zeros(n_out, np.float64)
    else:
        src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(src).astype(np.int32), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1).astype(np.int32)
    frac = src - lo
    return lo, hi, frac


def resize_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of (B,H,W,C) to (B,size[0],size[1],C) with align_corners=True.

    Matches PyTorch ``nn.UpsamplingBilinear2d`` / ``F.interpolate(..., mode="bilinear",
    align_corners=True)``: corner pixels map onto corner pixels. Computes in x's dtype.
    """
    _, h, w, _ = x.shape
    for axis, (n_in, n_out) in ((1, (h, size[0])), (2, (w, size[1]))):
        if n_in == n_out:
            continue
        lo, hi, frac = align_corners_weights(n_in, n_out)
        shape = [1, 1, 1, 1]
        shape[axis] = n_out
        f = jnp.asarray(frac, x.dtype).reshape(shape)
        x = jnp.take(x, lo, axis=axis) * (1 - f) + jnp.take(x, hi, axis=axis) * f
    return x


def upsample2x_bilinear(x: Array) -> Array:
    """(B,H,W,C) -> (B,2H,2W,C) bilinear, align_corners=True (TransUNet's up-sampling)."""
    return resize_bilinear_align_corners(x, (2 * x.shape[1], 2 * x.shape[2]))
