"""The U-Net's operations by implementation name: one switch for convolutions, transposed
convolutions, max-pools, bias additions and reflection padding.

* ``"xla"``: plain JAX/XLA ops, differentiated by XLA.
* ``"cpu_fast"``: the same arithmetic with gradients written the way XLA:CPU runs fast
  (:mod:`brats_jax.ops.conv`, ``.upconv``, ``.pool``, ``.bias``, ``.pad``); identical
  forward values except the transposed convolution, gradients identical or equal up to
  float32 summation order.
* ``"gpu_fast"``: the plain ops, except the reflection pad (a zero pad whose border is then
  written in place, :func:`~brats_jax.ops.pad.reflect_pad_dus`; ``jnp.pad(mode="reflect")``
  becomes two slow concatenations on XLA:GPU) and the max-pool gradient (an element-wise
  mask, :func:`~brats_jax.ops.pool.max_pool_2x2_fast`, instead of ``select_and_scatter``):
  the U-Net train step at 240x240, batch 16, bfloat16 on an H200 takes 11.5 ms instead of
  15.2 ms (BENCHMARKS.md).
* ``"gemm"``: convolutions as im2col + one matrix product (:mod:`brats_jax.ops.gemm`), the
  rest as ``"gpu_fast"``: for K stacked runs under ``jax.vmap``, where every weight-carrying
  layer becomes one batched GEMM over the runs instead of a grouped convolution.
* ``"auto"``: ``"cpu_fast"`` when JAX's default backend is the CPU, ``"gpu_fast"`` on GPUs,
  else ``"xla"`` (TPUs: not measured).
* :func:`resolve_impl` turns "auto" into one of these, and "cpu_fast" into "cpu_fast_ynn"
  when ``XLA_FLAGS`` leave XLA:CPU's YNN fusions on (its weight-gradient choices differ), so
  the environment is read once, at start (``runtime.resolve_ops``), and a model given a
  resolved name never reads it while traced.

Parameters do not depend on the implementation, so checkpoints are interchangeable.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from brats_jax.ops import bias, conv, gemm, pad, pool, upconv
from brats_jax.ops.flags import ynn_disabled

IMPLS = ("xla", "cpu_fast", "cpu_fast_ynn", "gpu_fast", "gemm", "auto")


@dataclasses.dataclass(frozen=True)
class Ops:
    """One implementation of each operation (NHWC activations, HWIO kernels).

    ``conv(x (B,H,W,Cin), kernel (kh,kw,Cin,Cout), strides (sh,sw), padding) -> (B,H',W',Cout)``
    with ``padding`` "VALID" or ((lo,hi),(lo,hi)) zero paddings, as ``lax.conv_general_dilated``;
    ``upconv(x (B,H,W,Cin), kernel (2,2,Cin,Cout)) -> (B,2H,2W,Cout)`` (2x2 stride-2 transposed
    conv); ``max_pool(x (B,H,W,C)) -> (B,H/2,W/2,C)`` (2x2 stride 2);
    ``bias_add(y (B,H,W,C), bias (C,)) -> (B,H,W,C)``;
    ``reflect_pad(x (B,H,W,C), (p, q)) -> (B,H+2p,W+2q,C)`` (numpy "reflect").
    """

    conv: Callable
    upconv: Callable
    max_pool: Callable
    bias_add: Callable
    reflect_pad: Callable


OPS = {
    "xla": Ops(
        conv.conv2d_xla,
        upconv.upconv2x2_xla,
        pool.max_pool_2x2_xla,
        bias.bias_add_xla,
        pad.reflect_pad_xla,
    ),
    # weight-gradient strategies picked for YNN fusions off (runtime.setup's flags) or on,
    # decided once by `resolve_impl`, never while a model is traced
    "cpu_fast": Ops(
        functools.partial(conv.conv2d_fast, strategy="auto_ynn_off"),
        upconv.upconv2x2_rows,
        pool.max_pool_2x2_fast,
        bias.bias_add_fast,
        pad.reflect_pad_fast,
    ),
    "cpu_fast_ynn": Ops(
        functools.partial(conv.conv2d_fast, strategy="auto_ynn_on"),
        upconv.upconv2x2_rows,
        pool.max_pool_2x2_fast,
        bias.bias_add_fast,
        pad.reflect_pad_fast,
    ),
    "gpu_fast": Ops(
        conv.conv2d_xla,
        upconv.upconv2x2_xla,
        pool.max_pool_2x2_fast,
        bias.bias_add_xla,
        pad.reflect_pad_dus,
    ),
    # K stacked runs under jax.vmap: convolutions as batched GEMMs (brats_jax.ops.gemm).
    "gemm": Ops(
        gemm.conv2d_gemm,
        upconv.upconv2x2_xla,
        pool.max_pool_2x2_fast,
        bias.bias_add_xla,
        pad.reflect_pad_dus,
    ),
}


def resolve_impl(impl: str) -> str:
    """``impl`` with "auto" replaced by the default backend's choice ("cpu_fast" on "cpu",
    "gpu_fast" on "gpu", else "xla"), and "cpu_fast" by "cpu_fast_ynn" when ``XLA_FLAGS``
    leave YNN fusions on; a ValueError names an unknown implementation."""
    if impl == "auto":
        impl = {"cpu": "cpu_fast", "gpu": "gpu_fast"}.get(jax.default_backend(), "xla")
    if impl == "cpu_fast" and not ynn_disabled():  # XLA_FLAGS read here, once, not in tracing
        impl = "cpu_fast_ynn"
    if impl not in OPS:
        raise ValueError(f"unknown ops implementation {impl!r}; expected one of {IMPLS}")
    return impl


def get_ops(impl: str) -> Ops:
    """The :class:`Ops` for ``impl`` (one of ``IMPLS``). A resolved name is looked up as it is
    (nothing is read from the environment); "auto" is resolved first (:func:`resolve_impl`)."""
    if impl == "auto":
        impl = resolve_impl(impl)
    if impl not in OPS:
        raise ValueError(f"unknown ops implementation {impl!r}; expected one of {IMPLS}")
    return OPS[impl]
