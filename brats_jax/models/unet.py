"""U-Net (Ronneberger et al. 2015) with reflection padding so the output has the input's size.

Defaults are the study's network: features 64-128-256-512-1024 (``features=64, depth=4``),
two 3x3 convs + ReLU per level, 2x2 max-pool, 2x2 transposed-conv up-sampling (halving the
channels), skip concatenated as ``[skip, upsampled]``, 1x1 head, no normalisation, biases on:
31,032,516 parameters for 4 input channels and 4 classes (31,044,292 with ``norm="batch"``,
``"group"`` or ``"instance"``: a scale and a bias per channel of each norm; convolution biases
are kept when a normalisation is used so these counts hold).

nnU-Net's options (``dynamic_network_architectures``, nnU-Net v2's default plans):
``norm="instance"`` (InstanceNorm, eps 1e-5, affine), ``activation="leaky_relu"`` (negative
slope 0.01) and ``deep_supervision``: a 1x1 head on each decoder level ``up_i``,
i = 1..depth-2, besides the full-resolution ``head`` (nnU-Net builds one on the lowest decoder
level too but weighs its loss 0; it is not built here). With ``train=True`` the model then
returns a tuple of logits at decreasing resolution, ``(B,H,W,K), (B,H/2,W/2,K), ...``
(:func:`brats_jax.losses.deep_supervision_loss`); with ``train=False`` the full-resolution
logits only, so evaluation and inference are unchanged.

Parameter tree: ``down_{i}/{conv1,conv2}`` (i = 0..depth-1, finest first), ``bottleneck``,
``upconv_{i}`` and ``up_{i}`` (i = depth-1..0), ``head``; with a normalisation also
``{norm1,norm2}`` inside each block; with deep supervision ``ds_head_{i}`` (i = 1..depth-2).
Convolutions are built only by ``ConvBlock.conv`` / ``UNet._head`` through
:class:`~brats_jax.models.layers.Conv2D`. ``conv_impl`` selects the implementation of the
convolutions, transposed convolutions, max-pools, bias additions and
reflection paddings together (:mod:`brats_jax.ops.impls`): "xla" (plain), "cpu_fast"
(gradients written the way XLA:CPU runs fast), "gpu_fast" (reflection pad and max-pool
gradient written the way XLA:GPU runs fast) or "auto" (cpu_fast on CPUs, gpu_fast on GPUs).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from brats_jax.models.layers import Conv2D, UpConv2x2
from brats_jax.ops.impls import IMPLS, get_ops

NORMS = ("none", "batch", "group", "instance")
ACTIVATIONS = {"relu": nn.relu, "leaky_relu": nn.leaky_relu}  # leaky: slope 0.01 (nnU-Net)
PADDINGS = ("reflect", "zero")


def _norm_layer(norm: str, features: int, train: bool, dtype, name: str):
    if norm == "batch":
        # Flax momentum 0.9 == PyTorch BatchNorm2d momentum 0.1; eps 1e-5 as in PyTorch.
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
        )
    if norm == "group":
        return nn.GroupNorm(num_groups=math.gcd(32, features), epsilon=1e-5, dtype=dtype, name=name)
    if norm == "instance":
        # nnU-Net: InstanceNorm eps 1e-5, affine (per-sample, per-channel over H, W)
        return nn.InstanceNorm(epsilon=1e-5, dtype=dtype, name=name)
    return None


class ConvBlock(nn.Module):
    """Two [3x3 conv (+ norm) + activation]: (B,H,W,Cin) -> (B,H,W,features)."""

    features: int
    padding: str = "reflect"
    norm: str = "none"
    activation: str = "relu"
    dtype: Any = None
    conv_impl: str = "xla"

    def conv(self, features: int, kernel_size: int, name: str) -> Conv2D:
        """The single place convolutions of the U-Net are created (swap via ``conv_impl``)."""
        return Conv2D(
            features, kernel_size, padding=self.padding, impl=self.conv_impl, dtype=self.dtype,
            name=name,
        )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in (1, 2):
            x = self.conv(self.features, 3, name=f"conv{i}")(x)
            norm = _norm_layer(self.norm, self.features, train, self.dtype, f"norm{i}")
            if norm is not None:
                x = norm(x)
            x = ACTIVATIONS[self.activation](x)
        return x


class UNet(nn.Module):
    """The study's U-Net.

    ``__call__(x (B,H,W,Cin) float32, train) -> logits (B,H,W,num_classes) float32``.

    Fields: ``num_classes`` (4), ``features`` (64: channels of the first level, doubled per
    level), ``depth`` (4 poolings: 64-128-256-512-1024), ``padding`` ("reflect" | "zero"),
    ``norm`` ("none" | "batch" | "group" | "instance"), ``activation`` ("relu" |
    "leaky_relu"), ``deep_supervision`` (bool: with ``train=True`` a tuple of logits at
    decreasing resolution, see the module docstring), ``dtype`` (compute dtype, e.g.
    jnp.bfloat16; parameters stay float32), ``conv_impl`` (ops implementation, "xla" | "cpu_fast" |
    "gpu_fast" | "auto", default "xla"; parameters and results do not depend on it beyond
    float32 rounding).
    H and W must be multiples of ``2**depth`` (16 by default). The input channel count is
    taken from x at init (4 for BraTS).
    """

    num_classes: int = 4
    features: int = 64
    depth: int = 4
    padding: str = "reflect"
    norm: str = "none"
    activation: str = "relu"
    deep_supervision: bool = False
    dtype: Any = None
    conv_impl: str = "xla"

    def _block(self, features: int, name: str) -> ConvBlock:
        shared = dict(
            padding=self.padding, norm=self.norm, activation=self.activation, dtype=self.dtype
        )
        return ConvBlock(features, conv_impl=self.conv_impl, name=name, **shared)

    def _head(self, name: str) -> Conv2D:
        return Conv2D(
            self.num_classes,
            1,
            padding="valid",
            impl=self.conv_impl,
            kernel_init=nn.initializers.lecun_normal(),
            dtype=self.dtype,
            name=name,
        )

    def _check(self, x: jax.Array) -> None:
        for field, allowed in (
            ("padding", PADDINGS), ("norm", NORMS), ("activation", tuple(ACTIVATIONS)),
            ("conv_impl", IMPLS),
        ):  # fmt: skip
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"UNet.{field}={getattr(self, field)!r}; expected one of {allowed}"
                )
        if x.ndim != 4:
            raise ValueError(f"UNet input must be (B,H,W,C); got shape {x.shape}")
        m = 2**self.depth
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(
                f"UNet input size {x.shape[1]}x{x.shape[2]} must be a multiple of 2**depth = {m}"
            )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        self._check(x)
        h = x.astype(self.dtype) if self.dtype is not None else x
        skips = []
        for i in range(self.depth):
            h = self._block(self.features * 2**i, f"down_{i}")(h, train)
            skips.append(h)
            h = get_ops(self.conv_impl).max_pool(h)
        h = self._block(self.features * 2**self.depth, "bottleneck")(h, train)
        # deep-supervision heads on up_1..up_{depth-2}; built at init whatever `train` is
        supervise = self.deep_supervision and (train or self.is_initializing())
        aux = {}
        for i in reversed(range(self.depth)):
            h = UpConv2x2(
                self.features * 2**i, impl=self.conv_impl, dtype=self.dtype, name=f"upconv_{i}"
            )(h)
            h = jnp.concatenate([skips[i], h], axis=-1)
            h = self._block(self.features * 2**i, f"up_{i}")(h, train)
            if supervise and 1 <= i <= self.depth - 2:
                aux[i] = self._head(f"ds_head_{i}")(h).astype(jnp.float32)
        logits = self._head("head")(h).astype(jnp.float32)
        if self.deep_supervision and train:
            return (logits, *(aux[i] for i in sorted(aux)))  # decreasing resolution
        return logits
