"""Fast convolution ops: a drop-in 2D convolution whose weight gradient is computed as large
matrix products, several times faster than XLA:CPU's own weight-gradient convolution.

See :mod:`brats_jax.ops.conv`. Nothing here imports the models; ``brats_jax.models.layers``
registers :func:`conv2d_fast` / :func:`conv2d_auto` as ``Conv2D`` implementations.
"""

from brats_jax.ops.conv import (
    WGRAD_STRATEGIES,
    FastConv,
    conv2d_auto,
    conv2d_fast,
    conv2d_xla,
    input_grad,
    pick_wgrad_strategy,
    weight_grad,
)
from brats_jax.ops.flags import CPU_XLA_FLAGS, set_cpu_xla_flags, ynn_disabled

__all__ = [
    "CPU_XLA_FLAGS",
    "input_grad",
    "set_cpu_xla_flags",
    "ynn_disabled",
    "WGRAD_STRATEGIES",
    "FastConv",
    "conv2d_auto",
    "conv2d_fast",
    "conv2d_xla",
    "pick_wgrad_strategy",
    "weight_grad",
]
