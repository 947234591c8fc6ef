"""Deep supervision and region-loss edge values (`losses/deep_supervision.py`,
`losses/regions.py`) by hand: nnU-Net's weights, nearest-exact down-sampling, the summed
loss with a stand-in loss, and the region loss's parameters and errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax import losses as L
from brats_jax.losses import deep_supervision as DS
from brats_jax.losses import regions as R


def test_deep_supervision_weights_halve_and_sum_to_one():
    np.testing.assert_allclose(DS.deep_supervision_weights(1), [1.0])
    np.testing.assert_allclose(DS.deep_supervision_weights(3), [4 / 7, 2 / 7, 1 / 7])
    assert DS.deep_supervision_weights(2).dtype == np.float64
    with pytest.raises(ValueError) as err:
        DS.deep_supervision_weights(0)
    assert str(err.value) == "deep supervision needs at least one output, got 0"


def test_downsample_labels_reads_the_centre_pixel_of_each_block():
    labels = jnp.arange(36).reshape(1, 6, 6)
    np.testing.assert_array_equal(DS.downsample_labels(labels, 1), labels)
    # factor 2: rows/cols 1, 3, 5 (floor((d + 0.5) * 2))
    np.testing.assert_array_equal(
        DS.downsample_labels(labels, 2)[0], np.arange(36).reshape(6, 6)[1::2, 1::2]
    )
    # factor 3: rows/cols 1, 4
    np.testing.assert_array_equal(DS.downsample_labels(labels, 3)[0], [[7, 10], [25, 28]])
    for bad in (0, 4):
        with pytest.raises(ValueError) as err:
            DS.downsample_labels(labels, bad)
        assert str(err.value) == f"labels (6, 6) cannot be down-sampled by {bad}"
    with pytest.raises(ValueError, match=r"labels \(6, 4\) cannot be down-sampled by 3"):
        DS.downsample_labels(jnp.zeros((1, 6, 4)), 3)
    # the height alone not divisible (bug caught: the width checked twice)
    with pytest.raises(ValueError, match=r"labels \(4, 6\) cannot be down-sampled by 3"):
        DS.downsample_labels(jnp.zeros((1, 4, 6)), 3)


def _stand_in_loss(logits, labels, params):
    """A loss whose value shows which labels reached it: sum(labels) * params + size."""
    return jnp.sum(labels).astype(jnp.float32) * params + logits.shape[1]


def test_deep_supervision_loss_sums_weighted_levels_by_hand():
    labels = jnp.arange(16).reshape(1, 4, 4)
    outputs = (jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 1, 1, 2)))
    # level 0: sum 120 + 4; level 1: labels[1::2, 1::2] = 5, 7, 13, 15 -> 40 + 2;
    # level 2: factor 4 reads [2, 2] = 10 -> 10 + 1
    got = DS.deep_supervision_loss(_stand_in_loss, outputs, labels, 1.0)
    want = 4 / 7 * 124 + 2 / 7 * 42 + 1 / 7 * 11
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert got.dtype == jnp.float32
    mine = DS.deep_supervision_loss(_stand_in_loss, outputs[:2], labels, 2.0, weights=[0.25, 1.0])
    assert float(mine) == pytest.approx(0.25 * 244 + 1.0 * 82, rel=1e-6)
    with pytest.raises(ValueError) as err:
        DS.deep_supervision_loss(_stand_in_loss, outputs, labels, 1.0, weights=[1.0])
    assert str(err.value) == "1 deep-supervision weights for 3 outputs"
    # output_loss: a tuple is deep supervision, an array one loss
    assert float(DS.output_loss(_stand_in_loss, outputs, labels, 1.0)) == pytest.approx(want)
    assert float(DS.output_loss(_stand_in_loss, outputs[0], labels, 1.0)) == 124.0


def test_region_loss_params_and_errors():
    for name, (ce, dice) in {"ce": (1, 0), "dice": (0, 1), "dice_ce": (0.7, 0.3)}.items():
        p = R.region_loss_params(name, dice_weight=0.3)
        assert (float(p.ce_weight), float(p.dice_weight)) == pytest.approx((ce, dice))
        assert float(p.dice_batch) == 1.0 and float(p.batch_counts) == 0.0
        np.testing.assert_array_equal(p.class_weights, np.ones(4))
    assert float(R.region_loss_params("dice_ce").ce_weight) == 0.5  # default dice_weight 0.5
    with pytest.raises(ValueError) as err:
        R.region_loss_params("focal")
    assert str(err.value) == "loss 'focal' has no region form; region losses: ce, dice, dice_ce"
    assert R.loss_for_output("classes") is L.combined_loss
    assert R.loss_for_output("regions") is R.region_combined_loss


def test_region_loss_shape_error_and_fully_masked_batch():
    labels = jnp.zeros((1, 2, 2), jnp.int32)
    with pytest.raises(ValueError) as err:
        R.region_bce_dice_loss(jnp.zeros((1, 2, 2, 4)), labels)
    assert (
        str(err.value) == "region logits must be labels' shape (1, 2, 2) + (3,); got (1, 2, 2, 4)"
    )
    logits = jnp.full((1, 2, 2, 3), 3.0)
    # fully masked: BCE 0, Dice term 1 - smooth_nr / smooth_dr
    got = R.region_bce_dice_loss(
        logits, labels, mask=jnp.zeros((1, 2, 2)), smooth_nr=0.25, smooth_dr=1.0, dice_weight=2.0
    )
    assert float(got) == pytest.approx(2.0 * 0.75)
    # unmasked, all background: BCE = softplus(3) per element; Dice per region
    # (0 + s) / (4 sigmoid(3) + 0 + s)
    s = 1e-5
    sig = 1 / (1 + np.exp(-3.0))
    want = 0.5 * np.log1p(np.exp(3.0)) + 1.5 * (1 - s / (4 * sig + s))
    got = R.region_bce_dice_loss(logits, labels, bce_weight=0.5, dice_weight=1.5)
    assert float(got) == pytest.approx(want, rel=1e-5)
    p = R.region_loss_params("dice_ce", dice_weight=0.25)
    combined = R.region_combined_loss(logits, labels, p)
    want_c = 0.75 * np.log1p(np.exp(3.0)) + 0.25 * (1 - s / (4 * sig + s))
    assert float(combined) == pytest.approx(want_c, rel=1e-5)


def test_deep_supervision_loss_on_non_square_slices():
    """(B, 4, 8) labels: each level's factor is the height's ratio (bug caught: the factor
    taken from the width, or the width of the labels over the height of the logits; square
    slices cannot tell). Level 0: sum(0..31) = 496, + 4; level 1: labels[1::2, 1::2] = rows
    1 and 3, columns 1, 3, 5, 7: 9 + 11 + 13 + 15 + 25 + 27 + 29 + 31 = 160, + 2."""
    labels = jnp.arange(32).reshape(1, 4, 8)
    outputs = (jnp.zeros((1, 4, 8, 2)), jnp.zeros((1, 2, 4, 2)))
    got = DS.deep_supervision_loss(_stand_in_loss, outputs, labels, 1.0, weights=[1.0, 10.0])
    assert float(got) == pytest.approx(500 + 10 * 162, rel=1e-6)
