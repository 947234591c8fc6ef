"""BraTS 2023 lesion-wise Dice and HD95 (numpy / scipy.ndimage, host).

The procedure and its constants follow the challenge's own evaluation code,
github.com/rachitsaluja/BraTS-2023-Metrics, ``metrics.py`` (``get_LesionWiseScores``,
``get_LesionWiseResults``) and its README:

* Regions WT, TC, ET as :data:`brats_jax.labels.REGIONS` (training classes {0..3}).
* Components: ``cc3d.connected_components(..., connectivity=26)`` for both the ground truth
  (GT) and the prediction -> ``component_neighbours=26`` here.
* GT lesions: the GT is dilated with ``scipy.ndimage.generate_binary_structure(3, 2)``
  (18-neighbourhood) for ``dilation_factor`` iterations (3 for BraTS-GLI, SSA and PED; 1 for
  MEN and MET) -> ``dilation_iterations=3``, ``dilation_neighbours=18``; GT components that
  fall into one component of the dilated GT are one lesion (``get_GTseg_combinedByDilation``).
  The GT voxels themselves are not changed.
* Matching: a lesion's predicted part is the union of the predicted components that overlap
  the lesion dilated again in the same way; per-lesion Dice and HD95 are computed between
  that union and the lesion. A lesion with no overlapping component is a false negative:
  Dice 0, HD95 374 mm (the code replaces infinite HD95 by 374).
* False positives: predicted components overlapping no (dilated) GT lesion, each scored
  Dice 0 and HD95 374. Components that touch only an ignored small lesion are neither.
* Lesions with volume ``<= lesion_volume_thresh`` (50 mm^3 for GLI, SSA, MEN and PED; 2 for
  MET) are left out of the score -> ``min_volume=50.0`` (mm^3: voxels times the spacing).
* Case score per region: ``sum(Dice of kept lesions) / (kept lesions + FP)`` and
  ``(sum(HD95 of kept lesions) + 374 * FP) / (kept lesions + FP)``.
* Empty denominator (no kept lesion and no FP; e.g. GT and prediction both empty): the
  code's NaN becomes Dice 1 and HD95 0, as here. An empty GT with k >= 1 predicted
  components scores Dice 0 and HD95 374 (k FPs; this follows from the formula).

One difference on purpose: the per-lesion HD95 is :func:`brats_jax.metrics.hd95` (voxel
surfaces, ``mode`` max or pooled), not the DeepMind ``surface_distance`` package the
challenge uses (surfel-area weighted); the two agree on exact matches (0) and differ
slightly elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from brats_jax import NUM_CLASSES, metrics
from brats_jax.labels import REGIONS
from brats_jax.metrics import volumes

__all__ = [
    "COLUMNS",
    "HD95_WORST",
    "NEIGHBOURS",
    "evaluate_volume",
    "region_scores",
    "summarise",
    "summary_table",
]

HD95_WORST = 374.0
"""HD95 (mm) of a missed lesion or a false-positive component (the challenge code's 374)."""
DILATION_ITERATIONS = 3  # BraTS-GLI dilation_factor
DILATION_NEIGHBOURS = 18  # generate_binary_structure(3, 2)
COMPONENT_NEIGHBOURS = 26  # cc3d connectivity=26
MIN_VOLUME = 50.0  # mm^3; lesions of this volume or less are ignored (BraTS-GLI)
NEIGHBOURS = {6: 1, 18: 2, 26: 3}
"""Neighbourhood size -> `scipy.ndimage.generate_binary_structure(3, c)` connectivity c."""

_KEYS = ("dice", "hd95", "tp", "fn", "fp")
COLUMNS = [f"lesionwise_{k}_{r}" for k in _KEYS for r in REGIONS]
"""Per-case columns of :func:`evaluate_volume`: Dice, HD95 (mm), and the counts of detected
(TP) and missed (FN) kept lesions and of false-positive components (FP), per region."""


def _structure(neighbours: int, what: str) -> np.ndarray:
    if neighbours not in NEIGHBOURS:
        raise ValueError(f"{what} {neighbours!r}: expected one of {sorted(NEIGHBOURS)}")
    return ndimage.generate_binary_structure(3, NEIGHBOURS[neighbours])


def _dilate_one(labels: np.ndarray, index: int, box, structure, iterations: int) -> tuple:
    """(slices, dilated mask) of component `index` of `labels` inside `box` grown by
    `iterations` voxels (clipped to the volume): the same result a whole-volume dilation gives."""
    grown = tuple(
        slice(max(s.start - iterations, 0), min(s.stop + iterations, n))
        for s, n in zip(box, labels.shape, strict=True)
    )
    mask = labels[grown] == index
    if iterations > 0:
        mask = ndimage.binary_dilation(mask, structure=structure, iterations=iterations)
    return grown, mask


def _crop(pred: np.ndarray, gt: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their union's bounding box grown by `margin` voxels (clipped to the
    volume). The scores do not change: every voxel of either mask is inside, a dilated voxel
    outside the box touches no predicted voxel and links no lesions that its projection onto
    the box does not (the 18-neighbourhood's dilation is monotone per axis), and HD95 is
    computed on its own crop (`metrics.hd95`). Saves most of the work on 240x240x155."""
    union = pred | gt
    if not union.any():  # one background voxel
        return pred[:1, :1, :1], gt[:1, :1, :1]
    (box,) = ndimage.find_objects(union.astype(np.uint8))
    box = tuple(
        slice(max(b.start - margin, 0), min(b.stop + margin, n))
        for b, n in zip(box, union.shape, strict=True)
    )
    return pred[box], gt[box]


def _gt_lesions(gt: np.ndarray, dil_structure, cc_structure, iterations: int):
    """(lesion map int, number of lesions): GT voxels labelled by the component of the
    dilated GT they fall into (components closer than the dilation are one lesion)."""
    dilated = gt
    if iterations > 0:
        dilated = ndimage.binary_dilation(gt, structure=dil_structure, iterations=iterations)
    dilated_cc, n = ndimage.label(dilated, structure=cc_structure)
    return np.where(gt, dilated_cc, 0), n


def region_scores(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    dilation_iterations: int = DILATION_ITERATIONS,
    dilation_neighbours: int = DILATION_NEIGHBOURS,
    component_neighbours: int = COMPONENT_NEIGHBOURS,
    min_volume: float = MIN_VOLUME,
    hd95_mode: str = "max",
) -> dict[str, float | int]:
    """Lesion-wise scores of one region's binary masks (see the module docstring).

    Args:
      pred_mask, gt_mask: boolean (H, W, D) masks of the same shape.
      spacing: voxel size in mm per axis (volumes in mm^3, HD95 in mm).
      dilation_iterations, dilation_neighbours: the GT dilation (iterations of the 6-, 18- or
        26-neighbourhood); component_neighbours: connectivity of the components (6/18/26).
      min_volume: GT lesions of at most this volume (mm^3) are ignored.
      hd95_mode: :func:`brats_jax.metrics.hd95`'s mode.

    Returns:
      ``dice``, ``hd95`` (mm) and the counts ``tp`` (kept lesions with a matched prediction),
      ``fn`` (kept lesions without), ``fp`` (unmatched predicted components), ``ignored``
      (small GT lesions left out).
    """
    pred = np.asarray(pred_mask, bool)
    gt = np.asarray(gt_mask, bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt masks must be equal (H, W, D); got {pred.shape}, {gt.shape}")
    if int(dilation_iterations) != dilation_iterations or dilation_iterations < 0:
        raise ValueError(f"dilation_iterations {dilation_iterations!r}: expected an integer >= 0")
    spacing = volumes._check_spacing(spacing, 3)
    pred, gt = _crop(pred, gt)
    dil_s = _structure(dilation_neighbours, "dilation_neighbours")
    cc_s = _structure(component_neighbours, "component_neighbours")
    voxel_mm3 = float(np.prod(spacing))
    lesions, n = _gt_lesions(gt, dil_s, cc_s, int(dilation_iterations))
    pred_cc, n_pred = ndimage.label(pred, structure=cc_s)
    matched_any = np.zeros(n_pred + 1, bool)
    dices, hds, tp, fn, ignored = [], [], 0, 0, 0
    for j, box in enumerate(ndimage.find_objects(lesions), start=1):
        grown, dil = _dilate_one(lesions, j, box, dil_s, int(dilation_iterations))
        hits = np.unique(pred_cc[grown][dil])
        hits = hits[hits > 0]
        matched_any[hits] = True
        lesion = lesions == j
        if lesion.sum() * voxel_mm3 <= min_volume:
            ignored += 1
            continue
        if not len(hits):
            fn += 1
            dices.append(0.0)
            hds.append(HD95_WORST)
            continue
        tp += 1
        lut = np.zeros(n_pred + 1, bool)
        lut[hits] = True
        part = lut[pred_cc]
        dices.append(2.0 * np.count_nonzero(part & lesion) / (part.sum() + lesion.sum()))
        hds.append(metrics.hd95(part, lesion, spacing, mode=hd95_mode))
    fp = int(n_pred - matched_any[1:].sum())
    total = len(dices) + fp
    if total == 0:  # nothing to score (both empty, or only ignored lesions): the challenge's 1 / 0
        dice, hd = 1.0, 0.0
    else:
        dice = float(np.sum(dices)) / total
        hd = (float(np.sum(hds)) + HD95_WORST * fp) / total
    return {"dice": dice, "hd95": hd, "tp": tp, "fn": fn, "fp": fp, "ignored": ignored}


def evaluate_volume(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), **options
) -> dict[str, float | int]:
    """Lesion-wise scores of class maps {0..3} (H, W, D) for WT, TC and ET.

    ``options`` go to :func:`region_scores`. Returns the flat :data:`COLUMNS` dict:
    ``lesionwise_{dice,hd95,tp,fn,fp}_{WT,TC,ET}`` (Dice and HD95 float, counts int).
    """
    pred = volumes._class_map("pred", pred)
    target = volumes._class_map("target", target)
    out: dict[str, float | int] = {}
    for name, classes in REGIONS.items():
        lut = np.zeros(NUM_CLASSES, bool)
        lut[list(classes)] = True
        scores = region_scores(lut[pred], lut[target], spacing, **options)
        for k in _KEYS:
            out[f"lesionwise_{k}_{name}"] = scores[k]
    return {k: out[k] for k in COLUMNS}


def summarise(rows: Sequence[dict]) -> dict:
    """The ``lesionwise`` results block of per-case rows holding :data:`COLUMNS`: case means
    of Dice and HD95 (mm) and the summed TP/FN/FP counts, per region (None without rows)."""
    out: dict[str, dict] = {}
    for k in _KEYS:
        block = {}
        for r in REGIONS:
            v = [row.get(f"lesionwise_{k}_{r}") for row in rows]
            v = [x for x in v if isinstance(x, int | float) and np.isfinite(x)]
            if not v:
                block[r] = None
            elif k in ("dice", "hd95"):
                block[r] = float(np.mean(v))
            else:
                block[r] = int(np.sum(v))
        out[k] = block
    return out


def summary_table(rows: Sequence[dict]) -> str:
    """Text table: lesion-wise Dice and HD95 mean / std / median per region, and the summed
    TP / FN / FP lesion counts (cases whose counts are unknown, e.g. missing, are skipped)."""
    lines = [
        "lesion-wise (BraTS 2023)",
        f"{'metric':<20}{'mean':>10}{'std':>10}{'median':>10}",
    ]
    for k in ("dice", "hd95"):
        for r in REGIONS:
            v = np.array([row[f"lesionwise_{k}_{r}"] for row in rows], np.float64)
            key = f"lesionwise_{k}_{r}"
            lines.append(f"{key:<20}{v.mean():>10.4f}{v.std():>10.4f}{np.median(v):>10.4f}")
    counts = summarise(rows)
    lines.append(
        "lesions "
        + "  ".join(
            f"{r}: TP {counts['tp'][r]} FN {counts['fn'][r]} FP {counts['fp'][r]}" for r in REGIONS
        )
    )
    return "\n".join(lines)
