"""NIfTI release -> slice-addressable cache, and the source that reads it.

Decoding four gzip'd volumes per slice read is far too slow for training, so a release is
converted once (`python -m brats_jax.prepare --src=DIR --out=CACHE`). Layout (format
version 2, the compact cache):

    CACHE/cache.json                     {"format", "version", "src", "dtype", "cases": [...]}
    CACHE/cases/<ID>/image.b2nd          the brain's box, one compressed chunk per axial
    CACHE/cases/<ID>/label.b2nd          slice: the files' intensities (d, h, w, 4) and the
                                         label (d, h, w) (`data.slice_store`)
    CACHE/cases/<ID>/stats.npz           class_counts (D, 4) int64 pixels, brain_fraction (D,) f32
                                         (of the full grid)
    CACHE/cases/<ID>/meta.json           case id, naming, shape (H, W, D), affine, source files
                                         and their [size, mtime_ns] stamps (nnU-Net cases:
                                         and dataset.json's channels and label map), version,
                                         norm: the box and the normalisation (`slice_store.Norm`)
    CACHE/cases/<ID>/COMPLETE            written last

A read un-crops: every slice comes back on the case's full (H, W) grid, every volume on
(H, W, D), with the values `load_case` gives (z-scored float32, exactly; `slice_store`).
Version 1 caches (whole float32 volumes as .npy, ~150 MB a case against ~7 MB now) are not
read: `NiftiCacheSource` says in one line which `prepare` command converts them again, in
place (a case of an older version counts as outdated).

An nnU-Net raw dataset (`data.nnunet`; `prepare(..., layout="nnunet")`) enters the same
cache: its cases are read through its dataset.json (channels, label values) and stored in
training classes like any other.

A slice read decompresses only that slice's chunk. Each case is written into
`cases/.<ID>.tmp-<host>-<pid>/`, the COMPLETE marker written last, then the folder is
renamed into place: a half-written case is never taken as valid, and a rerun skips cases
whose folder has the marker (resumable) and whose source files still have the size and
modification time recorded (a changed file, or a case cached before stamps were recorded, is
converted again). Several processes may prepare the same cache at once (two trainings on one
release, or every host of a multi-host run): a process removes only the temporary folders of
dead processes of its own host, and a case another process completed first is kept.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
from absl import logging

from brats_jax.data import nnunet, slice_store
from brats_jax.data.brats import Case, find_cases, load_case
from brats_jax.data.common import DataError, SliceTable
from brats_jax.fileio import process_alive, user_cache_dir

FORMAT = "brats_jax.slice_cache"
VERSION = 2  # 1: whole z-scored float32 volumes (.npy); 2: the compact cache (slice_store)
_MARKER = "COMPLETE"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAYOUTS = ("brats", "nnunet")  # what `prepare` reads: case folders, or an nnU-Net dataset


def _case_dir(out: pathlib.Path, case_id: str) -> pathlib.Path:
    return out / "cases" / case_id


def is_case_complete(out: str | os.PathLike, case_id: str) -> bool:
    """True when the cache holds a finished entry for `case_id`."""
    return (_case_dir(pathlib.Path(out), case_id) / _MARKER).is_file()


def _source_stamps(case: Case) -> dict:
    """{path: [size in bytes, modification time in ns]} of the case's modality and seg files;
    for a case with its own label map (an nnU-Net dataset's), also {"dataset.json":
    {"channels": file name by modality, "labels": [[file value, class], ...]}}, so that an
    edited dataset.json converts the case again."""
    stats = {str(p): os.stat(p) for p in [*case.paths.values(), case.seg]}
    stamps: dict = {p: [st.st_size, st.st_mtime_ns] for p, st in stats.items()}
    if case.label_map is not None:
        channels = {m: pathlib.Path(p).name for m, p in case.paths.items()}
        stamps["dataset.json"] = {"channels": channels, "labels": case.label_map.pairs()}
    return stamps


def is_case_current(out: str | os.PathLike, case: Case) -> bool:
    """True when the cache holds a finished entry for `case` made from its files as they are
    now (same sizes and modification times)."""
    folder = _case_dir(pathlib.Path(out), case.case_id)
    if not is_case_complete(out, case.case_id):
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == VERSION and meta.get("stamps") == _source_stamps(case)


def _host() -> str:
    """This machine's name without '-' (the separator of temporary folder names)."""
    return socket.gethostname().replace("-", "_")


def _temp_suffix(pid: int | None = None) -> str:
    """`-<host>-<pid>` naming this process's temporary folders."""
    return f"-{_host()}-{os.getpid() if pid is None else pid}"


def _remove_dead_temporaries(cases_dir: pathlib.Path) -> None:
    """Removes `.<ID>.tmp-<host>-<pid>` folders left by dead processes of this host."""
    for tmp in cases_dir.glob(".*.tmp-*"):
        owner_host, _, pid = tmp.name.rsplit(".tmp-", 1)[1].rpartition("-")
        # "" is the host-less `.tmp-<pid>` naming of earlier versions
        if owner_host in (_host(), "") and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """Worker initializer: the worker ends when `parent_pid` (the process running `prepare`)
    dies, SIGKILL included, instead of running on as an orphan.

    On Linux, when the worker's own parent is `parent_pid` (fork), the kernel sends it SIGKILL
    (prctl PR_SET_PDEATHSIG); everywhere, a daemon thread polls every `poll_s` seconds and
    ends the worker once it is re-parented or `parent_pid` is gone. A killed worker's
    temporary case folder is removed by the next `prepare` (a dead process's temporaries).
    """
    ppid = os.getppid()
    if sys.platform.startswith("linux") and ppid == parent_pid:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the thread below suffices
            pass
    if os.getppid() != ppid or not process_alive(parent_pid):  # died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == ppid and process_alive(parent_pid):
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _write_case(case: Case, out: pathlib.Path, dtype: str) -> str:
    """Converts one case into its cache folder atomically. Returns the case id.

    When another process completes the same case first, its folder is kept and this
    process's copy discarded.
    """
    final = _case_dir(out, case.case_id)
    tmp = final.parent / f".{case.case_id}.tmp{_temp_suffix()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        stamps = _source_stamps(case)  # before reading: a file changed meanwhile is redone
        data = load_case(case, require_label=True, normalization=None)  # the files' values
        image, label, norm = slice_store.encode(data.image, data.brain, data.label, dtype)
        d = data.label.shape[2]
        slice_of = np.broadcast_to(np.arange(d), data.label.shape)  # pixel counts per slice
        counts = np.bincount((slice_of * 4 + data.label).ravel(), minlength=4 * d).reshape(d, 4)
        brain_fraction = np.moveaxis(data.brain, 2, 0).reshape(d, -1).mean(1).astype(np.float32)
        slice_store.write(tmp, image, label)
        np.savez(
            tmp / "stats.npz", class_counts=counts.astype(np.int64), brain_fraction=brain_fraction
        )
        meta = dict(
            case_id=case.case_id,
            naming=data.naming,
            shape=list(data.label.shape),
            affine=np.asarray(data.affine).tolist(),
            files={m: str(p) for m, p in case.paths.items()} | {"seg": str(case.seg)},
            stamps=stamps,
            version=VERSION,
            dtype=dtype,
            stored_dtype=str(image.dtype),
            norm=norm.to_json(),
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / _MARKER).write_text("ok\n")
        _install(tmp, final, out, case)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return case.case_id


def _install(tmp: pathlib.Path, final: pathlib.Path, out: pathlib.Path, case: Case) -> None:
    """Renames the finished folder `tmp` to `final`. A current entry already there (another
    process's, finished first) is kept, never removed: hosts that share the cache may be
    reading it. An invalid or outdated entry is moved aside in one rename, then removed."""
    try:
        os.rename(tmp, final)  # fails while `final` holds an entry
        return
    except OSError:
        if is_case_current(out, case):
            return
    old = final.parent / f".{case.case_id}.old.tmp{_temp_suffix()}"
    try:
        os.rename(final, old)
    except FileNotFoundError:  # another process moved it aside first
        pass
    try:
        os.rename(tmp, final)
    except OSError:  # another process put its finished copy in place meanwhile
        if not is_case_current(out, case):
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _convert(todo: list, out: pathlib.Path, dtype: str, workers: int, bar) -> None:
    """Converts the cases `todo` (`_write_case`), in `workers` processes when > 1 (they exit
    when this process dies), updating the progress `bar` after each."""
    if workers > 1 and len(todo) > 1:
        with concurrent.futures.ProcessPoolExecutor(
            workers, initializer=_exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futs = [pool.submit(_write_case, c, out, dtype) for c in todo]
            for f in concurrent.futures.as_completed(futs):
                f.result()
                bar.update(1)
    else:
        for c in todo:
            _write_case(c, out, dtype)
            bar.update(1)


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    workers: int = 1,
    progress: bool = True,
    layout: str = "brats",
) -> pathlib.Path:
    """Converts the NIfTI release under `src` into a slice cache at `out` (resumable).

    `layout`: "brats" (case folders, `brats.find_cases`) or "nnunet" (`src` an nnU-Net raw
    dataset folder, its training cases read through its dataset.json: `nnunet.find_cases`).

    Cases already complete in `out` from unchanged source files are skipped. `workers` > 1
    converts cases in parallel processes, which exit when this process dies. Writes
    `out/cache.json` last. Returns `out` as a Path. Raises DataError for bad cases (naming
    the file and what was expected); OSError when `out` is not writable.
    """
    from tqdm.auto import tqdm

    if dtype not in ("float32", "float16"):
        raise DataError(f"cache dtype must be 'float32' or 'float16', got {dtype!r}")
    src_p = pathlib.Path(src).resolve() if pathlib.Path(src).exists() else pathlib.Path(src)
    out = pathlib.Path(out)
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    cases = nnunet.find_cases(src_p) if layout == "nnunet" else find_cases(src_p)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    meta_path = out / "cache.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("dtype", dtype) != dtype:
            raise DataError(
                f"cache {out} was built with dtype {old.get('dtype')}, asked for {dtype}; "
                "use another --out or delete it"
            )
        if old.get("version") != VERSION:
            logging.warning(
                "cache %s is of format version %s: its cases are converted again into "
                "version %d (the compact cache)",
                out,
                old.get("version"),
                VERSION,
            )
        if old.get("src") not in (None, str(src_p)):
            logging.warning(
                "cache %s was built from %s, now asked for %s: cases whose files are "
                "elsewhere now are converted again",
                out,
                old.get("src"),
                src_p,
            )
    _remove_dead_temporaries(out / "cases")
    todo = [c for c in cases if not is_case_current(out, c)]
    logging.info("prepare %s -> %s: %d cases, %d to convert", src_p, out, len(cases), len(todo))
    bar = tqdm(
        total=len(cases),
        initial=len(cases) - len(todo),
        unit="case",
        desc=f"preparing {out}",
        disable=not progress,
    )
    try:  # the bar is closed (its line ended) before an error's one line is printed
        _convert(todo, out, dtype, workers, bar)
    finally:
        bar.close()
    info = dict(
        format=FORMAT,
        version=VERSION,
        src=str(src_p),
        dtype=dtype,
        cases=[c.case_id for c in cases],
    )
    tmp = out / f".cache.json.tmp{_temp_suffix()}"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, meta_path)
    return out


def _version_error(meta_path: pathlib.Path, info: dict, cache_dir) -> DataError:
    """The one-line error for a cache.json that this version does not read."""
    if info.get("format") != FORMAT:
        fmt = info.get("format")
        return DataError(f"{meta_path}: not a brats_jax slice cache (format {fmt!r})")
    src = info.get("src") or "NIFTI_DIR"
    return DataError(
        f"{meta_path}: slice cache format version {info.get('version')}, this brats_jax reads "
        f"version {VERSION}; convert it again (in place, resumable) with "
        f"`python -m brats_jax.prepare --src={src} --out={cache_dir}`"
    )


class NiftiCacheSource:
    """Grain random-access source over a prepared slice cache (see module docstring).

    cache_dir: a folder written by `prepare`. Records are all slices of all cases, cases in
    cache.json order (sorted ids), slices in order; each record's image float32 (H, W, 4)
    and label int32 (H, W) are on the case's full grid (un-cropped). Pickles as paths, table
    and each case's shape and `slice_store.Norm` (the stored arrays are opened lazily per
    process and thread).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = str(cache_dir)
        meta_path = pathlib.Path(cache_dir) / "cache.json"
        if not meta_path.is_file():
            raise DataError(
                f"{meta_path} not found; build the cache first with "
                f"`python -m brats_jax.prepare --src=NIFTI_DIR --out={cache_dir}`"
            )
        info = json.loads(meta_path.read_text())
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise _version_error(meta_path, info, cache_dir)
        self.src = info.get("src", "")
        self.case_ids = list(info["cases"])
        ids, sl, cc, bf, offsets = [], [], [], [], [0]
        self._shapes, self._norms = [], []
        for cid in self.case_ids:
            d = _case_dir(pathlib.Path(cache_dir), cid)
            if not (d / _MARKER).is_file():
                raise DataError(f"cache entry {d} is incomplete; rerun prepare to finish it")
            meta = json.loads((d / "meta.json").read_text())
            self._shapes.append(tuple(int(n) for n in meta["shape"]))
            self._norms.append(slice_store.Norm.from_json(meta.get("norm", {}), d / "meta.json"))
            z = np.load(d / "stats.npz")
            n = len(z["brain_fraction"])
            ids.append(np.full(n, cid))
            sl.append(np.arange(n, dtype=np.int32))
            cc.append(z["class_counts"])
            bf.append(z["brain_fraction"])
            offsets.append(offsets[-1] + n)
        self._offsets = np.asarray(offsets, np.int64)
        self.table = SliceTable(
            case_id=np.concatenate(ids) if ids else np.zeros(0, str),
            slice_index=np.concatenate(sl) if sl else np.zeros(0, np.int32),
            class_counts=np.concatenate(cc) if cc else np.zeros((0, 4), np.int64),
            brain_fraction=np.concatenate(bf) if bf else np.zeros(0, np.float32),
        )

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return (
            f"NiftiCacheSource(cache_dir={self.cache_dir!r}, cases={len(self.case_ids)}, "
            f"slices={len(self)})"
        )

    def _locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return k, i - int(self._offsets[k])

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        k, s = self._locate(i)
        d = os.path.join(self.cache_dir, "cases", self.case_ids[k])
        image, label = slice_store.read_slice(d, s, self._shapes[k], self._norms[k])
        return dict(image=image, label=label, case_id=self.case_ids[k], slice_index=s)

    def read_window(self, records) -> dict:
        """One record from the 2k+1 records of a context window (`context.neighbour_records`,
        all of one case, slice order): the centre record with the window's slices merged
        into its image (H, W, 4 (2k+1)); what `context.stack_records` of the records gives,
        read in one go."""
        located = [self._locate(int(i)) for i in records]
        (k, centre) = located[len(located) // 2]
        if any(kk != k for kk, _ in located):
            raise DataError(f"context window {list(records)} spans several cases")
        d = os.path.join(self.cache_dir, "cases", self.case_ids[k])
        image, label = slice_store.read_window(
            d, [s for _, s in located], self._shapes[k], self._norms[k], label_of=centre
        )
        return dict(image=image, label=label, case_id=self.case_ids[k], slice_index=centre)

    def load_volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Whole case -> (image float32 (H,W,D,4), label int32 (H,W,D)) on its full grid."""
        if case_id not in self.case_ids:
            raise DataError(
                f"case {case_id!r} not in cache {self.cache_dir}; known e.g. {self.case_ids[:5]}"
            )
        k = self.case_ids.index(case_id)
        d = os.path.join(self.cache_dir, "cases", case_id)
        return slice_store.read_volume(d, self._shapes[k], self._norms[k])

    def case_meta(self, case_id: str) -> dict:
        """meta.json of a case: naming, shape (H,W,D), affine (4x4 list), source files, the
        stored box and normalisation (`norm`)."""
        d = _case_dir(pathlib.Path(self.cache_dir), case_id)
        return json.loads((d / "meta.json").read_text())


def default_cache_dir(root: str | os.PathLike) -> pathlib.Path:
    """`fileio.user_cache_dir()`/<sha1 of the absolute root>[:12] (~/.cache/brats_jax/...;
    where make_source puts a cache)."""
    import hashlib

    h = hashlib.sha1(os.path.abspath(str(root)).encode()).hexdigest()[:12]
    return user_cache_dir() / h
