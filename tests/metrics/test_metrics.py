"""Tests for brats_jax.metrics against hand-worked examples and a brute-force HD95 reference."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics

from brats_jax import metrics as M

# ------------------------------------------------------------------ confusion matrix, Dice


def test_confusion_matrix_hand_example_mask_and_accumulation():
    target = np.array([[[0, 1], [3, 3]]])
    pred = np.array([[[0, 1], [2, 3]]])
    want = np.zeros((4, 4), int)
    want[0, 0] = want[1, 1] = want[3, 2] = want[3, 3] = 1
    np.testing.assert_array_equal(M.confusion_matrix(pred, target, 4), want)
    np.testing.assert_array_equal(
        jax.jit(M.confusion_matrix, static_argnums=2)(pred, target, 4), want
    )
    mask = np.array([[[True, True], [False, True]]])
    want_m = want.copy()
    want_m[3, 2] = 0
    np.testing.assert_array_equal(M.confusion_matrix(pred, target, 4, mask), want_m)
    # out-of-range values are ignored
    np.testing.assert_array_equal(
        M.confusion_matrix(np.array([[9, 1]]), np.array([[0, 1]]), 4)[1, 1], 1
    )
    assert int(M.confusion_matrix(np.array([[9, 1]]), np.array([[0, 1]]), 4).sum()) == 1
    # accumulation over batches = matrix of the concatenation
    total = M.confusion_matrix(pred, target, 4) + M.confusion_matrix(target, target, 4)
    np.testing.assert_array_equal(total, want + np.diag([1, 1, 0, 2]))


def test_dice_from_confusion_absent_rules():
    cm = np.array([[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    # class 0: 2*3/(4+4); class 1: 2*1/(2+2); classes 2, 3 absent
    np.testing.assert_allclose(M.dice_from_confusion(cm), [0.75, 0.5, 1.0, 1.0])
    d = M.dice_from_confusion(cm, absent="exclude")
    np.testing.assert_allclose(d[:2], [0.75, 0.5])
    assert np.isnan(d[2:]).all()
    np.testing.assert_allclose(M.paper_dice_pooled(cm), (0.75 + 0.5 + 2) / 4)
    np.testing.assert_allclose(M.paper_dice_pooled(cm, "exclude"), (0.75 + 0.5) / 2)
    np.testing.assert_allclose(M.dice_from_confusion(jnp.asarray(cm)), [0.75, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="absent"):
        M.dice_from_confusion(cm, absent="zero")


def test_paper_dice_hand_examples():
    t = np.zeros((1, 3, 3), int)
    # perfect prediction
    t_full = t.copy()
    t_full[0, 0, :] = 2
    np.testing.assert_allclose(M.paper_dice(t_full, t_full), [1.0])
    # disjoint: target all class 1, prediction all class 2 (classes 0 and 3 absent from both)
    np.testing.assert_allclose(M.paper_dice(np.full((1, 2, 2), 2), np.full((1, 2, 2), 1)), [0.5])
    np.testing.assert_allclose(
        M.paper_dice(np.full((1, 2, 2), 2), np.full((1, 2, 2), 1), absent="exclude"), [0.0]
    )
    # one-pixel ET object missed by one pixel: bg 2*7/16, ET 0, NCR/ED absent -> 1
    target = t.copy()
    target[0, 1, 1] = 3
    pred = t.copy()
    pred[0, 1, 2] = 3
    np.testing.assert_allclose(M.paper_dice(pred, target), [(0.875 + 0 + 1 + 1) / 4])
    np.testing.assert_allclose(
        M.paper_dice(pred, target, absent="exclude"), [(0.875 + 0) / 2], rtol=1e-6
    )
    # per-slice average vs pooled over the two slices
    preds = np.concatenate([pred, t_full])
    targets = np.concatenate([target, t_full])
    per_slice = M.paper_dice(preds, targets)
    np.testing.assert_allclose(per_slice, [0.71875, 1.0])
    cm = M.confusion_matrix(preds, targets, 4)
    # pooled: bg tp 7+6, |A|+|B| 8+8+6+6 -> 26/28 ; ED 1 ; NCR absent 1 ; ET 0
    np.testing.assert_allclose(M.paper_dice_pooled(np.asarray(cm)), (26 / 28 + 1 + 1 + 0) / 4)


def test_clu_metrics_confusion_and_mean_paper_dice():
    labels = np.array([[[0, 1], [3, 3]], [[2, 2], [2, 2]]])
    pred = np.array([[[0, 1], [2, 3]], [[0, 0], [0, 0]]])
    logits = jax.nn.one_hot(pred, 4) * 5.0
    valid = np.array([True, False])  # second sample is padding

    @jax.jit
    def update(logits, labels, valid):
        return (
            M.ConfusionMatrix.from_model_output(labels=labels, logits=logits, valid=valid),
            M.MeanPaperDice.from_model_output(labels=labels, logits=logits, valid=valid),
        )

    cm_metric, dice_metric = M.ConfusionMatrix.empty(), M.MeanPaperDice.empty()
    for _ in range(3):
        cm, d = update(logits, labels, valid)
        cm_metric, dice_metric = cm_metric.merge(cm), dice_metric.merge(d)
    want = np.zeros((4, 4), int)
    want[0, 0] = want[1, 1] = want[3, 2] = want[3, 3] = 3
    np.testing.assert_array_equal(cm_metric.compute(), want)
    # sample 0: bg 1, NCR 1, ED 0 (pred 1, target 0), ET 2/3 -> 2.6667/4
    np.testing.assert_allclose(dice_metric.compute(), (1 + 1 + 0 + 2 / 3) / 4, rtol=1e-6)
    np.testing.assert_allclose(cm_metric.paper_dice(), (1 + 1 + 0 + 2 / 3) / 4, rtol=1e-6)
    np.testing.assert_allclose(cm_metric.dice(), [1, 1, 0, 2 / 3], rtol=1e-6)

    # in a clu Collection, and int64 accumulation past 2**31 pixels outside jit
    coll = clu_metrics.Collection.create(cm=M.ConfusionMatrix, dice=M.MeanPaperDice)
    c = coll.single_from_model_output(labels=labels, logits=logits)
    assert set(c.compute()) == {"cm", "dice"}
    big = M.ConfusionMatrix(matrix=np.full((4, 4), 2**30, np.int64))
    assert int(big.merge(big).merge(big).compute()[0, 0]) == 3 * 2**30


def test_mean_paper_dice_empty_is_nan_and_sums_exactly_outside_jit():
    assert np.isnan(M.MeanPaperDice.empty().compute())  # no slice: undefined, not 0.0
    labels = np.zeros((1, 2, 2), int)
    pred = np.array([[[0, 1], [0, 0]]])  # bg 2*3/7, NCR 0 (pred only), ED/ET absent 1
    d = M.MeanPaperDice.from_model_output(labels=labels, predictions=pred)
    one = (6 / 7 + 0 + 1 + 1) / 4
    np.testing.assert_allclose(d.compute(), one, rtol=1e-6)
    only_padding = M.MeanPaperDice.from_model_output(
        labels=labels, predictions=pred, valid=np.array([False])
    )
    assert np.isnan(M.MeanPaperDice.empty().merge(only_padding).compute())
    # 2**24 + 1 slices of Dice 1: a float32 running sum stalls at 2**24 (mean ~0.99999994)
    ones = M.MeanPaperDice(total=jnp.float32(2.0**24), count=jnp.int32(2**24))
    unit = M.MeanPaperDice(total=jnp.float32(1.0), count=jnp.int32(1))
    assert float(ones.merge(unit).compute()) == 1.0
    big = M.MeanPaperDice(total=np.float64(2.0**31), count=np.int64(2**31))
    assert int(big.merge(big).count) == 2**32  # no int32 overflow


def test_region_dice_takes_a_float_mask_as_bool():
    target = np.array([0, 1, 2, 3, 3, 0])
    pred = np.array([0, 2, 2, 3, 0, 1])
    mask = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # drops the missed ET and the false NCR
    d = M.region_dice(pred, target, mask=mask)
    # WT: pred {1,2,3} target {1,2,3} -> 1 ; TC: pred {3} target {1,3} -> 2/3 ; ET 1
    np.testing.assert_allclose([d["WT"], d["TC"], d["ET"]], [1.0, 2 / 3, 1.0], rtol=1e-6)


def test_region_dice_hand_example():
    target = np.array([0, 1, 2, 3, 3, 0])
    pred = np.array([0, 2, 2, 3, 0, 1])
    # WT: pred {1,2,3,5} target {1,2,3,4} -> 2*3/8 ; TC: pred {3,5} target {1,3,4} -> 2/5
    # ET: pred {3} target {3,4} -> 2/3
    d = M.region_dice(pred, target)
    np.testing.assert_allclose([d["WT"], d["TC"], d["ET"]], [0.75, 0.4, 2 / 3], rtol=1e-6)
    # the same from the confusion matrix (numpy and JAX)
    cm = M.confusion_matrix(pred, target, 4)
    for c in (np.asarray(cm), cm):
        r = M.region_dice_from_confusion(c)
        np.testing.assert_allclose([r["WT"], r["TC"], r["ET"]], [0.75, 0.4, 2 / 3], rtol=1e-6)
    r = M.region_dice_from_confusion(np.diag([5, 0, 0, 0]))
    assert r == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    empty = M.region_dice(np.zeros(4, int), np.zeros(4, int))
    assert all(float(v) == 1.0 for v in empty.values())
    one = M.region_dice(np.array([0, 3]), np.zeros(2, int))
    assert float(one["ET"]) == 0.0


# ------------------------------------------------------------------ HD95


def _brute_surface(mask):
    """Surface by explicit 6-neighbour check, outside the array = background."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask), strict=True):
        p = tuple(i + 1 for i in idx)
        for ax, d in itertools.product(range(mask.ndim), (-1, 1)):
            q = list(p)
            q[ax] += d
            if not padded[tuple(q)]:
                out[idx] = True
                break
    return out


def _brute_hd(a, b, spacing, mode, q=95):
    sa, sb = _brute_surface(a), _brute_surface(b)
    pa = np.argwhere(sa) * np.asarray(spacing)
    pb = np.argwhere(sb) * np.asarray(spacing)
    dist = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = dist.min(1), dist.min(0)
    if mode == "max":
        return max(np.percentile(d_ab, q), np.percentile(d_ba, q))
    return np.percentile(np.concatenate([d_ab, d_ba]), q)


def test_hd95_empty_conventions():
    z = np.zeros((5, 5, 5), bool)
    o = z.copy()
    o[2, 2, 2] = True
    assert M.hd95(z, z) == 0.0
    assert M.hd95(o, z) == 373.13
    assert M.hd95(z, o) == 373.13
    assert M.hd95(o, o) == 0.0


def test_hd95_single_voxels_and_anisotropic_spacing():
    a = np.zeros((6, 6, 6), bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[1, 2, 0] = True
    assert M.hd95(a, b) == pytest.approx(math.sqrt(5))
    assert M.hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(math.sqrt(13))


def test_hd95_shifted_cubes_closed_form():
    # 2-voxel cube shifted by 3 along x: every directed distance is 2 or 3 -> P95 = 3
    a = np.zeros((12, 8, 8), bool)
    a[2:4, 2:4, 2:4] = True
    b = np.roll(a, 3, axis=0)
    assert M.hd95(a, b) == pytest.approx(3.0)
    assert M.hd95(a, b, mode="pooled") == pytest.approx(3.0)
    # 3-voxel cube shifted by 3: surface = 26 voxels (centre excluded); distances to the
    # other cube's surface: 9 x 3 (far face), 8 x 2 (middle layer), 9 x 1 (near face)
    a = np.zeros((14, 9, 9), bool)
    a[2:5, 3:6, 3:6] = True
    b = np.roll(a, 3, axis=0)
    assert M.hd95(a, b, percentile=100) == pytest.approx(3.0)
    assert M.hd95(a, b, percentile=50) == pytest.approx(2.0)  # sorted[12], sorted[13] = 2
    assert M.hd95(a, b) == pytest.approx(3.0)  # 0.95 * 25 = 23.75 -> sorted[23..24] = 3
    # spacing 2 mm along x doubles everything
    assert M.hd95(a, b, spacing=(2, 1, 1), percentile=50) == pytest.approx(4.0)


def test_hd95_max_vs_pooled_definitions():
    a = np.zeros((8, 3, 3), bool)
    b = a.copy()
    a[0, 1, 1] = True
    b[3:5, 1, 1] = True
    # d(a->b) = [3], d(b->a) = [3, 4]
    assert M.hd95(a, b, mode="max") == pytest.approx(3.95)  # max(3, 3 + 0.95)
    assert M.hd95(a, b, mode="pooled") == pytest.approx(3.9)  # P95 of [3, 3, 4]
    assert M.hd95(a, b, spacing=(2, 1, 1), mode="pooled") == pytest.approx(7.8)
    with pytest.raises(ValueError, match="mode"):
        M.hd95(a, b, mode="mean")


def test_hd95_volume_border_voxels_are_surface():
    a = np.ones((4, 4, 4), bool)  # fills the volume: its surface is the 56 border voxels
    b = np.zeros_like(a)
    b[0, 0, 0] = True
    assert M.hd95(a, b, percentile=100) == pytest.approx(math.sqrt(27))
    assert M.hd95(b, a, percentile=100) == pytest.approx(math.sqrt(27))


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for trial in range(6):
        shape = (12, 10, 9)
        a = rng.random(shape) < 0.15
        b = rng.random(shape) < 0.15
        a[: 3 + trial] = False  # varied bounding boxes, some touching the border
        spacing = (1.0, 1.5, 2.5) if trial % 2 else (1.0, 1.0, 1.0)
        for mode in ("max", "pooled"):
            assert M.hd95(a, b, spacing, mode) == pytest.approx(
                _brute_hd(a, b, spacing, mode), rel=1e-9
            )


def test_hd95_full_size_volume():
    shape = (240, 240, 155)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt = ((zz - 120) / 40.0) ** 2 + ((yy - 110) / 35.0) ** 2 + ((xx - 80) / 30.0) ** 2 < 1
    pred = ((zz - 123) / 38.0) ** 2 + ((yy - 112) / 36.0) ** 2 + ((xx - 80) / 31.0) ** 2 < 1
    value = M.hd95(pred, gt)  # its speed is a benchmark's claim, not a unit test's
    assert 0 < value < 10


# ------------------------------------------------------------------ sens/spec, evaluate_volume


def test_sensitivity_specificity_and_evaluate_volume():
    assert M.sensitivity_specificity(3, 1, 1, 5) == (0.75, 5 / 6)
    # no target positives: 0 with false positives, 1 without (BraTS-2023-Metrics, GaNDLF)
    assert M.sensitivity_specificity(0, 2, 0, 5) == (0.0, 5 / 7)
    assert M.sensitivity_specificity(0, 0, 0, 5) == (1.0, 1.0)
    target = np.zeros((4, 4, 4), np.int32)
    pred = np.zeros_like(target)
    target[1, 1, 1:3] = 2  # ED, 2 voxels
    target[1, 2, 1] = 1  # NCR, 1 voxel
    pred[1, 1, 1:3] = 2
    pred[1, 2, 1] = 2  # NCR predicted as ED
    pred[3, 3, 3] = 3  # false ET
    r = M.evaluate_volume(pred, target, spacing=(1, 1, 1))
    expected_keys = {
        f"{m}_{g}" for m in ("dice", "hd95", "sensitivity", "specificity") for g in M.REGIONS
    } | {"volume_dice_4class", "class_dice_0", "class_dice_1", "class_dice_2", "class_dice_3"}
    assert set(r) == expected_keys
    # WT: target 3 voxels, pred 4, overlap 3 -> 6/7 ; TC: target {NCR}, pred {ET} -> 0
    assert r["dice_WT"] == pytest.approx(6 / 7)
    assert r["dice_TC"] == 0.0 and r["dice_ET"] == 0.0
    assert r["sensitivity_WT"] == 1.0 and r["specificity_WT"] == pytest.approx(60 / 61)
    assert r["sensitivity_ET"] == 0.0  # no ET in target, one false ET voxel
    assert r["sensitivity_TC"] == 0.0  # TC: the NCR voxel missed
    assert r["hd95_ET"] == 373.13
    # classes: bg 2*60/(61+60), NCR 0, ED 2*2/(2+3), ET 0
    np.testing.assert_allclose(
        [r[f"class_dice_{c}"] for c in range(4)], [120 / 121, 0, 0.8, 0], rtol=1e-12
    )
    assert r["volume_dice_4class"] == pytest.approx((120 / 121 + 0.8) / 4)
    with pytest.raises(ValueError, match="outside"):
        M.evaluate_volume(pred + 4, target)
    with pytest.raises(ValueError, match="shape"):
        M.evaluate_volume(pred[:2], target)
