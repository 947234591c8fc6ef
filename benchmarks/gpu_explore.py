"""Where does the GPU U-Net train step spend its time, and which op implementations help?

One process (so XLA's in-memory autotuning cache is shared by every variant): builds the
default U-Net (bfloat16 compute, 240x240, batch B) with the plain XLA ops, then with one
operation at a time swapped for its ``gpu_fast`` version (:mod:`brats_jax.ops.impls`),
then the swaps that helped together and whole implementations (``--impls``), then the best
so far with the train state in XLA-chosen layouts (``time_steps(state_layouts="auto")``,
``--no-auto-layouts`` to skip). It times each train step and writes per-variant JSON lines,
plus a profiler trace (Chrome trace.json.gz) and the optimised HLO of the fastest variant
with ``--profile``; ``--pad-micro`` first times the reflection pads alone (forward +
gradient):

  python -m benchmarks.gpu_explore --out=DIR [--batch-size=16] [--image-size=240] [--steps=20]
      [--swaps=conv,upconv,max_pool,bias_add,reflect_pad] [--impls=gpu_fast]
      [--other-batches=32,1] [--profile] [--pad-micro] [--budget-s=300] [--no-auto-layouts]

Each line: variant, swaps, batch, step_ms_sync (median of steps each waited for, as ``bench``),
step_ms_pipelined (``steps`` steps queued back to back, total / steps), TFLOP/s and MFU
(from the faster of the two) against ``--peak`` (dense bf16 TFLOP/s, 989 for an H100 SXM /
H200), all variants scored on the baseline's FLOPs. Results: BENCHMARKS.md, "Train step".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from brats_jax.benchmarking import workload
from brats_jax.benchmarking.timing import time_steps
from brats_jax.models import create_model
from brats_jax.ops import impls

SWAPS = {  # field of impls.Ops -> the alternative to the plain XLA op
    f.name: getattr(impls.OPS["gpu_fast"], f.name) for f in dataclasses.fields(impls.Ops)
}


@contextlib.contextmanager
def plain_ops_replaced(**fields):
    """Temporarily replace fields of ``impls.OPS["xla"]`` (models traced inside see them)."""
    old = impls.OPS["xla"]
    impls.OPS["xla"] = dataclasses.replace(old, **fields)
    try:
        yield
    finally:
        impls.OPS["xla"] = old


def run_variant(
    name,
    swaps,
    *,
    batch,
    size,
    steps,
    peak,
    padding="reflect",
    impl="xla",
    state_layouts="default",
    trace_dir=None,
    hlo_path=None,
    flops_per_slice=None,
):
    """Compile and time one variant; returns its result dict (see the module docstring).
    ``flops_per_slice``: the FLOPs used for TFLOP/s and MFU (default: this variant's own,
    :func:`brats_jax.benchmarking.timing.step_flops`), so variants that compute the same model
    are scored on the same count. Timing: :func:`brats_jax.benchmarking.timing.time_steps`."""
    fields = {k: SWAPS[k] for k in swaps}
    with plain_ops_replaced(**fields):  # the step is traced inside time_steps
        net = create_model(
            "unet",
            num_classes=4,
            dtype=workload.DTYPES["bfloat16"],
            conv_impl=impl,
            padding=padding,
        )
        tx = optax.adam(1e-4)
        state = workload.init_train_state(net, size, tx)
        image, label = workload.random_batch(batch, size)
        timing = time_steps(
            workload.make_train_step(net, tx),
            state,
            (image, label),
            steps,
            state_layouts,
            count_flops=flops_per_slice is None,
        )
    flops = timing.flops if flops_per_slice is None else flops_per_slice * batch
    if hlo_path:
        with gzip.open(hlo_path, "wt") as f:
            f.write(timing.compiled.as_text())
    if trace_dir:
        state, loss = timing.state, timing.out
        with jax.profiler.trace(trace_dir):
            for _ in range(5):
                state, loss = timing.compiled(state, image, label)
            jax.block_until_ready(loss)
    med, piped = timing.median_s, timing.pipelined_s
    best = min(med, piped)
    return {
        "bench": "gpu_explore",
        "variant": name,
        "swaps": sorted(swaps),
        "impl": impl,
        "state_layouts": state_layouts,
        "padding": padding,
        "batch_size": batch,
        "image_size": size,
        "compile_s": round(timing.compile_s, 1),
        "step_ms_sync": round(med * 1e3, 3),
        "step_ms_sync_min": round(min(timing.times) * 1e3, 3),
        "step_ms_pipelined": round(piped * 1e3, 3),
        "flops_per_step": flops,
        "tflops": round(flops / best / 1e12, 1),
        "mfu": round(flops / best / 1e12 / peak, 4),
        "loss": float(timing.out),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }


def pad_micro(
    shapes=((16, 240, 240, 64), (16, 240, 240, 128), (16, 60, 60, 512)), steps=20
) -> list[dict]:
    """Reflection pad (p = q = 1) alone, forward + gradient, bfloat16: ms per call (queued
    back to back) for each :mod:`brats_jax.ops.pad` version, and the same for a zero pad."""
    from brats_jax.ops import pad as pad_ops

    fns = {
        "jnp.pad": pad_ops.reflect_pad_xla,
        "cpu_fast": pad_ops.reflect_pad_fast,
        "dus": pad_ops.reflect_pad_dus,
        "zero_pad (bound)": lambda x, pq: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
    }
    out = []
    for shape in shapes:
        x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.bfloat16)
        g = jax.random.normal(
            jax.random.PRNGKey(1), (shape[0], shape[1] + 2, shape[2] + 2, shape[3]), jnp.bfloat16
        )
        for name, fn in fns.items():
            f = jax.jit(
                lambda x, g, fn=fn: (lambda y, vjp: (y, vjp(g)[0]))(
                    *jax.vjp(lambda x: fn(x, (1, 1)), x)
                )
            )
            jax.block_until_ready(f(x, g))
            t = time.perf_counter()
            for _ in range(steps):
                r = f(x, g)
            jax.block_until_ready(r)
            out.append(
                {
                    "bench": "pad_micro",
                    "shape": list(shape),
                    "pad": name,
                    "fwd_bwd_ms": round((time.perf_counter() - t) / steps * 1e3, 4),
                }
            )
    return out


def _save_trace(trace_dir, dest):
    """Copy the profiler's Chrome trace (or the raw xplane) of ``trace_dir`` to ``dest``."""
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if found:
        shutil.copy(found[-1], dest + ".trace.json.gz")
        return
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if found:
        shutil.copy(found[-1], dest + ".xplane.pb")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (flags: the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_explore")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak", type=float, default=989.0)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting variants after")
    p.add_argument("--profile", action="store_true", help="trace + HLO of the best variant")
    p.add_argument("--profile-baseline", action="store_true", help="and of the baseline")
    p.add_argument("--swaps", default=",".join(SWAPS), help="comma list of Ops fields to try")
    p.add_argument("--other-batches", default="32,1", help="comma list, for the best variant")
    p.add_argument("--impls", default="gpu_fast", help="whole ops implementations to time")
    p.add_argument("--pad-micro", action="store_true", help="time the reflection pads alone")
    p.add_argument(
        "--auto-layouts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the best variant so far with XLA-chosen state layouts",
    )
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    log = open(os.path.join(a.out, "gpu_explore.jsonl"), "a")
    common = dict(batch=a.batch_size, size=a.image_size, steps=a.steps, peak=a.peak)

    def emit(r):
        print(json.dumps(r), flush=True)
        log.write(json.dumps(r) + "\n")
        log.flush()

    def time_left():
        return a.budget_s - (time.perf_counter() - t_start)

    if a.pad_micro:
        for r in pad_micro():
            emit(r)
    tmp = tempfile.mkdtemp()
    prof = a.profile
    prof_base = prof and a.profile_baseline
    base = run_variant(
        "xla",
        [],
        **common,
        trace_dir=os.path.join(tmp, "t_base") if prof_base else None,
        hlo_path=os.path.join(a.out, "hlo_xla.txt.gz") if prof_base else None,
    )
    emit(base)
    common["flops_per_slice"] = base["flops_per_step"] / a.batch_size
    if prof_base:
        _save_trace(os.path.join(tmp, "t_base"), os.path.join(a.out, "prof_xla"))
    results = {"xla": base}
    for k in [k for k in a.swaps.split(",") if k]:
        if time_left() < 30:
            break
        results[k] = run_variant(k, [k], **common)
        emit(results[k])
    helped = [
        k
        for k in SWAPS
        if k in results and results[k]["step_ms_pipelined"] < 0.99 * base["step_ms_pipelined"]
    ]
    if len(helped) > 1 and time_left() > 30:
        name = "+".join(helped)
        results[name] = run_variant(name, helped, **common)
        emit(results[name])
    for impl in [i for i in a.impls.split(",") if i]:
        if time_left() > 30:
            results[impl] = run_variant(impl, [], impl=impl, **common)
            emit(results[impl])
    if a.auto_layouts and time_left() > 30:
        so_far = min(results, key=lambda n: results[n]["step_ms_pipelined"])
        name = so_far + "+auto_layouts"
        r = results[so_far]
        results[name] = run_variant(
            name, r["swaps"], impl=r["impl"], state_layouts="auto", **common
        )
        emit(results[name])
    best_name = min(results, key=lambda n: results[n]["step_ms_pipelined"])
    best = {k: results[best_name][k] for k in ("swaps", "impl", "state_layouts")}
    if prof and best_name != "xla" and time_left() > 20:
        r = run_variant(
            best_name,
            **best,
            **common,
            trace_dir=os.path.join(tmp, "t_best"),
            hlo_path=os.path.join(a.out, "hlo_best.txt.gz"),
        )
        r["variant"] = best_name + " (profiled rerun)"
        emit(r)
        _save_trace(os.path.join(tmp, "t_best"), os.path.join(a.out, "prof_best"))
    for bs in [int(b) for b in a.other_batches.split(",") if b]:
        if time_left() > 40:
            emit(run_variant(best_name, **best, **{**common, "batch": bs}))
    print(
        "best:",
        best_name,
        results[best_name]["step_ms_pipelined"],
        "ms (pipelined) vs xla",
        base["step_ms_pipelined"],
        "ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
