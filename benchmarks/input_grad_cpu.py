"""Times every :func:`brats_jax.ops.input_grad` method on the U-Net's 3x3 layers, one JSON line
per layer (milliseconds, median of ``--repeats`` calls, each jitted and waited for), plus the
method "auto" picks, so the choice in :func:`~brats_jax.ops.pick_input_grad_method` can be
rechecked on another machine:

  python benchmarks/input_grad_cpu.py [--image-size=128] [--batch-size=4] [--base-features=64]
      [--depth=4] [--repeats=10] [--methods=conv,flip,gemm]

Layer shapes follow :class:`brats_jax.models.unet.UNet`: at level l (image/2^l pixels a side,
width F*2^l) a Cin->Cout convolution in the encoder, the bottleneck and the decoder. Sets the
fast XLA:CPU flags (:func:`brats_jax.ops.set_cpu_xla_flags`) first, as ``main`` and ``bench``
do. Results: BENCHMARKS.md, "CPU vs PyTorch".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def unet_conv3x3_layers(
    image_size: int, base_features: int, depth: int
) -> list[tuple[str, int, int, int]]:
    """(name, side in pixels, Cin, Cout) of each distinct 3x3 convolution of the U-Net."""
    layers = []
    cin = 4
    for lvl in range(depth):
        f = base_features * 2**lvl
        side = image_size // 2**lvl
        layers += [(f"down_{lvl}/conv1", side, cin, f), (f"down_{lvl}/conv2", side, f, f)]
        cin = f
    f = base_features * 2**depth
    side = image_size // 2**depth
    layers += [("bottleneck/conv1", side, cin, f), ("bottleneck/conv2", side, f, f)]
    for lvl in reversed(range(depth)):
        f = base_features * 2**lvl
        side = image_size // 2**lvl
        layers += [(f"up_{lvl}/conv1", side, 2 * f, f), (f"up_{lvl}/conv2", side, f, f)]
    return layers


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the timings; returns (and prints) one dict per layer."""
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--base-features", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--methods", default="conv,flip,gemm")
    a = p.parse_args(argv)

    from brats_jax.ops.flags import set_cpu_xla_flags

    set_cpu_xla_flags()
    import jax
    import numpy as np

    from brats_jax.ops import INPUT_GRAD_METHODS, input_grad, pick_input_grad_method

    methods = a.methods.split(",")
    bad = [m for m in methods if m not in INPUT_GRAD_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected names from {INPUT_GRAD_METHODS}")
    rng = np.random.default_rng(0)
    rows = []
    for name, side, cin, cout in unet_conv3x3_layers(a.image_size, a.base_features, a.depth):
        dy = jax.numpy.asarray(rng.standard_normal((a.batch_size, side, side, cout), np.float32))
        k = jax.numpy.asarray(rng.standard_normal((3, 3, cin, cout), np.float32))
        row = {"layer": name, "side": side, "cin": cin, "cout": cout, "batch": a.batch_size}
        for m in methods:
            f = jax.jit(lambda dy, k, m=m: input_grad(dy, k, m))
            f(dy, k).block_until_ready()
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                f(dy, k).block_until_ready()
                times.append(time.perf_counter() - t0)
            row[f"{m}_ms"] = round(1e3 * statistics.median(times), 2)
        row["auto"] = pick_input_grad_method(dy.shape, k.shape)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
