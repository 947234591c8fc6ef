"""Metric edge values and errors (`metrics/slices.py`, `metrics/volumes.py`) by hand: the
study's per-slice readings, empty regions, sensitivity at zero counts, and one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax import metrics as M
from brats_jax.metrics import slices, volumes


def _message(fn, *args, **kw):
    with pytest.raises(ValueError) as err:
        fn(*args, **kw)
    return str(err.value)


def test_slice_dice_readings_by_hand():
    # slice 0: target {0, 1}, pred {0, 0}: class 0 Dice 2/3, class 1 Dice 0, classes 2, 3 absent
    # slice 1: identical maps with classes 0 and 3: Dice 1 for both, 1 and 2 absent
    target = np.array([[[0, 1]], [[0, 3]]])
    pred = np.array([[[0, 0]], [[0, 3]]])
    got = M.slice_dice_readings(pred, target)
    np.testing.assert_allclose(got["absent_one"], [(2 / 3 + 0 + 1 + 1) / 4, 1.0])
    np.testing.assert_allclose(got["absent_excluded"], [(2 / 3 + 0) / 2, 1.0])
    np.testing.assert_array_equal(
        got["confusion"], [[2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    )
    assert got["confusion"].dtype == np.int64
    assert _message(M.slice_dice_readings, pred[0], target[0]) == (
        "pred and target must be equal (N, H, W); got (1, 2), (1, 2)"
    )
    assert _message(M.slice_dice_readings, pred, target[:1]) == (
        "pred and target must be equal (N, H, W); got (2, 1, 2), (1, 1, 2)"
    )


def test_class_map_errors():
    assert _message(M.evaluate_volume, np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int)) == (
        "pred must be an integer class map; got dtype float64"
    )
    assert _message(M.region_confusion, np.zeros((2, 2), int), np.array([[0, 5], [-1, 4]])) == (
        "target has values [-1, 4, 5] outside {0..3}"
    )
    assert _message(M.region_confusion, np.zeros((2, 2), int), np.zeros((2, 3), int)) == (
        "pred shape (2, 2) != target shape (2, 3)"
    )
    empty = np.zeros((0, 2), np.int64)  # no voxel: no range to check
    assert M.region_confusion(empty, empty)["WT"] == (0, 0, 0, 0)


def test_hd95_argument_errors():
    a = np.ones((2, 2, 2), bool)
    assert _message(M.hd95, a, a[:1]) == "pred_mask shape (2, 2, 2) != gt_mask shape (1, 2, 2)"
    assert _message(M.hd95, a, a, mode="mean") == (
        "mode must be one of ('max', 'pooled'); got 'mean'"
    )
    assert _message(M.hd95, a, a, spacing=(1.0, 0.0, 1.0)) == (
        "spacing must be 3 positive numbers (mm); got (1.0, 0.0, 1.0)"
    )
    assert _message(M.hd95, a, a, spacing=(1.0, np.nan, 1.0)).startswith("spacing must be 3")
    assert M.hd95(a, a, spacing=2.5) == 0.0  # one number serves every axis
    b = np.zeros((1, 1, 5), bool)
    c = b.copy()
    b[0, 0, 0], c[0, 0, 4] = True, True
    assert M.hd95(b, c, spacing=2.5) == 10.0


def test_sensitivity_specificity_without_positives_or_negatives():
    assert M.sensitivity_specificity(0, 0, 0, 5) == (1.0, 1.0)
    assert M.sensitivity_specificity(0, 2, 0, 5) == (0.0, 5 / 7)
    assert M.sensitivity_specificity(3, 0, 1, 0) == (0.75, 1.0)
    sens, spec = M.sensitivity_specificity(1, 1, 3, 3)
    assert (sens, spec) == (0.25, 0.75) and isinstance(sens, float)


def test_evaluate_volume_empty_regions_and_keys():
    t = np.zeros((3, 3, 3), np.int64)
    t[1, 1, 1] = 2  # only ED: TC and ET empty in both
    got = M.evaluate_volume(t, t, spacing=(1, 1, 2))
    assert got["dice_TC"] == 1.0 and got["hd95_ET"] == 0.0 and got["dice_WT"] == 1.0
    assert got["sensitivity_ET"] == 1.0 and got["specificity_ET"] == 1.0
    assert got["class_dice_1"] == 1.0 and got["volume_dice_4class"] == 1.0
    excl = M.evaluate_volume(t, t, absent="exclude")
    assert np.isnan(excl["class_dice_1"]) and excl["volume_dice_4class"] == 1.0
    missed = M.evaluate_volume(np.zeros_like(t), t, hd95_mode="pooled")
    assert missed["dice_WT"] == 0.0 and missed["hd95_WT"] == volumes.HD95_EMPTY
    assert missed["sensitivity_WT"] == 0.0 and missed["specificity_WT"] == 1.0
    assert missed["class_dice_2"] == 0.0 and missed["volume_dice_4class"] == pytest.approx(
        (2 * 26 / 53 + 1 + 0 + 1) / 4
    )


def test_slice_metric_errors():
    x = jnp.zeros((2, 3), jnp.int32)
    assert _message(M.confusion_matrix, x, jnp.zeros((3, 2), jnp.int32)) == (
        "pred shape (2, 3) != target shape (3, 2)"
    )
    assert _message(M.dice_from_confusion, np.eye(4), absent="zero") == (
        "absent must be one of ('one', 'exclude'); got 'zero'"
    )
    assert _message(M.paper_dice, x, x, absent="nan").startswith("absent must be one of")
    assert _message(M.paper_dice, jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32)) == (
        "pred must be (B, H, W, ...); got shape (4,)"
    )
    assert _message(M.region_dice_from_confusion, np.eye(3)) == "cm must be (4, 4); got (3, 3)"
    assert _message(M.region_dice, x, jnp.zeros((2, 2), jnp.int32)) == (
        "pred shape (2, 3) != target shape (2, 2)"
    )
    assert _message(slices._model_output, x, None, None) == (
        "give exactly one of logits (B,H,W,C) or predictions (B,H,W)"
    )
    assert _message(slices._model_output, x, jnp.zeros((2, 3, 4)), x).startswith("give exactly")


def test_confusion_ignores_out_of_range_values_and_counts_int32():
    pred = jnp.array([[0, 1, 4, -1, 3]])
    target = jnp.array([[0, 1, 1, 1, 3]])
    cm = M.confusion_matrix(pred, target)
    assert cm.dtype == jnp.int32 and int(cm.sum()) == 3  # 4 and -1 are ignored
    np.testing.assert_array_equal(np.diag(np.asarray(cm)), [1, 1, 0, 1])
    cm2 = M.confusion_matrix(jnp.array([0, 1, 2]), jnp.array([2, 1, 0]), num_classes=3)
    np.testing.assert_array_equal(np.asarray(cm2), [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    cm3 = M.confusion_matrix(jnp.array([0, 3]), jnp.array([3, 3]), num_classes=3)
    assert int(cm3.sum()) == 0  # class 3 is out of range for 3 classes


def test_region_dice_from_confusion_numpy_floats_and_jax():
    cm = np.zeros((4, 4), np.int64)
    cm[2, 2] = 3  # ED found
    cm[3, 1] = 1  # ET read as NCR: in TC, not in ET
    got = M.region_dice_from_confusion(cm)
    assert got == {"WT": 1.0, "TC": 2 * 1 / 2, "ET": 0.0}
    assert all(isinstance(v, float) for v in got.values())
    j = M.region_dice_from_confusion(jnp.asarray(cm))
    assert float(j["ET"]) == 0.0 and j["WT"].dtype == jnp.float32
    empty = M.region_dice_from_confusion(np.diag([5, 0, 0, 0]))
    assert empty == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_class_map_errors_name_the_argument_at_fault():
    """(Bug caught: the message names the other array, or none.)"""
    ok = np.zeros((2, 3, 4), np.int64)
    bad = ok.copy()
    bad[0, 0, 0] = 4  # BraTS's own ET label, not a training class (bug caught: 4 let in)
    for fn in (volumes.evaluate_volume, volumes.region_confusion, volumes.slice_dice_readings):
        with pytest.raises(ValueError) as err:
            fn(bad, ok)
        assert str(err.value) == "pred has values [4] outside {0..3}", fn.__name__
        with pytest.raises(ValueError) as err:
            fn(ok, bad)
        assert str(err.value) == "target has values [4] outside {0..3}", fn.__name__
    with pytest.raises(ValueError, match="^target must be an integer class map; got dtype float"):
        volumes.evaluate_volume(ok, ok.astype(np.float32))


def test_specificity_with_a_single_negative_voxel():
    """tn + fp = 1: the one negative predicted positive gives specificity 0 (bug caught:
    "no negatives" read as fewer than two)."""
    assert volumes.sensitivity_specificity(1, 1, 0, 0) == (1.0, 0.0)
    assert volumes.sensitivity_specificity(1, 0, 0, 1) == (1.0, 1.0)
    assert volumes.sensitivity_specificity(1, 0, 0, 0) == (1.0, 1.0)  # no negatives at all


def test_evaluate_volume_passes_its_hd95_mode_and_absent_convention():
    """Non-default options reach the metrics (bug caught: either left at its default).
    WT: target a 1-voxel column, prediction that column plus 3 voxels at 1, 2 and 3 mm from
    it. "max": max(P95 of pred->gt {0, 1, 2, 3}, P95 of gt->pred {0}) = 2.85 mm; "pooled":
    P95 of {0, 1, 2, 3, 0} = 2.8 mm. NCR and ET are absent from both maps: the 4-class
    volume Dice scores them 1 with "one" and leaves them out with "exclude"."""
    target = np.zeros((1, 1, 8), np.int64)
    target[0, 0, 0] = 2
    pred = target.copy()
    pred[0, 0, 1:4] = 2
    got = volumes.evaluate_volume(pred, target, hd95_mode="pooled", absent="exclude")
    assert got["hd95_WT"] == pytest.approx(volumes.hd95(pred > 0, target > 0, mode="pooled"))
    assert got["hd95_WT"] == pytest.approx(np.percentile([0, 1, 2, 3, 0], 95))
    assert volumes.evaluate_volume(pred, target)["hd95_WT"] == pytest.approx(
        np.percentile([0, 1, 2, 3], 95)
    )
    # classes: background Dice 2*4/(7+4) = 8/11, ED 2*1/(1+4) = 2/5, NCR and ET absent
    assert got["volume_dice_4class"] == pytest.approx((8 / 11 + 2 / 5) / 2)
    one = volumes.evaluate_volume(pred, target)["volume_dice_4class"]
    assert one == pytest.approx((8 / 11 + 2 / 5 + 1 + 1) / 4)


def test_slice_readings_when_the_last_slice_lacks_the_last_class_pair():
    """The per-slice confusion counts keep their shape when the highest index (last slice,
    ET predicted on ET) never occurs (bug caught: bincount without minlength), without a
    warning for the classes absent from a slice."""
    import warnings

    target = np.zeros((2, 2, 2), np.int64)
    target[0, 0, 0] = 3  # ET on slice 0 only
    pred = target.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = volumes.slice_dice_readings(pred, target)
    np.testing.assert_allclose(got["absent_one"], [1.0, 1.0])
    np.testing.assert_allclose(got["absent_excluded"], [1.0, 1.0])
    assert got["confusion"].tolist() == [[7, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]


def test_hd95_surfaces_include_the_volume_border_and_any_nonzero_is_in_the_mask():
    """A (1, 1, 8) volume: every voxel touches the border on the first two axes, so every
    mask voxel is a surface voxel. Prediction voxels 0..3, truth 0..5: pred -> truth
    distances all 0, truth -> pred {0, 0, 0, 0, 1, 2}: HD95 = P95 of those (were the border
    inside the masks, only voxels 3 and 5 would be surfaces: HD95 2). A mask given as label
    values (2) is the same mask (bug caught: masks not read as booleans)."""
    pred = np.zeros((1, 1, 8), bool)
    pred[..., :4] = True
    gt = np.zeros((1, 1, 8), bool)
    gt[..., :6] = True
    want = np.percentile([0, 0, 0, 0, 1, 2], 95)
    assert volumes.hd95(pred, gt) == pytest.approx(want)
    assert volumes.hd95(2 * pred.astype(np.int64), 2 * gt.astype(np.int64)) == pytest.approx(want)


def test_paper_dice_scores_only_the_masked_pixels():
    """pred [[0, 1], [1, 1]], target [[0, 1], [0, 1]], the bottom-left pixel masked out: the
    three pixels left agree, so every class scores 1 (absent ones too); unmasked, class 0 is
    2/3 and class 1 is 4/5 (bug caught: the mask dropped on its way to the confusion
    matrices)."""
    pred = jnp.array([[[0, 1], [1, 1]]])
    target = jnp.array([[[0, 1], [0, 1]]])
    mask = jnp.array([[[1, 1], [0, 1]]], bool)
    np.testing.assert_allclose(slices.paper_dice(pred, target, mask=mask), [1.0], rtol=1e-6)
    np.testing.assert_allclose(
        slices.paper_dice(pred, target), [(2 / 3 + 4 / 5 + 1 + 1) / 4], rtol=1e-6
    )


def test_confusion_matrix_counts_every_nonzero_mask_value():
    """A label map used as the mask (values 0, 1, 2, 4): every nonzero pixel counts (bug caught:
    the mask combined with the in-range flags as integers, where 1 & 2 == 0 drops a pixel)."""
    pred = jnp.array([0, 1, 2, 3, 3])
    target = jnp.array([0, 1, 2, 3, 0])
    mask = jnp.array([4, 1, 2, 2, 0], jnp.int32)
    np.testing.assert_array_equal(M.confusion_matrix(pred, target, mask=mask), np.eye(4))


def test_paper_dice_pooled_per_matrix_in_float64_for_numpy_and_under_jit():
    """cm_a: class 0 2*2/(3+2) = 0.8, class 1 2*1/(1+2) = 2/3, classes 2 and 3 absent; cm_b: the
    classes present all exact. Bugs caught: the excluded mean taken over the whole stack
    (one number for two matrices), numpy input averaged in float32, numpy used on a tracer."""
    cm_a = np.array([[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    stack = np.stack([cm_a, np.diag([3, 0, 0, 1])])
    got = M.paper_dice_pooled(stack, "exclude")
    assert got.shape == (2,) and got.dtype == np.float64
    np.testing.assert_allclose(got, [(0.8 + 2 / 3) / 2, 1.0], rtol=1e-14)
    one = M.paper_dice_pooled(cm_a)
    assert isinstance(one, np.floating) and one == pytest.approx((0.8 + 2 / 3 + 2) / 4, rel=1e-14)
    jitted = jax.jit(M.paper_dice_pooled, static_argnums=1)(jnp.asarray(cm_a), "exclude")
    assert float(jitted) == pytest.approx((0.8 + 2 / 3) / 2, rel=1e-6)


def test_paper_dice_of_one_dimensional_images():
    """(B, N) maps are B images of N pixels. Image 0: class 0 2*1/(2+1), class 1 2*1/(1+2),
    2 and 3 absent; image 1 exact (bug caught: a shape check that asks for (B, H, W))."""
    pred = jnp.array([[0, 1, 1], [2, 2, 0]])
    target = jnp.array([[0, 1, 0], [2, 2, 0]])
    np.testing.assert_allclose(
        slices.paper_dice(pred, target), [(2 / 3 + 2 / 3 + 2) / 4, 1.0], rtol=1e-6
    )


def test_region_dice_from_confusion_counts_past_float32_and_under_jit():
    """NCR found in 2**24 + 1 voxels, one NCR voxel read as background: WT, TC Dice
    2(2**24 + 1) / (2(2**24 + 1) + 1) exactly in float64 (float32 counts round 2**24 + 1 to
    2**24); under jit the JAX branch runs (bugs caught: numpy input cast to float32 or sent to
    jnp, JAX input sent to numpy)."""
    n = 2**24 + 1
    cm = np.zeros((4, 4), np.int64)
    cm[1, 1], cm[1, 0] = n, 1
    got = M.region_dice_from_confusion(cm)
    assert got["WT"] == got["TC"] == 2 * n / (2 * n + 1) and got["ET"] == 1.0
    assert got["WT"] != float(np.float32(2 * n) / np.float32(2 * n + 1))
    small = np.diag([5, 2, 0, 1])
    small[3, 1] = 1  # ET read as NCR: TC 2*4/8 = 1, ET 2*1/(2+1)
    jitted = jax.jit(M.region_dice_from_confusion)(jnp.asarray(small))
    np.testing.assert_allclose([float(jitted[k]) for k in ("WT", "TC", "ET")], [1, 1, 2 / 3])


def test_confusion_metric_predictions_masks_valid_flags_classes_and_reduce():
    """Sample 0 (valid): labels [0, 1, 3], pred [0, 1, 1], mask [2, 1, 0] (label-valued): counts
    (0, 0) and (1, 1), the ET pixel read as NCR is masked out. Sample 1 (padding) is not counted
    even where its mask is set. Bugs caught: `predictions=` ignored, the mask dropped or dropped
    when `valid` is given, mask and valid joined by `|` or bitwise on integers, the number of
    classes taken as 4 for 2-class logits, `reduce` over the wrong axis, `absent` ignored."""
    labels = np.array([[[0, 1, 3]], [[2, 2, 2]]])
    pred = np.array([[[0, 1, 1]], [[0, 0, 0]]])
    mask = np.array([[[2, 1, 0]], [[1, 1, 1]]])
    cm = M.ConfusionMatrix.from_model_output(
        labels=labels, predictions=pred, mask=mask, valid=np.array([True, False])
    )
    np.testing.assert_array_equal(cm.compute(), np.diag([1, 1, 0, 0]))
    two = M.ConfusionMatrix.from_model_output(
        labels=np.array([[[0, 1]]]), logits=jax.nn.one_hot(np.array([[[0, 0]]]), 2)
    )
    np.testing.assert_array_equal(two.compute(), [[1, 0], [1, 0]])
    stacked = M.ConfusionMatrix(matrix=jnp.stack([jnp.eye(4, dtype=jnp.int32), 2 * cm.matrix]))
    np.testing.assert_array_equal(stacked.reduce().compute(), np.diag([3, 3, 1, 1]))
    off = M.ConfusionMatrix(matrix=jnp.asarray([[2, 1, 0, 0]] + [[0] * 4] * 3, jnp.int32))
    np.testing.assert_allclose(off.dice("exclude"), [0.8, 0.0, np.nan, np.nan], rtol=1e-6)
    assert float(off.paper_dice("exclude")) == pytest.approx(0.4, rel=1e-6)
    assert float(off.paper_dice()) == pytest.approx(0.7, rel=1e-6)


def test_mean_paper_dice_masks_pixels():
    """One slice, labels [0, 1], pred [0, 0]: unmasked (2/3 + 0 + 1 + 1) / 4; with the NCR
    pixel masked out only background is left, scored 1 (bug caught: the mask dropped)."""
    labels, pred = np.array([[[0, 1]]]), np.array([[[0, 0]]])
    d = M.MeanPaperDice.from_model_output(labels=labels, predictions=pred, mask=[[[2, 0]]])
    assert float(d.compute()) == pytest.approx(1.0)
    d = M.MeanPaperDice.from_model_output(labels=labels, predictions=pred)
    assert float(d.compute()) == pytest.approx((2 / 3 + 2) / 4, rel=1e-6)


def test_metrics_merge_and_compute_inside_jit():
    """The traced branches: slice 0 of labels [0, 1] / pred [0, 0] scores (2/3 + 0 + 2) / 4,
    slice 1 scores 1; merging a batch with itself keeps the mean and doubles the count; one
    slice divides by 1; no counted slice is NaN; a confusion matrix merged with a concrete one
    from outside, in either order, adds, and counts stay integers past 2**24 (bugs caught:
    subtraction, the count clamped at 2, NaN at count 1 or a zero at count 0, a float32 empty
    matrix, numpy used on a tracer)."""
    labels = jnp.array([[[0, 1]], [[2, 2]]])
    pred = jnp.array([[[0, 0]], [[2, 2]]])
    outside = M.ConfusionMatrix(matrix=jnp.zeros((4, 4), jnp.int32).at[0, 0].set(2**24))

    @jax.jit
    def run(labels, pred):
        d = M.MeanPaperDice.from_model_output(labels=labels, predictions=pred)
        first = M.MeanPaperDice.from_model_output(labels=labels[:1], predictions=pred[:1])
        none = M.MeanPaperDice.from_model_output(
            labels=labels, predictions=pred, valid=jnp.zeros(2, bool)
        )
        cm = M.ConfusionMatrix.from_model_output(labels=labels, predictions=pred)
        from_empty = M.ConfusionMatrix.empty().merge(outside).merge(cm)
        merged = cm.merge(outside), outside.merge(cm), from_empty
        twice = d.merge(d)
        return twice.count, twice.compute(), first.compute(), none.compute(), merged

    count, mean, first, none, (a, b, from_empty) = run(labels, pred)
    slice0 = (2 / 3 + 2) / 4
    assert int(count) == 4 and float(mean) == pytest.approx((slice0 + 1) / 2, rel=1e-6)
    assert float(first) == pytest.approx(slice0, rel=1e-6) and np.isnan(float(none))
    want = np.zeros((4, 4), np.int64)
    want[0, 0], want[1, 0], want[2, 2] = 2**24 + 1, 1, 2
    np.testing.assert_array_equal(a.compute(), want)
    np.testing.assert_array_equal(b.compute(), want)
    np.testing.assert_array_equal(from_empty.compute(), want)
    assert from_empty.compute().dtype == jnp.int32
