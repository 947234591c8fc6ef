"""Compile time of the TransUNet train step (bench's plain Adam + CE step), scanned or not.

Prints one JSON line per repeat: ``trace_lower_s`` (Python tracing + lowering to StableHLO),
``compile_s`` (XLA compile) and their sum ``total_s``, for a batch of ``--batch-size`` images
of ``--image-size`` pixels. Each repeat builds a fresh step function, so nothing is cached.

    PYTHONPATH=$PWD python -m benchmarks.transunet_compile --preset=r50_vit_b16 --repeats=3
    PYTHONPATH=$PWD python -m benchmarks.transunet_compile --preset=tiny --scan=false

``--scan`` unset builds the model with its default; "true"/"false" set ``TransUNet.scan``.
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

    from brats_jax import bench
    from brats_jax.models import create_model

    kw = {"num_classes": 4, "preset": preset, "dtype": bench.DTYPES[dtype]}
    if scan is not None:
        kw["scan"] = scan
    net = create_model("transunet", **kw)
    tx = optax.adam(1e-4)
    state = bench.init_train_state(net, image_size, tx)
    image, label = bench.random_batch(batch_size, image_size)
    step = bench.make_train_step(net, tx)
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


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.transunet_compile")
    p.add_argument("--preset", default="r50_vit_b16")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--scan", default=None, choices=["true", "false"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args(argv)
    from brats_jax.ops.flags import set_cpu_xla_flags

    set_cpu_xla_flags()
    scan = None if a.scan is None else a.scan == "true"
    for _ in range(a.repeats):
        res = compile_times(a.preset, a.image_size, a.batch_size, scan, a.dtype)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
