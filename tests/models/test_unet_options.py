"""U-Net options of the generalisation recipe: instance norm, leaky ReLU, deep supervision
(nnU-Net's choices).

Expected values come from hand arithmetic (parameter counts), numpy (instance norm, leaky
ReLU) and the per-level losses called one by one (deep supervision), never from the code
under test.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brats_jax import config_fields, losses, models
from brats_jax.models.unet import ConvBlock, UNet
from brats_jax.runs import train_state
from brats_jax.training import steps, train
from configs import default
from configs import unet as unet_config


def _n_params(model, size=240, cin=4):
    v = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, cin)), train=False)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))


def _unet_params_by_hand(cin=4, k=4, f=64, depth=4):
    """Plain U-Net: 3x3 convs 9*ci*co + co, 2x2 up-convs 4*ci*co + co, 1x1 head ci*k + k."""
    conv = lambda ci, co: 9 * ci * co + co  # noqa: E731
    n, c = 0, cin
    for i in range(depth):  # down blocks
        n += conv(c, f * 2**i) + conv(f * 2**i, f * 2**i)
        c = f * 2**i
    n += conv(c, f * 2**depth) + conv(f * 2**depth, f * 2**depth)  # bottleneck
    for i in reversed(range(depth)):  # up-conv, then block on [skip, up]
        co = f * 2**i
        n += 4 * (2 * co) * co + co + conv(2 * co, co) + conv(co, co)
    return n + f * k + k


def test_parameter_counts_by_hand():
    assert _unet_params_by_hand() == 31_032_516  # the study's U-Net (the paper's count)
    assert _n_params(UNet()) == 31_032_516
    assert _n_params(UNet(activation="leaky_relu")) == 31_032_516  # no parameters
    # instance norm: scale + bias per channel, 2 norms per block; block widths
    # down 64,128,256,512, bottleneck 1024, up 512,256,128,64: 2 * 2 * (2*960 + 1024) = 11,776
    channels = 2 * (64 + 128 + 256 + 512) + 1024
    assert channels == 2944
    assert _n_params(UNet(norm="instance")) == 31_032_516 + 2 * 2 * channels == 31_044_292
    # deep supervision at depth 4: heads on up_1 (128 ch) and up_2 (256 ch), 4 outputs each:
    # (128*4 + 4) + (256*4 + 4) = 516 + 1028 = 1,544
    assert _n_params(UNet(deep_supervision=True)) == 31_032_516 + 516 + 1028 == 31_034_060
    # tiny: features 4, depth 3, 3 regions: one head on up_1 (8 ch): 8*3 + 3 = 27
    tiny = _unet_params_by_hand(k=3, f=4, depth=3)
    assert _n_params(UNet(num_classes=3, features=4, depth=3), 32) == tiny
    assert _n_params(UNet(num_classes=3, features=4, depth=3, deep_supervision=True), 32) == (
        tiny + 8 * 3 + 3
    )


def _block_intermediates(block, x, params_edit=None):
    variables = block.init(jax.random.PRNGKey(1), x)
    if params_edit:
        variables = {"params": params_edit(variables["params"])}
    out, state = block.apply(variables, x, capture_intermediates=True)
    inter = state["intermediates"]
    subs = {k: v for k, v in inter.items() if k != "__call__"}  # the block's own output
    return np.asarray(out), {k: np.asarray(v["__call__"][0]) for k, v in subs.items()}


def test_instance_norm_is_a_per_sample_per_channel_normalisation():
    rng = np.random.default_rng(0)
    # sample 0 tiny (variance ~1e-6: eps 1e-5 vs flax's default 1e-6 matters), sample 1 large
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    x[0] *= 1e-3
    x[1] = x[1] * 5 + 2
    scale = rng.uniform(0.5, 2, 5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)

    def edit(p):
        p = jax.tree.map(np.asarray, p)
        p["norm1"] = {"scale": scale, "bias": bias}
        return p

    block = ConvBlock(5, norm="instance")
    _, inter = _block_intermediates(block, jnp.asarray(x), edit)
    y = inter["conv1"].astype(np.float64)  # (2, 8, 8, 5) pre-norm
    mean = y.mean(axis=(1, 2), keepdims=True)
    var = y.var(axis=(1, 2), keepdims=True)
    expected = (y - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(inter["norm1"], expected, rtol=2e-3, atol=2e-4)


def test_leaky_relu_passes_negative_pre_activations_with_slope_0_01():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 3)), jnp.float32)
    out_leaky, inter = _block_intermediates(ConvBlock(4, activation="leaky_relu"), x)
    out_relu, _ = _block_intermediates(ConvBlock(4), x)  # same init key: same weights
    z = inter["conv2"]  # the last pre-activation
    assert (z < 0).any() and (z > 0).any()
    np.testing.assert_allclose(out_leaky, np.where(z > 0, z, 0.01 * z), rtol=1e-6, atol=1e-7)
    neg = z < 0
    assert not np.allclose(out_leaky[neg], out_relu[neg])


def test_nnunet_weights_and_nearest_exact_targets():
    # nnU-Net: n decoder outputs weighted 1/2^i, the lowest set to 0, normalised to sum 1
    for n in (3, 4):
        w = np.array([1 / 2**i for i in range(n)])
        w[-1] = 0
        w = w / w.sum()
        np.testing.assert_allclose(losses.deep_supervision_weights(n - 1), w[:-1])
    np.testing.assert_allclose(losses.deep_supervision_weights(3), [4 / 7, 2 / 7, 1 / 7])
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 4, (2, 16, 16)), jnp.int32)
    # torch "nearest-exact" (nnU-Net's DownsampleSegForDSTransform): out d <- in floor((d+.5)f)
    for f in (1, 2, 4):
        idx = np.floor((np.arange(16 // f) + 0.5) * f).astype(int)
        ref = np.asarray(labels)[:, idx][:, :, idx]
        np.testing.assert_array_equal(losses.downsample_labels(labels, f), ref)
        resized = jax.image.resize(labels.astype(jnp.float32), ref.shape, "nearest")
        np.testing.assert_array_equal(np.asarray(resized).astype(int), ref)  # half-pixel nearest
    np.testing.assert_array_equal(losses.downsample_labels(labels, 2), labels[:, 1::2, 1::2])
    np.testing.assert_array_equal(losses.downsample_labels(labels, 4), labels[:, 2::4, 2::4])


@pytest.mark.parametrize("output", ["classes", "regions"])
def test_deep_supervision_loss_is_the_weighted_sum_of_the_per_level_losses(output):
    k = 4 if output == "classes" else 3
    model = UNet(num_classes=k, features=2, depth=4, padding="zero", deep_supervision=True)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 16, 16)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    outs = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    assert [o.shape for o in outs] == [(2, 16, 16, k), (2, 8, 8, k), (2, 4, 4, k)]
    loss_fn = losses.loss_for_output(output)
    params = (
        losses.loss_params("dice_ce", num_classes=4)
        if output == "classes"
        else losses.region_loss_params("dice_ce")
    )
    # depth 4 -> nnU-Net weights [1, 1/2, 1/4, 0] / 1.75 = [4/7, 2/7, 1/7]
    expected = (
        4 / 7 * loss_fn(outs[0], labels, params)
        + 2 / 7 * loss_fn(outs[1], labels[:, 1::2, 1::2], params)
        + 1 / 7 * loss_fn(outs[2], labels[:, 2::4, 2::4], params)
    )
    got = losses.deep_supervision_loss(loss_fn, outs, labels, params)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.slow  # compiles a training step (minutes on a shared 2-core CPU)
def test_train_step_takes_the_deep_supervision_loss_and_full_resolution_class_weights():
    model = UNet(features=4, depth=3, deep_supervision=True)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(1, 16, 16, 4)), jnp.float32)
    labels = rng.integers(0, 3, (1, 16, 16)).astype(np.int32)
    labels[0, 0, 0] = 3  # the only ET pixel: the 2x down-sampled labels ([1::2, 1::2]) miss it
    assert not (labels[:, 1::2, 1::2] == 3).any()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    tx = optax.sgd(0.0)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"], model_state={},
        opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(0),
    )  # fmt: skip
    params = losses.loss_params("cb_ce", beta=0.9, class_counts=losses.BATCH_PIXELS)
    outs = model.apply(variables, x, train=True)
    # depth 3 -> nnU-Net weights [1, 1/2, 0] / 1.5 = [2/3, 1/3]
    loss_fn = losses.combined_loss
    expected = 2 / 3 * loss_fn(outs[0], labels, params) + 1 / 3 * loss_fn(
        outs[1], labels[:, 1::2, 1::2], params
    )
    _, out = jax.jit(steps.make_train_step(model, tx))(state, {"image": x, "label": labels}, params)
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    # Cui et al. per batch from the full-resolution labels: w_c = (1 - beta) / (1 - beta^n_c),
    # scaled to sum to the number of present classes (4 here, ET with n = 1)
    n = np.bincount(labels.ravel(), minlength=4)
    raw = 0.1 / (1 - 0.9**n)
    np.testing.assert_allclose(out["class_weights"], raw / raw.sum() * 4, rtol=1e-5)


def test_eval_mode_returns_full_resolution_logits_of_the_shared_layers():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 4)), jnp.float32)
    ds = UNet(features=2, depth=3, deep_supervision=True)
    plain = UNet(features=2, depth=3)
    variables = ds.init(jax.random.PRNGKey(0), x)
    out = ds.apply(variables, x, train=False)
    assert out.shape == (2, 16, 16, 4)
    shared = {k: v for k, v in variables["params"].items() if not k.startswith("ds_head")}
    assert set(variables["params"]) - set(shared) == {"ds_head_1"}
    np.testing.assert_allclose(out, plain.apply({"params": shared}, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds.apply(variables, x, train=True)[0], out, rtol=1e-6, atol=1e-6)


def test_config_fields_reach_the_model_and_old_runs_keep_their_network():
    c = unet_config.get_config("tiny")
    assert (c.model.norm, c.model.activation, c.model.deep_supervision) == ("none", "relu", False)
    plain = UNet(features=4, depth=2, conv_impl="xla", dtype=jnp.dtype("float32"))
    assert models.from_config(c.model, ops="xla") == plain
    with c.unlocked():
        c.model.norm, c.model.activation, c.model.deep_supervision = "instance", "leaky_relu", True
    m = models.from_config(c.model, ops="xla")
    assert (m.norm, m.activation, m.deep_supervision) == ("instance", "leaky_relu", True)
    old = json.loads(unet_config.get_config("tiny").to_json_best_effort())
    del old["model"]["activation"], old["model"]["deep_supervision"]
    upgraded = config_fields.upgrade_legacy(old)["model"]
    assert (upgraded["activation"], upgraded["deep_supervision"]) == ("relu", False)
    t = default.base_config()
    t.model.name, t.model.preset, t.model.deep_supervision = "transunet", "tiny", True
    with pytest.raises(ValueError, match=r"^model.deep_supervision=True is for the U-Net"):
        models.from_config(t.model)
    with pytest.raises(ValueError, match="activation"):
        _n_params(UNet(activation="gelu"), 32)


@pytest.mark.slow  # a training run
def test_tiny_run_with_deep_supervision_instance_norm_and_regions(tmp_path, recompute_test_pass):
    c = unet_config.get_config("tiny")
    for dotted, value in {
        "model.deep_supervision": True, "model.norm": "instance", "model.depth": 3,
        "model.output": "regions", "train.loss": "dice_ce", "model.activation": "leaky_relu",
        "train.num_steps": 4, "train.eval_every_steps": 4, "train.checkpoint_every_steps": 4,
    }.items():  # fmt: skip
        config_fields.set_field(c, dotted, value)
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(c, workdir)
    assert results["steps"] == 4
    want = recompute_test_pass(workdir, tmp_path)
    assert results["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in logged if "train_loss" in r)
    config, model, variables = train_state.load_trained(workdir)
    assert config.model.deep_supervision and "ds_head_1" in variables["params"]
    assert model.apply(variables, jnp.zeros((1, 32, 32, 4)), train=False).shape == (1, 32, 32, 3)
