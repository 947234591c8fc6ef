"""Tests for brats_jax.losses against hand-worked values and closed forms."""

import decimal
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brats_jax import losses as L

LN2 = math.log(2.0)


def _two_pixel():
    # pixel 0: logits (0, 0), label 0 -> p = 1/2; pixel 1: logits (ln 3, 0), label 1 -> p = 1/4
    logits = jnp.array([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])  # (1, 1, 2, 2)
    labels = jnp.array([[[0, 1]]])
    return logits, labels


# ------------------------------------------------------------------ cross-entropy / focal


def test_cross_entropy_hand_values():
    logits, labels = _two_pixel()
    np.testing.assert_allclose(L.cross_entropy(logits, labels), 1.5 * LN2, rtol=1e-6)
    w = jnp.array([2.0, 0.5])
    # pixels: (2 ln2 + 0.5 ln4) / 2 ; weights: (2 ln2 + 0.5 ln4) / 2.5
    np.testing.assert_allclose(L.cross_entropy(logits, labels, w), 1.5 * LN2, rtol=1e-6)
    np.testing.assert_allclose(
        L.cross_entropy(logits, labels, w, normalize="weights"), 3 * LN2 / 2.5, rtol=1e-6
    )
    mask = jnp.array([[[True, False]]])
    np.testing.assert_allclose(L.cross_entropy(logits, labels, mask=mask), LN2, rtol=1e-6)
    np.testing.assert_allclose(L.cross_entropy(logits, labels, mask=mask * 0), 0.0)
    with pytest.raises(ValueError, match="normalize"):
        L.cross_entropy(logits, labels, normalize="sum")
    with pytest.raises(ValueError, match="class_weights"):
        L.cross_entropy(logits, labels, jnp.ones(3))


def test_focal_hand_values_and_gamma0_equals_ce():
    logits, labels = _two_pixel()
    # gamma 2: (1/2)^2 ln2 and (3/4)^2 ln4, mean
    want = (0.25 * LN2 + 0.5625 * 2 * LN2) / 2
    np.testing.assert_allclose(L.focal_loss(logits, labels, gamma=2.0), want, rtol=1e-6)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 4)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=(2, 5, 6)))
    w = jnp.array([0.1, 1.0, 2.0, 0.9])
    m = jnp.asarray(rng.random((2, 5, 6)) > 0.3)
    for kw in (dict(), dict(class_weights=w), dict(class_weights=w, normalize="weights")):
        np.testing.assert_allclose(
            L.focal_loss(x, y, gamma=0.0, mask=m, **kw),
            L.cross_entropy(x, y, mask=m, **kw),
            rtol=1e-6,
        )


# ------------------------------------------------------------------ class-balanced weights


def test_class_balanced_weights_hand_computed():
    # beta 0.5: raw (1-b)/(1-b^n) = 1, 2/3, 4/7 -> normalised to sum 3
    raw = np.array([1.0, 2 / 3, 4 / 7])
    np.testing.assert_allclose(
        L.class_balanced_weights([1, 2, 3], 0.5), raw * 3 / raw.sum(), rtol=1e-14
    )
    np.testing.assert_allclose(L.class_balanced_weights([5, 5, 5, 5], 0.9), np.ones(4))
    np.testing.assert_allclose(L.class_balanced_weights([1, 10, 100], 0.0), np.ones(3))
    # absent class -> weight 0, present ones normalised to mean 1
    w = L.class_balanced_weights([0, 1, 2, 3], 0.5)
    assert w[0] == 0.0
    np.testing.assert_allclose(w[1:], raw * 3 / raw.sum(), rtol=1e-14)


def test_class_balanced_weights_extreme_matches_high_precision():
    beta = 1 - 1e-9
    counts = [1e10, 1e9, 1e8, 1.0]
    with decimal.localcontext() as ctx:  # 60 digits here only, not for later tests
        ctx.prec = 60
        b = decimal.Decimal(1) - decimal.Decimal("1e-9")
        raw = [
            (1 - b) / (1 - (decimal.Decimal(repr(n)) * b.ln()).exp()) for n in counts
        ]  # independent reference
    raw = np.array([float(r) for r in raw])
    want = raw * 4 / raw.sum()
    got = L.class_balanced_weights(counts, beta)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6)  # beta itself is rounded to float64


def test_pixel_count_pitfall_and_slice_counts():
    # pixel counts in the millions: every beta <= 0.9999 gives equal weights
    for beta in (0.5, 0.75, 0.99, 0.9999):
        np.testing.assert_allclose(
            L.class_balanced_weights([8e7, 6e5, 2e6, 5e5], beta), np.ones(4), atol=1e-12
        )
    per_slice = np.array([[5, 0, 0, 1], [3, 2, 0, 0], [10, 0, 0, 0]])
    np.testing.assert_array_equal(L.slice_counts(per_slice), [3, 1, 0, 1])
    np.testing.assert_array_equal(L.slice_counts(per_slice, min_pixels=2), [3, 1, 0, 0])


def test_class_balanced_weights_errors():
    for counts, beta, msg in (
        ([1, -1], 0.5, "counts"),
        ([0, 0], 0.5, "all zero"),
        ([1, 2], 1.0, "beta"),
        ([1, 2], -0.1, "beta"),
        ([[1, 2]], 0.5, "1-D"),
    ):
        with pytest.raises(ValueError, match=msg):
            L.class_balanced_weights(counts, beta)


# ------------------------------------------------------------------ Dice


def test_dice_loss_hand_values():
    logits = jnp.zeros((1, 2, 2, 2))  # uniform p = 1/2
    labels = jnp.array([[[0, 0], [1, 1]]])
    # per class: inter 1, sum p 2, sum g 2 -> D = 1/2 ; squared: den 1 + 2 -> D = 2/3
    np.testing.assert_allclose(L.dice_loss(logits, labels), 0.5, rtol=1e-5)
    np.testing.assert_allclose(L.dice_loss(logits, labels, squared=True), 1 / 3, rtol=1e-5)
    np.testing.assert_allclose(
        L.dice_loss(logits, labels, include_background=False), 0.5, rtol=1e-5
    )
    # per-sample vs batch: sample 0 all class 0, sample 1 all class 1
    logits = jnp.zeros((2, 2, 2, 2))
    labels = jnp.array([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    # per sample: present class D = 2*2/(2+4) = 2/3, absent class D ~ 0 -> loss (1/3 + 1)/2
    np.testing.assert_allclose(L.dice_loss(logits, labels), 2 / 3, rtol=1e-4)
    # batch: each class inter 2, P 4, G 4 -> D = 1/2
    np.testing.assert_allclose(L.dice_loss(logits, labels, batch=True), 0.5, rtol=1e-5)
    # perfect confident prediction -> ~0 ; absent class in both scores ~1
    perfect = 50.0 * jax.nn.one_hot(labels, 3)
    np.testing.assert_allclose(L.dice_loss(perfect, labels), 0.0, atol=1e-5)


def test_per_sample_dice_leaves_padded_samples_out():
    # sample 0: uniform p = 1/2, labels [[0, 0], [1, 1]] -> D = 1/2 per class, loss 0.5
    # (hand value above); sample 1 is padding (mask 0) with arbitrary logits and labels
    logits = jnp.stack([jnp.zeros((2, 2, 2)), jnp.full((2, 2, 2), 3.0).at[..., 1].set(-3.0)])
    labels = jnp.array([[[0, 0], [1, 1]], [[1, 1], [1, 0]]])
    mask = jnp.array([1.0, 0.0])[:, None, None]
    np.testing.assert_allclose(L.dice_loss(logits[:1], labels[:1]), 0.5, rtol=1e-5)
    np.testing.assert_allclose(L.dice_loss(logits, labels, mask=mask), 0.5, rtol=1e-5)
    np.testing.assert_allclose(
        L.dice_loss(logits, labels, include_background=False, mask=mask > 0), 0.5, rtol=1e-5
    )
    # the same through combined_loss (per-sample Dice, with and without the CE term)
    for name in ("dice", "dice_ce"):
        kw = {"batch": False} if name == "dice_ce" else {}
        p = L.loss_params(name, num_classes=2, **kw)
        np.testing.assert_allclose(
            L.combined_loss(logits, labels, p, mask),
            L.get_loss(name, **kw)(logits[:1], labels[:1]),
            rtol=1e-5,
            err_msg=name,
        )


@pytest.mark.parametrize(
    "name, kw",
    [
        ("ce", {}),
        ("focal", {}),
        ("dice", {"batch": False}),
        ("dice", {"batch": True}),
        ("dice_ce", {"batch": False}),
        ("dice_ce", {"batch": True}),
    ],
)
def test_fully_masked_batch_gives_loss_zero(name, kw):
    """The module doc's promise: a fully masked batch gives loss 0 (value and gradient)."""
    logits = jnp.array(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
    labels = jnp.array(np.random.default_rng(1).integers(0, 4, size=(2, 3, 3)))
    mask = jnp.zeros((2, 3, 3))
    loss, grad = jax.value_and_grad(lambda x: L.get_loss(name, **kw)(x, labels, mask))(logits)
    assert float(loss) == 0.0
    assert bool(jnp.all(grad == 0.0))
    p = L.loss_params(name, **kw)
    assert float(L.combined_loss(logits, labels, p, mask)) == 0.0


def test_dice_ce_hand_value():
    logits = jnp.zeros((1, 2, 2, 2))
    labels = jnp.array([[[0, 0], [1, 1]]])
    # CE = ln 2 ; TransUNet Dice (squared, batch) = 1 - 2/3
    np.testing.assert_allclose(L.dice_ce_loss(logits, labels), 0.5 * LN2 + 0.5 / 3, rtol=1e-5)
    np.testing.assert_allclose(
        L.dice_ce_loss(logits, labels, ce_weight=1.0, dice_weight=0.0), LN2, rtol=1e-6
    )


# ------------------------------------------------------------------ registry, combined loss

COUNTS = np.array([900_000, 3_000, 20_000, 5_000])
CONFIGS = {
    "ce": {},
    "cb_ce": dict(beta=0.9999, class_counts=COUNTS),
    "focal": dict(gamma=2.0),
    "cb_focal": dict(gamma=1.0, class_weights=[0.5, 1.5, 1.0, 1.0], normalize="weights"),
    "dice": dict(include_background=False, squared=True),
    "dice_ce": dict(ce_weight=1.0, dice_weight=0.3, batch=False),
}


def _batch(seed=0, shape=(2, 6, 5)):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(*shape, 4)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=shape), jnp.int32)
    m = jnp.asarray(rng.random(shape) > 0.2)
    return x, y, m


def test_registry_matches_functions():
    x, y, m = _batch()
    w = L.class_balanced_weights(COUNTS, 0.9999)
    assert not np.allclose(w, 1.0)
    direct = {
        "ce": L.cross_entropy(x, y, mask=m),
        "cb_ce": L.cross_entropy(x, y, w, mask=m),
        "focal": L.focal_loss(x, y, 2.0, mask=m),
        "cb_focal": L.focal_loss(
            x, y, 1.0, jnp.array([0.5, 1.5, 1.0, 1.0]), mask=m, normalize="weights"
        ),
        "dice": L.dice_loss(x, y, include_background=False, squared=True, mask=m),
        "dice_ce": 1.0 * L.cross_entropy(x, y, mask=m)
        + 0.3 * L.dice_loss(x, y, squared=True, mask=m),
    }
    assert set(L.LOSS_NAMES) == set(CONFIGS)
    for name, kw in CONFIGS.items():
        fn = L.get_loss(name, **kw)
        np.testing.assert_allclose(fn(x, y, m), direct[name], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(jax.jit(fn)(x, y, m), direct[name], rtol=1e-5, err_msg=name)


def test_registry_errors_list_valid_options():
    with pytest.raises(ValueError, match="valid names: ce, cb_ce, focal, cb_focal, dice"):
        L.get_loss("bce")
    with pytest.raises(ValueError, match=r"unknown parameter.*'gama'.*valid.*gamma"):
        L.get_loss("focal", gama=2.0)
    with pytest.raises(ValueError, match="beta and class_counts"):
        L.get_loss("cb_ce", beta=0.9)
    with pytest.raises(ValueError, match="not both"):
        L.get_loss("cb_ce", beta=0.9, class_counts=[1, 2], class_weights=[1, 1])
    with pytest.raises(ValueError, match="normalize"):
        L.get_loss("ce", normalize="mean")


def test_combined_loss_equals_registry_and_vmaps():
    x, y, m = _batch(1)
    params = [L.loss_params(name, **kw) for name, kw in CONFIGS.items()]
    want = np.array([float(L.get_loss(n, **kw)(x, y, m)) for n, kw in CONFIGS.items()])
    for p, w_, name in zip(params, want, CONFIGS, strict=True):
        np.testing.assert_allclose(L.combined_loss(x, y, p, m), w_, rtol=1e-5, err_msg=name)
    # one compiled program over all six losses
    stacked = L.stack_loss_params(params)
    n = len(params)
    xs, ys, ms = (jnp.broadcast_to(a, (n, *a.shape)) for a in (x, y, m))
    got = jax.jit(jax.vmap(L.combined_loss))(xs, ys, stacked, ms)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grads = jax.vmap(jax.grad(L.combined_loss))(xs, ys, stacked, ms)
    assert bool(jnp.all(jnp.isfinite(grads)))


# ------------------------------------------------------------------ numerical safety


@pytest.mark.parametrize("name", list(CONFIGS))
def test_finite_value_and_grad_bf16_extreme_background(name):
    fn = L.get_loss(name, **CONFIGS[name])
    rng = np.random.default_rng(2)
    # extreme bf16 logits: +-3e4, confident right and confident wrong pixels, absent classes
    sign = np.where(rng.random((2, 4, 4, 4)) > 0.5, 1.0, -1.0)
    x = jnp.asarray(3e4 * sign, jnp.bfloat16)
    y_bg = jnp.zeros((2, 4, 4), jnp.int32)  # all background
    y_mix = jnp.asarray(rng.integers(0, 2, size=(2, 4, 4)), jnp.int32)  # classes 2, 3 absent
    perfect = jnp.asarray(3e4 * jax.nn.one_hot(y_bg, 4), jnp.bfloat16)  # p_t == 1 exactly
    for logits, labels in ((x, y_bg), (x, y_mix), (perfect, y_bg), (x * 0, y_bg)):
        for mask in (None, jnp.zeros((2, 4, 4), bool)):
            v, g = jax.value_and_grad(lambda z: fn(z, labels, mask))(logits)  # noqa: B023
            assert g.dtype == jnp.bfloat16
            assert np.isfinite(float(v)), name
            assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name


def test_focal_fractional_gamma_grad_finite_when_certain():
    logits = jnp.array([[[[1e4, -1e4, 0.0, 0.0]]]])
    labels = jnp.zeros((1, 1, 1), jnp.int32)
    for gamma in (0.0, 0.25, 0.5, 2.0):
        g = jax.grad(lambda z: L.focal_loss(z, labels, gamma=gamma))(logits)  # noqa: B023
        assert bool(jnp.all(jnp.isfinite(g))), gamma


# ------------------------------------------------------------------ Dice loss actually learns


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Conv(4, (1, 1))(x)


def _synthetic_tumours(n=8, size=32, seed=0):
    """Discs: ED ring (2) around NCR (1) around an ET core (3) on background, 2 channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((n, size, size), np.int32)
    for i in range(n):
        cy, cx = rng.integers(10, size - 10, size=2)
        r = np.hypot(yy - cy, xx - cx)
        labels[i][r < 9] = 2
        labels[i][r < 6] = 1
        labels[i][r < 3] = 3
    # two "modalities": a noisy class-dependent contrast in each channel
    contrast = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])[labels]
    images = contrast + 0.3 * rng.normal(size=contrast.shape)
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels)


def _tumour_dice(logits, labels):
    pred = jnp.argmax(logits, -1)
    ds = []
    for c in (1, 2, 3):
        a, b = pred == c, labels == c
        ds.append(2 * jnp.sum(a & b) / jnp.maximum(jnp.sum(a) + jnp.sum(b), 1))
    return float(jnp.mean(jnp.array(ds)))


def test_tiny_network_learns_with_dice_loss_alone():
    x, y = _synthetic_tumours()
    model = _TinyNet()
    params = model.init(jax.random.key(0), x)
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    loss_fn = L.get_loss("dice")

    @jax.jit
    def step(params, opt):
        loss, g = jax.value_and_grad(lambda p: loss_fn(model.apply(p, x), y))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    dice0 = _tumour_dice(model.apply(params, x), y)
    losses = []
    for _ in range(120):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    dice1 = _tumour_dice(model.apply(params, x), y)
    assert losses[-1] < 0.1 < 0.5 < losses[0], (losses[0], losses[-1])
    assert dice1 > 0.9 and dice1 > dice0 + 0.5, (dice0, dice1)
