"""brats_jax.ops: every "cpu_fast" / "gpu_fast" op equals its plain XLA twin, values and
gradients.

References are independent of the code under test: jax.grad through flax's own nn.Conv /
nn.max_pool / jnp.pad / lax.conv_general_dilated (XLA's own transpose rules), and direct numpy
sums and loops (weight gradient, transposed convolution, pad adjoint, first-maximum routing).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax.models.layers import Conv2D
from brats_jax.ops import (
    bias_add_fast,
    conv2d_fast,
    conv2d_xla,
    get_ops,
    input_grad,
    max_pool_2x2_fast,
    max_pool_2x2_xla,
    pick_input_grad_method,
    pick_wgrad_strategy,
    upconv2x2_rows,
    upconv2x2_xla,
    weight_grad,
)
from brats_jax.ops.pad import reflect_pad_dus, reflect_pad_fast, reflect_pad_xla

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


@pytest.mark.parametrize("impl", ["cpu_fast", "gpu_fast", "auto", "xla"])
def test_conv2d_layer_is_a_drop_in_for_nn_conv(impl):
    x = _rand((2, 8, 8, 3), 9)
    ref = nn.Conv(4, (3, 3), padding="SAME")
    mine = Conv2D(4, 3, padding="zero", impl=impl)
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


def test_conv2d_layer_reflect_padding_grads_equal_plain():
    x = _rand((2, 6, 5, 2), 10)
    fast, plain = Conv2D(3, 3, padding="reflect", impl="cpu_fast"), Conv2D(3, 3, padding="reflect")
    p = plain.init(jax.random.PRNGKey(1), x)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    want = conv2d_xla(xp, p["params"]["kernel"]) + p["params"]["bias"]
    np.testing.assert_array_equal(np.asarray(fast.apply(p, x)), np.asarray(want))
    t = _rand(want.shape, 16)

    def loss(m):
        return lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * t)

    g0 = jax.grad(loss(plain), (0, 1))(p, x)
    g1 = jax.jit(jax.grad(loss(fast), (0, 1)))(p, x)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5),
        g0,
        g1,
    )


def test_pick_strategy(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert pick_wgrad_strategy((4, 130, 130, 64), (3, 3, 64, 64)) == "xla"
    assert pick_wgrad_strategy((4, 128, 128, 64), (1, 1, 64, 4)) == "im2col"
    assert pick_wgrad_strategy((4, 10, 10, 1024), (3, 3, 1024, 1024)) == "im2col"  # 9 MiB
    assert pick_wgrad_strategy((4, 18, 18, 512), (3, 3, 512, 512)) == "xla"  # 18 MiB
    monkeypatch.setenv("XLA_FLAGS", "")
    assert pick_wgrad_strategy((4, 10, 10, 1024), (1, 1, 1024, 4)) == "im2col"
    assert pick_wgrad_strategy((4, 10, 10, 64), (3, 3, 64, 64)) == "im2col"
    assert pick_wgrad_strategy((4, 130, 130, 64), (3, 3, 64, 64)) == "shift"


def test_input_grad_conv_is_bit_identical_to_xla_transpose():
    x, w, dy = _rand((2, 11, 10, 3), 13), _rand((3, 3, 3, 5), 14), _rand((2, 9, 8, 5), 15)
    (want,) = jax.vjp(lambda a: conv2d_xla(a, w), x)[1](dy)
    np.testing.assert_allclose(
        np.asarray(input_grad(dy, w, "conv")), np.asarray(want), rtol=1e-6, atol=1e-6
    )


def _numpy_input_grad(dy, w):
    """dx[b,h+i,w+j,c] += sum_o dy[b,h,w,o] K[i,j,c,o] in float64 (the adjoint, as loops)."""
    dy, w = np.asarray(dy, np.float64), np.asarray(w, np.float64)
    kh, kw, cin, _ = w.shape
    b, h, wd, _ = dy.shape
    dx = np.zeros((b, h + kh - 1, wd + kw - 1, cin))
    for i in range(kh):
        for j in range(kw):
            dx[:, i : i + h, j : j + wd] += np.einsum("bhwo,co->bhwc", dy, w[i, j])
    return dx


@pytest.mark.parametrize("method", ["conv", "flip", "gemm", "auto"])
@pytest.mark.parametrize(
    "dy_shape,k_shape",
    [((2, 3, 3, 32), (3, 3, 32, 32)), ((2, 9, 8, 5), (3, 3, 3, 5)), ((2, 4, 5, 6), (1, 1, 7, 6))],
)
def test_input_grad_methods_match_the_direct_sum(method, dy_shape, k_shape):
    dy, w = _rand(dy_shape, 16), _rand(k_shape, 17)
    got = input_grad(dy, w, method)
    np.testing.assert_allclose(np.asarray(got), _numpy_input_grad(dy, w), rtol=1e-5, atol=1e-5)
    assert got.dtype == dy.dtype


def test_input_grad_gemm_keeps_bfloat16():
    dy = _rand((2, 3, 3, 8), 18).astype(jnp.bfloat16)
    w = _rand((3, 3, 4, 8), 19).astype(jnp.bfloat16)
    got = input_grad(dy, w, "gemm")
    assert got.dtype == jnp.bfloat16
    ref = _numpy_input_grad(np.asarray(dy, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=5e-2)


def test_pick_input_grad_method():
    # 8x8 / 15x15 bottleneck and 16x16 up to batch 4: one GEMM; 16x16 at batch 16
    # (B*H*W = 4096) and full size: conv; 32x32 at batch 1 (kernel > dy + dx): flip.
    assert pick_input_grad_method((4, 8, 8, 1024), (3, 3, 1024, 1024)) == "gemm"
    assert pick_input_grad_method((4, 15, 15, 1024), (3, 3, 1024, 1024)) == "gemm"
    assert pick_input_grad_method((4, 16, 16, 512), (3, 3, 512, 512)) == "gemm"
    assert pick_input_grad_method((16, 16, 16, 512), (3, 3, 512, 512)) == "conv"
    assert pick_input_grad_method((1, 32, 32, 256), (3, 3, 256, 256)) == "flip"
    assert pick_input_grad_method((4, 128, 128, 64), (3, 3, 64, 64)) == "conv"
    with pytest.raises(ValueError, match="method='bogus'"):
        input_grad(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 1)), "bogus")


# --------------------------------------------------------------------------- pool


def test_max_pool_fast_routes_ties_to_the_first_maximum():
    # One 2x2 window [[1, 3], [3, 0]]: the max 3 is tied; the gradient goes to (0, 1) only.
    x = jnp.asarray([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(max_pool_2x2_fast(x) * 5.0))(x)
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[0.0, 5.0], [0.0, 0.0]])
    # all four tied (a window of ReLU zeros): the first position, like select_and_scatter.
    g = jax.grad(lambda x: jnp.sum(max_pool_2x2_fast(x)))(jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_max_pool_fast_equals_flax_bit_for_bit():
    rng = np.random.default_rng(20)
    # ReLU-like input: many exact zeros and some positive ties, as in the U-Net.
    x = np.maximum(rng.integers(-3, 4, (2, 8, 6, 5)), 0).astype(np.float32)
    x = jnp.asarray(x)
    t = _rand((2, 4, 3, 5), 21)
    for f in (max_pool_2x2_fast, max_pool_2x2_xla):
        np.testing.assert_array_equal(
            np.asarray(f(x)), np.asarray(nn.max_pool(x, (2, 2), strides=(2, 2)))
        )
    g0 = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2)) * t))(x)
    g1 = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_2x2_fast(x) * t)))(x)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g0))


def test_max_pool_odd_size_raises():
    with pytest.raises(ValueError, match="even H and W"):
        max_pool_2x2_fast(jnp.zeros((1, 5, 4, 2)))


# --------------------------------------------------------------------------- upconv, bias, pad


def _np_upconv(x, k):
    """Scatter definition of a 2x2 stride-2 transposed convolution, float64."""
    b, h, w, _ = x.shape
    y = np.zeros((b, 2 * h, 2 * w, k.shape[-1]))
    for i in range(2):
        for j in range(2):
            y[:, i::2, j::2] = np.einsum("bhwc,cd->bhwd", x, k[i, j])
    return y


def test_upconv_rows_matches_definition_and_einsum_grads():
    x, k = _rand((2, 3, 4, 5), 22), _rand((2, 2, 5, 6), 23)
    want = _np_upconv(np.asarray(x, np.float64), np.asarray(k, np.float64))
    for f in (upconv2x2_rows, upconv2x2_xla):
        np.testing.assert_allclose(np.asarray(f(x, k)), want, rtol=1e-5, atol=1e-5)
    t = _rand((2, 6, 8, 6), 24)
    g0 = jax.grad(lambda x, k: jnp.sum(upconv2x2_xla(x, k) * t), (0, 1))(x, k)
    g1 = jax.jit(jax.grad(lambda x, k: jnp.sum(upconv2x2_rows(x, k) * t), (0, 1)))(x, k)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_bias_add_fast_gradient_is_the_channel_sum():
    y, b, t = _rand((2, 3, 4, 5), 25), _rand((5,), 26), _rand((2, 3, 4, 5), 27)
    np.testing.assert_array_equal(np.asarray(bias_add_fast(y, b)), np.asarray(y + b))
    gy, gb = jax.jit(jax.grad(lambda y, b: jnp.sum(bias_add_fast(y, b) * t), (0, 1)))(y, b)
    np.testing.assert_array_equal(np.asarray(gy), np.asarray(t))
    np.testing.assert_allclose(
        np.asarray(gb), np.asarray(t, np.float64).sum((0, 1, 2)), rtol=1e-5, atol=1e-6
    )


def _np_reflect_pad_adjoint(g, p, q, h, w):
    """Adds each padded cotangent value onto the input pixel it was copied from (numpy)."""

    def src(i, n, pad):
        i = i - pad
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    dx = np.zeros(g.shape[:1] + (h, w) + g.shape[3:])
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            dx[:, src(i, h, p), src(j, w, q)] += g[:, i, j]
    return dx


@pytest.mark.parametrize("pad_fn", [reflect_pad_fast, reflect_pad_dus])
@pytest.mark.parametrize("pad", [(1, 1), (2, 1), (0, 2), (3, 3), (6, 5)])
def test_reflect_pad_values_and_adjoint(pad_fn, pad):
    x = _rand((2, 7, 6, 3), 28)
    p, q = pad
    want = np.pad(np.asarray(x), ((0, 0), (p, p), (q, q), (0, 0)), mode="reflect")
    got_x = jax.jit(pad_fn, static_argnums=1)(x, pad)
    np.testing.assert_array_equal(np.asarray(got_x), want)
    g = _rand(want.shape, 29)
    (got,) = jax.jit(lambda x, g: jax.vjp(lambda x: pad_fn(x, pad), x)[1](g))(x, g)
    np.testing.assert_allclose(
        np.asarray(got), _np_reflect_pad_adjoint(np.asarray(g, np.float64), p, q, 7, 6), atol=1e-5
    )
    (xla,) = jax.vjp(lambda x: reflect_pad_xla(x, pad), x)[1](g)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla), atol=1e-6)


def test_reflect_pad_dus_rejects_too_wide_pads():
    with pytest.raises(ValueError, match=r"pad \(7, 1\).*\(2, 7, 6, 3\)"):
        reflect_pad_dus(jnp.zeros((2, 7, 6, 3)), (7, 1))


def test_get_ops(monkeypatch):
    assert get_ops("xla").max_pool is max_pool_2x2_xla
    assert get_ops("cpu_fast").max_pool is max_pool_2x2_fast
    assert get_ops("gpu_fast").reflect_pad is reflect_pad_dus
    assert get_ops("auto") is get_ops("cpu_fast")  # the tests run on the CPU backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert get_ops("auto") is get_ops("gpu_fast")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert get_ops("auto") is get_ops("xla")
    with pytest.raises(ValueError, match="'nope'"):
        get_ops("nope")


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


@pytest.mark.parametrize("impl", ["cpu_fast", "gpu_fast"])
def test_unet_gradients_equal_with_fast_ops(monkeypatch, impl):
    """Whole tiny U-Net: cpu_fast / gpu_fast gradients equal the plain XLA ones (float32
    tolerance)."""
    monkeypatch.setenv("XLA_FLAGS", "")
    from brats_jax.models import create_model

    x = _rand((2, 16, 16, 4), 11)
    y = jnp.asarray(np.random.default_rng(12).integers(0, 4, (2, 16, 16)), jnp.int32)
    plain = create_model("unet", features=4, depth=2, conv_impl="xla")
    fast = create_model("unet", features=4, depth=2, conv_impl=impl)
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


def test_a_resolved_ops_name_never_reads_xla_flags_while_traced(monkeypatch):
    """Issue 17: XLA_FLAGS are read once, by `resolve_impl`; tracing a U-Net gradient with the
    resolved name does not read them (the weight-gradient choice is carried by the name)."""
    from brats_jax.models import UNet
    from brats_jax.ops import conv as conv_module
    from brats_jax.ops import impls

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert impls.resolve_impl("cpu_fast") == "cpu_fast"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert impls.resolve_impl("cpu_fast") == "cpu_fast_ynn"
    assert impls.resolve_impl("auto") == "cpu_fast_ynn"  # the tests run on the CPU backend

    def no_reading():
        raise AssertionError("XLA_FLAGS read while tracing")

    monkeypatch.setattr(conv_module, "ynn_disabled", no_reading)
    monkeypatch.setattr(impls, "ynn_disabled", no_reading)
    for name in ("cpu_fast", "cpu_fast_ynn"):
        model = UNet(features=4, depth=2, num_classes=4, conv_impl=name)
        x = jnp.ones((1, 16, 16, 4))
        params = model.init(jax.random.PRNGKey(0), x)
        jax.grad(lambda p, m=model, x=x: m.apply(p, x).sum())(params)  # traces the gradients
