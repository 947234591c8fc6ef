"""metrics.calibration: ECE and reliability bins against hand-computed values, temperature
fits against temperatures that generated the labels, and what a temperature leaves alone."""

import numpy as np
import pytest
from scipy import special

from brats_jax.metrics import calibration as cal
from brats_jax.models import outputs


def _one_channel(probs, targets, num_bins):
    bins = cal.ReliabilityBins.empty(("x",), num_bins)
    return bins.add(np.asarray(probs)[:, None], np.asarray(targets, bool)[:, None])


def test_ece_of_hand_made_bins():
    """3 bins [0, 1/3), [1/3, 2/3), [2/3, 1]: (0.1, 0.2 | 1 of 2 positive), (0.5, 0.6 | 1 of
    2), (0.9, 0.95, 1.0 | 2 of 3): gaps 0.35, 0.05, 0.95 - 2/3, weighted by 2, 2, 3 of 7.
    Catches: p = 1 dropped or put out of the last bin, an unweighted mean of the gaps, bins
    by rounding instead of flooring."""
    bins = _one_channel([0.1, 0.2, 0.5, 0.6, 0.9, 0.95, 1.0], [0, 1, 0, 1, 1, 1, 0], 3)
    np.testing.assert_array_equal(bins.count, [[2, 2, 3]])
    np.testing.assert_allclose(bins.mean_confidence(), [[0.15, 0.55, 0.95]])
    np.testing.assert_allclose(bins.frequency(), [[0.5, 0.5, 2 / 3]])
    expected = (2 * 0.35 + 2 * 0.05 + 3 * (0.95 - 2 / 3)) / 7  # = 0.2357...
    np.testing.assert_allclose(bins.ece(), [expected])
    assert bins.to_dict()["ece"]["x"] == pytest.approx(expected)


def test_mask_and_merge_count_only_the_voxels_asked_for():
    """A masked-out voxel is not counted; two halves merged = the whole, and channels are
    binned on their own (channel 1's voxels all in the top bin).
    Catches: the mask ignored, channels mixed up in the flat bin index."""
    probs = np.array([[0.1, 0.9], [0.8, 0.95], [0.4, 0.99]])
    targets = np.array([[0, 1], [1, 1], [1, 0]], bool)
    mask = np.array([True, True, False])
    bins = cal.ReliabilityBins.empty(("a", "b"), 2).add(probs, targets, mask)
    np.testing.assert_array_equal(bins.count, [[1, 1], [0, 2]])
    np.testing.assert_allclose(bins.ece(), [(0.1 + 0.2) / 2, (0.1 + 0.05) / 2])
    halves = cal.ReliabilityBins.empty(("a", "b"), 2).add(probs[:1], targets[:1])
    halves = halves.merge(cal.ReliabilityBins.empty(("a", "b"), 2).add(probs[1:], targets[1:]))
    whole = cal.ReliabilityBins.empty(("a", "b"), 2).add(probs, targets)
    np.testing.assert_array_equal(halves.count, whole.count)
    np.testing.assert_allclose(halves.ece(), whole.ece())


def test_calibrated_set_has_ece_near_zero_and_overconfident_one_its_gap():
    """Labels drawn with the predicted probability: ECE ~ 0 (1e6 voxels: the sampling noise
    is ~0.001); p = 0.9 where 70% are positive and p = 0.1 where 30% are: ECE 0.2.
    Catches: frequency and confidence taken from different voxels, bins off by one."""
    rng = np.random.default_rng(0)
    p = rng.uniform(size=1_000_000)
    assert _one_channel(p, rng.uniform(size=p.size) < p, 15).ece()[0] < 0.005
    over = np.r_[np.full(10, 0.9), np.full(10, 0.1)]
    y = np.r_[np.arange(10) < 7, np.arange(10) < 3]
    np.testing.assert_allclose(_one_channel(over, y, 15).ece(), [0.2])


def test_channel_targets_are_one_hot_classes_or_nested_regions():
    """Labels 0..3 -> one-hot; regions WT = {1, 2, 3}, TC = {1, 3}, ET = {3}."""
    label = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(cal.channel_targets(label, "classes"), np.eye(4, dtype=bool))
    np.testing.assert_array_equal(
        cal.channel_targets(label, "regions"),
        [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]],
    )


def test_brain_of_normalised_volume_is_where_any_modality_leaves_the_corner_value():
    """Background is each modality's constant (per slice), brain whatever differs from it
    in some modality, even where another modality equals its background value.
    Catches: all modalities required to differ, one corner for all slices."""
    image = np.zeros((4, 4, 2, 2), np.float32)
    image[..., 0, 0], image[..., 0, 1] = -0.5, -1.5  # slice 0 background
    image[..., 1, 0], image[..., 1, 1] = 0.3, 0.7  # slice 1: another constant (slice-wise)
    image[1, 2, 0, 0] = 2.0  # brain in modality 0 only
    image[3, 1, 1, 1] = -0.2  # brain in modality 1 only
    expected = np.zeros((4, 4, 2), bool)
    expected[1, 2, 0] = expected[3, 1, 1] = True
    np.testing.assert_array_equal(cal.brain_of_normalised(image), expected)


def test_fitted_temperature_recovers_the_one_that_drew_the_class_labels():
    """Labels sampled from softmax(z / 2.5): the fit from z gives T within 3% of 2.5, and a
    lower NLL than T = 1. Catches: logits multiplied by T (gives 1 / 2.5), a wrong sign of
    the NLL, a search range without 2.5."""
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 4.0, (200_000, 4))
    p = special.softmax(z / 2.5, axis=-1)
    y = (rng.uniform(size=(len(z), 1)) < np.cumsum(p, -1)).argmax(-1)
    targets = np.eye(4, dtype=bool)[y]
    t = cal.fit_temperature(z, targets, "classes")
    assert t.shape == (4,) and np.all(t == t[0])
    assert t[0] == pytest.approx(2.5, rel=0.03)
    assert cal.nll(z, targets, t, "classes") < cal.nll(z, targets, 1.0, "classes")


def test_fitted_temperatures_recover_one_per_region():
    """Region labels sampled independently from sigmoid(z / T_r), T = (0.5, 1.0, 3.0): each
    region's fit within 5% of its own T. Catches: one shared T for regions, channels mixed."""
    rng = np.random.default_rng(2)
    true = np.array([0.5, 1.0, 3.0])
    z = rng.normal(0.0, 3.0, (200_000, 3))
    y = rng.uniform(size=z.shape) < special.expit(z / true)
    np.testing.assert_allclose(cal.fit_temperature(z, y, "regions"), true, rtol=0.05)


def test_temperature_keeps_the_argmax_and_the_region_masks():
    """softmax(z / T) has the argmax of z, and sigmoid(z / T_r) > 0.5 where z > 0, for
    temperatures on both sides of 1, logits close to 0 included (down to 1e-3).
    Catches: a temperature that is not applied to the logits (e.g. to probabilities, p^(1/T)
    renormalised keeps argmax but not sigmoid's threshold: p^(1/T) > 0.5 moves), per-class
    temperatures for the softmax."""
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 2.0, (5000, 4))
    z[:100, 1] = z[:100, 0] + rng.uniform(1e-3, 1e-2, 100)  # near ties
    for t in (0.3, 2.7):
        scaled = cal.scaled_probabilities(z, np.full(4, t), "classes")
        np.testing.assert_array_equal(
            outputs.labels_from_probabilities(scaled, "classes"), z.argmax(-1)
        )
    zr = z[:, :3]
    zr[:50] = rng.uniform(-1e-3, 1e-3, (50, 3))
    plain = outputs.labels_from_probabilities(special.expit(zr), "regions")
    for t in ((0.3, 1.9, 5.0), (4.0, 0.5, 0.2)):
        scaled = cal.scaled_probabilities(zr, np.array(t), "regions")
        np.testing.assert_array_equal(outputs.labels_from_probabilities(scaled, "regions"), plain)
        np.testing.assert_array_equal(scaled > 0.5, zr > 0)


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"expected the same shape \(\.\.\., 2\)"):
        cal.ReliabilityBins.empty(("a", "b")).add(np.zeros((3, 3)), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="one-hot"):
        cal.fit_temperature(np.zeros((2, 4)), np.zeros((2, 4), bool), "classes")
