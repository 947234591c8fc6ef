"""brats_jax.ops: the fast-weight-gradient convolution equals the plain XLA convolution.

References are independent of the code under test: jax.grad through flax's own nn.Conv /
lax.conv_general_dilated (XLA's transpose rule), and a direct numpy sum for the weight gradient.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax.ops import (
    FastConv,
    conv2d_fast,
    conv2d_xla,
    input_grad,
    pick_wgrad_strategy,
    weight_grad,
)

STRATS = ["im2col", "shift", "dots", "xla", "auto"]


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _numpy_wgrad(x, dy, kh, kw):
    """dW[i,j,c,o] = sum_{b,h,w} x[b,h+i,w+j,c] dy[b,h,w,o] in float64."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    _, h, w, _ = dy.shape
    return np.stack(
        [
            np.stack(
                [np.einsum("bhwc,bhwo->co", x[:, i : i + h, j : j + w], dy) for j in range(kw)]
            )
            for i in range(kh)
        ]
    )


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("k", [1, 3])
def test_weight_grad_matches_direct_sum(strategy, k, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # "auto" then picks im2col/shift, not xla
    x = _rand((2, 7 + k - 1, 6 + k - 1, 3), 0)
    dy = _rand((2, 7, 6, 5), 1)
    got = weight_grad(x, dy, (k, k, 3, 5), strategy)
    np.testing.assert_allclose(np.asarray(got), _numpy_wgrad(x, dy, k, k), rtol=1e-5, atol=1e-5)


def test_weight_grad_rectangular_kernel():
    x, dy = _rand((1, 6, 9, 2), 2), _rand((1, 4, 5, 3), 3)
    for s in ["im2col", "shift", "dots"]:
        got = weight_grad(x, dy, (3, 5, 2, 3), s)
        np.testing.assert_allclose(np.asarray(got), _numpy_wgrad(x, dy, 3, 5), rtol=1e-5, atol=1e-5)


def test_weight_grad_bad_shape_raises():
    with pytest.raises(ValueError, match="dy shape"):
        weight_grad(_rand((1, 6, 6, 2), 0), _rand((1, 5, 5, 3), 0), (3, 3, 2, 3))
    with pytest.raises(ValueError, match="strategy"):
        weight_grad(_rand((1, 6, 6, 2), 0), _rand((1, 4, 4, 3), 0), (3, 3, 2, 3), "nope")


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("padding", ["VALID", ((1, 1), (1, 1)), ((0, 2), (1, 0))])
def test_conv2d_fast_forward_and_grads_equal_plain(strategy, padding, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    x, w = _rand((2, 8, 8, 3), 4), _rand((3, 3, 3, 4), 5)
    t = _rand(conv2d_xla(x, w, (1, 1), padding).shape, 6)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * t)

    plain = loss(lambda x, w: conv2d_xla(x, w, (1, 1), padding))
    fast = loss(lambda x, w: conv2d_fast(x, w, (1, 1), padding, strategy=strategy))
    y0 = conv2d_xla(x, w, (1, 1), padding)
    y1 = conv2d_fast(x, w, (1, 1), padding, strategy=strategy)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))  # same forward, bit for bit
    g0 = jax.grad(plain, (0, 1))(x, w)
    g1 = jax.jit(jax.grad(fast, (0, 1)))(x, w)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_strided_falls_back_to_plain():
    x, w = _rand((1, 9, 9, 2), 7), _rand((3, 3, 2, 2), 8)
    g0 = jax.grad(lambda w: jnp.sum(conv2d_xla(x, w, (2, 2), "VALID") ** 2))(w)
    g1 = jax.grad(lambda w: jnp.sum(conv2d_fast(x, w, (2, 2), "VALID") ** 2))(w)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-6)


@pytest.mark.parametrize("impl", ["cpu_fast", "auto", "xla"])
def test_fastconv_is_a_drop_in_for_nn_conv(impl):
    x = _rand((2, 8, 8, 3), 9)
    ref = nn.Conv(4, (3, 3), padding="SAME")
    mine = FastConv(4, (3, 3), padding="SAME", impl=impl)
    params = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(
        mine.init(jax.random.PRNGKey(0), x)
    ) == jax.tree_util.tree_structure(params)

    def loss(m):
        return lambda p: jnp.sum(jnp.tanh(m.apply(p, x)) * jnp.arange(4.0))

    np.testing.assert_allclose(
        np.asarray(mine.apply(params, x)), np.asarray(ref.apply(params, x)), rtol=1e-6, atol=1e-6
    )
    g0, g1 = jax.grad(loss(ref))(params), jax.grad(loss(mine))(params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5),
        g0,
        g1,
    )


def test_fastconv_reflect_padding_matches_explicit_pad():
    x = _rand((1, 6, 6, 2), 10)
    m = FastConv(3, 3, padding="REFLECT", impl="cpu_fast")
    p = m.init(jax.random.PRNGKey(1), x)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    want = conv2d_xla(xp, p["params"]["kernel"]) + p["params"]["bias"]
    np.testing.assert_allclose(np.asarray(m.apply(p, x)), np.asarray(want), rtol=1e-6)


def test_pick_strategy(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert pick_wgrad_strategy((4, 130, 130, 64), (3, 3, 64, 64)) == "xla"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert pick_wgrad_strategy((4, 10, 10, 1024), (1, 1, 1024, 4)) == "im2col"
    assert pick_wgrad_strategy((4, 10, 10, 64), (3, 3, 64, 64)) == "im2col"
    assert pick_wgrad_strategy((4, 130, 130, 64), (3, 3, 64, 64)) == "shift"


def test_input_grad_bit_identical_to_xla_transpose():
    x, w, dy = _rand((2, 7, 6, 3), 13), _rand((3, 3, 3, 5), 14), _rand((2, 5, 4, 5), 15)
    (want,) = jax.vjp(lambda a: conv2d_xla(a, w), x)[1](dy)
    np.testing.assert_allclose(
        np.asarray(input_grad(dy, w)), np.asarray(want), rtol=1e-6, atol=1e-6
    )


def test_set_cpu_xla_flags_keeps_user_choice(monkeypatch):
    import brats_jax.ops.flags as fl

    monkeypatch.setattr(fl, "_backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    added = fl.set_cpu_xla_flags()
    assert added == ["--xla_cpu_experimental_ynn_fusion_type="]
    import os

    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_cpu_use_onednn=false",
        "--xla_cpu_experimental_ynn_fusion_type=",
    ]
    assert fl.ynn_disabled()


def test_unet_gradients_equal_with_fast_conv(monkeypatch):
    """Whole tiny U-Net: cpu_fast gradients equal the plain XLA ones (float32 tolerance)."""
    monkeypatch.setenv("XLA_FLAGS", "")
    from brats_jax.models import create_model

    x = _rand((2, 16, 16, 4), 11)
    y = jnp.asarray(np.random.default_rng(12).integers(0, 4, (2, 16, 16)), jnp.int32)
    plain = create_model("unet", features=4, depth=2, conv_impl="xla")
    fast = create_model("unet", features=4, depth=2, conv_impl="cpu_fast")
    params = plain.init(jax.random.PRNGKey(0), x)["params"]

    def loss(m):
        def f(p):
            lg = m.apply({"params": p}, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[..., None], -1))

        return f

    l0, g0 = jax.jit(jax.value_and_grad(loss(plain)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(loss(fast)))(params)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale
        ),
        g0,
        g1,
    )
