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
