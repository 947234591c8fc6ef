"""Cost of logging the effective class weights in the train step (issue 16).

Times the library's train step (`steps.make_train_step`: CB-CE beta 0.99 with per-batch
counts, the `cpu` preset's U-Net at 128 px, batch 8) with and without its `class_weights`
output, 3 interleaved repeats of 8 timed steps each; prints the medians and their ratio.
Run: `python -m benchmarks.class_weights_cost`. Results: BENCHMARKS.md.
"""

from brats_jax import runtime


def main() -> None:
    runtime.setup()  # fast XLA:CPU flags before JAX starts
    import numpy as np

    from brats_jax import losses
    from brats_jax.benchmarking import timing, workload
    from brats_jax.training import steps

    model, tx, init, batch = workload.cpu_preset_step_setup()
    loss_params = losses.loss_params("cb_ce", beta=0.99, class_counts="batch_pixels")
    full = steps.make_train_step(model, tx)

    def without_weights(state, b, p):
        state, out = full(state, b, p)
        return state, {k: v for k, v in out.items() if k != "class_weights"}

    medians = {"with": [], "without": []}
    for _ in range(3):
        for name, fn in (("with", full), ("without", without_weights)):
            medians[name].append(timing.time_steps(fn, init(0), (batch, loss_params), 8).median_s)
    for name, values in medians.items():
        print(name, [f"{v:.3f}" for v in values])
    ratio = np.median(medians["with"]) / np.median(medians["without"])
    print(f"ratio with/without (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
