"""Loss options at their defaults and passed through (the mutation run's survivors of
`losses/core.py` and `losses/regions.py`): a default is checked against the same call with
the documented value written out, and an option is checked at a value where a dropped
argument would show (smoothing 1.0 on 2x2 slices, where the 1e-5 default changes the Dice)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
