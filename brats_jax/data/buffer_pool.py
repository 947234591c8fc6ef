"""Recycled host buffers for the training pipeline's batches.

A batch of 16 whole-slice 2.5D records is 44 MB of float32. glibc serves a block that size
with fresh pages (it is above its largest mmap threshold, 32 MiB), and touching fresh memory
costs a page fault per 4 KiB page, so every batch paid ~11,000 faults. `batch_records`
stacks a batch into memory that an earlier batch used: `empty` hands out arrays whose memory
goes back to a pool, not to the system, once nothing refers to it any more (the array and
every view of it gone, a JAX array that uses it in place included). Measured on the
41 real cases (BENCHMARKS.md, "Recycled batch buffers"): whole 240 px slices 1.17-1.24x the
slices per second, patches unchanged. Records themselves are left to glibc: pooling them too was
slower for patches (a record freed and reused at once by the thread that read it is cheaper
than one handed between threads).

Only the memory is reused, never an array still referred to: a pooled array owns its memory
through a private `memoryview`, every view of it keeps the array itself alive (numpy sets a
view's `base` to the array when the array does not own its data), and the array returns its
buffer only when it is garbage (`weakref.finalize`).
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref

import numpy as np

# Free buffers kept at most, in bytes over all sizes (beyond it a freed buffer is dropped,
# i.e. returned to the system): a few batches of each shape in use.
MAX_FREE_BYTES = 512 * 2**20
# Start address multiple (bytes): XLA's CPU client uses a numpy buffer in place, without a
# copy, when it is aligned to 64 bytes (jax.device_put on the CPU); numpy only promises 16.
ALIGN = 64
_FREE: dict[int, collections.deque] = collections.defaultdict(collections.deque)
_FREE_BYTES = [0]
_LOCK = threading.Lock()


@functools.cache
def _raise_glibc_thresholds() -> None:
    """Once, in a process that pools buffers: glibc raises its mmap threshold (and its trim
    threshold, to twice that) to the size of a freed block served by mmap (mallopt(3),
    "dynamic mmap threshold"). Batches kept here are never freed, so glibc no longer sees
    them go; one freed 8 MiB block sets the thresholds so that the records (2.8 MB) and
    their temporaries are reused from the heap instead of fresh pages: measured ~1.07x the
    whole-slice rate over the pool alone (BENCHMARKS.md)."""
    np.empty(8 * 2**20, np.uint8)


def _release(raw: np.ndarray) -> None:
    """Keeps `raw` for reuse unless the pool is full (called when its array is garbage)."""
    with _LOCK:
        if _FREE_BYTES[0] + raw.nbytes <= MAX_FREE_BYTES:
            _FREE[raw.nbytes].append(raw)
            _FREE_BYTES[0] += raw.nbytes


def _take(nbytes: int) -> np.ndarray:
    """A free buffer of `nbytes`, else a new one aligned to ALIGN."""
    with _LOCK:
        free = _FREE.get(nbytes)
        if free:
            _FREE_BYTES[0] -= nbytes
            return free.pop()
    _raise_glibc_thresholds()
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.__array_interface__["data"][0] % ALIGN
    return raw[start : start + nbytes]


def empty(shape, dtype) -> np.ndarray:
    """np.empty(shape, dtype) (C order, contents undefined, 64-byte aligned) on recycled
    memory: the buffer of an earlier array of the same byte size that nothing refers to any
    more, if the pool has one."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = _take(nbytes)
    out = np.frombuffer(memoryview(raw), dtype, count=nbytes // dtype.itemsize)
    weakref.finalize(out, _release, raw).atexit = False  # `out` owns the memory view
    return out.reshape(shape)  # a view of `out`: keeps it alive, as any view of it does


def free_bytes() -> int:
    """Bytes held for reuse now."""
    return _FREE_BYTES[0]


def stack(values) -> np.ndarray:
    """np.stack(values) (a new leading axis) into a pooled buffer; string and object
    values as np.stack gives them."""
    first = np.asarray(values[0])
    if first.dtype.kind not in "biuf":
        return np.stack(values)
    return np.stack(values, out=empty((len(values), *first.shape), first.dtype))


def batch_records(records) -> dict:
    """grain batch function for flat dict records: each field stacked with `stack`."""
    return {k: stack([r[k] for r in records]) for k in records[0]}
