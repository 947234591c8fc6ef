"""Segmentation metrics: confusion matrix, the study's Dice, BraTS region Dice, HD95, sens/spec.

Two families:

* Slice metrics in JAX (jit-safe, used during training/validation): :func:`confusion_matrix`,
  :class:`ConfusionMatrix` / :class:`MeanPaperDice` (``clu.metrics.Metric``),
  :func:`dice_from_confusion`, :func:`paper_dice`, :func:`paper_dice_pooled`, :func:`region_dice`.
* Volume metrics on the host (numpy/scipy, float64): :func:`hd95`, :func:`region_confusion`,
  :func:`evaluate_volume`.

The BraTS 2023 lesion-wise scores are in :mod:`brats_jax.metrics.lesionwise`; the scores of a
folder of saved predictions against a ground-truth folder (``python -m brats_jax.evaluate``)
in :mod:`brats_jax.metrics.folder` (neither is imported here).

Class maps use the training classes {0 background, 1 NCR/NET, 2 ED, 3 ET}. BraTS regions:
WT = {1,2,3}, TC = {1,3}, ET = {3}.

Conventions (the issue left them open; chosen here):

* Dice of a class/region absent from both target and prediction: **1** by default (BraTS's
  convention "both empty -> Dice 1"; a correct "nothing here" is perfect agreement, keeps the
  per-slice mean defined for every slice, and is what a smoothed Dice like the study's
  ``(2I + eps) / (|A| + |B| + eps)`` evaluates to). ``absent="exclude"`` leaves such classes out
  of the mean instead (a slice where all classes are excluded - impossible for a non-empty
  slice, since its pixels belong to some class - would give NaN).
* Present in exactly one of target/prediction: Dice 0 (follows from the formula).
* HD95: both empty -> 0, exactly one empty -> 373.13 mm (BraTS). Default definition
  ``"max"``: the larger of the two directed 95th percentiles (MONAI ``compute_hausdorff_distance``
  with ``percentile=95``); ``"pooled"``: the 95th percentile of both directions' distances
  pooled (medpy ``hd95``). Percentiles use linear interpolation (``np.percentile`` default).
  Surface = mask voxels with at least one 6-neighbour (face neighbour) outside the mask;
  voxels outside the volume count as outside the mask, so mask voxels on the volume border
  are surface voxels. Distances are from surface voxels of one mask to the nearest surface
  voxel of the other, in mm (``spacing``).
* Sensitivity = TP / (TP + FN); when the target region is empty, 1.0 if the prediction is
  empty too, else 0.0 (the BraTS 2023 challenge's `get_sensitivity_and_specificity`);
  specificity = TN / (TN + FP) over the whole volume (1.0 when there are no negatives).
"""

from __future__ import annotations

from brats_jax.labels import CLASS_NAMES, REGIONS  # noqa: F401
from brats_jax.metrics.slices import (  # noqa: F401
    ABSENT_RULES,
    ConfusionMatrix,
    MeanPaperDice,
    confusion_matrix,
    dice_from_confusion,
    paper_dice,
    paper_dice_pooled,
    region_dice,
    region_dice_from_confusion,
)
from brats_jax.metrics.volumes import (  # noqa: F401
    HD95_EMPTY,
    HD95_MODES,
    evaluate_volume,
    hd95,
    region_confusion,
    sensitivity_specificity,
    slice_dice_readings,
)

__all__ = [
    "ABSENT_RULES",
    "CLASS_NAMES",
    "ConfusionMatrix",
    "HD95_EMPTY",
    "HD95_MODES",
    "MeanPaperDice",
    "REGIONS",
    "confusion_matrix",
    "dice_from_confusion",
    "evaluate_volume",
    "hd95",
    "paper_dice",
    "paper_dice_pooled",
    "region_confusion",
    "region_dice",
    "region_dice_from_confusion",
    "sensitivity_specificity",
    "slice_dice_readings",
]
