"""The study's slice Dice and the two readings it leaves open (absent classes, pooling)."""

import numpy as np
import pytest

from brats_jax import metrics as M


def test_slice_dice_readings_hand_example():
    # slice 0: 2x2, target bg bg / ED ED, pred bg bg / ED bg -> bg 2*2/(2+3)=0.8, ED 2/3,
    #          NCR and ET absent from both (scored 1, or left out)
    # slice 1: all background in both -> every class but bg absent; bg Dice 1
    target = np.array([[[0, 0], [2, 2]], [[0, 0], [0, 0]]])
    pred = np.array([[[0, 0], [2, 0]], [[0, 0], [0, 0]]])
    r = M.slice_dice_readings(pred, target)
    np.testing.assert_allclose(r["absent_one"], [(0.8 + 1 + 2 / 3 + 1) / 4, 1.0])
    np.testing.assert_allclose(r["absent_excluded"], [(0.8 + 2 / 3) / 2, 1.0])
    # pooled over both slices: bg 6 target / 7 pred pixels, 6 overlap -> 12/13; ED 2/3;
    # NCR, ET absent everywhere -> 1
    cm = r["confusion"]
    assert cm.dtype == np.int64 and cm.sum() == 8
    np.testing.assert_allclose(M.dice_from_confusion(cm), [12 / 13, 1.0, 2 / 3, 1.0])
    assert M.paper_dice_pooled(cm) == pytest.approx((12 / 13 + 1 + 2 / 3 + 1) / 4)
    # the study's reading equals paper_dice slice by slice
    np.testing.assert_allclose(r["absent_one"], M.paper_dice(pred, target), rtol=1e-6)


def test_slice_dice_readings_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        M.slice_dice_readings(np.full((1, 2, 2), 4), np.zeros((1, 2, 2), int))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        M.slice_dice_readings(np.zeros((2, 2), int), np.zeros((2, 2), int))


def test_volume_dice_is_not_called_paper_dice():
    """The per-case (whole-volume) 4-class Dice has its own name (results.json's paper_dice
    is the mean over slices)."""
    from brats_jax.metrics import folder as E

    r = M.evaluate_volume(np.zeros((2, 2, 2), int), np.zeros((2, 2, 2), int))
    assert "paper_dice" not in r and r["volume_dice_4class"] == 1.0
    assert "paper_dice" not in E.COLUMNS and "volume_dice_4class" in E.COLUMNS
