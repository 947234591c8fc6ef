"""Operations written the way XLA:CPU or XLA:GPU runs them fast, and the switch for them.

:mod:`brats_jax.ops.impls` maps an implementation name ("xla", "cpu_fast", "gpu_fast",
"auto") to the convolution, transposed convolution, max-pool, bias addition and reflection
padding the U-Net uses;
:mod:`brats_jax.ops.flags` sets the XLA:CPU flags that make convolutions fast. Nothing here
imports the models.
"""

from brats_jax.ops.bias import bias_add_fast, bias_add_xla
from brats_jax.ops.conv import (
    INPUT_GRAD_METHODS,
    WGRAD_STRATEGIES,
    conv2d_fast,
    conv2d_xla,
    input_grad,
    pick_input_grad_method,
    pick_wgrad_strategy,
    weight_grad,
)
from brats_jax.ops.flags import CPU_XLA_FLAGS, set_cpu_xla_flags, ynn_disabled
from brats_jax.ops.impls import IMPLS, OPS, Ops, get_ops
from brats_jax.ops.pad import reflect_pad_dus, reflect_pad_fast, reflect_pad_xla
from brats_jax.ops.pool import max_pool_2x2_fast, max_pool_2x2_xla
from brats_jax.ops.upconv import upconv2x2_rows, upconv2x2_xla

__all__ = [
    "CPU_XLA_FLAGS",
    "IMPLS",
    "INPUT_GRAD_METHODS",
    "OPS",
    "WGRAD_STRATEGIES",
    "Ops",
    "bias_add_fast",
    "bias_add_xla",
    "conv2d_fast",
    "conv2d_xla",
    "get_ops",
    "input_grad",
    "max_pool_2x2_fast",
    "max_pool_2x2_xla",
    "pick_input_grad_method",
    "pick_wgrad_strategy",
    "reflect_pad_dus",
    "reflect_pad_fast",
    "reflect_pad_xla",
    "set_cpu_xla_flags",
    "upconv2x2_rows",
    "upconv2x2_xla",
    "weight_grad",
    "ynn_disabled",
]
