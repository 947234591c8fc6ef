"""Augmentation config checks and edge values (`data/augment.py`), by hand: every range and
probability check, `enabled`, the BGContrast factor sides, modality dropout and the blur radius."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.extend.core import jaxprs_in_params

from brats_jax.data import augment
from brats_jax.data.augment import AugmentConfig


def _message(**fields):
    with pytest.raises(ValueError) as err:
        augment.from_config({"augment": fields})
    return str(err.value)


def test_probability_range_and_value_errors():
    assert _message(mirror_p=-0.1) == "augment.mirror_p=-0.1; expected a probability in [0, 1]"
    assert _message(blur_p_per_modality=1.5) == (
        "augment.blur_p_per_modality=1.5; expected a probability in [0, 1]"
    )
    assert _message(lowres_p_per_modality=-1) == (
        "augment.lowres_p_per_modality=-1.0; expected a probability in [0, 1]"
    )
    assert (
        _message(rotation_degrees=-5)
        == "augment.rotation_degrees=-5.0; expected a finite value >= 0"
    )
    assert _message(noise_std_max=math.inf) == (
        "augment.noise_std_max=inf; expected a finite value >= 0"
    )
    assert augment.from_config({"augment": {"mirror_p": 1, "noise_std_min": 0}}).mirror_p == 1.0


@pytest.mark.parametrize(
    "lo, hi",
    [
        ("noise_std_min", "noise_std_max"),
        ("blur_sigma_min", "blur_sigma_max"),
        ("brightness_min", "brightness_max"),
        ("contrast_min", "contrast_max"),
        ("lowres_scale_min", "lowres_scale_max"),
        ("gamma_min", "gamma_max"),
    ],
)
def test_each_range_must_be_ordered(lo, hi):
    assert _message(**{lo: 0.9, hi: 0.8}) == f"augment.{lo}=0.9 > augment.{hi}=0.8"
    augment.from_config({"augment": {lo: 0.8, hi: 0.8}})  # an empty-width range is allowed


def test_positive_minimums_and_limits():
    for name in ("scale_min", "lowres_scale_min", "gamma_min"):
        assert _message(**{name: 0.0}) == f"augment.{name}=0.0; expected > 0"
    assert _message(lowres_scale_max=1.2) == "augment.lowres_scale_max=1.2; expected <= 1"
    assert _message(elastic_p=0.5, elastic_sigma=0.0) == "augment.elastic_sigma=0.0; expected > 0"
    augment.from_config({"augment": {"elastic_sigma": 0.0}})  # no elastic: sigma unused
    fields = list(augment.OFF_FIELDS)
    assert _message(zoom_p=0.5) == f"augment.zoom_p: unknown field; expected one of {fields}"


def test_enabled_by_any_probability_only():
    assert not AugmentConfig(rotation_degrees=90.0, blur_p_per_modality=1.0).enabled
    for name in [f for f in augment.OFF_FIELDS if f.endswith("_p")]:
        assert AugmentConfig(**{name: 0.1}).enabled, name
    x = jnp.arange(8.0).reshape(1, 2, 1, 4)
    y = jnp.ones((1, 2, 1), jnp.int32)
    out = augment.augment_batch(jax.random.key(0), x, y, AugmentConfig(scale_min=0.9))
    assert out[0] is x and out[1] is y  # off: the inputs themselves


def test_bg_contrast_factor_sides_and_plain_ranges():
    keys = jax.random.split(jax.random.key(3), 400)
    f = jax.vmap(lambda k: augment._factor(k, 0.5, 3.0))(keys)
    below = np.asarray(f) < 1
    # a fair coin picks the side, not the width: about half below 1 although [0.5, 1) is 1/5
    assert 0.4 < below.mean() < 0.6
    assert float(f.min()) >= 0.5 and float(f.max()) <= 3.0
    g = jax.vmap(lambda k: augment._factor(k, 1.2, 1.4))(keys)  # 1 not inside: plain uniform
    assert 1.2 <= float(g.min()) and float(g.max()) <= 1.4 and float(g.max() - g.min()) > 0.15
    assert augment._factor(keys[0], 0.5, 3.0, (4,)).shape == (4,)


def test_blur_radius_covers_three_sigma():
    assert augment._blur_radius(1.0) == 3 and augment._blur_radius(0.2) == 1
    assert augment._blur_radius(1.1) == 4


def test_modality_dropout_off_always_and_one_modality():
    image = jnp.arange(1.0, 25.0).reshape(2, 1, 12)  # 3 context slices x 4 modalities
    key = jax.random.key(0)
    assert augment.modality_dropout(key, image, 0.0) is image
    dropped = np.asarray(augment.modality_dropout(key, image, 1.0)).reshape(2, 1, 3, 4)
    zero = np.flatnonzero((dropped == 0).all(axis=(0, 1, 2)))
    assert len(zero) == 1  # one modality, in every context slice
    kept = np.delete(dropped, zero, axis=-1)
    np.testing.assert_array_equal(kept, np.delete(np.asarray(image).reshape(2, 1, 3, 4), zero, -1))
    assert augment.modality_dropout(key, image.astype(jnp.bfloat16), 1.0).dtype == jnp.bfloat16


def test_resample_fills_outside_with_the_background_or_the_minimum():
    image = jnp.arange(8.0).reshape(2, 2, 2)  # channel 0: 0 2 4 6; channel 1: 1 3 5 7
    label = jnp.array([[1, 2], [3, 1]], jnp.int32)
    rows = jnp.array([[0.0, -0.6], [1.5, 1.0]])
    cols = jnp.array([[0.0, 0.0], [0.0, 1.51]])
    img, lab = augment.resample(image, label, (rows, cols))
    # (-0.6, 0) and (1, 1.51) are outside; (1.5, 0) is on the half-pixel border: inside
    np.testing.assert_array_equal(np.asarray(lab), [[1, 0], [3, 0]])
    np.testing.assert_allclose(np.asarray(img[0, 1]), [0.0, 1.0])  # each channel's minimum
    np.testing.assert_allclose(np.asarray(img[1, 0]), [4.0, 5.0])  # clamped to the last row
    bg = jnp.array([-9.0, -8.0])
    img_bg, _ = augment.resample(image, label, (rows, cols), background=bg)
    np.testing.assert_allclose(np.asarray(img_bg[1, 1]), [-9.0, -8.0])
    assert lab.dtype == jnp.int32


def test_elastic_offsets_are_noise_smoothed_by_a_gaussian_of_sigma_times_size():
    """Peer: scipy's periodic Gaussian filter (std elastic_sigma x H along rows, x W along
    columns) of the same white noise, each field scaled so its largest |offset| is the drawn
    magnitude x its axis' size. H != W and W odd catch swapped axes and a lost `s=(h, w)`;
    sigma and magnitude away from their defaults (bugs caught: any change to the Gaussian's
    formula, a peak over both fields, the magnitude's range ignored, a field returned twice)."""
    h, w = 24, 31
    cfg = AugmentConfig(elastic_p=1, elastic_sigma=0.15, elastic_magnitude=0.2)
    key = jax.random.PRNGKey(7)
    du, dv = (np.asarray(d, np.float64) for d in augment._elastic_offsets(key, (h, w), cfg))
    k_noise, k_mag = jax.random.split(key)  # the function's two draws, taken again
    noise = np.asarray(jax.random.normal(k_noise, (2, h, w)), np.float64)
    magnitude = float(jax.random.uniform(k_mag, maxval=0.2))
    assert 0 < magnitude < 0.2
    for got, field, size in ((du, noise[0], h), (dv, noise[1], w)):
        smooth = scipy.ndimage.gaussian_filter(field, (0.15 * h, 0.15 * w), mode="wrap", truncate=6)
        want = smooth / np.abs(smooth).max() * magnitude * size
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
        assert np.abs(got).max() == pytest.approx(magnitude * size, rel=1e-5)


def test_gaussian_blur_equals_scipy_per_modality_sigma():
    """Peer: scipy's gaussian_filter1d along rows, then columns, edges repeated ('nearest'),
    truncated at the same radius, with each modality's own sigma; the context axis is not
    blurred (bugs caught: the kernel's formula, the context axis blurred instead of columns,
    a product for a weighted sum)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 11, 3, 4)).astype(np.float32)
    sigma = np.array([0.6, 0.8, 1.0, 0.5], np.float32)
    got = np.asarray(augment.gaussian_blur(jnp.asarray(x), jnp.asarray(sigma), 3))
    for m in range(4):
        want = x[..., m].astype(np.float64)
        for axis in (0, 1):
            want = scipy.ndimage.gaussian_filter1d(
                want, float(sigma[m]), axis=axis, mode="nearest", truncate=3 / float(sigma[m])
            )
        np.testing.assert_allclose(got[..., m], want, atol=1e-5)


def test_contrast_and_gamma_use_each_modality_own_statistics():
    """Four modalities with different means and ranges: contrast's mean and clipping range
    and gamma's statistics are each modality's own (numpy per modality; bugs caught: the
    statistics taken over all modalities; `gamma` inverting by default)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5, 3, 4)) * [1.0, 0.2, 3.0, 0.5] + [0.0, 10.0, -5.0, 3.0]
    factor = np.array([0.5, 1.5, 1.2, 0.8])
    got = np.asarray(augment.contrast(jnp.asarray(x, jnp.float32), jnp.asarray(factor)))
    axes = (0, 1, 2)
    mean, lo, hi = x.mean(axes), x.min(axes), x.max(axes)
    want = np.clip((x - mean) * factor + mean, lo, hi)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.any(got[..., 1] == np.float32(hi[1]))  # factor 1.5 reached the modality's max
    g = np.array([1.4, 0.7, 1.0, 1.2])
    got = np.asarray(augment.gamma(jnp.asarray(x, jnp.float32), jnp.asarray(g)))
    a = (x - lo) / (hi - lo)
    y = a**g
    want = (y - y.mean(axes)) / y.std(axes) * x.std(axes) + mean
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_elastic_deformation_is_switched_on_from_the_config():
    """`elastic_p` > 0 with the default sigma 0.1 is a valid config (bug caught: a sigma
    check that refused every sigma up to 1); a config object without `get` is all off."""
    cfg = augment.from_config({"augment": {"elastic_p": 0.5}})
    assert cfg.elastic_p == 0.5 and cfg.elastic_sigma == 0.1
    assert augment.from_config(object()) == AugmentConfig()


def test_factor_draws_per_element_on_both_sides_and_plain_ranges_with_1_at_an_end():
    """BGContrast (0.5, 2): each element picks its own side (about half below 1, though the
    plain uniform would put a third there), below uniform on [0.5, 1) (mean 0.75), above on
    [1, 2] (mean 1.5); with 1 at an end of the range it is a plain uniform (no mass at exactly
    1.0). Bugs caught: one side for all elements, the upper bound or lower bound of a side
    lost, the side rule applied when 1 is an end, one value for all elements."""
    f = np.asarray(augment._factor(jax.random.key(5), 0.5, 2.0, (4000,)))
    below = f < 1
    assert 0.46 < below.mean() < 0.54 and 0.5 <= f.min() and f.max() <= 2.0
    assert f[below].mean() == pytest.approx(0.75, abs=0.02)
    assert f[~below].mean() == pytest.approx(1.5, abs=0.03)
    for lo, hi in ((1.0, 1.5), (0.5, 1.0)):
        g = np.asarray(augment._factor(jax.random.key(6), lo, hi, (4000,)))
        assert not np.any(g == 1.0) and g.mean() == pytest.approx((lo + hi) / 2, abs=0.02)
    assert len(set(np.asarray(augment._factor(jax.random.key(7), 1.2, 1.4, (4,))))) == 4


def test_spatial_draws_off_by_their_coin_leave_the_grid_and_on_stay_in_range():
    """Rotation, scale and elastic on with a probability that never fires: the identity grid
    exactly (bugs caught: 1 rad, scale 2 or 1-px offsets when the coin is off). Always on:
    the angle, read back from the 9 x 9 grid, covers both signs within +-30 degrees; the scale
    covers [0.7, 1.4] above 1 too; the elastic field moves pixels (bugs caught: angles drawn
    from [0, limit], scales from [0.7, 1], the offsets dropped or never drawn at p = 1)."""
    never = AugmentConfig(rotation_p=1e-12, scale_p=1e-12, elastic_p=1e-12)
    rows, cols = augment.sampling_coordinates(jax.random.key(0), (9, 9), never)
    ident = np.meshgrid(np.arange(9.0), np.arange(9.0), indexing="ij")
    np.testing.assert_array_equal(rows, ident[0])
    np.testing.assert_array_equal(cols, ident[1])
    keys = jax.random.split(jax.random.key(1), 300)
    rot = AugmentConfig(rotation_p=1, rotation_degrees=30)
    r, c = jax.vmap(lambda k: augment.sampling_coordinates(k, (9, 9), rot))(keys)
    angle = np.degrees(np.arctan2(-(np.asarray(c)[:, 5, 4] - 4), np.asarray(r)[:, 5, 4] - 4))
    assert -30.01 <= angle.min() < -20 and 20 < angle.max() <= 30.01
    sc = AugmentConfig(scale_p=1, scale_min=0.7, scale_max=1.4)
    r, c = jax.vmap(lambda k: augment.sampling_coordinates(k, (9, 9), sc))(keys)
    scale = np.hypot(np.asarray(r)[:, 5, 4] - 4, np.asarray(c)[:, 5, 4] - 4)
    assert 0.7 - 1e-6 <= scale.min() < 0.8 and 1.3 < scale.max() <= 1.4 + 1e-6
    el = AugmentConfig(elastic_p=1, elastic_sigma=0.2, elastic_magnitude=0.2)
    r, c = augment.sampling_coordinates(jax.random.key(2), (9, 9), el)
    moved = np.hypot(np.asarray(r) - ident[0], np.asarray(c) - ident[1])
    assert 0 < moved.max() <= 0.2 * 9 * np.sqrt(2) + 1e-5
    image, label = np.arange(81.0).reshape(9, 9, 1), np.ones((9, 9), np.int32)
    out, _ = augment.spatial_transform(jax.random.key(2), jnp.asarray(image), label, el)
    assert not np.allclose(out, image)  # elastic alone is a spatial transform


def test_resample_keeps_coordinates_exactly_on_the_half_pixel_border():
    """-0.5 and size - 0.5 on either axis are inside (label kept, edge value); beyond is
    outside (bugs caught: strict comparisons at the border)."""
    image = jnp.arange(4.0).reshape(2, 2, 1)
    label = jnp.array([[1, 2], [3, 1]], jnp.int32)
    rows = jnp.array([[-0.5, 0.0], [1.5, 0.0]])
    cols = jnp.array([[0.0, -0.5], [1.0, 1.5]])
    img, lab = augment.resample(image, label, (rows, cols))
    np.testing.assert_array_equal(np.asarray(lab), [[1, 1], [1, 2]])
    np.testing.assert_allclose(np.asarray(img)[..., 0], [[0.0, 0.0], [3.0, 1.0]])


def test_intensity_draws_are_per_modality_and_exact_at_a_fixed_value():
    """Four identical modalities: blur sigma, brightness, contrast and gamma factors are drawn
    per modality, so the outputs differ between modalities; the per-modality coins of blur
    and low resolution mix on and off within one sample; a range of one value below 1 gives
    exactly that transform (JAX clamps a draw to its minimum, so a lost upper bound shows
    only below 1); a sample-level coin that never fires leaves the image alone (bugs caught:
    one draw for all modalities, a lost bound of a range, `|` for `&` between the coins)."""
    rng = np.random.default_rng(2)
    one = rng.normal(size=(12, 12, 1)).astype(np.float32)
    x = jnp.asarray(np.repeat(one, 4, axis=-1))  # (H, W, 4S) with S = 1
    key = jax.random.key(3)
    for cfg in (
        AugmentConfig(blur_p=1, blur_p_per_modality=1, blur_sigma_min=0.5, blur_sigma_max=2.0),
        AugmentConfig(brightness_p=1, brightness_min=0.5, brightness_max=2.0),
        AugmentConfig(contrast_p=1, contrast_min=0.5, contrast_max=2.0),
        AugmentConfig(gamma_p=1, gamma_min=0.5, gamma_max=2.0),
    ):
        out = np.asarray(augment.intensity_transform(key, x, cfg))
        assert (
            min(np.abs(out[..., a] - out[..., b]).max() for a, b in [(0, 1), (1, 2), (2, 3)]) > 1e-3
        )
    for field in ("blur", "lowres"):
        # lowres scales kept below 1, where every drawn scale changes the image
        cfg = AugmentConfig(
            **{f"{field}_p": 1, f"{field}_p_per_modality": 0.5}, lowres_scale_max=0.6
        )
        mixed = []
        for k in jax.random.split(jax.random.key(4), 8):
            out = np.asarray(augment.intensity_transform(k, x, cfg))
            mixed.append(len({bool(np.array_equal(out[..., m], one[..., 0])) for m in range(4)}))
        assert max(mixed) == 2, field  # some sample has modalities on and off
        never = AugmentConfig(**{f"{field}_p": 1e-12, f"{field}_p_per_modality": 1})
        assert np.array_equal(augment.intensity_transform(key, x, never), x)
    xm = augment._by_modality(x)
    fixed = AugmentConfig(blur_p=1, blur_p_per_modality=1, blur_sigma_min=0.7, blur_sigma_max=0.7)
    want = augment.gaussian_blur(xm, jnp.full((4,), 0.7), augment._blur_radius(0.7))
    np.testing.assert_allclose(
        augment.intensity_transform(key, x, fixed), want.reshape(x.shape), atol=1e-6
    )
    fixed = AugmentConfig(
        lowres_p=1, lowres_p_per_modality=1, lowres_scale_min=0.5, lowres_scale_max=0.5
    )
    want = augment.low_resolution(xm, jnp.full((4,), 0.5))
    np.testing.assert_allclose(
        augment.intensity_transform(key, x, fixed), want.reshape(x.shape), atol=1e-6
    )


def _torch_lowres_1d(x, n):
    """Nearest-exact down to n samples, then linear (half-pixel centres) back: torch's
    interpolate formulas, written out with loops, numpy float64."""
    size = len(x)
    down = [x[min(int(np.floor((i + 0.5) * size / n)), size - 1)] for i in range(n)]
    out = []
    for j in range(size):
        u = min(max((j + 0.5) * n / size - 0.5, 0.0), n - 1)
        i0 = int(np.floor(u))
        i1 = min(i0 + 1, n - 1)
        out.append((1 - (u - i0)) * down[i0] + (u - i0) * down[i1])
    return np.array(out)


def test_low_resolution_equals_torch_formulas_on_both_axes():
    """(10, 7) slices, per-modality scales 0.5, 0.35, 0.05 (down to one sample) and 0.8,
    against the loop reference along rows then columns (bugs caught: the neighbour index off by
    one or two, a minimum length of 2, the second pass on the context axis)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 7, 1, 4))
    scales = [0.5, 0.35, 0.05, 0.8]
    got = np.asarray(augment.low_resolution(jnp.asarray(x, jnp.float32), jnp.asarray(scales)))
    for m, s in enumerate(scales):
        want = x[:, :, 0, m]
        want = np.stack([_torch_lowres_1d(want[:, c], max(round(s * 10), 1)) for c in range(7)], 1)
        want = np.stack([_torch_lowres_1d(want[r], max(round(s * 7), 1)) for r in range(10)], 0)
        np.testing.assert_allclose(got[:, :, 0, m], want, atol=1e-5)


def test_modality_dropout_reaches_every_modality():
    """Over 64 keys each of the four modalities is the dropped one at least once (bug caught:
    modality 0 never drawn)."""
    image = jnp.ones((1, 1, 4))
    dropped = set()
    for k in jax.random.split(jax.random.key(8), 64):
        out = np.asarray(augment.modality_dropout(k, image, 1.0))[0, 0]
        dropped.add(int(np.flatnonzero(out == 0)[0]))
    assert dropped == {0, 1, 2, 3}


def test_transforms_switched_off_draw_nothing():
    """A transform at probability 0 is left out of the traced program (the module's promise):
    no random bits drawn for the intensity part of a spatial-only config nor for the spatial
    part of an intensity-only one, only the two mirror coins for a mirror-only spatial map
    (bugs caught: `p >= 0` switching every transform on)."""
    x = jnp.zeros((8, 8, 4))

    def count(jaxpr):  # random_bits equations, inside nested jitted functions too
        return sum(
            (e.primitive.name == "random_bits") + sum(map(count, jaxprs_in_params(e.params)))
            for e in jaxpr.eqns
        )

    def draws(fn):
        return count(jax.make_jaxpr(fn)(jax.random.key(0)).jaxpr)

    assert draws(lambda k: augment.intensity_transform(k, x, AugmentConfig(mirror_p=0.5))) == 0
    label = jnp.zeros((8, 8), jnp.int32)
    noise_only = AugmentConfig(noise_p=0.5)
    assert draws(lambda k: augment.spatial_transform(k, x, label, noise_only)[0]) == 0
    mirror_only = AugmentConfig(mirror_p=0.5)
    assert draws(lambda k: augment.sampling_coordinates(k, (8, 8), mirror_only)) == 2
    assert (
        draws(lambda k: augment.sampling_coordinates(k, (8, 8), AugmentConfig(rotation_p=0.5))) == 4
    )


def _draws(cfg, x, n=64, seed=9):
    """intensity_transform of `x` (H, W, 4) under n keys -> (n, H, W, 4) numpy float64."""
    keys = jax.random.split(jax.random.key(seed), n)
    out = jax.vmap(lambda k: augment.intensity_transform(k, jnp.asarray(x, jnp.float32), cfg))
    return np.asarray(out(keys), np.float64)


def test_a_transform_draws_its_coin_and_its_values_independently():
    """A sample's coin, its per-modality coins and its values come from separate keys: over
    64 keys at p = 0.5, the samples a transform acts on show values from both halves of its
    range, and modality 0 is left alone in some samples whose other modalities changed. (JAX
    draws a key's first scalar and the first element of an array from the same bits, so a key
    shared by two draws ties them: bugs caught: the noise drawn from its coin's key, always
    negative where applied; the noise's std from the noise's key; blur sigma, brightness,
    contrast or gamma factors from their coin's key, always in the lower half where applied;
    blur's or low resolution's sample coin from the per-modality key, so modality 0 follows
    it.)"""
    zeros = np.zeros((8, 8, 4))
    out = _draws(AugmentConfig(noise_p=0.5, noise_std_min=0.2, noise_std_max=0.2), zeros)
    first = out[np.abs(out).max(axis=(1, 2, 3)) > 0][:, 0, 0, 0]
    assert 10 < len(first) < 54 and (first > 0).any() and (first < 0).any()
    big = np.zeros((32, 32, 4))
    out = _draws(AugmentConfig(noise_p=1, noise_std_min=0.1, noise_std_max=1.0), big, n=100)
    std = out.reshape(100, -1).std(axis=1)
    assert abs(np.corrcoef(std, out[:, 0, 0, 0] / std)[0, 1]) < 0.5
    ones = np.ones((4, 4, 4))
    out = _draws(AugmentConfig(brightness_p=0.5, brightness_min=1.1, brightness_max=1.5), ones)
    factor = out[:, 0, 0, 0][out[:, 0, 0, 0] != 1]
    assert (factor < 1.3).any() and (factor > 1.3).any()
    ramp = np.repeat(np.linspace(-1, 1, 16).reshape(4, 4, 1), 4, axis=-1)  # mean 0, in [-1, 1]
    out = _draws(AugmentConfig(contrast_p=0.5, contrast_min=1.1, contrast_max=1.5), ramp)
    factor = out[:, 2, 0, 0] / ramp[2, 0, 0]  # a pixel near the mean: never clipped
    factor = factor[np.abs(factor - 1) > 1e-6]
    assert (factor < 1.3).any() and (factor > 1.3).any()
    delta = np.zeros((9, 9, 4))
    delta[4, 4] = 1.0
    blur = AugmentConfig(
        blur_p=0.5, blur_p_per_modality=0.5, blur_sigma_min=0.5, blur_sigma_max=1.0
    )
    out = _draws(blur, delta)
    changed = np.abs(out - delta).max(axis=(1, 2)) > 1e-6  # (n, 4)
    assert (changed.any(axis=1) & ~changed[:, 0]).any()
    # the centre of a blurred delta is k(0)^2, k the normalised kernel: falls as sigma grows
    t = np.arange(-3, 4)
    centre = lambda s: 1 / np.exp(-(t**2) / (2 * s**2)).sum() ** 2  # noqa: E731
    assert centre(0.75) > out[changed[:, 0], 4, 4, 0].min()  # some sigma above the middle
    assert centre(0.75) < out[changed[:, 0], 4, 4, 0].max()  # and some below
    # gamma read back: on values {0, 0.5, 1} the ratio (mid - low) / (high - low) is 0.5 ** g,
    # whatever shift and scale the retained statistics apply
    three = np.repeat(np.array([0.0, 0.5, 1.0, 0.0]).reshape(2, 2, 1), 4, axis=-1)
    out = _draws(AugmentConfig(gamma_p=0.5, gamma_min=1.1, gamma_max=1.5), three)
    ratio = (out[:, 0, 1, 0] - out[:, 0, 0, 0]) / (out[:, 1, 0, 0] - out[:, 0, 0, 0])
    g = np.log(ratio[np.abs(ratio - 0.5) > 1e-4]) / np.log(0.5)
    assert 1.1 - 1e-3 <= g.min() < 1.3 < g.max() <= 1.5 + 1e-3
    noise = np.random.default_rng(4).normal(size=(8, 8, 4))
    low = AugmentConfig(
        lowres_p=0.5, lowres_p_per_modality=0.5, lowres_scale_min=0.3, lowres_scale_max=0.6
    )
    changed = np.abs(_draws(low, noise) - noise).max(axis=(1, 2)) > 1e-6
    assert (changed.any(axis=1) & ~changed[:, 0]).any()
