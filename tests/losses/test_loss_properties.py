"""Property tests of brats_jax.losses against numpy closed forms written here (float64).

Every hyperparameter is drawn away from the value at which a wrong formula is invisible:
``gamma`` not 1, ``beta`` not 0.99 (and not 0), ``dice_weight`` not 0.5 (so ``w`` and
``1 - w`` differ), class weights not all 1 (so pixel and weight normalisation differ), masks
not all ones (sometimes a fully masked sample). Shapes are fixed, so JAX compiles each
operation once and the examples only change values.
"""

import ml_collections
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from brats_jax import losses as L
from brats_jax.runs import train_state

SHAPE = (3, 5, 4)  # B, H, W
C = 4
RTOL, ATOL = 2e-5, 1e-6

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

# ------------------------------------------------------------------ strategies


def _away_from(x, gap):
    return lambda v: abs(v - x) > gap


gammas = st.floats(0.0, 4.0).filter(_away_from(1.0, 0.05))
betas = st.floats(0.05, 0.9995).filter(_away_from(0.99, 0.003))
dice_weights = st.floats(0.02, 0.98).filter(_away_from(0.5, 0.05))
smooths = st.sampled_from([1e-5, 1e-3, 0.1, 1.0])


@st.composite
def batches(draw):
    """(logits (B,H,W,C) float32, labels (B,H,W) int32, mask (B,H,W) bool, weights (C,))."""
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.floats(0.1, 6.0))
    mask_kind = draw(st.sampled_from(["random", "ones", "first_sample_masked"]))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(*SHAPE, C)) * scale).astype(np.float32)
    y = rng.integers(0, C, size=SHAPE).astype(np.int32)
    if draw(st.booleans()):  # a class absent from the batch
        y[y == draw(st.integers(0, C - 1))] = (draw(st.integers(0, C - 1)) + 1) % C
    m = rng.random(SHAPE) > 0.3
    if mask_kind == "ones":
        m[:] = True
    elif mask_kind == "first_sample_masked":
        m[0] = False
    w = rng.uniform(0.1, 3.0, size=C)
    return x, y, m, w


# ------------------------------------------------------------------ numpy references


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _pick(a, y):
    """a[..., y] per pixel."""
    return np.take_along_axis(a, y[..., None], axis=-1)[..., 0]


def ref_focal(x, y, m, w=None, gamma=0.0, normalize="pixels"):
    """sum m w_y (1 - p_y)**gamma (-log p_y) / (sum m | sum m w_y); 0 when nothing counts."""
    logp = _pick(_log_softmax(x), y)
    wy = np.ones(y.shape) if w is None else np.asarray(w, np.float64)[y]
    m = np.asarray(m, np.float64)
    num = np.sum(m * wy * (1.0 - np.exp(logp)) ** gamma * -logp)
    den = np.sum(m * wy) if normalize == "weights" else np.sum(m)
    return num / den if den > 0 else 0.0


def ref_ce(x, y, m, w=None, normalize="pixels"):
    return ref_focal(x, y, m, w, 0.0, normalize)


def ref_dice(
    x, y, m, include_background=True, squared=False, batch=False, smooth_nr=1e-5, smooth_dr=1e-5
):
    """Soft Dice loss on softmax: per sample (mean over counted samples) or over the batch."""
    p = np.exp(_log_softmax(x)) * np.asarray(m, np.float64)[..., None]
    g = np.eye(C)[y] * np.asarray(m, np.float64)[..., None]
    if batch:
        p, g = p[None], g[None]  # one "sample": the batch
    p = p.reshape(p.shape[0], -1, C)
    g = g.reshape(g.shape[0], -1, C)
    inter = (p * g).sum(1)
    den = (p * p).sum(1) + (g * g).sum(1) if squared else p.sum(1) + g.sum(1)
    d = (2 * inter + smooth_nr) / (den + smooth_dr)  # (S, C)
    if not include_background:
        d = d[:, 1:]
    per_sample = (1.0 - d).mean(-1)
    if batch:
        return float(per_sample[0])
    counted = np.asarray(m).reshape(len(per_sample), -1).any(-1)
    return float(per_sample[counted].mean()) if counted.any() else 0.0


def ref_cb_weights(counts, beta):
    """Cui et al.: (1 - b) / (1 - b**n) for present classes, 0 for absent, sum = #present."""
    n = np.asarray(counts, np.float64)
    raw = np.array([(1 - beta) / (1 - beta**k) if k > 0 else 0.0 for k in n])
    return raw * (np.count_nonzero(n) / raw.sum())


def _batch_counts(y, m):
    return np.array([np.sum((y == c) & m) for c in range(C)], np.float64)


def ref_region_loss(x, y, m, bce_weight, dice_weight, smooth_nr=1e-5, smooth_dr=1e-5):
    """BCE over counted pixels and 3 regions + batch soft Dice per region (linear)."""
    x = np.asarray(x, np.float64)
    g = np.stack([np.isin(y, r) for r in ([1, 2, 3], [1, 3], [3])], -1).astype(np.float64)
    mm = np.asarray(m, np.float64)[..., None]
    bce = np.logaddexp(0.0, x) - x * g  # -g log s(x) - (1 - g) log(1 - s(x))
    bce = np.sum(bce * mm) / (mm.sum() * 3) if mm.sum() > 0 else 0.0
    p = 1.0 / (1.0 + np.exp(-x)) * mm
    g = g * mm
    axes = (0, 1, 2)
    dice = (2 * (p * g).sum(axes) + smooth_nr) / (p.sum(axes) + g.sum(axes) + smooth_dr)
    return bce_weight * bce + dice_weight * np.mean(1.0 - dice)


def _close(got, want, msg=""):
    np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=ATOL, err_msg=msg)


# ------------------------------------------------------------------ the loss functions


@SETTINGS
@given(batches(), gammas, st.sampled_from(["pixels", "weights"]), st.booleans())
def test_cross_entropy_and_focal_equal_the_closed_form(batch, gamma, normalize, weighted):
    x, y, m, w = batch
    w = w if weighted else None
    _close(L.cross_entropy(x, y, w, mask=m, normalize=normalize), ref_ce(x, y, m, w, normalize))
    _close(
        L.focal_loss(x, y, gamma, w, mask=m, normalize=normalize),
        ref_focal(x, y, m, w, gamma, normalize),
    )


@SETTINGS
@given(batches(), st.booleans(), st.booleans(), st.booleans(), smooths, smooths)
def test_dice_loss_equals_the_closed_form(batch, background, squared, over_batch, snr, sdr):
    x, y, m, _ = batch
    kw = dict(
        include_background=background,
        squared=squared,
        batch=over_batch,
        smooth_nr=snr,
        smooth_dr=sdr,
    )
    _close(L.dice_loss(x, y, mask=m, **kw), ref_dice(x, y, m, **kw), str(kw))


@SETTINGS
@given(batches(), st.floats(0.0, 2.0), st.floats(0.0, 2.0), st.booleans(), st.booleans())
def test_dice_ce_equals_its_weighted_terms(batch, ce_weight, dice_weight, weighted, squared):
    x, y, m, w = batch
    w = w if weighted else None
    want = ce_weight * ref_ce(x, y, m, w) + dice_weight * ref_dice(
        x, y, m, squared=squared, batch=True
    )
    got = L.dice_ce_loss(
        x, y, ce_weight=ce_weight, dice_weight=dice_weight, class_weights=w, squared=squared, mask=m
    )
    _close(got, want)


@SETTINGS
@given(
    st.lists(st.integers(0, 5000), min_size=C, max_size=C).filter(any),
    betas,
)
def test_class_balanced_weights_equal_the_effective_number_formula(counts, beta):
    got = L.class_balanced_weights(counts, beta)
    np.testing.assert_allclose(got, ref_cb_weights(counts, beta), rtol=1e-9, atol=1e-12)
    assert np.isclose(got.sum(), np.count_nonzero(counts))


@SETTINGS
@given(batches(), betas)
def test_batch_class_balanced_weights_count_the_masked_batch(batch, beta):
    x, y, m, _ = batch
    counts = _batch_counts(y, m)
    got = np.asarray(L.batch_class_balanced_weights(y, beta, m, C))
    want = ref_cb_weights(counts, beta) if counts.any() else np.zeros(C)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ registry and LossParams


@st.composite
def registry_cases(draw):
    """(name, get_loss kwargs, reference f(x, y, m)) for every registry name."""
    name = draw(st.sampled_from(L.LOSS_NAMES))
    normalize = draw(st.sampled_from(["pixels", "weights"]))
    if name == "ce":
        return name, dict(normalize=normalize), lambda x, y, m: ref_ce(x, y, m, None, normalize)
    if name in ("cb_ce", "cb_focal"):
        gamma = draw(gammas) if name == "cb_focal" else 0.0
        beta = draw(betas)
        source = draw(st.sampled_from(["counts", "batch_pixels", "class_weights"]))
        kw = dict(normalize=normalize)
        if name == "cb_focal":
            kw["gamma"] = gamma
        if source == "counts":
            counts = draw(st.lists(st.integers(1, 300), min_size=C, max_size=C))
            kw.update(beta=beta, class_counts=counts)
            w = ref_cb_weights(counts, beta)
            return name, kw, lambda x, y, m: ref_focal(x, y, m, w, gamma, normalize)
        if source == "batch_pixels":
            kw.update(beta=beta, class_counts=L.BATCH_PIXELS)

            def ref(x, y, m):
                counts = _batch_counts(y, m)
                w = ref_cb_weights(counts, beta) if counts.any() else np.zeros(C)
                return ref_focal(x, y, m, w, gamma, normalize)

            return name, kw, ref
        w = np.asarray(draw(st.lists(st.floats(0.1, 3.0), min_size=C, max_size=C)))
        kw["class_weights"] = w
        return name, kw, lambda x, y, m: ref_focal(x, y, m, w, gamma, normalize)
    if name == "focal":
        gamma = draw(gammas)
        kw = dict(gamma=gamma, normalize=normalize)
        return name, kw, lambda x, y, m: ref_focal(x, y, m, None, gamma, normalize)
    dice_kw = dict(
        include_background=draw(st.booleans()),
        squared=draw(st.booleans()),
        batch=draw(st.booleans()),
        smooth_nr=draw(smooths),
        smooth_dr=draw(smooths),
    )
    if name == "dice":
        return name, dice_kw, lambda x, y, m: ref_dice(x, y, m, **dice_kw)
    ce_w, dice_w = draw(st.floats(0.0, 2.0)), draw(dice_weights)
    kw = dict(ce_weight=ce_w, dice_weight=dice_w, **dice_kw)
    return name, kw, lambda x, y, m: ce_w * ref_ce(x, y, m) + dice_w * ref_dice(x, y, m, **dice_kw)


@settings(SETTINGS, max_examples=40)
@given(batches(), registry_cases())
def test_every_registry_loss_and_its_loss_params_equal_the_closed_form(batch, case):
    x, y, m, _ = batch
    name, kw, ref = case
    want = ref(x, y, m)
    _close(L.get_loss(name, **kw)(x, y, m), want, f"get_loss {name} {kw}")
    _close(L.combined_loss(x, y, L.loss_params(name, C, **kw), m), want, f"combined {name} {kw}")


# ------------------------------------------------------------------ the training config's mix


def _train_config(loss, dice_weight=0.5, gamma=1.0, beta=0.99, class_counts="batch_pixels"):
    return ml_collections.ConfigDict(
        dict(loss=loss, dice_weight=dice_weight, gamma=gamma, beta=beta, class_counts=class_counts)
    )


@SETTINGS
@given(batches(), dice_weights)
def test_train_dice_weight_mixes_one_minus_w_ce_and_w_dice(batch, w):
    """`train.dice_weight = w`: ``(1 - w) * CE + w * Dice`` (TransUNet's Dice settings)."""
    x, y, m, _ = batch
    params = train_state.create_loss_params(_train_config("dice_ce", dice_weight=w), None)
    want = (1 - w) * ref_ce(x, y, m) + w * ref_dice(x, y, m, squared=True, batch=True)
    _close(L.combined_loss(x, y, params, m), want)


@SETTINGS
@given(batches(), st.sampled_from(["ce", "dice", "dice_ce"]), dice_weights)
def test_region_losses_mix_one_minus_w_bce_and_w_dice(batch, name, w):
    x, y, m, _ = batch
    xr = x[..., :3]
    cfg = _train_config(name, dice_weight=w)
    params = train_state.create_loss_params(cfg, None, output="regions")
    bce_w, dice_w = {"ce": (1, 0), "dice": (0, 1), "dice_ce": (1 - w, w)}[name]
    _close(L.region_combined_loss(xr, y, params, m), ref_region_loss(xr, y, m, bce_w, dice_w))
    _close(
        L.region_bce_dice_loss(xr, y, bce_weight=1 - w, dice_weight=w, mask=m),
        ref_region_loss(xr, y, m, 1 - w, w),
    )


@SETTINGS
@given(
    batches(),
    st.sampled_from(["focal", "cb_ce", "cb_focal"]),
    gammas,
    betas,
    st.sampled_from(["batch_pixels", "split_pixels", "split_slices"]),
)
def test_train_gamma_beta_and_class_counts_reach_the_loss(batch, name, gamma, beta, mode):
    x, y, m, _ = batch
    rng = np.random.default_rng(int(gamma * 1000))
    per_slice = rng.integers(0, 40, size=(6, C)) * (rng.random((6, C)) > 0.3)
    per_slice[:, 0] += 1  # background in every slice: some class is present
    cfg = _train_config(name, gamma=gamma, beta=beta, class_counts=mode)
    params = train_state.create_loss_params(cfg, per_slice)
    g = gamma if name != "cb_ce" else 0.0
    if name == "focal":
        w = None
    elif mode == "batch_pixels":
        counts = _batch_counts(y, m)
        w = ref_cb_weights(counts, beta) if counts.any() else np.zeros(C)
    elif mode == "split_pixels":
        w = ref_cb_weights(per_slice.sum(0), beta)
    else:
        w = ref_cb_weights((per_slice >= 1).sum(0), beta)
    _close(L.combined_loss(x, y, params, m), ref_focal(x, y, m, w, g), f"{name} {mode}")
