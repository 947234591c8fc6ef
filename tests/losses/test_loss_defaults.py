"""Loss options at their defaults and passed through (the mutation run's survivors of
`losses/core.py` and `losses/regions.py`): a default is checked against the same call with
the documented value written out, and an option is checked at a value where a dropped
argument would show (smoothing 1.0 on 2x2 slices, where the 1e-5 default changes the Dice)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax import losses as L
from brats_jax.losses import core as C
from brats_jax.losses import regions as R

LOGITS = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 4))
LABELS = jnp.array([[[0, 1], [2, 3]], [[3, 3], [0, 2]]])


def test_region_loss_defaults_are_nnunets_one_and_one():
    """(Bug caught: a default weight other than 1.) The default equals BCE + Dice with both
    weights written out, and the two terms alone add up to it."""
    z = LOGITS[..., :3]
    default = R.region_bce_dice_loss(z, LABELS)
    ones = R.region_bce_dice_loss(z, LABELS, bce_weight=1.0, dice_weight=1.0)
    bce = R.region_bce_dice_loss(z, LABELS, bce_weight=1.0, dice_weight=0.0)
    dice = R.region_bce_dice_loss(z, LABELS, bce_weight=0.0, dice_weight=1.0)
    assert float(default) == pytest.approx(float(ones), rel=1e-6)
    assert float(default) == pytest.approx(float(bce) + float(dice), rel=1e-6)
    assert float(bce) > 0 and float(dice) != 0


def test_focal_default_gamma_is_one():
    """(Bug caught: another default gamma.) gamma 1 and 2 differ on these logits."""
    default = C.focal_loss(LOGITS, LABELS)
    assert float(default) == pytest.approx(float(C.focal_loss(LOGITS, LABELS, gamma=1.0)))
    assert float(default) != pytest.approx(float(C.focal_loss(LOGITS, LABELS, gamma=2.0)))


def test_dice_ce_passes_its_smoothing_to_the_dice_term():
    """dice_ce with the CE weight 0 is its Dice term: dice_loss with dice_ce's options
    (squared, batch) and the same smoothing (bug caught: smooth_nr or smooth_dr dropped)."""
    for nr, dr in ((1.0, 1e-5), (1e-5, 1.0), (1.0, 1.0)):
        got = C.dice_ce_loss(LOGITS, LABELS, ce_weight=0.0, dice_weight=1.0, smooth_nr=nr,
                             smooth_dr=dr)  # fmt: skip
        want = C.dice_loss(LOGITS, LABELS, squared=True, batch=True, smooth_nr=nr, smooth_dr=dr)
        assert float(got) == pytest.approx(float(want), rel=1e-6), (nr, dr)
    assert float(C.dice_ce_loss(LOGITS, LABELS, ce_weight=0.0, smooth_nr=1.0)) != pytest.approx(
        float(C.dice_ce_loss(LOGITS, LABELS, ce_weight=0.0))
    )


def test_region_combined_loss_passes_the_params_smoothing():
    """(Bug caught: the params' smooth_nr / smooth_dr not passed on, the defaults used.)"""
    z = LOGITS[..., :3]
    for nr, dr in ((1.0, 1e-5), (1e-5, 1.0)):
        params = R.region_loss_params("dice")._replace(
            smooth_nr=np.float32(nr), smooth_dr=np.float32(dr)
        )
        got = R.region_combined_loss(z, LABELS, params)
        want = R.region_bce_dice_loss(z, LABELS, bce_weight=0.0, dice_weight=1.0, smooth_nr=nr,
                                      smooth_dr=dr)  # fmt: skip
        assert float(got) == pytest.approx(float(want), rel=1e-6), (nr, dr)
        default = R.region_bce_dice_loss(z, LABELS, bce_weight=0.0, dice_weight=1.0)
        assert float(got) != pytest.approx(float(default), rel=1e-6), (nr, dr)


# three classes on 4 x 5 slices: no axis of the logits has the size of another
X3 = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5, 3))
Y3 = jax.random.randint(jax.random.PRNGKey(2), (2, 4, 5), 0, 3)
MASK = jnp.ones((2, 4, 5)).at[0, :2].set(0.0)  # 10 of the 40 pixels left out
W3 = np.array([0.5, 1.0, 2.0], np.float32)


def test_registry_passes_normalize_weights_mask_and_class_count():
    """get_loss's class-weighted losses equal the functions called with the same options
    (bugs caught: `normalize` dropped, the batch weights computed without the mask or for the
    default 4 classes, the class count read from the height or width of the logits)."""
    for normalize in ("weights", "pixels"):
        got = L.get_loss("cb_ce", class_weights=W3, normalize=normalize)(X3, Y3, MASK)
        want = C.cross_entropy(X3, Y3, W3, mask=MASK, normalize=normalize)
        assert float(got) == pytest.approx(float(want), rel=1e-6), normalize
        got = L.get_loss("cb_focal", class_weights=W3, gamma=2.0, normalize=normalize)(X3, Y3)
        want = C.focal_loss(X3, Y3, 2.0, W3, normalize=normalize)
        assert float(got) == pytest.approx(float(want), rel=1e-6), normalize
    weights = L.batch_class_balanced_weights(Y3, 0.9, MASK, 3)
    assert weights.shape == (3,)
    assert not np.allclose(weights, L.batch_class_balanced_weights(Y3, 0.9, None, 3))
    cb_ce = L.get_loss("cb_ce", beta=0.9, class_counts="batch_pixels")(X3, Y3, MASK)
    assert float(cb_ce) == pytest.approx(
        float(C.cross_entropy(X3, Y3, weights, mask=MASK)), rel=1e-6
    )
    cb_focal = L.get_loss("cb_focal", beta=0.9, class_counts="batch_pixels")(X3, Y3, MASK)
    assert float(cb_focal) == pytest.approx(
        float(C.focal_loss(X3, Y3, 1.0, weights, mask=MASK)), rel=1e-6
    )


def test_combined_loss_divides_by_the_weights_when_asked():
    """combined_loss with ce_by_weights = 1 (normalize="weights") equals get_loss's (bug
    caught: the flag read as "> 1", so the sum is divided by the pixel count)."""
    kw = dict(class_weights=W3, gamma=2.0, normalize="weights")
    got = L.combined_loss(X3, Y3, L.loss_params("cb_focal", num_classes=3, **kw), MASK)
    want = L.get_loss("cb_focal", **kw)(X3, Y3, MASK)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    pixels = L.get_loss("cb_focal", **{**kw, "normalize": "pixels"})(X3, Y3, MASK)
    assert float(got) != pytest.approx(float(pixels), rel=1e-6)


def test_class_balanced_weights_at_beta_zero_leave_absent_classes_at_zero():
    """beta 0: equal weights over the present classes, 0 for the absent one, mean 1 over the
    present (bug caught: the absent class weighted 1, giving 0.75 each)."""
    np.testing.assert_allclose(L.class_balanced_weights([5, 0, 3, 2], 0.0), [1, 0, 1, 1])


def test_class_weights_with_a_beta_are_refused():
    """class_weights and a beta without class_counts is still "both" (bug caught: only beta
    AND counts counted as counts, so the beta was silently ignored)."""
    with pytest.raises(ValueError) as err:
        L.get_loss("cb_ce", class_weights=W3, beta=0.9)
    assert str(err.value) == (
        "loss 'cb_ce': give either class_weights or (beta and class_counts), not both"
    )


def test_logits_of_two_axes_are_pixels_by_classes():
    """(N, C) logits: -log softmax of each row's label, averaged (bug caught: two axes
    refused)."""
    z = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = jnp.array([0, 2])
    want = np.mean([np.log(np.exp(2) + 2) - 2, np.log(2 + np.e)])
    assert float(C.cross_entropy(z, y)) == pytest.approx(want, rel=1e-6)


def test_a_sample_with_one_counted_pixel_is_in_the_per_sample_mean():
    """Per-sample Dice over a masked batch of 3: sample 0 keeps one pixel, sample 1 all,
    sample 2 none; the loss is the mean of the two counted samples' own losses (bugs caught:
    a sample needs two counted pixels; the uncounted sample averaged in)."""
    x = jnp.concatenate([X3, X3[:1]])
    y = jnp.concatenate([Y3, Y3[:1]])
    mask = jnp.zeros((3, 4, 5)).at[0, 0, 0].set(1.0).at[1].set(1.0)
    got = C.dice_loss(x, y, mask=mask)
    each = [C.dice_loss(x[i : i + 1], y[i : i + 1], mask=mask[i : i + 1]) for i in (0, 1)]
    assert float(got) == pytest.approx(float(np.mean(each)), rel=1e-5)
    assert float(each[0]) != pytest.approx(float(each[1]), rel=1e-3)
