"""Slice metrics in JAX (jit-safe, used in training and validation): the confusion matrix,
the study's Dice readings, region Dice, and the clu metric classes of the eval step.

Conventions: see :mod:`brats_jax.metrics`."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from brats_jax import NUM_CLASSES
from brats_jax.labels import REGIONS

ABSENT_RULES = ("one", "exclude")


def confusion_matrix(
    pred: jax.Array, target: jax.Array, num_classes: int = NUM_CLASSES, mask=None
) -> jax.Array:
    """Confusion matrix of integer class maps; jit-safe. Rows = target, columns = prediction.

    Args:
      pred, target: integer arrays of the same shape (any rank, e.g. (B, H, W) or (H, W, D)),
        values in {0..num_classes-1}; pixels with a value outside that range are ignored
        (values cannot be checked inside ``jit``).
      num_classes: C.
      mask: optional array broadcastable to ``pred.shape`` (e.g. (B, 1, 1) for the
        ``valid`` flags of a padded eval batch), cast to bool: zero pixels are ignored, any
        nonzero value (a label map used as the mask) counts.

    Returns:
      (C, C) int32 counts ``cm[t, p]`` = number of pixels with target t predicted as p. Sum over
      batches to accumulate (use int64 numpy, or :class:`ConfusionMatrix`, beyond 2**31 pixels).
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    c = int(num_classes)
    ok = (pred >= 0) & (pred < c) & (target >= 0) & (target < c)
    if mask is not None:
        ok = ok & jnp.broadcast_to(jnp.asarray(mask, bool), pred.shape)
    idx = jnp.where(ok, target.astype(jnp.int32) * c + pred.astype(jnp.int32), c * c)
    counts = jnp.bincount(idx.ravel(), length=c * c + 1)[: c * c]
    return counts.reshape(c, c).astype(jnp.int32)


def _check_absent(absent: str) -> None:
    if absent not in ABSENT_RULES:
        raise ValueError(f"absent must be one of {ABSENT_RULES}; got {absent!r}")


def dice_from_confusion(cm, absent: str = "one"):
    """Per-class Dice ``2 cm[c,c] / (row_c + col_c)`` from a (C, C) (or (..., C, C)) matrix.

    Works on numpy (float64 result) and JAX arrays (float32). A class absent from both target
    and prediction gets 1.0 (``absent="one"``) or NaN (``absent="exclude"``; use
    ``nanmean``). Returns (..., C).
    """
    _check_absent(absent)
    xp = jnp if isinstance(cm, jax.Array) else np
    cm = xp.asarray(cm)
    cm = cm.astype(xp.float32 if xp is jnp else np.float64)
    tp = xp.diagonal(cm, axis1=-2, axis2=-1)
    den = cm.sum(-1) + cm.sum(-2)
    empty = den == 0
    fill = 1.0 if absent == "one" else xp.nan
    return xp.where(empty, fill, 2.0 * tp / xp.where(empty, 1.0, den))


def paper_dice_pooled(cm, absent: str = "one"):
    """The study's Dice pooled over a dataset: mean over all C classes (background included)
    of the per-class Dice of the accumulated confusion matrix (C, C). Scalar.

    With ``absent="exclude"`` classes absent everywhere are left out of the mean.
    """
    d = dice_from_confusion(cm, absent)
    xp = jnp if isinstance(d, jax.Array) else np
    return xp.nanmean(d, axis=-1) if absent == "exclude" else xp.mean(d, axis=-1)


def paper_dice(
    pred: jax.Array,
    target: jax.Array,
    num_classes: int = NUM_CLASSES,
    absent: str = "one",
    mask=None,
) -> jax.Array:
    """The study's Dice ``D = 1/C sum_c 2|A_c n B_c| / (|A_c| + |B_c|)`` for each image.

    Args:
      pred, target: integer class maps (B, H, W) (a batch of slices; any number of trailing
        spatial axes works, e.g. (1, H, W, D) for one volume as a single image).
      num_classes: C (all classes, background included, enter the mean).
      absent: rule for a class absent from both an image's target and prediction:
        ``"one"`` (default, counts as Dice 1) or ``"exclude"`` (left out of that image's mean).
      mask: optional array broadcastable to ``pred.shape``, cast to bool; zero pixels are
        ignored.

    Returns:
      (B,) float32 per-image Dice. The study's per-slice-averaged number is the mean over all
      slices of the dataset (see :class:`MeanPaperDice`); the pooled one is
      :func:`paper_dice_pooled` of the summed :func:`confusion_matrix`.
    """
    _check_absent(absent)
    pred = jnp.asarray(pred)
    if pred.ndim < 2:
        raise ValueError(f"pred must be (B, H, W, ...); got shape {pred.shape}")
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), pred.shape)
    # mask None is an empty pytree: vmap passes None through to each image's matrix
    cms = jax.vmap(lambda p, t, m: confusion_matrix(p, t, num_classes, m))(
        pred, jnp.asarray(target), mask
    )
    return paper_dice_pooled(cms, absent)


def region_dice_from_confusion(cm) -> dict[str, float | jax.Array]:
    """BraTS region Dice pooled from an accumulated (C, C) confusion matrix of classes {0..3}.

    Rows = target, columns = prediction (as :func:`confusion_matrix`). For region R:
    TP = sum of cm[t, p] with t, p in R; Dice = 2 TP / (sum of rows in R + sum of columns in R),
    1.0 when R is empty in both. numpy input -> Python floats; JAX input -> float32 scalars.
    """
    is_jax = isinstance(cm, jax.Array)
    xp = jnp if is_jax else np
    cm = xp.asarray(cm)
    if cm.shape != (NUM_CLASSES, NUM_CLASSES):
        raise ValueError(f"cm must be ({NUM_CLASSES}, {NUM_CLASSES}); got {cm.shape}")
    cm = cm.astype(xp.float32 if is_jax else np.float64)
    out = {}
    for name, classes in REGIONS.items():
        sel = np.zeros(NUM_CLASSES, bool)
        sel[list(classes)] = True
        tp = cm[sel][:, sel].sum()
        den = cm[sel].sum() + cm[:, sel].sum()
        d = xp.where(den > 0, 2.0 * tp / xp.where(den > 0, den, 1.0), 1.0)
        out[name] = d if is_jax else float(d)
    return out


def region_dice(pred: jax.Array, target: jax.Array, mask=None) -> dict[str, jax.Array]:
    """BraTS region Dice of class maps {0..3} pooled over all given pixels/voxels.

    Args:
      pred, target: integer arrays of the same shape (one volume (H, W, D), or a batch of
        slices pooled together). WT = {1,2,3}, TC = {1,3}, ET = {3}.
      mask: optional array broadcastable to the shape (cast to bool: nonzero counts); False
        voxels are ignored.

    Returns:
      {"WT", "TC", "ET"} -> float32 scalar; 1.0 when the region is empty in both.
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    m = (
        jnp.ones(pred.shape, bool)
        if mask is None
        else jnp.broadcast_to(jnp.asarray(mask, bool), pred.shape)
    )
    out = {}
    for name, classes in REGIONS.items():
        a = jnp.isin(pred, jnp.asarray(classes)) & m
        b = jnp.isin(target, jnp.asarray(classes)) & m
        inter = jnp.sum(a & b, dtype=jnp.float32)
        den = jnp.sum(a, dtype=jnp.float32) + jnp.sum(b, dtype=jnp.float32)
        out[name] = jnp.where(den > 0, 2.0 * inter / jnp.maximum(den, 1.0), 1.0)
    return out


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


def _add_counts(a, b):
    """a + b; exact int64 numpy addition outside jit (no int32 overflow past 2**31 pixels)."""
    if _is_traced(a, b):
        return a + b
    return np.asarray(a, np.int64) + np.asarray(b, np.int64)


def _model_output(labels, logits, predictions):
    """`(labels, predicted classes, number of classes)` of a clu metric's model output: give
    exactly one of logits (B,H,W,C) or predictions (B,H,W)."""
    if (logits is None) == (predictions is None):
        raise ValueError("give exactly one of logits (B,H,W,C) or predictions (B,H,W)")
    pred = jnp.argmax(logits, axis=-1) if predictions is None else jnp.asarray(predictions)
    c = logits.shape[-1] if logits is not None else NUM_CLASSES
    return jnp.asarray(labels), pred, c


def _valid_mask(labels, mask, valid):
    m = None
    if mask is not None:
        m = jnp.broadcast_to(jnp.asarray(mask, bool), labels.shape)
    if valid is not None:
        v = jnp.asarray(valid, bool).reshape((-1,) + (1,) * (labels.ndim - 1))
        v = jnp.broadcast_to(v, labels.shape)
        m = v if m is None else m & v
    return m


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """``clu.metrics.Metric`` accumulating a (C, C) confusion matrix (rows target, cols pred).

    ``from_model_output(labels, logits=None, predictions=None, mask=None, valid=None)``:
    labels (B, H, W) int; logits (B, H, W, C) (argmax taken) or predictions (B, H, W) int;
    mask (B, H, W) bool of pixels to count; valid (B,) bool (padded eval samples are False).
    ``merge`` adds matrices (int64 numpy outside jit, so dataset-size counts do not overflow);
    ``compute()`` returns the matrix; :meth:`dice` / :meth:`paper_dice` give the pooled
    per-class Dice (C,) and the study's pooled Dice. ``empty()`` has C = ``NUM_CLASSES``.
    """

    matrix: jax.Array

    @classmethod
    def empty(cls) -> ConfusionMatrix:
        return cls(matrix=jnp.zeros((NUM_CLASSES, NUM_CLASSES), jnp.int32))

    @classmethod
    def from_model_output(
        cls, labels, logits=None, predictions=None, mask=None, valid=None, **_
    ) -> ConfusionMatrix:
        labels, pred, c = _model_output(labels, logits, predictions)
        return cls(matrix=confusion_matrix(pred, labels, c, _valid_mask(labels, mask, valid)))

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return type(self)(matrix=_add_counts(self.matrix, other.matrix))

    def reduce(self) -> ConfusionMatrix:
        return type(self)(matrix=self.matrix.sum(0))

    def compute(self):
        return self.matrix

    def dice(self, absent: str = "one"):
        """(C,) pooled per-class Dice (see :func:`dice_from_confusion`)."""
        return dice_from_confusion(self.matrix, absent)

    def paper_dice(self, absent: str = "one"):
        """The study's Dice pooled over everything accumulated (scalar)."""
        return paper_dice_pooled(self.matrix, absent)


@flax.struct.dataclass
class MeanPaperDice(clu_metrics.Metric):
    """``clu.metrics.Metric``: the study's Dice averaged over slices (``absent="one"``).

    ``from_model_output(labels, logits=None, predictions=None, mask=None, valid=None)`` as in
    :class:`ConfusionMatrix`; samples with ``valid=False`` are not counted. ``compute()`` =
    mean over all counted slices of :func:`paper_dice`, NaN when no slice was counted (a mean
    of nothing is undefined; 0.0 would read as a real, worst score, while NaN is written as
    null to metrics.jsonl and skipped by ``np.isfinite`` filters). ``merge`` outside ``jit``
    sums in float64 and counts in int64 (numpy), so a dataset's worth of slices loses no
    precision; inside ``jit`` it adds the float32/int32 arrays.
    """

    total: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls) -> MeanPaperDice:
        return cls(total=jnp.array(0.0, jnp.float32), count=jnp.array(0, jnp.int32))

    @classmethod
    def from_model_output(
        cls, labels, logits=None, predictions=None, mask=None, valid=None, **_
    ) -> MeanPaperDice:
        labels, pred, c = _model_output(labels, logits, predictions)
        m = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), labels.shape)
        d = paper_dice(pred, labels, c, "one", m)
        v = jnp.ones(d.shape, bool) if valid is None else jnp.asarray(valid, bool).reshape(-1)
        return cls(total=jnp.sum(jnp.where(v, d, 0.0)), count=jnp.sum(v, dtype=jnp.int32))

    def merge(self, other: MeanPaperDice) -> MeanPaperDice:
        if _is_traced(self.total, self.count, other.total, other.count):
            return type(self)(total=self.total + other.total, count=self.count + other.count)
        total = np.asarray(self.total, np.float64) + np.asarray(other.total, np.float64)
        return type(self)(total=total, count=_add_counts(self.count, other.count))

    def compute(self):
        if _is_traced(self.total, self.count):
            mean = self.total / jnp.maximum(self.count, 1)
            return jnp.where(self.count > 0, mean, jnp.nan)
        count = np.asarray(self.count, np.int64)
        total = np.asarray(self.total, np.float64)
        return np.float64(total / count) if count > 0 else np.float64(np.nan)
