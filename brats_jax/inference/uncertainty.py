"""Predictive uncertainty of a segmentation: voxel-wise entropy and per-case summaries.

The entropy is that of the probabilities `predict` averages (over an ensemble's runs and
the test-time mirror views), in **nats** (natural log):

* ``model.output=classes``: ``H = -sum_c p_c log p_c`` over the 4 classes (0 .. log 4);
* ``model.output=regions``: the sum over WT, TC, ET of the binary entropies
  ``-p log p - (1 - p) log(1 - p)`` (0 .. 3 log 2), the regions treated as independent.

Per case (:func:`case_row`, one CSV row): the predicted tumour's volume in **ml**
(voxels times the header's voxel size in mm^3, / 1000), the mean entropy inside the predicted
tumour (labels > 0, after post-processing), the share of uncertain brain voxels (entropy
at least ``UNCERTAIN_NATS`` = log 2, a coin flip between two classes or on one region, the
same bar for both output kinds; among the voxels where any input modality is non-zero,
`CaseData.brain`), and for ensembles of >= 2 runs the mean pairwise
whole-tumour Dice between the runs' own labels (each run's probabilities decoded alone,
without post-processing; 1 when both are empty). Empty cells: no tumour, no brain, or one run.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from scipy import special

from brats_jax import fileio
from brats_jax.models import outputs

UNCERTAIN_NATS = math.log(2)
"""A voxel is uncertain when its entropy is at least this (nats): a 50/50 split between two
classes, or one region at p = 0.5 (a fraction of the maximum entropy would set a higher bar
for regions, 3 log 2, than for classes, log 4)."""
CSV_FILE = "uncertainty.csv"
COLUMNS = (
    "case_id",
    "tumour_volume_ml",
    "mean_entropy_tumour",
    "uncertain_share_brain",
    "members",
    "member_wt_dice",
)
DESCRIPTION = "brats_jax predictive entropy (nats)"  # the NIfTI header's descrip


def max_entropy(output: str) -> float:
    """Largest possible entropy in nats: log 4 for classes, 3 log 2 for regions."""
    if outputs.check_output(output) == "regions":
        return 3 * math.log(2)
    return math.log(outputs.num_channels(output))


def entropy(probs, output: str) -> np.ndarray:
    """float32 (...) entropy in nats of probabilities (..., C) of either output kind.

    Classes: ``-sum p log p`` over the last axis; regions (C = 3 sigmoids): the sum of the
    three binary entropies. ``0 log 0 = 0``; values are clipped to [0, 1] first.
    """
    p = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    if p.shape[-1] != outputs.num_channels(output):
        raise ValueError(
            f"probabilities {p.shape}: expected {outputs.num_channels(output)} channels "
            f"for model.output={output!r}"
        )
    h = special.entr(p)
    if output == "regions":
        h = h + special.entr(1.0 - p)
    return h.sum(-1).astype(np.float32)


def pairwise_wt_dice(member_labels: Sequence[np.ndarray]) -> float | None:
    """Mean whole-tumour Dice (labels > 0) over all pairs of the runs' label maps (H, W, D);
    a pair with no tumour in either scores 1; None with fewer than two runs."""
    masks = [np.asarray(m) > 0 for m in member_labels]
    if len(masks) < 2:
        return None
    scores = []
    for a, b in itertools.combinations(masks, 2):
        n = int(a.sum()) + int(b.sum())
        scores.append(2.0 * np.count_nonzero(a & b) / n if n else 1.0)
    return float(np.mean(scores))


def case_row(
    case_id: str,
    entropy_map: np.ndarray,
    labels: np.ndarray,
    brain: np.ndarray,
    spacing: Sequence[float],
    output: str,
    member_labels: Sequence[np.ndarray] = (),
) -> dict:
    """One :data:`COLUMNS` row (see the module docstring).

    Args:
      entropy_map: float (H, W, D) nats (:func:`entropy`); labels: (H, W, D) training labels
        (0 background) of the written segmentation; brain: bool (H, W, D);
      spacing: voxel size in mm; output: ``model.output``; member_labels: each run's labels.
    """
    tumour = np.asarray(labels) > 0
    brain = np.asarray(brain, bool)
    voxel_ml = float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
    uncertain = entropy_map >= UNCERTAIN_NATS * (1 - 1e-6)  # float32 log 2 counts too
    return {
        "case_id": case_id,
        "tumour_volume_ml": float(tumour.sum()) * voxel_ml,
        "mean_entropy_tumour": float(entropy_map[tumour].mean()) if tumour.any() else None,
        "uncertain_share_brain": float(uncertain[brain].mean()) if brain.any() else None,
        "members": len(member_labels),
        "member_wt_dice": pairwise_wt_dice(member_labels),
    }


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """`rows` as CSV with :data:`COLUMNS` (floats to 6 significant digits, None empty),
    written atomically."""
    with fileio.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                 for k, v in r.items()}
            )  # fmt: skip


def write_nifti(entropy_map: np.ndarray, data, path: str | os.PathLike) -> None:
    """The float32 entropy map (H, W, D) as NIfTI on the input's grid: `data` (a
    `brats.CaseData`)'s affine and header, data type float32, description :data:`DESCRIPTION`."""
    fileio.write_nifti_like(np.asarray(entropy_map, np.float32), data, path, descrip=DESCRIPTION)


def write_case(data, labels, probs, output: str, path, member_labels=()) -> dict:
    """Write a case's entropy NIfTI to `path` (:func:`write_nifti`) and return its
    :func:`case_row` (`data` a `brats.CaseData`; labels (H, W, D) training labels; probs
    (H, W, D, C) the averaged probabilities; spacing from the header's zooms)."""
    h = entropy(probs, output)
    write_nifti(h, data, path)
    spacing = tuple(float(z) for z in data.header.get_zooms()[:3])
    return case_row(data.case_id, h, labels, data.brain, spacing, output, member_labels)


def csv_path(nifti_path: str | os.PathLike) -> pathlib.Path:
    """The CSV beside a one-case entropy NIfTI: ``X.nii[.gz]`` -> ``X.csv``."""
    p = pathlib.Path(nifti_path)
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(f"{stem}.csv")


def by_case(rows: list[dict]) -> dict[str, dict]:
    """`case ID -> {column: value}` of summary rows without their `case_id` column (the
    `extra_columns` of `overlays` index pages, which list the case ID already)."""
    return {r["case_id"]: {k: v for k, v in r.items() if k != "case_id"} for r in rows}
