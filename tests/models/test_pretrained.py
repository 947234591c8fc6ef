"""Round trip of Google's R50+ViT-B_16.npz layout into TransUNet parameters.

The real checkpoint cannot be downloaded here; conftest's ``vit_checkpoint.write_npz`` writes a
random .npz with the official key names, following ``make_fake_vit_npz.py`` (the script the
official PyTorch TransUNet loader accepts) with the sizes as arguments, so small variants fit
the tiny preset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.special

from brats_jax.models import TransUNet, load_pretrained
from brats_jax.models.pretrained import adapt_root_kernel, resize_grid_align_corners
from brats_jax.models.transunet import Encoder

FULL = dict(
    units=(3, 4, 9), width=64, hidden=768, layers=12, heads=12, mlp=3072, grid=14, n_cls=21843
)


def abstract_params(model, size, cin=4):
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, cin))))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), v)


def check_round_trip(variables, arrays, report, grid, cin, vit_checkpoint):
    params = variables["params"]
    dropped = {k for k in arrays if k == "cls" or k.startswith("head/")}
    assert set(report.dropped) == dropped
    assert not report.unplaced
    assert set(report.loaded) == set(arrays) - dropped  # every other key was placed
    for k in report.loaded:
        np.testing.assert_allclose(
            vit_checkpoint.get(params, k),
            vit_checkpoint.expected_value(k, arrays[k], grid, cin),
            rtol=1e-5,
            atol=1e-6,
            err_msg=k,
        )
    # Only the decoder and the segmentation head are left at init.
    assert {k.split("/")[0] for k in report.not_in_checkpoint} == {"decoder", "segmentation_head"}


@pytest.mark.parametrize("gn4d", [False, True])
def test_tiny_npz_round_trip(tmp_path, gn4d, vit_checkpoint):
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", gn4d=gn4d, **vit_checkpoint.TINY)
    model = TransUNet(preset="tiny")  # tiny preset = conftest's TINY sizes
    variables = abstract_params(model, 64)  # 4x4 token grid; checkpoint has 3x3 (+ class token)
    new, report = load_pretrained(variables, tmp_path / "vit.npz")
    check_round_trip(new, arrays, report, grid=4, cin=4, vit_checkpoint=vit_checkpoint)
    # params-only input works too and leaves its argument untouched.
    new_p, _ = load_pretrained(variables["params"], tmp_path / "vit.npz")
    np.testing.assert_array_equal(
        vit_checkpoint.get(new_p, "embedding/kernel"), arrays["embedding/kernel"]
    )
    assert not np.any(vit_checkpoint.get(variables["params"], "embedding/kernel"))
    y = jax.jit(model.apply)(new, jnp.ones((1, 64, 64, 4)))
    assert y.shape == (1, 64, 64, 4) and bool(jnp.all(jnp.isfinite(y)))


def _ln(x, s, b):
    m = x.mean(-1, keepdims=True)
    v = x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * s + b


def numpy_vit_encoder(tokens, a, layers, heads, pos):
    """ViT encoder written directly on the checkpoint's arrays (reference semantics)."""
    x = tokens + pos[0]
    for i in range(layers):
        p = f"Transformer/encoderblock_{i}/"
        at = p + "MultiHeadDotProductAttention_1/"
        y = _ln(x, a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, a[at + f"{n}/kernel"]) + a[at + f"{n}/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        w = scipy.special.softmax(logits, axis=-1)
        o = np.einsum("bhqs,bshk->bqhk", w, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, a[at + "out/kernel"]) + a[at + "out/bias"]
        y = _ln(x, a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"])
        h = y @ a[p + "MlpBlock_3/Dense_0/kernel"] + a[p + "MlpBlock_3/Dense_0/bias"]
        h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))  # exact GELU
        x = x + h @ a[p + "MlpBlock_3/Dense_1/kernel"] + a[p + "MlpBlock_3/Dense_1/bias"]
    return _ln(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])


def test_loaded_transformer_computes_the_reference_vit(tmp_path, vit_checkpoint):
    """Names mean what they say: query/key/value/out, LayerNorm_0/2, Dense_0/1 are used in
    the checkpoint's roles (a swap would change the output)."""
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", **vit_checkpoint.TINY)
    model = TransUNet(preset="tiny")
    new, _ = load_pretrained(abstract_params(model, 48), tmp_path / "vit.npz")  # 3x3 grid
    tokens = np.random.default_rng(5).standard_normal((2, 9, 32)).astype(np.float32)
    enc = Encoder(model.config)
    y = enc.apply({"params": new["params"]["Transformer"]}, jnp.asarray(tokens), False)
    pos = arrays["Transformer/posembed_input/pos_embedding"][:, 1:]
    ref = numpy_vit_encoder(tokens.astype(np.float64), arrays, 2, 2, pos)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_root_conv_methods_and_strict_mode(tmp_path, vit_checkpoint):
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", **vit_checkpoint.TINY)
    model = TransUNet(preset="tiny")
    v = abstract_params(model, 48)
    rgb = arrays["conv_root/kernel"]
    new, rep = load_pretrained(v, tmp_path / "vit.npz", root_conv="repeat")
    np.testing.assert_allclose(
        vit_checkpoint.get(new["params"], "conv_root/kernel"),
        rgb[:, :, [0, 1, 2, 0]] * 0.75,
        rtol=1e-6,
    )
    new, rep = load_pretrained(v, tmp_path / "vit.npz", root_conv="init")
    assert "conv_root/kernel" in rep.dropped and "conv_root/kernel" in rep.not_in_checkpoint
    # 3-channel model: copied unchanged.
    v3 = abstract_params(model, 48, cin=3)
    new, rep = load_pretrained(v3, tmp_path / "vit.npz")
    np.testing.assert_array_equal(vit_checkpoint.get(new["params"], "conv_root/kernel"), rgb)
    # A model that does not match (one transformer layer, other MLP width) -> every misfit named.
    other = abstract_params(TransUNet(preset="tiny", num_layers=1, mlp_dim=48), 48)
    with pytest.raises(ValueError, match="encoderblock_1") as e:
        load_pretrained(other, tmp_path / "vit.npz")
    assert "Dense_0/kernel" in str(e.value)
    _, rep = load_pretrained(other, tmp_path / "vit.npz", strict=False)
    assert "Transformer/encoderblock_1/LayerNorm_0/scale" in rep.unplaced
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in rep.unplaced
    assert "Transformer/encoderblock_0/LayerNorm_0/scale" in rep.loaded
    with pytest.raises(ValueError, match="root_conv"):
        load_pretrained(v, tmp_path / "vit.npz", root_conv="zeros")


def test_grid_resize_matches_scipy_zoom_and_official_layout_size(vit_checkpoint):
    g = np.random.default_rng(0).standard_normal((14, 14, 5))
    np.testing.assert_allclose(
        resize_grid_align_corners(g, (15, 15)),
        scipy.ndimage.zoom(g, (15 / 14, 15 / 14, 1), order=1),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        resize_grid_align_corners(g, (7, 20)),
        scipy.ndimage.zoom(g, (7 / 14, 20 / 14, 1), order=1),
        atol=1e-12,
    )
    shapes = vit_checkpoint.official_shapes(**FULL)
    assert len(shapes) == 356  # make_fake_vit_npz.py: "356 arrays"
    assert shapes["block3/unit9/conv3/kernel"] == (1, 1, 256, 1024)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)


@pytest.mark.slow
def test_full_size_npz_round_trip(tmp_path, vit_checkpoint):
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", gn4d=True, **FULL)
    variables = abstract_params(TransUNet(), 240)
    new, report = load_pretrained(variables, tmp_path / "vit.npz")
    assert len(report.loaded) == 353
    check_round_trip(new, arrays, report, grid=15, cin=4, vit_checkpoint=vit_checkpoint)


def test_scanned_and_per_block_models_load_the_same_arrays(tmp_path, vit_checkpoint):
    """Stage units 2..N and the transformer blocks of the scanned model (stacked) receive the
    checkpoint's unit{u} / encoderblock_{i} arrays at index u-2 / i; the per-block model
    (scan=False) loads them under their own names."""
    sizes = {**vit_checkpoint.TINY, "units": (1, 2, 3), "layers": 3}
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", **sizes)
    kw = dict(preset="tiny", resnet_units=(1, 2, 3), num_layers=3)
    new, report = load_pretrained(abstract_params(TransUNet(**kw), 48), tmp_path / "vit.npz")
    check_round_trip(new, arrays, report, grid=3, cin=4, vit_checkpoint=vit_checkpoint)
    stacked = new["params"]["block3"]["repeated_units"]["conv2"]["kernel"]
    np.testing.assert_array_equal(stacked[1], arrays["block3/unit3/conv2/kernel"])
    enc = new["params"]["Transformer"]["encoderblock"]
    np.testing.assert_array_equal(
        enc["MlpBlock_3"]["Dense_1"]["kernel"][2],
        arrays["Transformer/encoderblock_2/MlpBlock_3/Dense_1/kernel"],
    )
    old, old_report = load_pretrained(
        abstract_params(TransUNet(scan=False, **kw), 48), tmp_path / "vit.npz"
    )
    assert old_report.loaded == report.loaded
    assert "unit3" in old["params"]["block3"] and "encoderblock_2" in old["params"]["Transformer"]
    check_round_trip(old, arrays, old_report, grid=3, cin=4, vit_checkpoint=vit_checkpoint)


def test_root_conv_rgb_mean_keeps_rgb_for_flair_t1ce_t2_and_means_t1():
    """Hand-made kernel: channel c of the RGB kernel holds the constant c+1 in output 0 and
    10*(c+1) in output 1; MODALITIES = (flair, t1, t1ce, t2)."""
    rgb = np.zeros((1, 1, 3, 2), np.float32)
    rgb[0, 0, :, 0] = [1, 2, 3]
    rgb[0, 0, :, 1] = [10, 20, 30]
    out = adapt_root_kernel(rgb, 4, "rgb_mean")
    # flair <- R, t1 <- mean(R,G,B) = 2 (20), t1ce <- G, t2 <- B; all times 3/4
    np.testing.assert_allclose(out[0, 0, :, 0], np.array([1, 2, 2, 3]) * 0.75)
    np.testing.assert_allclose(out[0, 0, :, 1], np.array([10, 20, 20, 30]) * 0.75)
    with pytest.raises(ValueError, match="rgb_mean"):
        adapt_root_kernel(rgb, 5, "rgb_mean")


def test_load_pretrained_root_conv_rgb_mean(tmp_path, vit_checkpoint):
    arrays = vit_checkpoint.write_npz(tmp_path / "vit.npz", **vit_checkpoint.TINY)
    rgb = arrays["conv_root/kernel"]
    new, rep = load_pretrained(
        abstract_params(TransUNet(preset="tiny"), 48), tmp_path / "vit.npz", root_conv="rgb_mean"
    )
    k = vit_checkpoint.get(new["params"], "conv_root/kernel")
    np.testing.assert_allclose(k[:, :, 0], rgb[:, :, 0] * 0.75, rtol=1e-6)  # flair = R
    np.testing.assert_allclose(k[:, :, 2], rgb[:, :, 1] * 0.75, rtol=1e-6)  # t1ce = G
    np.testing.assert_allclose(k[:, :, 3], rgb[:, :, 2] * 0.75, rtol=1e-6)  # t2 = B
    np.testing.assert_allclose(k[:, :, 1], rgb.mean(axis=2) * 0.75, rtol=1e-5)  # t1 = mean
    assert "flair,t1ce,t2" in rep.loaded["conv_root/kernel"]
