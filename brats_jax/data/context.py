"""Context across slices (2.5D input, `data.context_slices` = k).

With k > 0 the model sees, for axial slice z, the slices z-k..z+k of the four modalities as
4 (2k+1) input channels, **slice-major**: channels [4j, 4j+4) are slice z-k+j's modalities
in `brats_jax.MODALITIES` order, so the centre slice z holds channels [4k, 4k+4).
Neighbours beyond the case's first / last slice repeat that slice (index clamped). k = 0
is the study's 2D input (4 channels). Every reader (training records, `eval_batches`,
whole-volume inference) takes its neighbours from `context_positions` / `neighbour_records`
and merges them into channels with `merge_context`, so the order is defined here only.
"""

from __future__ import annotations

import numpy as np

from brats_jax import MODALITIES

NUM_MODALITIES = len(MODALITIES)


def check_context_slices(k) -> int:
    """`k` as an int >= 0; ValueError naming data.context_slices otherwise."""
    if isinstance(k, bool) or int(k) != k or int(k) < 0:
        raise ValueError(f"data.context_slices={k!r}; expected an integer >= 0 (0 = 2D input)")
    return int(k)


def context_slices(config) -> int:
    """The validated `data.context_slices` of a run config (0 for runs made before it)."""
    return check_context_slices(config.data.get("context_slices", 0))


def input_channels(config) -> int:
    """Model input channels of a run config: 4 (2k+1), k = `data.context_slices`."""
    return NUM_MODALITIES * (2 * context_slices(config) + 1)


def context_positions(depth: int, k: int) -> np.ndarray:
    """(depth, 2k+1) int64: row z holds z-k..z+k clamped to [0, depth-1]."""
    k = check_context_slices(k)
    if depth < 1:
        raise ValueError(f"context_positions: depth {depth}; expected at least 1 slice")
    return np.clip(np.arange(depth)[:, None] + np.arange(-k, k + 1)[None], 0, depth - 1)


def neighbour_records(table, k: int) -> np.ndarray:
    """(N, 2k+1) int64 record indices: row i = the records of record i's case at positions
    p-k..p+k (clamped) of that case's records sorted by slice index, p = record i's position.

    `table`: a `SliceTable` (case_id, slice_index); neighbours are records, so for a source
    with gaps (the Kaggle sample) they are the adjacent *present* slices.
    """
    k = check_context_slices(k)
    order = np.lexsort((table.slice_index, table.case_id))  # by case, then slice index
    _, start, count = np.unique(table.case_id[order], return_index=True, return_counts=True)
    first = np.repeat(start, count)  # sorted position of each sorted record's case start
    last = first + np.repeat(count, count) - 1
    sorted_pos = np.arange(len(order))[:, None] + np.arange(-k, k + 1)[None]
    out = np.empty((len(order), 2 * k + 1), np.int64)
    out[order] = order[np.clip(sorted_pos, first[:, None], last[:, None])]
    return out


def merge_context(x: np.ndarray) -> np.ndarray:
    """(..., 2k+1, 4) slices-by-modalities -> (..., 4 (2k+1)) channels, slice-major."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def stack_context(slices: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Input slices of a volume: its axial slices first, (D, H, W, 4) (`np.moveaxis(volume,
    2, 0)`, made contiguous once: each slice is then one block of memory), and rows of
    `context_positions` (n, 2k+1) -> float32 (n, H, W, 4 (2k+1)) (only these n slices are
    materialised)."""
    positions = np.asarray(positions, np.int64)
    x = np.moveaxis(slices[positions], 1, -2)  # (n, H, W, 2k+1, 4)
    return merge_context(np.ascontiguousarray(x, np.float32))  # a view: contiguous already


def stack_records(records: list[dict]) -> dict:
    """One record from the 2k+1 records of a context window (slice order): the centre
    record with its image replaced by the windows' images merged (H, W, 4 (2k+1))."""
    centre = records[len(records) // 2]
    images = [np.ascontiguousarray(r["image"], np.float32) for r in records]
    if images[0].shape[-1] == NUM_MODALITIES:  # a pixel's 4 float32 as one 16-byte item:
        wide = [x.view(np.complex128)[..., 0] for x in images]  # whole-row copies, ~7x faster
        return {**centre, "image": np.stack(wide, axis=-1).view(np.float32)}
    return {**centre, "image": merge_context(np.stack(images, axis=-2))}
