"""The Kaggle sliced BraTS2020 release: `volume_<v>_slice_<s>.h5` files + `meta_data.csv`.

Each file holds `image` float64 (240,240,4) (FLAIR, T1, T1ce, T2; z-scored per slice over all
pixels) and `mask` uint8 (240,240,3) one-hot (NCR/NET, ED, ET; background implicit). The class
map is `0 if mask.sum(-1) == 0 else 1 + argmax(mask)`.

Index and table:
- With `meta_data.csv`: the index comes from the csv (its `/content/data/...` paths are re-rooted
  to the folder given; rows whose file is absent are dropped with a warning, found with one
  directory listing). `class_counts` come from the csv's `label{0,1,2}_pxl_cnt` columns
  (classes 1, 2, 3; class 0 = H*W minus their sum). The csv has no brain area (its
  `background_ratio` is the fraction of label-background pixels, not of non-brain pixels), so
  `brain_fraction` starts as NaN and is filled by reading only the slices that need it
  (`fill_brain_fraction`, called by pruning for label-empty slices).
- Without the csv: the index comes from listing file names (no file is opened); the first
  access to `table` reads every file once (tqdm progress) to count classes and brain area.
Opening the source checks every indexed file's structure (datasets `image` and `mask`, their
shapes and dtypes; no arrays read), so a bad file is reported before training starts; files
already checked with the same size and modification time are skipped (`checked.json` in
`stats_dir`). Reading a slice checks its values: a finite image, a one-hot mask (0/1 values,
at most one channel per pixel). Measured statistics are cached on disk (`stats_dir`, default
~/.cache/brats_jax/kaggle-<hash>: `fileio.user_cache_dir`) so they are read once per machine
(again for a file whose size or modification time has changed); a long first pass saves them
as it goes, so an interrupted one is not read again.

Brain area of a z-scored slice: a pixel is brain if any channel exceeds that channel's minimum
over the slice (raw BraTS intensities are >= 0 with background 0, and the per-slice z-score is
monotone, so the background is exactly the channel minimum). All-constant slices -> 0.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
import re

import numpy as np
from absl import logging

from brats_jax import fileio
from brats_jax.data.common import DataError, SliceTable

_NAME = re.compile(r"^volume_(\d+)_slice_(\d+)\.h5$")
_SAVE_EVERY = 2000  # slices measured between saves of the statistics


def mask_to_label(mask: np.ndarray) -> np.ndarray:
    """One-hot (..., 3) {NCR, ED, ET} -> int32 (...) classes {0 bg, 1 NCR, 2 ED, 3 ET}."""
    mask = np.asarray(mask)
    return np.where(mask.sum(-1) == 0, 0, 1 + np.argmax(mask, axis=-1)).astype(np.int32)


def kaggle_brain_mask(image: np.ndarray) -> np.ndarray:
    """Brain pixels of a per-slice z-scored Kaggle image (H, W, 4) -> bool (H, W)."""
    image = np.asarray(image)
    return np.any(image > image.min(axis=(0, 1), keepdims=True), axis=-1)


def _default_stats_dir(root: str) -> pathlib.Path:
    h = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:12]
    return fileio.user_cache_dir() / f"kaggle-{h}"


def _check_datasets(path: str, image, mask) -> None:
    """Shapes and dtypes of a slice's `image` and `mask` (h5py datasets or arrays)."""
    if len(image.shape) != 3 or image.shape[-1] != 4:
        raise DataError(f"{path}: 'image' has shape {image.shape}, expected (H, W, 4)")
    if tuple(mask.shape) != tuple(image.shape[:2]) + (3,):
        raise DataError(
            f"{path}: 'mask' has shape {mask.shape}, expected {tuple(image.shape[:2]) + (3,)}"
        )
    if image.dtype.kind != "f":
        raise DataError(f"{path}: 'image' has dtype {image.dtype}, expected floating point")
    if mask.dtype.kind not in "biuf":
        raise DataError(f"{path}: 'mask' has dtype {mask.dtype}, expected 0/1 numbers")


def _open_datasets(f, path: str):
    if not all(isinstance(f.get(k), _h5py().Dataset) for k in ("image", "mask")):
        raise DataError(
            f"{path}: expected datasets 'image' (H,W,4) and 'mask' (H,W,3), "
            f"found {sorted(f.keys())}"
        )
    return f["image"], f["mask"]


def _h5py():
    import h5py

    return h5py


def check_slice_file(path: str | os.PathLike) -> tuple[int, ...]:
    """Structure of one Kaggle .h5 without reading its arrays: dataset names, shapes and
    dtypes. Returns the image shape (H, W, 4); DataError naming the file if it is bad."""
    path = str(path)
    try:
        with _h5py().File(path, "r") as f:
            image, mask = _open_datasets(f, path)
            _check_datasets(path, image, mask)
            return tuple(image.shape)
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/RuntimeError on corrupt files
        raise DataError(
            f"cannot read Kaggle slice file {path} (not HDF5, truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from e


def _check_one_hot(path: str, mask: np.ndarray) -> None:
    """Every pixel has at most one of the three channels set, each 0 or 1."""
    if not mask.size:
        return
    mask = np.asarray(mask, np.float64)
    if mask.min() < 0 or mask.max() > 1 or np.any(mask != np.round(mask)):
        bad = np.argwhere((mask != 0) & (mask != 1))[0]
        raise DataError(
            f"{path}: 'mask' value {mask[tuple(bad)]} at {tuple(int(i) for i in bad)}; "
            "expected one-hot 0/1 values"
        )
    overlap = mask.sum(-1) > 1
    if np.any(overlap):
        y, x = (int(i) for i in np.argwhere(overlap)[0])
        raise DataError(
            f"{path}: 'mask' has {int(overlap.sum())} pixel(s) with more than one class set "
            f"(first at ({y}, {x}): {mask[y, x].astype(int).tolist()}); expected one-hot"
        )


def read_slice_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One Kaggle .h5 -> (image float32 (H,W,4), label int32 (H,W) {0..3}); DataError if bad
    (missing or misshapen datasets, non-finite image, a mask that is not one-hot)."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"Kaggle slice file {path} does not exist")
    try:
        with _h5py().File(path, "r") as f:
            image, mask = _open_datasets(f, path)
            _check_datasets(path, image, mask)
            image = image[()]
            mask = mask[()]
    except DataError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/RuntimeError on corrupt files
        raise DataError(
            f"cannot read Kaggle slice file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    if not np.all(np.isfinite(image)):
        raise DataError(f"{path}: 'image' has non-finite values; expected finite intensities")
    _check_one_hot(path, mask)
    return image.astype(np.float32), mask_to_label(mask)


class KaggleH5Source:
    """Grain random-access source over the Kaggle sliced-HDF5 release.

    root: folder holding `volume_<v>_slice_<s>.h5` (or the release's top folder with
    `BraTS2020_training_data/content/data` / `content/data` inside). Records are sorted by
    (volume, slice); case_id is `volume_<v>`. `__getitem__` opens the file per read (no h5py
    handle is kept, so the source pickles for spawned workers).
    """

    def __init__(self, root: str | os.PathLike, *, stats_dir: str | os.PathLike | None = None):
        root_p = pathlib.Path(root)
        if not root_p.exists():
            raise DataError(f"Kaggle root {root_p} does not exist; expected a folder of .h5 slices")
        data_dir = self._locate(root_p)
        self.root = str(data_dir)
        self.stats_dir = str(stats_dir) if stats_dir else str(_default_stats_dir(self.root))
        names = [n for n in os.listdir(data_dir) if _NAME.match(n)]
        if not names:
            raise DataError(f"no volume_<v>_slice_<s>.h5 files in {data_dir}")
        present = set(names)
        csv_path = data_dir / "meta_data.csv"
        counts = None
        if csv_path.is_file():
            rows = self._read_csv(csv_path)
            missing = [r for r in rows if r[0] not in present]
            if missing:
                logging.warning(
                    "%s lists %d file(s) absent from %s (e.g. %s); they are skipped",
                    csv_path,
                    len(missing),
                    data_dir,
                    missing[0][0],
                )
            rows = [r for r in rows if r[0] in present]
            if not rows:
                raise DataError(f"{csv_path}: none of the listed slices exist in {data_dir}")
            rows.sort(key=lambda r: (r[1], r[2]))
            self._files = [r[0] for r in rows]
            vol = np.array([r[1] for r in rows])
            sl = np.array([r[2] for r in rows], np.int32)
            lab = np.array([r[3] for r in rows], np.int64).reshape(-1, 3)
            self.has_csv = True
        else:
            parsed = sorted((int(m[1]), int(m[2]), n) for n in names for m in [_NAME.match(n)])
            self._files = [p[2] for p in parsed]
            vol = np.array([p[0] for p in parsed])
            sl = np.array([p[1] for p in parsed], np.int32)
            self.has_csv = False
        self.image_shape = self._check_files(data_dir)
        n = len(self._files)
        hw = self.image_shape[0] * self.image_shape[1]
        if self.has_csv:
            counts = np.concatenate([hw - lab.sum(1, keepdims=True), lab], axis=1)
        else:
            counts = np.full((n, 4), -1, np.int64)  # unknown until measured
        self._table = SliceTable(
            case_id=np.array([f"volume_{v}" for v in vol]),
            slice_index=sl,
            class_counts=counts,
            brain_fraction=np.full(n, np.nan, np.float32),
        )
        self._load_stats()

    @staticmethod
    def _locate(root: pathlib.Path) -> pathlib.Path:
        for cand in (
            root,
            root / "content" / "data",
            root / "BraTS2020_training_data" / "content" / "data",
        ):
            if cand.is_dir() and any(_NAME.match(n) for n in os.listdir(cand)):
                return cand
        return root

    @staticmethod
    def _read_csv(path: pathlib.Path) -> list:
        need = [
            "slice_path",
            "volume",
            "slice",
            "label0_pxl_cnt",
            "label1_pxl_cnt",
            "label2_pxl_cnt",
        ]
        rows = []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in need if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; expected {need}")
            for lineno, r in enumerate(reader, start=2):
                try:
                    name = os.path.basename(r["slice_path"].replace("\\", "/"))
                    rows.append(
                        (
                            name,
                            int(r["volume"]),
                            int(r["slice"]),
                            [int(float(r[f"label{k}_pxl_cnt"])) for k in range(3)],
                        )
                    )
                except (TypeError, ValueError) as e:
                    raise DataError(f"{path}:{lineno}: malformed row {r}: {e}") from e
        return rows

    def _check_files(self, data_dir: pathlib.Path) -> tuple[int, ...]:
        """Checks every indexed file's structure (`check_slice_file`, no arrays read) so a
        bad file fails here, not steps into training; returns the common image shape.

        Files already checked with the same size and modification time are skipped (the
        list is kept in `stats_dir`).
        """
        from tqdm.auto import tqdm

        record = pathlib.Path(self.stats_dir) / "checked.json"
        try:
            checked = json.loads(record.read_text())
        except (OSError, ValueError):
            checked = {}
        now, bad, shapes = {}, [], {}
        for name in tqdm(
            self._files,
            desc=f"checking Kaggle slice files in {data_dir}",
            unit="file",
            disable=len(self._files) < 2000,
        ):
            st = os.stat(data_dir / name)
            key = [st.st_size, st.st_mtime_ns]
            entry = checked.get(name)
            if entry is None or entry[:2] != key:
                try:
                    entry = key + list(check_slice_file(data_dir / name))
                except DataError as e:
                    bad.append(str(e))
                    continue
            now[name] = entry
            shapes.setdefault(tuple(entry[2:]), name)
        if bad:
            raise DataError(
                f"{len(bad)} of {len(self._files)} Kaggle slice files in {data_dir} are not "
                f"valid slices; the first: {bad[0]}"
            )
        if len(shapes) > 1:
            (a, fa), (b, fb) = list(shapes.items())[:2]
            raise DataError(f"Kaggle slices differ in shape: {fa} is {a}, {fb} is {b}")
        if now != checked:
            self._save_checked(record, now)
        self._stamps = np.array([now[n][:2] for n in self._files], np.int64)  # (n, 2)
        return next(iter(shapes))

    @staticmethod
    def _save_checked(record: pathlib.Path, checked: dict) -> None:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_text(record, json.dumps(checked))
        except OSError as e:  # only a lost speed-up
            logging.warning("could not write the Kaggle check list %s: %s", record, e)

    # -- grain source protocol ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"KaggleH5Source(root={self.root!r}, slices={len(self)}, csv={self.has_csv})"

    def path(self, i: int) -> str:
        """File path of record i."""
        return os.path.join(self.root, self._files[int(i)])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        image, label = read_slice_file(self.path(i))
        return dict(
            image=image,
            label=label,
            case_id=str(self._table.case_id[i]),
            slice_index=int(self._table.slice_index[i]),
        )

    # -- statistics -----------------------------------------------------------------------
    @property
    def table(self) -> SliceTable:
        """The SliceTable; without the csv the first access reads every file (cached on disk)."""
        if not self.has_csv:
            todo = np.nonzero(self._table.class_counts[:, 0] < 0)[0]
            if len(todo):
                self._measure(todo)
        return self._table

    def fill_brain_fraction(self, indices=None) -> None:
        """Measures brain_fraction of `indices` (default all) where still NaN (reads files)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64)
        todo = idx[np.isnan(self._table.brain_fraction[idx])]
        if len(todo):
            self._measure(todo)

    def _measure(self, indices: np.ndarray) -> None:
        """Reads the slices `indices` one at a time for their class counts and brain area;
        saved to `stats_dir` every `_SAVE_EVERY` slices (a release's first pass reads tens of
        thousands of files: an interrupted one keeps what it read) and at the end."""
        from tqdm.auto import tqdm

        t = self._table
        bar = tqdm(
            indices,
            desc=f"reading Kaggle slice stats in {self.root}",
            unit="slice",
            disable=len(indices) < 200,
        )
        for k, i in enumerate(bar, start=1):
            image, label = read_slice_file(self.path(i))
            t.brain_fraction[i] = kaggle_brain_mask(image).mean()
            t.class_counts[i] = np.bincount(label.ravel(), minlength=4)[:4]
            if k % _SAVE_EVERY == 0:
                self._save_stats()
        self._save_stats()

    def _stats_file(self) -> pathlib.Path:
        return pathlib.Path(self.stats_dir) / "stats.npz"

    def _load_stats(self) -> None:
        """Statistics measured before, for the files whose [size, mtime_ns] are unchanged
        (a file rewritten since, or a stats file without stamps, is measured again)."""
        p = self._stats_file()
        if not p.is_file():
            return
        try:
            z = np.load(p)
            pos = {n: k for k, n in enumerate(self._files)}
            if "stamps" not in z:
                return
            for name, stamp, bf, cc in zip(
                z["names"], z["stamps"], z["brain_fraction"], z["class_counts"], strict=True
            ):
                k = pos.get(str(name))
                if k is None or not np.array_equal(stamp, self._stamps[k]):
                    continue
                if np.isfinite(bf):
                    self._table.brain_fraction[k] = bf
                if not self.has_csv and cc[0] >= 0:
                    self._table.class_counts[k] = cc
        except Exception as e:  # a broken cache is only a lost speed-up
            logging.warning("ignoring unreadable Kaggle stats cache %s: %s", p, e)

    def _save_stats(self) -> None:
        p = self._stats_file()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".stats.{os.getpid()}.tmp.npz")
            np.savez(
                tmp,
                names=np.array(self._files),
                stamps=self._stamps,
                brain_fraction=self._table.brain_fraction,
                class_counts=self._table.class_counts,
            )
            os.replace(tmp, p)
        except OSError as e:
            logging.warning("could not write Kaggle stats cache %s: %s", p, e)
