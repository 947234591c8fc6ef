"""The BraTS label vocabulary: training classes, evaluation regions, the releases' label
conventions and the conversions between them. Every module that names a class, a region
or a release's label values takes it from here.

* Training classes, the labels of every array inside the library: 0 background, 1 NCR/NET
  (necrotic and non-enhancing tumour core), 2 ED (peritumoral oedema), 3 ET (enhancing
  tumour).
* Regions, BraTS's evaluation: WT = {NCR, ED, ET}, TC = {NCR, ET}, ET = {ET}.
* Release conventions, the label values of the files users read and write: ``"2018"``
  (BraTS 2018-2021: 0, 1, 2, 4; ET = 4) and ``"2023"`` (BraTS 2023: 0, 1, 2, 3; ET = 3). The
  file naming of a release (``_t1ce`` / ``-t1c``) goes with its convention
  (``data.brats.Case.naming``); ``evaluate``'s flags spell them ``brats2018`` /
  ``brats2023`` (:data:`CONVENTION_FLAGS`).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 4
"""Training classes: 0 background, 1 NCR/NET, 2 ED, 3 ET."""

CLASS_NAMES = ("background", "NCR", "ED", "ET")
"""Names of the training classes, by class number (keys of `class_dice` in results)."""

CLASS_LEGEND = ("background", "NCR/NET", "ED", "ET")
"""The classes as figures' legends name them."""

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
"""BraTS evaluation regions as sets of training classes (nested: ET in TC in WT)."""

RELEASE_LABELS: dict[str, tuple[int, ...]] = {"2018": (0, 1, 2, 4), "2023": (0, 1, 2, 3)}
"""Label values of each release convention, in training-class order (index = class)."""

CONVENTIONS = tuple(RELEASE_LABELS)

CONVENTION_FLAGS = {"brats2018": "2018", "brats2023": "2023"}
"""`evaluate --labels/--pred_labels` spelling -> convention."""


class LabelError(ValueError):
    """Label values outside a convention, or an unknown convention (message names where)."""


def _check_convention(convention: str) -> tuple[int, ...]:
    if convention not in RELEASE_LABELS:
        raise LabelError(
            f"unknown label convention {convention!r}; expected one of {', '.join(CONVENTIONS)}"
        )
    return RELEASE_LABELS[convention]


def to_train_labels(label: np.ndarray, convention: str, *, where: str = "label") -> np.ndarray:
    """Release labels (any shape, integer or integral float values) -> training classes,
    int32 of the same shape: "2018" {0, 1, 2, 4} -> {0, 1, 2, 3}; "2023" unchanged.

    Raises LabelError naming `where` for non-finite, non-integer or unknown values.
    """
    allowed = _check_convention(convention)
    lab = np.asarray(label)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)):
            raise LabelError(f"{where}: non-finite label values; expected {allowed}")
        if np.any(lab != np.round(lab)):
            raise LabelError(f"{where}: non-integer label values (dtype {lab.dtype})")
    values = np.unique(lab)
    bad = [int(v) for v in values if int(v) not in allowed]
    if bad:
        raise LabelError(
            f"{where}: unknown label values {bad[:10]} for the BraTS {convention} convention "
            f"(expected a subset of {list(allowed)})"
        )
    lut = np.zeros(max(allowed) + 1, np.int32)
    lut[list(allowed)] = np.arange(NUM_CLASSES, dtype=np.int32)
    return lut[lab.astype(np.int64)]


def to_release_labels(label_0123: np.ndarray, convention: str = "2018") -> np.ndarray:
    """Training classes {0..3} (any shape) -> the convention's values, uint8 of the same
    shape (ET = 4 for "2018", 3 for "2023"). Raises LabelError outside 0..3."""
    allowed = _check_convention(convention)
    lab = np.asarray(label_0123)
    if lab.size and (lab.min() < 0 or lab.max() > NUM_CLASSES - 1):
        raise LabelError(f"training labels must be in 0..3, got range {lab.min()}..{lab.max()}")
    return np.asarray(allowed, np.uint8)[lab.astype(np.int64)]


def et_label(convention: str) -> int:
    """The enhancing tumour's value in files of this convention (4 or 3)."""
    return _check_convention(convention)[NUM_CLASSES - 1]
