"""Tests of brats_jax.models: parameter counts, shapes, gradients, modes, precision, layers.

Full-size networks are only traced (jax.eval_shape); anything executed uses small presets with
variables filled by numpy (random init compiles one threefry kernel per parameter shape, which
costs ~1 s each on a small CPU), except one test of the real ``model.init``.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax.models import PRESETS, TransUNet, UNet, create_model
from brats_jax.models.layers import Conv2D, UpConv2x2, resize_bilinear_align_corners
from brats_jax.models.transunet import upgrade_params

KEY = jax.random.PRNGKey(0)
RNGS = {"params": KEY, "dropout": jax.random.PRNGKey(1)}


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_vars(model, size: int, cin: int = 4):
    return jax.eval_shape(lambda: model.init(RNGS, jnp.zeros((1, size, size, cin)), train=False))


def numpy_vars(model, size: int, cin: int = 4, seed: int = 0):
    """Variables with the model's structure, filled by numpy (He-like kernels, noisy norms)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        coll = path[0].key
        shape = s.shape
        if coll == "batch_stats":
            v = rng.standard_normal(shape) * 0.1
            return jnp.asarray(1 + np.abs(v) if name == "var" else v, jnp.float32)
        if name == "kernel":
            if len(shape) == 3 and path[-2].key == "out":
                fan_in = shape[0] * shape[1]
            elif len(shape) == 3:
                fan_in = shape[0]
            else:
                fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name == "scale":
            v = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "pos_embedding":
            v = 0.02 * rng.standard_normal(shape)
        else:
            v = 0.05 * rng.standard_normal(shape)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_vars(model, size, cin))


@functools.partial(jax.jit, static_argnames=("model", "train"))
def run(model, variables, x, train=False, rng=KEY):
    """Jitted apply shared by the tests (compiled once per model/shape/mode)."""
    if train:
        return model.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return model.apply(variables, x, train=False, rngs={"dropout": rng})


def small_unet(**kw):
    return UNet(**{"features": 4, "depth": 3, **kw})


def tiny_transunet(**kw):
    return TransUNet(preset="tiny", **kw)


# --------------------------------------------------------------------------- counts, shapes


def test_default_models_are_the_study_networks():
    assert create_model("unet") == UNet()
    assert create_model("transunet") == TransUNet()
    assert create_model("TransUNet", preset="tiny", decoder_channels=[8, 8, 8, 8]) == TransUNet(
        preset="tiny", decoder_channels=(8, 8, 8, 8)
    )
    assert UNet().features == 64 and UNet().depth == 4 and UNet().num_classes == 4
    assert TransUNet().config == PRESETS["r50_vit_b16"]


def test_unet_parameter_counts():
    # FACTS.md: 31,032,516 without normalisation, 31,044,292 with BatchNorm after every 3x3 conv.
    assert n_params(abstract_vars(UNet(), 240)["params"]) == 31_032_516
    assert n_params(abstract_vars(UNet(norm="batch"), 240)["params"]) == 31_044_292
    assert n_params(abstract_vars(UNet(norm="group"), 240)["params"]) == 31_044_292


def test_transunet_parameter_counts():
    # Counts of the official PyTorch code (FACTS.md), BatchNorm statistics not counted.
    v = abstract_vars(TransUNet(), 240)
    assert n_params(v["params"]) == 105_301_764
    assert n_params(abstract_vars(TransUNet(), 224)["params"]) == 105_279_492
    assert n_params(abstract_vars(TransUNet(num_classes=9), 224, cin=3)["params"]) == 105_277_081
    # BatchNorm statistics: conv_more 512 + decoder (256,256,128,128,64,64,16,16), mean and var.
    assert n_params(v["batch_stats"]) == 2 * (512 + 2 * (256 + 128 + 64 + 16))


@pytest.mark.parametrize("size", [128, 224, 240])
def test_full_size_output_shapes(size):
    x = jax.ShapeDtypeStruct((2, size, size, 4), jnp.float32)
    for model in (UNet(), TransUNet()):
        v = abstract_vars(model, size)
        out = jax.eval_shape(lambda v, x, m=model: m.apply(v, x, train=False), v, x)
        assert out.shape == (2, size, size, 4) and out.dtype == jnp.float32
    pe = v["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, (size // 16) ** 2, 768)


@pytest.mark.parametrize(
    "size",
    [240, pytest.param(128, marks=pytest.mark.slow), pytest.param(224, marks=pytest.mark.slow)],
)
def test_small_models_run_at_study_sizes(size):
    # Executes the small presets; the default networks' shapes at 128/224/240 are checked above.
    x = jax.random.normal(KEY, (1, size, size, 4))
    for model in (small_unet(depth=4), tiny_transunet()):
        y = run(model, numpy_vars(model, size), x)
        assert y.shape == (1, size, size, 4) and y.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(y)))


def test_transunet_skip_feature_shapes_follow_official_padding():
    # 240: root 120, max-pool 59 (block1 59 -> zero-padded to 60), block2 30, block3 15.
    model = TransUNet()
    x = jax.ShapeDtypeStruct((1, 240, 240, 4), jnp.float32)
    v = abstract_vars(model, 240)

    def f(v, x):
        _, state = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]

    inter = jax.eval_shape(f, v, x)
    assert inter["block1"]["__call__"][0].shape == (1, 59, 59, 256)
    assert inter["block2"]["__call__"][0].shape == (1, 30, 30, 512)
    assert inter["block3"]["__call__"][0].shape == (1, 15, 15, 1024)
    dec = inter["decoder"]
    assert dec["block_1"]["__call__"][0].shape == (1, 60, 60, 128)
    assert dec["block_2"]["__call__"][0].shape == (1, 120, 120, 64)


def test_bad_input_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        abstract_vars(TransUNet(preset="tiny"), 100)
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth"):
        abstract_vars(UNet(), 100)
    with pytest.raises(ValueError, match="preset"):
        abstract_vars(TransUNet(preset="huge"), 32)
    with pytest.raises(ValueError, match="norm"):
        abstract_vars(UNet(norm="layer"), 32)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet")


# --------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize(
    "model",
    [
        small_unet(depth=2, norm="batch"),
        pytest.param(small_unet(depth=2), marks=pytest.mark.slow),
        pytest.param(small_unet(depth=2, norm="group", padding="zero"), marks=pytest.mark.slow),
        tiny_transunet(),
        pytest.param(tiny_transunet(n_skip=1), marks=pytest.mark.slow),
    ],
    ids=["unet-bn", "unet", "unet-gn-zero", "transunet-tiny", "transunet-tiny-nskip1"],
)
def test_every_parameter_gets_a_gradient(model):
    size = 32
    v = numpy_vars(model, size)
    x = jax.random.normal(KEY, (2, size, size, 4))
    y = jax.random.randint(jax.random.PRNGKey(3), (2, size, size), 0, 4)

    def loss(p):
        logits, _ = model.apply(
            {**v, "params": p},
            x,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(4)},
            mutable=["batch_stats"],
        )
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    grads = jax.jit(jax.grad(loss))(v["params"])
    dead = [
        jax.tree_util.keystr(p)
        for p, g in jax.tree_util.tree_leaves_with_path(grads)
        if not bool(jnp.any(g != 0)) or not bool(jnp.all(jnp.isfinite(g)))
    ]
    assert not dead, f"parameters without a (finite) gradient: {dead}"


def test_eval_is_deterministic_and_train_uses_dropout_and_batch_stats():
    model = tiny_transunet()
    v = numpy_vars(model, 32)
    x = jax.random.normal(KEY, (2, 32, 32, 4))
    e1 = run(model, v, x, rng=jax.random.PRNGKey(1))
    e2 = run(model, v, x, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    t1, s1 = run(model, v, x, train=True, rng=jax.random.PRNGKey(1))
    t2, _ = run(model, v, x, train=True, rng=jax.random.PRNGKey(2))
    assert not np.allclose(np.asarray(t1), np.asarray(t2))  # dropout is active in train mode
    old, new = v["batch_stats"], s1["batch_stats"]
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), old, new)
    assert all(jax.tree_util.tree_leaves(changed))  # running statistics updated
    # UNet without normalisation has no batch_stats; mutable apply still works.
    u = small_unet()
    out, upd = u.apply(numpy_vars(u, 32), x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 32, 32, 4) and not upd


@pytest.mark.parametrize("kind", ["unet", "transunet"])
def test_bfloat16_forward_close_to_float32(kind):
    make = small_unet if kind == "unet" else tiny_transunet
    kw = {"norm": "batch"} if kind == "unet" else {}
    m32, m16 = make(**kw), make(dtype=jnp.bfloat16, **kw)
    v = numpy_vars(m32, 32)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(abstract_vars(m16, 32)))
    x = jax.random.normal(KEY, (2, 32, 32, 4))
    y32 = run(m32, v, x)
    y16 = run(m16, v, x)
    assert y16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(y16 - y32)) / jnp.max(jnp.abs(y32)))
    assert err < 0.05, err
    agree = float(jnp.mean(jnp.argmax(y16, -1) == jnp.argmax(y32, -1)))
    assert agree > 0.9, agree
    # The convolutions really run in bfloat16.
    jaxpr = jax.make_jaxpr(m16.apply)(v, x)
    convs = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _all_eqns(sub)


@pytest.mark.slow
def test_real_init_of_small_presets():
    """model.init itself (random initialisers) for the tiny presets: parameter counts and a
    finite forward pass at 32 px."""
    x = jnp.ones((1, 32, 32, 4))
    for model in (UNet(features=4, depth=2), tiny_transunet()):
        v = model.init(RNGS, x, train=False)
        assert n_params(v["params"]) == n_params(abstract_vars(model, 32)["params"])
        assert bool(jnp.all(jnp.isfinite(model.apply(v, x))))


# --------------------------------------------------------------------------- layers


def _np_resize_align_corners(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Direct per-pixel bilinear interpolation with align_corners=True, (H,W,C)."""
    h, w, _ = img.shape
    out = np.zeros((out_h, out_w, img.shape[2]))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, h - 1)
        dy = sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, w - 1)
            dx = sx - x0
            out[i, j] = (
                (1 - dy) * (1 - dx) * img[y0, x0]
                + (1 - dy) * dx * img[y0, x1]
                + dy * (1 - dx) * img[y1, x0]
                + dy * dx * img[y1, x1]
            )
    return out


@pytest.mark.parametrize(
    "src,dst", [((4, 5), (8, 10)), ((3, 7), (5, 4)), ((1, 2), (2, 4)), ((15, 15), (30, 30))]
)
def test_bilinear_align_corners_matches_numpy(src, dst):
    x = np.random.default_rng(0).standard_normal((2, *src, 3))
    y = np.asarray(resize_bilinear_align_corners(jnp.asarray(x, jnp.float32), dst))
    for b in range(2):
        np.testing.assert_allclose(y[b], _np_resize_align_corners(x[b], *dst), atol=1e-5)


def test_bilinear_align_corners_keeps_corners_and_ramps():
    # align_corners=True: a linear ramp 0..n-1 becomes the ramp 0..n-1 sampled at 2n points.
    ramp = jnp.arange(6.0).reshape(1, 6, 1, 1) * jnp.ones((1, 1, 3, 1))
    y = resize_bilinear_align_corners(ramp, (12, 6))
    np.testing.assert_allclose(np.asarray(y[0, :, 0, 0]), np.linspace(0, 5, 12), atol=1e-6)


def test_upconv_is_2x2_stride2_transposed_conv():
    x = np.random.default_rng(1).standard_normal((1, 3, 2, 5)).astype(np.float32)
    layer = UpConv2x2(4)
    k = np.random.default_rng(2).standard_normal((2, 2, 5, 4)).astype(np.float32)
    v = {"params": {"kernel": k, "bias": np.arange(4, dtype=np.float32)}}
    y = np.asarray(layer.apply(v, x))
    ref = np.zeros((1, 6, 4, 4))  # scatter definition of a transposed conv
    for h in range(3):
        for w in range(2):
            for i in range(2):
                for j in range(2):
                    ref[0, 2 * h + i, 2 * w + j] += x[0, h, w] @ k[i, j]
    np.testing.assert_allclose(y, ref + np.arange(4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,np_mode", [("reflect", "reflect"), ("zero", "constant")])
def test_conv_padding_modes(padding, np_mode):
    x = np.random.default_rng(2).standard_normal((1, 5, 6, 2)).astype(np.float32)
    layer = Conv2D(3, 3, padding=padding)
    k = np.random.default_rng(3).standard_normal((3, 3, 2, 3)).astype(np.float32)
    y = np.asarray(layer.apply({"params": {"kernel": k, "bias": np.zeros(3, np.float32)}}, x))
    xp = np.pad(x[0], ((1, 1), (1, 1), (0, 0)), mode=np_mode)
    ref = np.zeros((5, 6, 3))
    for i in range(5):
        for j in range(6):
            ref[i, j] = np.einsum("hwc,hwcd->d", xp[i : i + 3, j : j + 3], k)
    np.testing.assert_allclose(y[0], ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- FLOPs


def test_flops_per_slice_matches_conv_arithmetic():
    from brats_jax.benchmarking.flops import flops_per_slice

    s, f, cin, ncls = 32, 4, 4, 4
    r = flops_per_slice(UNet(features=f, depth=2), s, batch_size=2)
    # Multiply-adds of the convolutions (2 FLOPs each): levels f, 2f, bottleneck 4f.
    c = [f, 2 * f, 4 * f]
    macs, ci = 0, cin
    for i, ch in enumerate(c):
        macs += 9 * (s // 2**i) ** 2 * (ci * ch + ch * ch)
        ci = ch
    for i in (1, 0):
        sz = s // 2**i
        macs += 4 * (sz // 2) ** 2 * c[i + 1] * c[i] + 9 * sz**2 * (2 * c[i] * c[i] + c[i] * c[i])
    macs += s * s * f * ncls
    assert r["forward"] == pytest.approx(2 * macs, rel=0.1)
    assert 2.0 < r["train_step"] / r["forward"] < 4.0
    assert r["params"] == n_params(abstract_vars(UNet(features=f, depth=2), s)["params"])


def test_flops_per_slice_counts_the_deep_supervision_heads_in_training_only():
    """A deep-supervised U-Net's eval forward is the plain U-Net's (heads only in training);
    its train step also runs and differentiates the auxiliary 1x1 heads, so it costs more
    (a loss of the full-resolution output alone would let XLA drop them: equal counts)."""
    from brats_jax.benchmarking.flops import flops_per_slice

    plain = flops_per_slice(UNet(features=4, depth=3), 32)
    deep = flops_per_slice(UNet(features=4, depth=3, deep_supervision=True), 32)
    assert deep["forward"] == pytest.approx(plain["forward"], rel=1e-9)
    head_macs = 16 * 16 * 8 * 4  # ds_head_1, on the 16 px decoder level: 2f -> 4 classes
    assert deep["train_step"] - plain["train_step"] >= 2 * head_macs


# --------------------------------------------------------------------------- scanned TransUNet


def test_scanned_transunet_eval_equals_per_block_model():
    """Quick check (eval only) of the slow test below, at the tiny preset with scanned units."""
    old, new = (
        tiny_transunet(scan=False, resnet_units=(1, 1, 2)),
        tiny_transunet(resnet_units=(1, 1, 2)),
    )
    v_old = numpy_vars(old, 32)
    x = jax.random.normal(KEY, (1, 32, 32, 4))
    np.testing.assert_allclose(
        np.asarray(run(new, upgrade_params(v_old), x)), np.asarray(run(old, v_old, x)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


@pytest.mark.slow
def test_scanned_transunet_equals_per_block_model():
    """scan=True (stacked blocks and units, one nn.scan each) computes today's per-block
    TransUNet on the same weights: eval and train outputs, batch statistics and gradients."""
    kw = dict(resnet_units=(1, 2, 3), num_layers=3, dropout_rate=0.0)
    old, new = tiny_transunet(scan=False, **kw), tiny_transunet(**kw)
    v_old = numpy_vars(old, 32)
    v_new = upgrade_params(v_old)
    assert jax.tree.structure(v_new) == jax.tree.structure(abstract_vars(new, 32))
    assert v_new["params"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (3, 32)
    assert v_new["params"]["block3"]["repeated_units"]["conv2"]["kernel"].shape[0] == 2
    x = jax.random.normal(KEY, (2, 32, 32, 4))

    @functools.partial(jax.jit, static_argnums=0)
    def outputs(model, v):
        def loss(p):
            y, upd = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(y**2), (y, upd)

        grads, (y, upd) = jax.grad(loss, has_aux=True)(v["params"])
        return model.apply(v, x, train=False), y, upd, grads

    ev_new, y_new, s_new, g_new = outputs(new, v_new)
    ev_old, y_old, s_old, g_old = outputs(old, v_old)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(np.asarray(ev_new), np.asarray(ev_old))
    close(np.asarray(y_new), np.asarray(y_old))
    jax.tree.map(close, s_new, s_old)
    jax.tree.map(close, g_new, upgrade_params(g_old))


def test_upgrade_params_stacks_per_block_trees_and_is_identity_on_new_ones():
    from flax.core import FrozenDict

    from brats_jax.models.transunet import is_stacked, per_block_params

    a, b, c, d = (np.full((2,), v, np.float32) for v in (1.0, 2.0, 3.0, 4.0))
    old = {
        "Transformer": {"encoderblock_0": {"w": a}, "encoderblock_1": {"w": b}, "n": {"s": c}},
        "block1": {"unit1": {"k": a}, "unit2": {"k": c}, "unit3": {"k": d}},
        "block2": {"unit1": {"k": b}},
    }
    up = upgrade_params(old)
    assert set(up["Transformer"]) == {"encoderblock", "n"} and set(up["block2"]) == {"unit1"}
    np.testing.assert_array_equal(up["Transformer"]["encoderblock"]["w"], [[1, 1], [2, 2]])
    assert set(up["block1"]) == {"unit1", "repeated_units"}
    np.testing.assert_array_equal(up["block1"]["repeated_units"]["k"], [[3, 3], [4, 4]])
    np.testing.assert_array_equal(up["block1"]["unit1"]["k"], a)
    assert "encoderblock_0" in old["Transformer"]  # input untouched
    assert is_stacked(up) and not is_stacked(old)
    same = lambda t, u: (
        jax.tree.structure(t) == jax.tree.structure(u)
        and all(
            np.array_equal(p, q)
            for p, q in zip(jax.tree.leaves(t), jax.tree.leaves(u), strict=True)
        )
    )
    assert same(upgrade_params(up), up)  # identity on the new layout
    assert same(per_block_params(up), old) and same(per_block_params(old), old)
    # inside containers (an optax Adam state holds two parameter-shaped trees) and FrozenDicts
    import optax

    opt_old = optax.adam(1e-3).init(old)
    opt_new = upgrade_params(opt_old)
    assert jax.tree.structure(opt_new) == jax.tree.structure(optax.adam(1e-3).init(up))
    assert isinstance(upgrade_params(FrozenDict(old)), FrozenDict)
    with pytest.raises(ValueError, match="not consecutive"):
        upgrade_params({"encoderblock_0": {"w": a}, "encoderblock_2": {"w": b}})
