"""Shared data types: DataError, SliceTable, and image/label resizing."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """Bad or missing input data; the message names the file or case and what was expected."""


@dataclasses.dataclass
class SliceTable:
    """Per-record metadata of a slice source (all arrays have length N = len(source)).

    case_id: (N,) str; slice_index: (N,) int32 (slice position along the volume's 3rd axis);
    class_counts: (N, 4) int64, pixels of each class 0..3 in the slice's label;
    brain_fraction: (N,) float32, fraction of the slice's pixels where any modality is non-zero
    (NaN where not yet known, only for the Kaggle source before it is filled in).
    """

    case_id: np.ndarray
    slice_index: np.ndarray
    class_counts: np.ndarray
    brain_fraction: np.ndarray

    def __post_init__(self):
        self.case_id = np.asarray(self.case_id, dtype=str)
        self.slice_index = np.asarray(self.slice_index, dtype=np.int32)
        self.class_counts = np.asarray(self.class_counts, dtype=np.int64).reshape(-1, 4)
        self.brain_fraction = np.asarray(self.brain_fraction, dtype=np.float32)
        n = len(self.case_id)
        for f in ("slice_index", "class_counts", "brain_fraction"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"SliceTable.{f} has length {len(getattr(self, f))}, expected {n}")

    def __len__(self) -> int:
        return len(self.case_id)


def _bilinear_axis(n_in: int, n_out: int):
    """Half-pixel-centre source coordinates -> (i0, i1, w1) for linear interpolation."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (x - i0).astype(np.float32)


def resize_image(x: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, like jax.image.resize 'linear' without antialias).

    x: float (..., H, W, C); size: int S or (S_h, S_w) -> float32 (..., S_h, S_w, C).
    Same size -> returned unchanged (as float32).
    """
    x = np.asarray(x, np.float32)
    sh, sw = (size, size) if np.isscalar(size) else tuple(size)
    h, w = x.shape[-3], x.shape[-2]
    if (sh, sw) == (h, w):
        return x
    i0, i1, wy = _bilinear_axis(h, sh)
    x = x[..., i0, :, :] * (1 - wy)[:, None, None] + x[..., i1, :, :] * wy[:, None, None]
    j0, j1, wx = _bilinear_axis(w, sw)
    x = x[..., :, j0, :] * (1 - wx)[:, None] + x[..., :, j1, :] * wx[:, None]
    return x.astype(np.float32)


def resize_label(y: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (half-pixel centres): int labels (..., H, W) -> (..., S_h, S_w)."""
    y = np.asarray(y)
    sh, sw = (size, size) if np.isscalar(size) else tuple(size)
    h, w = y.shape[-2], y.shape[-1]
    if (sh, sw) == (h, w):
        return y
    rows = np.minimum(np.floor((np.arange(sh) + 0.5) * h / sh).astype(np.int64), h - 1)
    cols = np.minimum(np.floor((np.arange(sw) + 0.5) * w / sw).astype(np.int64), w - 1)
    return y[..., rows, :][..., cols]
