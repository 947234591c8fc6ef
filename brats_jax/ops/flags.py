"""XLA:CPU flags that make convolutions fast, and a helper that sets them before JAX starts.

On jaxlib 0.10.2 XLA:CPU hands convolutions to YNNPACK fusions by default; for the U-Net's
layers these run at 30-50 GFLOP/s (forward) and the weight-gradient convolutions 3-10x slower
than PyTorch's oneDNN. With YNN fusions disabled (``--xla_cpu_experimental_ynn_fusion_type=``,
an empty list) XLA uses its Eigen/oneDNN convolution kernels, 2-5x faster on a 2-core Xeon
(numbers in BENCHMARKS.md). ``--xla_cpu_use_onednn=true`` additionally routes matmuls and some
convolutions to oneDNN. XLA reads ``XLA_FLAGS`` once, when the CPU backend is created, so
:func:`set_cpu_xla_flags` must run before the first JAX computation of the process.
"""

from __future__ import annotations

import os
import warnings

CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_use_onednn=true")
"""Flags added by :func:`set_cpu_xla_flags` (strings as they appear in ``XLA_FLAGS``)."""


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - private API moved
        return False


def set_cpu_xla_flags(flags=CPU_XLA_FLAGS) -> list[str]:
    """Append ``flags`` to ``os.environ["XLA_FLAGS"]`` (flags whose name is already set there
    are left alone, so a user's own choice wins). Returns the flags added. Warns and changes
    nothing if flags are missing but a JAX backend already exists (they would be ignored).
    Harmless on GPU/TPU: the flags only affect the CPU backend."""
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    added = [f for f in flags if f.split("=")[0] not in names]
    if added and _backend_started():
        warnings.warn(
            "set_cpu_xla_flags: a JAX backend is already initialised; XLA_FLAGS "
            "would be ignored. Call it before the first JAX computation.",
            stacklevel=2,
        )
        return []
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def ynn_disabled() -> bool:
    """True when ``XLA_FLAGS`` turns YNN fusions off (then XLA's own weight gradient is fast)."""
    for f in os.environ.get("XLA_FLAGS", "").split():
        if f.startswith("--xla_cpu_experimental_ynn_fusion_type="):
            return f.split("=", 1)[1] in ("", "-dot,-eltwise,-reduce")
    return False
