"""Files that survive a crash: atomic writes (a reader never sees a half-written output), the
NIfTI writer of every output, and whether a lock file's holder still runs."""

import contextlib
import errno
import json
import os
import pathlib
import secrets
from collections.abc import Iterator


def user_cache_dir() -> pathlib.Path:
    """The library's folder in the user's cache: `$XDG_CACHE_HOME/brats_jax`, else
    `~/.cache/brats_jax` (slice caches, Kaggle statistics, predict's compilation cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "brats_jax"


def _create_temp_beside(path: pathlib.Path) -> pathlib.Path:
    """Create an empty, uniquely named file beside `path`, keeping its suffixes.

    Created with mode 0o666 less the process umask, as `open` would create `path` itself
    (`tempfile.mkstemp` would make it 0o600, unreadable to the rest of a lab group).
    """
    suffix = "".join(path.suffixes)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    The temporary file keeps `path`'s suffixes (so writers that infer the format from
    the name, such as nibabel's `.nii.gz`, behave), gets the permissions a plain `open`
    would give (0o666 less the umask), and is removed if the block raises.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_nifti_like(array, like, path, *, descrip=None, display_range=(0.0, 0.0)) -> None:
    """Write `array` atomically as NIfTI on `like`'s grid (`like.affine`, a copy of
    `like.header`), in the voxel order of the file `like` was read from (`like.to_file`,
    `brats.CaseData`'s; None or absent: as given): data type `array.dtype`, no intensity
    scaling, `descrip` (80 bytes at most; None keeps the input's), display range
    `(cal_min, cal_max)` ((0, 0): none, so viewers show the data's range instead of the
    input image's)."""
    import nibabel as nib
    import numpy as np

    array = np.asarray(array)
    header = like.header.copy()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1, 0)
    header["cal_min"], header["cal_max"] = display_range
    if descrip is not None:
        header["descrip"] = descrip
    image = nib.Nifti1Image(array, like.affine, header)
    if getattr(like, "to_file", None) is not None:
        image = image.as_reoriented(like.to_file)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError naming `path` (or the file blocking its folder) now if it could not be
    written later by `atomic_path`.

    Creates the missing parent folders (as the write would) and one empty temporary file
    beside `path`, which it removes; for outputs that come after a long computation.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a parent folder should be
        blocker = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(blocker)) from e
    try:
        _create_temp_beside(path).unlink()
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from e


def drop_jsonl_rows_after(path: str | os.PathLike, step: int) -> int:
    """Atomically rewrite the JSON-lines file `path` without its rows whose "step" is above
    `step` (a run resumed from checkpoint `step` writes them again). Unparsable lines (a line
    cut by a kill) are dropped too. Returns the number of lines dropped; 0 if no file."""
    path = pathlib.Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        write_text(path, "".join(kept))
    return len(lines) - len(kept)


# Lock files (`runs.workdir_lock`, the NIfTI cache's conversion lock) name their holder by
# host, pid and start time; these tell whether that holder still runs.


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc; None elsewhere or when it is gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), after "pid (comm)"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
