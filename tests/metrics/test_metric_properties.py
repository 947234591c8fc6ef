"""Property tests of brats_jax.metrics against numpy/scipy references written here.

Dice (:func:`dice_from_confusion`, :func:`evaluate_volume`) and HD95 (:func:`hd95`) are
symmetric in (prediction, target), bounded, follow the empty-mask conventions (both empty:
Dice 1, HD95 0; one empty: Dice 0, HD95 373.13) and equal brute-force references: HD95 from
``scipy.spatial.distance.cdist`` over the surface voxels (mask voxels with a face neighbour
outside the mask, the volume border counting as outside) in mm, on small non-cubic volumes
with anisotropic spacing, so an axis or spacing mix-up shows.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from brats_jax import metrics as M

SHAPE = (7, 5, 6)  # non-cubic: a swapped axis changes the geometry
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

# ------------------------------------------------------------------ strategies

spacings = st.tuples(*[st.sampled_from([0.5, 0.8, 1.0, 1.7, 3.0])] * 3).filter(
    lambda s: len(set(s)) > 1
)


@st.composite
def masks(draw, shape=SHAPE):
    """A boolean mask: empty, full, a random box, or random voxels (sparse or dense)."""
    kind = draw(st.sampled_from(["empty", "box", "box", "voxels", "voxels", "full"]))
    m = np.zeros(shape, bool)
    if kind == "full":
        m[:] = True
    elif kind == "box":
        lo = [draw(st.integers(0, n - 1)) for n in shape]
        hi = [draw(st.integers(a + 1, n)) for a, n in zip(lo, shape, strict=True)]
        m[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    elif kind == "voxels":
        seed = draw(st.integers(0, 2**32 - 1))
        density = draw(st.sampled_from([0.03, 0.15, 0.5, 0.9]))
        m = np.random.default_rng(seed).random(shape) < density
    return m


@st.composite
def class_maps(draw):
    """An integer class map {0..3} whose classes are a drawn subset (regions may be empty)."""
    seed = draw(st.integers(0, 2**32 - 1))
    classes = draw(st.lists(st.integers(1, 3), max_size=3, unique=True))
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, *classes], size=SHAPE, p=None).astype(np.uint8)
    if draw(st.booleans()):  # a compact tumour: background outside a box
        box = draw(masks())
        labels[~box] = 0
    return labels


# ------------------------------------------------------------------ references


def ref_dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = a.sum() + b.sum()
    return 1.0 if n == 0 else 2.0 * np.count_nonzero(a & b) / n


def ref_surface(mask):
    """Voxels of `mask` with one of their 6 face neighbours outside it (or the volume)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for ax in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(p, step, axis=ax)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def ref_hd(a, b, spacing, mode="max", q=95.0):
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return M.HD95_EMPTY
    pa = np.argwhere(ref_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(ref_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    d_ab, d_ba = d.min(1), d.min(0)
    if mode == "max":
        return max(np.percentile(d_ab, q), np.percentile(d_ba, q))
    return np.percentile(np.concatenate([d_ab, d_ba]), q)


def _confusion(pred, target):
    return np.asarray(M.confusion_matrix(jnp.asarray(pred), jnp.asarray(target)))


# ------------------------------------------------------------------ Dice


@SETTINGS
@given(class_maps(), class_maps())
def test_class_dice_from_confusion_is_symmetric_bounded_and_the_set_formula(pred, target):
    cm, cm_swapped = _confusion(pred, target), _confusion(target, pred)
    np.testing.assert_array_equal(cm, np.asarray(cm_swapped).T)
    want = np.array([ref_dice(pred == c, target == c) for c in range(4)])
    for matrix in (cm, cm_swapped):
        got = M.dice_from_confusion(matrix)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        got_jax = np.asarray(M.dice_from_confusion(jnp.asarray(matrix)))
        np.testing.assert_allclose(got_jax, want, rtol=1e-6)
        assert np.all((0 <= got) & (got <= 1))
        excluded = M.dice_from_confusion(matrix, "exclude")
        absent = [not (pred == c).any() and not (target == c).any() for c in range(4)]
        np.testing.assert_array_equal(np.isnan(excluded), absent)
        np.testing.assert_allclose(excluded[~np.isnan(excluded)], want[~np.array(absent)])


@SETTINGS
@given(class_maps(), class_maps(), spacings)
def test_evaluate_volume_dice_and_hd95_symmetric_and_equal_references(pred, target, spacing):
    got = M.evaluate_volume(pred, target, spacing)
    swapped = M.evaluate_volume(target, pred, spacing)
    for region, classes in REGIONS.items():
        a, b = np.isin(pred, classes), np.isin(target, classes)
        dice, hd = got[f"dice_{region}"], got[f"hd95_{region}"]
        assert dice == swapped[f"dice_{region}"] and 0.0 <= dice <= 1.0
        assert np.isclose(hd, swapped[f"hd95_{region}"]) and 0.0 <= hd <= M.HD95_EMPTY
        assert np.isclose(dice, ref_dice(a, b))
        assert np.isclose(hd, ref_hd(a, b, spacing))
        # prediction a, target b: FP = predicted outside the target
        tp, fp, fn = (a & b).sum(), (a & ~b).sum(), (~a & b).sum()
        tn = a.size - tp - fp - fn
        sens = tp / (tp + fn) if tp + fn else float(fp == 0)
        spec = tn / (tn + fp) if tn + fp else 1.0
        assert np.isclose(got[f"sensitivity_{region}"], sens), region
        assert np.isclose(got[f"specificity_{region}"], spec), region
        if not a.any() and not b.any():
            assert (dice, hd) == (1.0, 0.0)
        elif not a.any() or not b.any():
            assert (dice, hd) == (0.0, M.HD95_EMPTY)
    class_dice = [ref_dice(pred == c, target == c) for c in range(4)]
    for c in range(4):
        assert np.isclose(got[f"class_dice_{c}"], class_dice[c])
        assert got[f"class_dice_{c}"] == swapped[f"class_dice_{c}"]
    assert np.isclose(got["volume_dice_4class"], np.mean(class_dice))


# ------------------------------------------------------------------ HD95


@settings(SETTINGS, max_examples=60)
@given(masks(), masks(), spacings, st.sampled_from(["max", "pooled"]))
def test_hd95_equals_brute_force_cdist_over_surfaces(a, b, spacing, mode):
    got = M.hd95(a, b, spacing, mode=mode)
    assert np.isclose(got, ref_hd(a, b, spacing, mode), rtol=1e-9, atol=1e-9)
    assert np.isclose(got, M.hd95(b, a, spacing, mode=mode), rtol=1e-12)
    assert 0.0 <= got <= M.HD95_EMPTY
    if a.any() and b.any():  # never beyond the volume's diagonal in mm
        assert got <= np.linalg.norm((np.asarray(SHAPE) - 1) * spacing) + 1e-9
    elif a.any() or b.any():
        assert got == M.HD95_EMPTY
    else:
        assert got == 0.0


@SETTINGS
@given(masks(), masks(), spacings, st.sampled_from([50.0, 100.0]))
def test_hd_at_other_percentiles_equals_brute_force(a, b, spacing, q):
    got = M.hd95(a, b, spacing, percentile=q)
    assert np.isclose(got, ref_hd(a, b, spacing, "max", q), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(masks(), spacings)
def test_hd95_of_a_mask_with_itself_is_zero_and_dice_one(a, spacing):
    assert M.hd95(a, a, spacing) == 0.0
    labels = a.astype(np.uint8) * 3
    r = M.evaluate_volume(labels, labels, spacing)
    for region in REGIONS:
        assert r[f"dice_{region}"] == 1.0 and r[f"hd95_{region}"] == 0.0


def test_reference_surface_is_the_documented_one():
    """The reference's surface: a 3x3x3 cube inside a larger volume keeps its centre out;
    touching the volume border makes border voxels surface voxels."""
    m = np.zeros((5, 5, 5), bool)
    m[1:4, 1:4, 1:4] = True
    s = ref_surface(m)
    assert s.sum() == 26 and not s[2, 2, 2]
    full = np.ones((3, 3, 3), bool)
    assert ref_surface(full).sum() == 26
