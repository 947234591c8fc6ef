"""Timing and FLOP counting of a compiled step, and the machine it ran on: :func:`time_steps`
(:class:`StepTiming`), :func:`cost_flops`, :func:`step_flops`, :func:`machine_info`."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Any

import jax
from jax.experimental.layout import Format, Layout


def cost_flops(compiled) -> float:
    """FLOPs from XLA's cost analysis of a `Lowered` or `Compiled` step (nan if unavailable).

    Pass the `Lowered` (pre-optimisation HLO) form: on GPUs the compiled executable's
    analysis misses convolutions that became cuDNN custom calls (it reported 9.4 of the
    U-Net step's ~255 GFLOPs on an H200), while the lowered HLO still has them as
    convolutions and gives the same count on every backend.
    """
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def step_flops(fn, lowered, *args) -> float:
    """FLOPs of one call of ``fn(*args)``: XLA's cost analysis of ``lowered`` (its
    pre-optimisation HLO), or, where the backend gives none (XLA:GPU in jax 0.11), of the same
    function lowered for the CPU (the count does not depend on the backend)."""
    flops = cost_flops(lowered)
    if flops != flops:  # nan
        flops = cost_flops(jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)))
    return flops


def machine_info() -> dict:
    """Backend, device kind/count, host CPU name and count, jax version, UTC date, XLA_FLAGS."""
    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": len(devs),
        "device_kind": devs[0].device_kind,
        "host": platform.processor() or platform.machine(),
        "cpu_count": cpu_count(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


@dataclasses.dataclass
class StepTiming:
    """Result of :func:`time_steps`: compile seconds, each waited-for step's seconds, seconds
    per step when ``steps`` steps are queued back to back, FLOPs per step (:func:`step_flops`),
    the last step's second output, and the compiled step with the state after the last step
    (to run it further, e.g. under a profiler)."""

    compile_s: float
    times: list[float]
    pipelined_s: float
    flops: float
    out: Any
    compiled: Any
    state: Any

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


STATE_LAYOUTS = ("default", "auto")


def _auto_layout_jit_kw(fn, state, args) -> tuple[dict[str, Any], Any]:
    """``jax.jit`` keywords that read and write the donated state in the device layouts XLA
    chooses for it (``Layout.AUTO``), and the state moved into those layouts."""
    auto = jax.tree.map(lambda _: Format(Layout.AUTO), state)
    free = (None,) * len(args)
    chosen = (
        jax.jit(fn, in_shardings=(auto, *free), out_shardings=(auto, None), donate_argnums=0)
        .lower(state, *args)
        .compile()
        .input_formats[0][0]
    )
    jit_kw = {"in_shardings": (chosen, *free), "out_shardings": (chosen, None)}
    return jit_kw, jax.device_put(state, chosen)


def time_steps(
    fn, state, args, steps: int, state_layouts: str = "default", count_flops: bool = True
) -> StepTiming:
    """Compile `fn(state, *args) -> (state, out)` with the state donated, run one warm-up
    step, time `steps` steps each waited for (host dispatch included, as a loop that reads
    every loss sees it), then `steps` steps queued back to back (as a training loop that
    does not wait sees them: on a GPU the device stays busy).

    ``state_layouts="auto"`` lets XLA choose the device layout of every state array
    (``Layout.AUTO``: e.g. conv kernels stored as the convolutions read them, so that no
    transpose runs between them and the optimizer), then compiles the step with the state read
    and written in those layouts and moves the state into them; compile_s covers both compiles.
    ``count_flops=False`` skips :func:`step_flops` (``flops`` is then nan): for callers that
    score every variant on one count, where the CPU lowering it may need takes seconds.
    """
    if state_layouts not in STATE_LAYOUTS:
        raise ValueError(f"state_layouts={state_layouts!r}; expected one of {STATE_LAYOUTS}")
    t0 = time.perf_counter()
    jit_kw: dict[str, Any] = {}
    if state_layouts == "auto":
        jit_kw, state = _auto_layout_jit_kw(fn, state, args)
    lowered = jax.jit(fn, donate_argnums=0, **jit_kw).lower(state, *args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(fn, lowered, state, *args) if count_flops else float("nan")
    state, out = compiled(state, *args)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, out = compiled(state, *args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, *args)
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t) / steps
    return StepTiming(compile_s, times, pipelined, flops, out, compiled, state)
