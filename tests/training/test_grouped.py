"""Grouped runs: convolutions as im2col GEMMs (brats_jax.ops.gemm) so that K stacked runs under
jax.vmap are batched GEMMs; results equal the K single runs (plain XLA convolutions)."""

from __future__ import annotations

import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from brats_jax.benchmarking import workload
from brats_jax.models import UNet
from brats_jax.ops.gemm import conv2d_gemm, im2col
from brats_jax.runs import train_state
from brats_jax.runs.checkpoints import RunCheckpoints
from brats_jax.training import train


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


@pytest.mark.parametrize(
    "kshape,strides,padding",
    [
        ((3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
        ((3, 3, 5, 6), (2, 2), "VALID"),
        ((1, 1, 5, 3), (1, 1), "VALID"),
        ((7, 7, 5, 4), (2, 2), ((3, 3), (3, 3))),
        ((3, 2, 5, 4), (1, 2), ((1, 1), (0, 1))),
    ],
)
def test_conv2d_gemm_equals_xla_convolution(kshape, strides, padding):
    kx, kk = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, 11, 13, kshape[2]))
    k = jax.random.normal(kk, kshape)
    ref = lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(conv2d_gemm(x, k, strides, padding), ref, rtol=1e-5, atol=1e-5)


def test_im2col_channel_order_is_the_hwio_kernel_order():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    p = im2col(x, (3, 3), (1, 1), "VALID")  # (2, 2, 2, 27)
    assert p.shape == (2, 2, 2, 27)
    # patch at output (1, 0), kernel tap (i, j) = (2, 1), channel 2 -> x[b, 1+2, 0+1, 2]
    np.testing.assert_array_equal(p[1, 1, 0, (2 * 3 + 1) * 3 + 2], x[1, 3, 1, 2])


def test_vmapped_gemm_conv_is_a_batched_gemm_not_a_grouped_convolution():
    x = jnp.ones((4, 1, 8, 8, 3))  # K=4 runs, batch 1
    k = jnp.ones((4, 3, 3, 3, 5))
    pad = ((1, 1), (1, 1))
    grouped = jax.make_jaxpr(
        jax.vmap(jax.grad(lambda x, k: jnp.sum(conv2d_gemm(x, k, (1, 1), pad) ** 2), (0, 1)))
    )(x, k)
    prims = _primitives(grouped.jaxpr)
    assert "dot_general" in prims and "conv_general_dilated" not in prims
    plain = jax.make_jaxpr(
        jax.vmap(
            lambda x, k: lax.conv_general_dilated(
                x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        )
    )(x, k)
    conv = [e for e in plain.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert conv and conv[0].params["feature_group_count"] == 4  # what vmap does without gemm


def test_vmapped_gemm_conv_gradients_equal_the_single_runs():
    """Forward and both gradients of K=3 vmapped gemm convolutions (own kernels, own inputs)
    equal three plain XLA convolutions."""
    kx, kk, kd = jax.random.split(jax.random.PRNGKey(1), 3)
    x, k = jax.random.normal(kx, (3, 1, 9, 9, 4)), jax.random.normal(kk, (3, 3, 3, 4, 5))
    dy = jax.random.normal(kd, (3, 1, 9, 9, 5))
    pad = ((1, 1), (1, 1))
    ref_conv = lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y, vjp = jax.vjp(jax.vmap(lambda x, k: conv2d_gemm(x, k, (1, 1), pad)), x, k)
    dx, dk = vjp(dy)
    for r in range(3):
        y_r, vjp_r = jax.vjp(ref_conv, x[r], k[r])
        dx_r, dk_r = vjp_r(dy[r])
        np.testing.assert_allclose(y[r], y_r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx[r], dx_r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dk[r], dk_r, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_vmapped_unet_step_equals_the_single_runs():
    """K=3 U-Net runs (own weights, own images) stepped together under vmap with the gemm
    ops give the losses, gradients and updated weights of three single steps of the plain
    XLA model, to float32 rounding."""
    runs, size = 3, 32
    tx = optax.sgd(0.1)
    ref_net = UNet(features=4, depth=2, conv_impl="xla")
    net = UNet(features=4, depth=2, conv_impl="gemm")
    states = [workload.init_train_state(ref_net, size, tx, seed=s) for s in range(runs)]
    batches = [workload.random_batch(1, size, seed=10 + s) for s in range(runs)]
    single = jax.jit(workload.make_train_step(ref_net, tx))
    expected = [single(st, *b) for st, b in zip(states, batches, strict=True)]
    stack = lambda *xs: jnp.stack(xs)
    grouped = jax.jit(jax.vmap(workload.make_train_step(net, tx)))
    k_state = jax.tree.map(stack, *states)
    k_image, k_label = (jnp.stack(xs) for xs in zip(*batches, strict=True))
    new_state, losses = grouped(k_state, k_image, k_label)
    prims = _primitives(jax.make_jaxpr(jax.vmap(workload.make_train_step(net, tx)))(
        k_state, k_image, k_label
    ).jaxpr)  # fmt: skip
    assert "conv_general_dilated" not in prims
    for r, (st, loss) in enumerate(expected):
        np.testing.assert_allclose(losses[r], loss, rtol=1e-5)
        got = jax.tree.map(lambda a, r=r: a[r], new_state["params"])
        before = jax.tree.map(lambda a, r=r: a[r], k_state["params"])
        # sgd(0.1): grad = (before - after) / 0.1; compare gradients and the new weights
        g_got = jax.tree.map(lambda b, a: (b - a) / 0.1, before, got)
        g_ref = jax.tree.map(lambda b, a: (b - a) / 0.1, states[r]["params"], st["params"])
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
        jax.tree.map(
            lambda a, b, s=scale: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * s),
            g_got, g_ref,
        )  # fmt: skip
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            got, st["params"],
        )  # fmt: skip


@pytest.mark.slow
def test_transunet_gemm_convolutions_equal_xla_and_vmap_to_gemms():
    """TransUNet(conv_impl="gemm") computes the default model on the same weights; vmapped over
    K=2 runs' weights its program has no convolution left (all batched GEMMs)."""
    from brats_jax.models import TransUNet

    ref, net = TransUNet(preset="tiny"), TransUNet(preset="tiny", conv_impl="gemm")
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 32, 32, 4))
    v = ref.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}, x)
    np.testing.assert_allclose(
        jax.jit(net.apply)(v, x), jax.jit(ref.apply)(v, x), rtol=1e-4, atol=1e-5
    )
    kv = jax.tree.map(lambda a: jnp.stack([a, a]), v)
    prims = _primitives(jax.make_jaxpr(jax.vmap(net.apply))(kv, jnp.stack([x, x])).jaxpr)
    assert "dot_general" in prims and "conv_general_dilated" not in prims


STEPS = 2


# Two tiny runs of STEPS steps (a log row and a checkpoint each step, no validation split).
GROUP = {
    "data.val_fraction": 0.0,
    "train.num_steps": STEPS,
    "train.log_every_steps": 1,
    "train.checkpoint_every_steps": 1,
}
RUN_FIELDS = [
    {"train.loss": "ce", "train.learning_rate": 1e-3, "train.seed": 0},
    {"train.loss": "dice_ce", "train.learning_rate": 3e-3, "train.seed": 1},
]


@pytest.fixture(scope="module")
def run_configs(tiny_config):
    """The configs of RUN_FIELDS, shared by the module's tests."""
    return [tiny_config(**GROUP | fields) for fields in RUN_FIELDS]


@pytest.fixture(scope="module")
def alone(tmp_path_factory, run_configs):
    """Each run trained by itself (plain XLA convolutions): folder and results."""
    root = tmp_path_factory.mktemp("alone")
    return root, [train.train_and_evaluate(c, root / str(i)) for i, c in enumerate(run_configs)]


def _train_losses(workdir) -> list[float]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _assert_same_as_alone(alone, workdirs, got):
    root, expected = alone
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["steps"] == e["steps"] == STEPS
        want, have = _train_losses(root / str(i)), _train_losses(workdirs[i])
        assert len(want) == len(have) == STEPS
        np.testing.assert_allclose(have, want, rtol=2e-3, atol=2e-4)
        assert g["paper_dice"] == pytest.approx(e["paper_dice"], abs=2e-3)
        for r in ("WT", "TC", "ET"):
            assert g["dice"][r] == pytest.approx(e["dice"][r], abs=2e-2)
        _, _, v_alone = train_state.load_trained(root / str(i), step=STEPS)
        _, _, v_group = train_state.load_trained(workdirs[i], step=STEPS)
        for x, y in zip(jax.tree.leaves(v_alone), jax.tree.leaves(v_group), strict=True):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-5)


def test_grouped_train_runs_equal_the_single_runs(alone, run_configs, tmp_path):
    workdirs = [tmp_path / str(i) for i in range(len(run_configs))]
    got = train.train_runs(run_configs, workdirs, mapping="grouped")
    _assert_same_as_alone(alone, workdirs, got)


def test_grouped_runs_resume_after_a_stop_between_two_saves(
    alone, run_configs, tmp_path, monkeypatch
):
    """Stopped after run 0 saved the last step but before run 1 did: the rerun redoes that
    step for both (run 0's checkpoint of it is replaced) and ends as the runs alone do."""
    workdirs = [tmp_path / "0", tmp_path / "1"]
    save = RunCheckpoints.save

    def save_or_stop(self, step, *args, **kwargs):
        if step == STEPS and self.directory.parent.name == "1":
            raise KeyboardInterrupt
        save(self, step, *args, **kwargs)

    monkeypatch.setattr(RunCheckpoints, "save", save_or_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train_runs(run_configs, workdirs, mapping="grouped")
    monkeypatch.setattr(RunCheckpoints, "save", save)
    steps = [sorted(int(p.name) for p in (w / "checkpoints").iterdir()) for w in workdirs]
    assert steps == [[1, 2], [1]]
    got = train.train_runs(run_configs, workdirs, mapping="grouped")
    _assert_same_as_alone(alone, workdirs, got)
