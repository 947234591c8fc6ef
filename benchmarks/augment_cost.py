"""Cost of on-device augmentation in the train step (issue 24).

Times the library's train step (`steps.make_train_step`: the `cpu` preset's U-Net, base 16,
at 128 px, batch 8, Dice + CE) without augmentation and with every transform on (all
`augment.*_p` = 1, elastic deformation included, `blur`/`lowres` on every modality), in one
process (each compiled once), interleaved repeats of timed steps; prints each repeat's
median, the ratio of the medians and its spread (min..max of the per-repeat ratios). The
data pipeline is not involved: augmentation runs on the device, inside the step.
Run: `python -m benchmarks.augment_cost [--repeats=5] [--steps=8]`. Results: BENCHMARKS.md.
"""

import argparse
import time

from brats_jax import runtime


def full_augmentation():
    """An `AugmentConfig` with every transform on for every sample."""
    from brats_jax.data import augment

    on = {k: 1.0 for k in augment.OFF_FIELDS if k.endswith("_p")}
    return augment.AugmentConfig(
        **{**augment.OFF_FIELDS, **on, "blur_p_per_modality": 1.0, "lowres_p_per_modality": 1.0}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    runtime.setup()  # fast XLA:CPU flags before JAX starts
    import jax
    import numpy as np

    from brats_jax import losses
    from brats_jax.benchmarking import workload
    from brats_jax.benchmarking.timing import time_steps
    from brats_jax.training import steps

    model, tx, init, batch = workload.cpu_preset_step_setup()
    loss_params = losses.loss_params("dice_ce", dice_weight=0.5)
    variants = {
        "off": steps.make_train_step(model, tx),
        "full": steps.make_train_step(model, tx, augment_cfg=full_augmentation()),
    }
    compiled, states = {}, {}
    for name, fn in variants.items():  # compile once each (and one warm-up step)
        timing = time_steps(fn, init(0), (batch, loss_params), 1, count_flops=False)
        compiled[name], states[name] = timing.compiled, timing.state
        print(f"{name:5s} compile {timing.compile_s:.1f} s")
    medians = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in compiled.items():
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                states[name], out = step(states[name], batch, loss_params)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - t)
            medians[name].append(float(np.median(times)))
    for name, values in medians.items():
        print(f"{name:5s} median s/step per repeat:", " ".join(f"{v:.3f}" for v in values))
    ratios = np.asarray(medians["full"]) / np.asarray(medians["off"])
    ratio = np.median(medians["full"]) / np.median(medians["off"])
    print(
        f"ratio full/off (medians): {ratio:.3f}; per-repeat ratios "
        f"{ratios.min():.3f}..{ratios.max():.3f}"
    )


if __name__ == "__main__":
    main()
