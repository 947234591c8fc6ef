"""Cost of logging the effective class weights in the train step (issue 16): the library's
train step (`steps.make_train_step`, CB-CE beta 0.99 with per-batch counts, the `cpu` preset's
U-Net at 128 px, batch 8) with and without its `class_weights` output, 3 interleaved repeats
of 8 timed steps each. Run: `python benchmarks/class_weights_cost.py`."""

from brats_jax import runtime

runtime.setup()
import jax, jax.numpy as jnp, numpy as np
from brats_jax import bench, losses, steps, train_state
from configs import unet

c = unet.get_config("cpu")
model = train_state.create_model(c)
tx = train_state.create_optimizer(c.train, 1000)
init = jax.jit(lambda s: train_state.init_state(model, tx, s, image_size=128))
image, label = bench.random_batch(8, 128)
batch = {"image": image, "label": label}
lp = losses.loss_params("cb_ce", beta=0.99, class_counts="batch_pixels")
full = steps.make_train_step(model, tx)


def without(s, b, p):
    s2, o = full(s, b, p)
    return s2, {k: v for k, v in o.items() if k != "class_weights"}


res = {"with": [], "without": []}
for rep in range(3):
    for name, fn in (("with", full), ("without", without)):
        t = bench.time_steps(fn, init(0), (batch, lp), 8)
        res[name].append(t.median_s)
for k, v in res.items():
    print(k, ["%.3f" % x for x in v])
print("ratio with/without (medians):", np.median(res["with"]) / np.median(res["without"]))
