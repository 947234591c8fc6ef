"""Compile time of the TransUNet train step (bench's plain Adam + CE step), scanned or not.

Prints one JSON line per repeat: ``trace_lower_s`` (Python tracing + lowering to StableHLO),
``compile_s`` (XLA compile) and their sum ``total_s``, for a batch of ``--batch-size`` images
of ``--image-size`` pixels. Each repeat builds a fresh step function, so nothing is cached.

    PYTHONPATH=$PWD python -m benchmarks.transunet_compile --preset=r50_vit_b16 --repeats=3
    PYTHONPATH=$PWD python -m benchmarks.transunet_compile --preset=tiny --scan=false

``--scan`` unset builds the model with its default; "true"/"false" set ``TransUNet.scan``.

XLA's cost analysis counts a scanned loop's body about once, so FLOP counts (and MFU) of the
scanned model's step are too low. ``--fix-rows`` reads ``bench train`` JSON lines on stdin and
rewrites the TransUNet rows' ``flops_per_step``/``tflops``/``tflops_pipelined`` with the count
of the per-block model (``scan=False``: the same arithmetic, lowered for the CPU, not
compiled); other lines pass through. ``benchmarks/gpu_check.sh`` pipes its TransUNet rows
through it.
"""

from __future__ import annotations

import argparse
import json
import time


def compile_times(
    preset: str, image_size: int, batch_size: int, scan: bool | None, dtype: str
) -> dict:
    """Trace+lower and compile seconds of one fresh TransUNet train step (not run)."""
    import jax
    import optax

    from brats_jax.benchmarking import workload
    from brats_jax.models import create_model

    kw = {"num_classes": 4, "preset": preset, "dtype": workload.DTYPES[dtype]}
    if scan is not None:
        kw["scan"] = scan
    net = create_model("transunet", **kw)
    tx = optax.adam(1e-4)
    state = workload.init_train_state(net, image_size, tx)
    image, label = workload.random_batch(batch_size, image_size)
    step = workload.make_train_step(net, tx)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, image, label)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {
        "bench": "transunet_compile",
        "preset": preset,
        "scan": scan,
        "image_size": image_size,
        "batch_size": batch_size,
        "dtype": dtype,
        "backend": jax.default_backend(),
        "trace_lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "total_s": round(t2 - t0, 3),
    }


def per_block_flops(preset: str, image_size: int, batch_size: int, dtype: str) -> float:
    """FLOPs of one train step of the per-block (``scan=False``) TransUNet: XLA's cost
    analysis of the step lowered for the CPU (same count on every backend)."""
    import jax
    import optax

    from brats_jax.benchmarking import timing, workload
    from brats_jax.models import create_model

    net = create_model(
        "transunet", num_classes=4, preset=preset, dtype=workload.DTYPES[dtype], scan=False
    )
    tx = optax.adam(1e-4)
    state = jax.eval_shape(lambda: workload.init_train_state(net, image_size, tx))
    image, label = workload.random_batch(batch_size, image_size)
    step = workload.make_train_step(net, tx)
    lowered = jax.jit(step).trace(state, image, label).lower(lowering_platforms=("cpu",))
    return timing.cost_flops(lowered)


def fix_rows(lines, out=None) -> None:
    """Rewrite TransUNet ``bench train`` rows with :func:`per_block_flops` (see module doc)."""
    import sys

    out = out or sys.stdout
    cache = {}
    for line in lines:
        line = line.strip()
        try:
            r = json.loads(line)
        except ValueError:
            print(line, file=out, flush=True)
            continue
        if r.get("model") == "transunet" and r.get("step_s_median"):
            key = (r.get("preset") or "r50_vit_b16", r["image_size"], r["batch_size"], r["dtype"])
            if key not in cache:
                cache[key] = per_block_flops(*key)
            f = cache[key]
            r.update(flops_per_step=f, flops_source="per-block model (scan=False)")
            r["tflops"] = round(f / r["step_s_median"] / 1e12, 5)
            if r.get("step_s_pipelined"):
                r["tflops_pipelined"] = round(f / r["step_s_pipelined"] / 1e12, 5)
        print(json.dumps(r), file=out, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.transunet_compile")
    p.add_argument("--preset", default="r50_vit_b16")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--scan", default=None, choices=["true", "false"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--fix-rows", action="store_true", help="rewrite bench rows on stdin")
    a = p.parse_args(argv)
    if a.fix_rows:
        import sys

        fix_rows(sys.stdin)
        return
    from brats_jax.ops.flags import set_cpu_xla_flags

    set_cpu_xla_flags()
    scan = None if a.scan is None else a.scan == "true"
    for _ in range(a.repeats):
        res = compile_times(a.preset, a.image_size, a.batch_size, scan, a.dtype)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
