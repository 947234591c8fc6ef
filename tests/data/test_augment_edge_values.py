"""Augmentation config checks and edge values (`data/augment.py`), by hand: every range and
probability check, `enabled`, the BGContrast factor sides, modality dropout and the blur radius."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    from scipy import ndimage as sp_ndimage

    h, w = 24, 31
    cfg = AugmentConfig(elastic_p=1, elastic_sigma=0.15, elastic_magnitude=0.2)
    key = jax.random.PRNGKey(7)
    du, dv = (np.asarray(d, np.float64) for d in augment._elastic_offsets(key, (h, w), cfg))
    k_noise, k_mag = jax.random.split(key)  # the function's two draws, taken again
    noise = np.asarray(jax.random.normal(k_noise, (2, h, w)), np.float64)
    magnitude = float(jax.random.uniform(k_mag, maxval=0.2))
    assert 0 < magnitude < 0.2
    for got, field, size in ((du, noise[0], h), (dv, noise[1], w)):
        smooth = sp_ndimage.gaussian_filter(field, (0.15 * h, 0.15 * w), mode="wrap", truncate=6)
        want = smooth / np.abs(smooth).max() * magnitude * size
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
        assert np.abs(got).max() == pytest.approx(magnitude * size, rel=1e-5)


def test_gaussian_blur_equals_scipy_per_modality_sigma():
    """Peer: scipy's gaussian_filter1d along rows, then columns, edges repeated ('nearest'),
    truncated at the same radius, with each modality's own sigma; the context axis is not
    blurred (bugs caught: the kernel's formula, the context axis blurred instead of columns,
    a product for a weighted sum)."""
    from scipy import ndimage as sp_ndimage

    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 11, 3, 4)).astype(np.float32)
    sigma = np.array([0.6, 0.8, 1.0, 0.5], np.float32)
    got = np.asarray(augment.gaussian_blur(jnp.asarray(x), jnp.asarray(sigma), 3))
    for m in range(4):
        want = x[..., m].astype(np.float64)
        for axis in (0, 1):
            want = sp_ndimage.gaussian_filter1d(
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
