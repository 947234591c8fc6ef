"""Cost of sliding-window inference (`eval.sliding_window`) against one whole-slice call.

Times `whole_volume.make_slice_predictor` for the `cpu` preset's U-Net (base 16, depth 4) on a
batch of native 240 px slices, once whole and once through 128 px windows (offsets 0, 56,
112: 9 tiles), each compiled once in one process, interleaved repeats; prints each
repeat's median seconds per batch, the ratio of the medians and its spread (min..max of the
per-repeat ratios). Random weights and inputs: the cost does not depend on them.
Run: `python -m benchmarks.sliding_window_cost [--repeats=5] [--calls=4] [--batch=16]`.
Results: BENCHMARKS.md.
"""

import argparse
import time

from brats_jax import runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    runtime.setup()  # fast XLA:CPU flags before JAX starts
    import jax
    import jax.numpy as jnp
    import numpy as np

    from brats_jax import models
    from brats_jax.inference import whole_volume
    from configs import unet

    config = unet.get_config("cpu")
    model = models.from_config(config.model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, 240, 240, 4)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    predictors = {
        "whole": whole_volume.make_slice_predictor(model, image_size=240),
        "window128": whole_volume.make_slice_predictor(model, image_size=240, window=128),
    }
    for name, fn in predictors.items():  # compile (and warm up) once each
        t = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        print(f"{name:9s} compile + first call {time.perf_counter() - t:.1f} s")
    medians = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name, fn in predictors.items():
            times = []
            for _ in range(args.calls):
                t = time.perf_counter()
                jax.block_until_ready(fn(variables, x))
                times.append(time.perf_counter() - t)
            medians[name].append(float(np.median(times)))
    for name, values in medians.items():
        print(f"{name:9s} s per batch of {args.batch}: " + " ".join(f"{v:.3f}" for v in values))
    ratios = [w / h for w, h in zip(medians["window128"], medians["whole"], strict=True)]
    ratio = np.median(medians["window128"]) / np.median(medians["whole"])
    print(f"window / whole: {ratio:.2f}x (per repeat {min(ratios):.2f}..{max(ratios):.2f})")


if __name__ == "__main__":
    main()
