"""2D convolution with gradients written the way XLA:CPU runs them fast (a ``jax.custom_vjp``).

The forward pass is the plain XLA convolution (bit-identical). The backward pass computes:

* the input gradient as the convolution XLA's own transpose rule emits, but with the spatial
  reversal done on the smaller of kernel and activations, or, for small images and batches,
  as one GEMM plus a col2im sum (:func:`input_grad`);
* the weight gradient ``dW[i,j,c,o] = sum_{b,h,w} x[b,h+i,w+j,c] * dy[b,h,w,o]`` by a
  per-shape strategy (:func:`weight_grad`). With YNN fusions on (jaxlib 0.10's default),
  XLA:CPU's weight-gradient convolutions are 3-10x slower than PyTorch's and large matrix
  products (``lax.dot_general``) win; with them off (:mod:`brats_jax.ops.flags`) XLA's own
  is fastest except for 1x1 kernels. Results equal the plain gradient up to float32
  summation order (relative differences ~1e-6).

Strategies for the weight gradient (``WGRAD_STRATEGIES``), all exact rewrites of the sum:

* ``"xla"``: XLA's own transpose of the convolution (the reference).
* ``"im2col"``: concatenate the kh*kw shifted views of x along channels -> (N, kh*kw*Cin),
  one GEMM with dy (N, Cout). Best when that patch matrix is small (deep, low-resolution layers).
* ``"shift"``: kw column-shifted copies of x (N', kw*Cin) and kh row-shifted, zero-padded
  copies of dy (N', kh*Cout) over the padded grid, one GEMM -> all (i, j) blocks at once.
  Moves ~3x (not 9x) the activations; best at high resolution.
* ``"dots"``: kh*kw GEMMs of sliced views, summed into the kernel.
* ``"auto"``: picked per layer shape by :func:`pick_wgrad_strategy` (measured on a 2-core
  Xeon VM, see BENCHMARKS.md): mostly "xla" when YNN fusions are off (see
  :mod:`brats_jax.ops.flags`, the bigger win), else im2col / shift.

Layout: NHWC activations, HWIO kernels (flax / ``brats_jax.models.layers`` convention).
Only stride 1 uses the custom gradient; strided or dilated convolutions fall back to XLA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from brats_jax.ops.flags import ynn_disabled

Array = jax.Array
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
WGRAD_STRATEGIES = ("auto", "auto_ynn_off", "auto_ynn_on", "xla", "im2col", "shift", "dots")
_AUTO_YNN_OFF = {"auto": None, "auto_ynn_off": True, "auto_ynn_on": False}
"""The "auto" strategies: "auto" reads ``XLA_FLAGS`` while tracing (:func:`flags.ynn_disabled`);
"auto_ynn_off" / "auto_ynn_on" carry that answer, resolved once at start by the ops table
(``ops.impls.resolve_impl``), so a model never reads the environment while it is traced."""

_IM2COL_MAX_BYTES = 24 * 2**20
"""'auto' uses im2col while the (N, kh*kw*Cin) patch matrix stays below this size."""

_IM2COL_SMALL_BYTES = 10 * 2**20
"""With YNN fusions off, 'auto' uses im2col up to this patch size (else XLA's own): e.g.
8x8x1024 -> 1024 at batch 4 (9 MiB), 26 ms vs 34 ms; from ~16x16x512 on XLA's is faster."""


def conv2d_xla(x: Array, kernel: Array, strides: Sequence[int] = (1, 1), padding="VALID") -> Array:
    """Plain XLA convolution: x (B,H,W,Cin), kernel (kh,kw,Cin,Cout) -> (B,H',W',Cout).

    ``padding`` is ``"VALID"``, ``"SAME"`` or ``((lo,hi),(lo,hi))`` zero paddings, as for
    ``lax.conv_general_dilated``; output dtype follows the inputs.
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=padding,
        dimension_numbers=DIMENSION_NUMBERS,
    )


def pick_wgrad_strategy(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    itemsize: int = 4,
    ynn_off: bool | None = None,
) -> str:
    """Weight-gradient strategy for a stride-1 VALID conv of x (B,Hp,Wp,Cin) with kernel
    (kh,kw,Cin,Cout): "im2col" (a single GEMM) for 1x1 kernels (2x faster than XLA's for the
    U-Net head). When XLA_FLAGS disable YNN fusions (:func:`flags.ynn_disabled`), "im2col"
    while the (N, kh*kw*Cin) patch matrix is at most ``_IM2COL_SMALL_BYTES`` and XLA's own
    ("xla") above; with YNN on, "im2col" up to ``_IM2COL_MAX_BYTES`` and "shift" above.
    ``ynn_off``: whether YNN fusions are off (None: read ``XLA_FLAGS`` now)."""
    b, hp, wp, cin = x_shape
    kh, kw = kernel_shape[:2]
    if kh == 1 and kw == 1:
        return "im2col"  # one GEMM, no patch copies, no layout transposes
    patch_bytes = b * (hp - kh + 1) * (wp - kw + 1) * kh * kw * cin * itemsize
    if ynn_disabled() if ynn_off is None else ynn_off:
        # XLA's own weight gradient is fastest, except for small patch matrices (deep layers).
        return "im2col" if patch_bytes <= _IM2COL_SMALL_BYTES else "xla"
    return "im2col" if patch_bytes <= _IM2COL_MAX_BYTES else "shift"


def _gemm_tn(a: Array, b: Array) -> Array:
    """a (N, M), b (N, K) -> a^T b (M, K), accumulated in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def weight_grad(x: Array, dy: Array, kernel_shape: Sequence[int], strategy: str = "auto") -> Array:
    """Gradient of ``sum(conv2d_xla(x, w, VALID) * dy)`` w.r.t. w, without XLA's conv transpose.

    x: (B,Hp,Wp,Cin) (already padded), dy: (B,H,W,Cout) with H = Hp-kh+1, W = Wp-kw+1.
    Returns float32 (kh,kw,Cin,Cout). ``strategy`` is one of ``WGRAD_STRATEGIES``.
    """
    kh, kw, cin, cout = kernel_shape
    b, hp, wp, _ = x.shape
    h, w = hp - kh + 1, wp - kw + 1
    if dy.shape != (b, h, w, cout):
        raise ValueError(
            f"weight_grad: dy shape {dy.shape} does not match x {x.shape} and "
            f"kernel {tuple(kernel_shape)} (expected {(b, h, w, cout)})"
        )
    if strategy in _AUTO_YNN_OFF:
        strategy = pick_wgrad_strategy(
            x.shape, kernel_shape, x.dtype.itemsize, ynn_off=_AUTO_YNN_OFF[strategy]
        )
    if strategy == "xla":
        _, vjp = jax.vjp(lambda k: conv2d_xla(x, k), jnp.zeros(kernel_shape, x.dtype))
        return vjp(dy.astype(x.dtype))[0].astype(jnp.float32)
    d = dy.reshape(b * h * w, cout)
    if strategy == "im2col":
        if kh == 1 and kw == 1:
            cols = x.reshape(b * h * w, cin)
        else:
            cols = jnp.concatenate(
                [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
            ).reshape(b * h * w, kh * kw * cin)
        return _gemm_tn(cols, d).reshape(kh, kw, cin, cout)
    if strategy == "dots":
        g = [
            _gemm_tn(x[:, i : i + h, j : j + w, :].reshape(-1, cin), d)
            for i in range(kh)
            for j in range(kw)
        ]
        return jnp.stack(g).reshape(kh, kw, cin, cout)
    if strategy == "shift":
        # sum over the padded rows h' of x[b,h',w+j,c] * dy_i[b,h',w,o], dy_i = dy moved down by i.
        xs = jnp.concatenate([x[:, :, j : j + w, :] for j in range(kw)], axis=-1)
        ds = jnp.concatenate(
            [jnp.pad(dy, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0))) for i in range(kh)], axis=-1
        )
        g = _gemm_tn(xs.reshape(b * hp * w, kw * cin), ds.reshape(b * hp * w, kh * cout))
        return g.reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3)
    raise ValueError(f"weight_grad: strategy={strategy!r}; expected one of {WGRAD_STRATEGIES}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_valid(x: Array, kernel: Array, strategy: str) -> Array:
    return conv2d_xla(x, kernel)


def _conv_valid_fwd(x, kernel, strategy):
    return conv2d_xla(x, kernel), (x, kernel)


INPUT_GRAD_METHODS = ("auto", "conv", "flip", "gemm")

_GEMM_INPUT_GRAD_MAX_PIXELS = 256
_GEMM_INPUT_GRAD_MAX_ROWS = 1024
"""'auto' computes the input gradient as one GEMM (:func:`input_grad`, "gemm") when dy has at
most ``_GEMM_INPUT_GRAD_MAX_PIXELS`` pixels per image (16x16) and at most
``_GEMM_INPUT_GRAD_MAX_ROWS`` in the batch (B*H*W, the GEMM's row count). There the transposed
convolution spends 27 % (16x16) to 56 % (8x8) extra FLOPs on the zero border, while the
col2im that the GEMM needs grows with B*H*W. Measured with ``benchmarks/input_grad_cpu.py`` on
a 2-core Xeon VM: 3x3x1024x1024 at 8x8, batch 4: 16 ms instead of 46 ms; at 15x15, batch 4:
59 vs 82 ms; at 16x16, batch 16 (B*H*W = 4096) the GEMM is 1.5x slower (BENCHMARKS.md)."""


def pick_input_grad_method(dy_shape: Sequence[int], kernel_shape: Sequence[int]) -> str:
    """The :func:`input_grad` method "auto" uses for dy (B,H,W,Cout) and kernel
    (kh,kw,Cin,Cout): "gemm" for small images and batches (``H*W <=
    _GEMM_INPUT_GRAD_MAX_PIXELS`` and ``B*H*W <= _GEMM_INPUT_GRAD_MAX_ROWS``), else "flip" when
    the kernel holds more values than dy and dx together, else "conv"."""
    b, h, w, cout = dy_shape
    kh, kw, cin, _ = kernel_shape
    if h * w <= _GEMM_INPUT_GRAD_MAX_PIXELS and b * h * w <= _GEMM_INPUT_GRAD_MAX_ROWS:
        return "gemm"
    dx_size = b * (h + kh - 1) * (w + kw - 1) * cin
    return "flip" if kh * kw * cin * cout > b * h * w * cout + dx_size else "conv"


def input_grad(dy: Array, kernel: Array, method: str = "auto") -> Array:
    """Gradient of ``sum(conv2d_xla(x, kernel, VALID) * dy)`` w.r.t. x (B,H+kh-1,W+kw-1,Cin).

    dy: (B,H,W,Cout), kernel: (kh,kw,Cin,Cout). ``method`` (one of ``INPUT_GRAD_METHODS``):

    * "conv": the convolution XLA's transpose rule emits (dy zero-padded by k-1, correlated
      with the kernel spatially reversed and with in/out swapped), the kernel transposed first
      and reversed in a separate copy (XLA:CPU fuses reverse+transpose into one slow loop);
      bit-identical to XLA's gradient.
    * "flip": the same convolution with the reversal done on the activations,
      ``flip(correlate(flip(pad(dy)), K^T))``: the same sum of the same products in another
      order (XLA:CPU copies a reversed array at ~1 GB/s: ~40 ms for 3x3x1024x1024).
    * "gemm": no convolution: ``P = K (kh*kw*Cin, Cout) . dy^T`` (one GEMM over the kernel as
      stored, no kernel transpose) gives every tap's contribution, and dx is the sum of the
      kh*kw taps shifted into place (col2im). Skips the products with the zero border.
    * "auto": :func:`pick_input_grad_method` ("gemm" for small images and batches, "flip"
      for the other deep, low-resolution layers, "conv" for the rest).

    All equal XLA's gradient up to float32 summation order.
    """
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = dy.shape
    if method == "auto":
        method = pick_input_grad_method(dy.shape, kernel.shape)
    pad = ((kh - 1, kh - 1), (kw - 1, kw - 1))
    if method == "gemm":
        taps = lax.dot_general(
            kernel.reshape(kh * kw * cin, cout),
            dy.reshape(b * h * w, cout),
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        ).reshape(kh, kw, cin, b, h, w)
        # col2im: tap (i, j) adds into rows i.., columns j.. (in-place slice updates of a
        # (Cin,B,H',W') buffer, then one transpose; a sum of padded taps fused with the
        # transpose runs 3-4x slower on XLA:CPU).
        dx = jnp.zeros((cin, b, h + kh - 1, w + kw - 1), jnp.float32)
        for i in range(kh):
            for j in range(kw):
                dx = dx.at[:, :, i : i + h, j : j + w].add(taps[i, j])
        return dx.transpose(1, 2, 3, 0).astype(dy.dtype)
    if method == "flip":
        wt = jnp.swapaxes(kernel, 2, 3)
        dx = lax.conv_general_dilated(
            dy[:, ::-1, ::-1], wt, (1, 1), pad, dimension_numbers=DIMENSION_NUMBERS
        )
        return dx[:, ::-1, ::-1]
    if method == "conv":
        wt = lax.optimization_barrier(jnp.swapaxes(kernel, 2, 3))
        wt = wt[::-1, ::-1]
        return lax.conv_general_dilated(dy, wt, (1, 1), pad, dimension_numbers=DIMENSION_NUMBERS)
    raise ValueError(f"input_grad: method={method!r}; expected one of {INPUT_GRAD_METHODS}")


def _conv_valid_bwd(strategy, res, dy):
    x, kernel = res
    dx = input_grad(dy, kernel).astype(x.dtype)
    dk = weight_grad(x, dy, kernel.shape, strategy).astype(kernel.dtype)
    return dx, dk


_conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


def conv2d_fast(
    x: Array,
    kernel: Array,
    strides: Sequence[int] = (1, 1),
    padding="VALID",
    strategy: str = "auto",
) -> Array:
    """Same forward as :func:`conv2d_xla` (bit-identical), with the fast weight gradient.

    x: (B,H,W,Cin), kernel: (kh,kw,Cin,Cout); ``padding`` "VALID" or ((lo,hi),(lo,hi)) zero
    paddings (applied with ``jnp.pad`` before the VALID conv). Strides other than 1 and string
    paddings other than "VALID" fall back to the plain XLA convolution and gradient.
    """
    if strategy not in WGRAD_STRATEGIES:
        raise ValueError(f"conv2d_fast: strategy={strategy!r}; expected one of {WGRAD_STRATEGIES}")
    if tuple(strides) != (1, 1) or (isinstance(padding, str) and padding != "VALID"):
        return conv2d_xla(x, kernel, strides, padding)
    if not isinstance(padding, str):
        (t, bo), (le, r) = padding
        if t or bo or le or r:
            x = jnp.pad(x, ((0, 0), (t, bo), (le, r), (0, 0)))
    return _conv_valid(x, kernel, strategy)
