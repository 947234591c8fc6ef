"""The slice cache's storage of one case: the brain's box, one compressed chunk per axial
slice, the files' intensities and the normalisation applied when a slice is read.

A case's (H, W, D) grid is cropped to the bounding box of its voxels where any modality is
non-zero or the label is not background (nnU-Net's crop to non-zero, widened by the label so
that no label voxel is lost; a case with no such voxel keeps one voxel). Inside the box the
case is stored as two blosc2 NDArrays, one chunk per axial slice, each compressed with
Zstandard level 1 after byte-shuffling: `image.b2nd` (d, h, w, 4), the modalities in
`brats_jax.MODALITIES` order (channel-last, as records are: a slice is normalised and
un-cropped with whole-row numpy operations, no transposition), and `label.b2nd` (d, h, w)
uint8, training classes 0..3.

What is stored (`encode`): the files' own intensities in int16 when they are integers that
fit (BraTS's are: int16/uint8/uint16 NIfTI data, values 0..32767), else in float32 when
float32 holds them exactly, else (and for the float16 cache) the z-scored values in that
dtype. Beside them the normalisation `offset`, `scale` (float64, per modality) and
`background` (float32 per modality) so that a read gives exactly what `load_case`
(`brats.zscore_brain`) gives, not only to rounding: inside the box
`float32((float64(stored) - offset) / scale)`, today's formula on the same numbers;
outside it `background`, the z-score of 0 (every voxel outside the box is 0 in all four
modalities: `float32(-mean / std)`).

Why blosc2 (nnU-Net v2's format) and Zstandard level 1: `benchmarks/cache_formats.py`
measured it against zarr v3 through tensorstore on 5 real cases cropped to int16
(BENCHMARKS.md, "Compact slice cache"). The same codec gives the same bytes in both (blosc
zstd + shuffle: 0.81x the cases' .nii.gz bytes), but random single-slice reads (slice +
label, one thread, arrays open) ran at ~5,400/s through blosc2 against ~1,500-1,800/s
through tensorstore, whose per-read future and chunk-cache machinery costs more than
decompressing a ~200 KB slice; and a blosc2 array is one file per case (zarr v3: one file
per chunk unless sharded). Zstandard level 3 saves 2 % of the bytes at 3x the write time,
level 8 6 % at 40x; LZ4 reads ~1.5x faster but stores 17 % more, and decompression is a
small part of a record's cost (normalising, un-cropping and batching 240 x 240 slices weigh
more).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading

import numpy as np

from brats_jax.data.brats import brain_mean_std
from brats_jax.data.common import DataError

FILES = ("image.b2nd", "label.b2nd")
NUM_MODALITIES = 4
_INT16 = np.iinfo(np.int16)


@dataclasses.dataclass(frozen=True)
class Norm:
    """How stored intensities become z-scored float32 (see the module docstring).

    box: (3, 2) int [start, stop) of the stored region along H, W, D; offset, scale:
    float64 (4,); background: float32 (4,), each modality's value outside the box.
    """

    box: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    background: np.ndarray

    @functools.cached_property
    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """offset and scale tiled over one stored row (w * 4 values, w the box's width)."""
        w = int(self.box[1, 1] - self.box[1, 0])
        return np.tile(self.offset, w), np.tile(self.scale, w)

    def to_json(self) -> dict:
        """JSON-serialisable dict (floats round-trip exactly through `repr`)."""
        return dict(
            box=np.asarray(self.box).tolist(),
            offset=[float(v) for v in self.offset],
            scale=[float(v) for v in self.scale],
            background=[float(v) for v in self.background],
        )

    @classmethod
    def from_json(cls, d: dict, where: str = "meta.json") -> Norm:
        """Inverse of `to_json`; DataError naming `where` for a missing or misshapen field."""
        try:
            norm = cls(
                np.asarray(d["box"], np.int64).reshape(3, 2),
                np.asarray(d["offset"], np.float64).reshape(NUM_MODALITIES),
                np.asarray(d["scale"], np.float64).reshape(NUM_MODALITIES),
                np.asarray(d["background"], np.float32).reshape(NUM_MODALITIES),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: bad or missing field norm ({e}); rerun prepare") from e
        return norm


def crop_box(brain: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(3, 2) int64 [start, stop) per axis of the voxels where `brain` (bool (H, W, D)) is
    True or `label` (H, W, D) is not 0; the first voxel alone when there is none."""
    keep = brain | (label != 0)
    box = np.zeros((3, 2), np.int64)
    box[:, 1] = 1
    if keep.any():
        for axis in range(3):
            hit = np.flatnonzero(keep.any(axis=tuple(a for a in range(3) if a != axis)))
            box[axis] = hit[0], hit[-1] + 1
    return box


def _storage_dtype(raw: np.ndarray) -> np.dtype | None:
    """int16 when the raw intensities are integers in int16's range, float32 when float32
    holds them exactly, else None (store the z-scored values)."""
    lo, hi = (raw.min(), raw.max()) if raw.size else (0, 0)
    if raw.dtype.kind in "iub" and _INT16.min <= lo and hi <= _INT16.max:
        return np.dtype(np.int16)
    if raw.dtype.kind == "f" and _INT16.min <= lo and hi <= _INT16.max:
        if np.array_equal(raw, np.round(raw)):
            return np.dtype(np.int16)
    if raw.dtype.kind == "f" and np.array_equal(raw.astype(np.float32), raw):
        return np.dtype(np.float32)
    return None


def encode(
    raw: np.ndarray, brain: np.ndarray, label: np.ndarray, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, Norm]:
    """A case's arrays -> (stored image (d, h, w, 4), stored label uint8 (d, h, w), `Norm`).

    raw: (H, W, D, 4) the files' intensities (`load_case(..., normalization=None)`); brain:
    bool (H, W, D); label: (H, W, D) classes 0..3. `dtype` "float32": exact storage (see
    the module docstring); "float16": the z-scored values rounded to float16 (reads give
    today's float16 cache's values).
    """
    box = crop_box(brain, label)
    region = tuple(slice(a, b) for a, b in box)
    stats = [brain_mean_std(raw[..., m], brain) for m in range(NUM_MODALITIES)]
    mean = np.array([s[0] for s in stats], np.float64)
    std = np.array([s[1] for s in stats], np.float64)
    crop = raw[region]
    store = None if dtype == "float16" else _storage_dtype(crop)
    if store is not None:
        values, offset, scale = crop.astype(store), mean, std
        background = ((0.0 - mean) / std).astype(np.float32)
    else:  # the z-scored values themselves, in `dtype`
        store = np.dtype(np.float16 if dtype == "float16" else np.float32)
        values = ((crop.astype(np.float64) - mean) / std).astype(np.float32).astype(store)
        offset, scale = np.zeros(NUM_MODALITIES), np.ones(NUM_MODALITIES)
        background = ((0.0 - mean) / std).astype(np.float32).astype(store).astype(np.float32)
    if not brain.any():  # zscore_brain: all zeros (an all-zero case), not -mean/std
        background = np.zeros(NUM_MODALITIES, np.float32)
    image = np.ascontiguousarray(np.moveaxis(values, 2, 0))  # (d, h, w, 4)
    stored_label = np.ascontiguousarray(np.moveaxis(label[region], 2, 0).astype(np.uint8))
    return image, stored_label, Norm(box, offset, scale, background)


def write(folder: str | os.PathLike, image: np.ndarray, label: np.ndarray) -> None:
    """Writes `image` (d, h, w, 4) and `label` (d, h, w) as `folder/image.b2nd` and
    `folder/label.b2nd`, one chunk per axial slice."""
    import blosc2

    cparams = dict(codec=blosc2.Codec.ZSTD, clevel=1, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    for name, arr in zip(FILES, (image, label), strict=True):
        chunks = (1, *arr.shape[1:])
        compressed = blosc2.asarray(
            np.ascontiguousarray(arr), chunks=chunks, blocks=chunks, cparams=cparams
        )
        # written by Python, not blosc2: a full disk is an OSError (ENOSPC), not blosc2's
        # bare RuntimeError, so `prepare` ends in its one-line error
        path = os.path.join(folder, name)
        try:
            with open(path, "wb") as f:
                f.write(compressed.to_cframe())
        except OSError as e:  # name the file: cli prints "error: <path>: <reason>"
            raise OSError(e.errno, e.strerror, path) from e


_OPEN: collections.OrderedDict = collections.OrderedDict()  # (path, inode, mtime) -> array
_OPEN_LOCK = threading.Lock()  # module state of this process, never pickled
_MAX_OPEN: list = []  # [open arrays kept], set on first use (`_max_open`)


def _max_open() -> int:
    """How many arrays this process keeps open (one file descriptor each; the least recently
    used is closed beyond): 4096, every file of a 1,251-case release plus room, when the
    limit on open files allows it; the soft limit is raised towards the hard one (to 8192)
    for that, else half the limit. Reopening costs ~0.5 ms, more than reading a slice."""
    if not _MAX_OPEN:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
        except (ImportError, ValueError, OSError):  # no resource module (Windows), or denied
            soft = 1024
        _MAX_OPEN.append(min(4096, soft // 2) if soft != -1 else 4096)
    return _MAX_OPEN[0]


def _array(folder: str, name: str):
    """The open `folder/<name>` (one of FILES), shared by this process's threads (reads of
    an mmap'd blosc2 array are thread-safe). The file is known by its inode and
    modification time too, so a case converted again (a new file renamed into place) is
    opened again, never read through the old file's handle."""
    import blosc2

    path = os.path.join(folder, name)
    try:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_mtime_ns)
        arr = _OPEN.get(key)
        if arr is None:
            arr = blosc2.open(path, mode="r", mmap_mode="r", dparams=dict(nthreads=1))
    except Exception as e:  # noqa: BLE001 - blosc2 raises assorted errors on bad files
        raise DataError(f"cannot read cache file {path} (corrupt? rerun prepare): {e}") from e
    with _OPEN_LOCK:
        _OPEN[key] = arr
        _OPEN.move_to_end(key)
        while len(_OPEN) > _max_open():
            _OPEN.popitem(last=False)
    return arr


def _normalise_into(out: np.ndarray, stored: np.ndarray, norm: Norm) -> None:
    """out[...] = float32((float64(stored) - offset) / scale), per modality (last axis of
    both, (..., w, 4)), computed on rows of w * 4 values (numpy's fast inner loops)."""
    offset, scale = norm.rows
    x = stored.reshape(-1, offset.size).astype(np.float64)
    x -= offset
    x /= scale
    out.reshape(x.shape)[...] = x  # the float64 -> float32 cast of `astype`


def read_window(
    folder: str, slices, shape, norm: Norm, label_of: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Axial slices `slices` (n of them) of the full grid as one image, and one label.

    -> (image float32 (H, W, 4 n): slice j's modalities in channels [4 j, 4 j + 4), the
    order of `context.merge_context`; label int32 (H, W) of slice `label_of`, or None).
    shape: the case's full (H, W, D); slices outside the box are background only. Each
    slice is normalised on its box and written into place as rows of 16-byte pixels (a
    pixel's 4 float32), so neither the un-crop nor the window costs a per-pixel copy.
    """
    h, w = int(shape[0]), int(shape[1])
    n = len(slices)
    image = np.empty((h, w, n * NUM_MODALITIES), np.float32)
    image.reshape(h, -1)[...] = np.tile(norm.background, w * n)
    pixels = image.view(np.complex128)  # (H, W, n): one item = one slice's 4 modalities
    (x0, x1), (y0, y1), (z0, z1) = norm.box
    crop = np.empty((x1 - x0, y1 - y0, NUM_MODALITIES), np.float32)
    for j, s in enumerate(slices):
        if z0 <= s < z1:
            _normalise_into(crop, _array(folder, FILES[0])[s - z0], norm)
            pixels[x0:x1, y0:y1, j] = crop.view(np.complex128)[..., 0]
    if label_of is None:
        return image, None
    label = np.zeros((h, w), np.int32)
    if z0 <= label_of < z1:
        label[x0:x1, y0:y1] = _array(folder, FILES[1])[label_of - z0]
    return image, label


def read_slice(folder: str, s: int, shape, norm: Norm) -> tuple[np.ndarray, np.ndarray]:
    """Axial slice `s` of the full grid -> (image float32 (H, W, 4), label int32 (H, W)).

    shape: the case's full (H, W, D); a slice outside the box is background only.
    """
    return read_window(folder, [s], shape, norm, label_of=s)


def read_volume(folder: str, shape, norm: Norm) -> tuple[np.ndarray, np.ndarray]:
    """The whole case on its full grid -> (image float32 (H, W, D, 4), label int32 (H, W, D))."""
    image = np.empty((*shape, NUM_MODALITIES), np.float32)
    image[...] = norm.background
    label = np.zeros(shape, np.int32)
    region = tuple(slice(a, b) for a, b in norm.box)
    stored = _array(folder, FILES[0])[:]  # (d, h, w, 4)
    crop = np.empty(stored.shape, np.float32)
    _normalise_into(crop, stored, norm)
    image[region] = np.moveaxis(crop, 0, 2)
    label[region] = np.moveaxis(_array(folder, FILES[1])[:], 0, 2)
    return image, label
