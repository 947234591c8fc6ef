"""One process per output folder: an exclusive lock file `FOLDER/.lock`.

The lock is a file created with `O_CREAT | O_EXCL`, holding the holder's host, pid and
process start time. `O_EXCL` creation is atomic on local file systems and on NFSv3+/most
shared file systems, where `fcntl`/`flock` locks are often unsupported, local to one client
or silently dropped; its drawback, a file left behind by a killed process, is handled by
the recorded holder: a lock of a process that no longer runs on this host (its pid is gone,
or now belongs to a process started at another time) is stale and taken over with a
warning. A lock held from another host cannot be checked and is refused (the message names
the file to delete if that process is gone).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time

from absl import logging

from brats_jax.fileio import process_alive, process_start_time

LOCK_NAME = ".lock"


class WorkdirBusy(ValueError):
    """Another process holds the folder's lock (message names it and the lock file)."""


def _holder_is_gone(holder: dict) -> bool:
    """True when `holder` (a lock's content) names a process of this host that has ended."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    pid = holder["pid"]
    if not process_alive(pid):
        return True
    start = process_start_time(pid)  # a reused pid: same number, another start time
    return holder.get("start") is not None and start is not None and start != holder["start"]


def _is_this_process(holder: dict) -> bool:
    return (
        holder.get("host") == socket.gethostname()
        and holder.get("pid") == os.getpid()
        and holder.get("start") == process_start_time(os.getpid())
    )


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process (its lock file is unreadable)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since', '?')})"
    )


class WorkdirLock:
    """Context manager holding `FOLDER/.lock` exclusively (FOLDER is created if needed).

    Raises WorkdirBusy on enter when another live process holds it; releases it on exit. A
    process that already holds the lock may take it again (nested, e.g. a sweep around the
    training loop): the inner one neither checks nor releases it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / LOCK_NAME
        self._content: str | None = None
        self._nested = False

    def _own_content(self) -> str:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        return json.dumps(holder) + "\n"

    def _read_holder(self) -> tuple[str | None, dict | None]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            return text, None
        return text, holder if isinstance(holder, dict) else None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content)
        return True

    def _take_over(self, stale_text: str) -> None:
        """Moves the stale lock aside, unless another process replaced it meanwhile."""
        aside = self.folder / f"{LOCK_NAME}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process took it over first
            return
        if aside.read_text() != stale_text:  # we moved a fresh lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock or raise WorkdirBusy naming its holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._content = self._own_content()
        for _ in range(5):
            if self._try_create():
                return
            text, holder = self._read_holder()
            if text is None:  # released meanwhile
                continue
            if holder is not None and _is_this_process(holder):
                self._nested = True
                return
            if holder is None or not _holder_is_gone(holder):
                raise WorkdirBusy(
                    f"{self.folder} is in use by {_describe(holder)}: one process per folder; "
                    f"if that process is gone, delete {self.path}"
                )
            logging.warning(
                "taking over the stale lock %s of %s, which no longer runs",
                self.path,
                _describe(holder),
            )
            self._take_over(text)
        raise WorkdirBusy(f"could not take the lock {self.path}: other processes keep taking it")

    def release(self) -> None:
        """Remove the lock file if it is still this process's (and not held by an outer one)."""
        if self._nested:
            self._nested = False
        elif self._content is not None and self._read_holder()[0] == self._content:
            self.path.unlink(missing_ok=True)
        self._content = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
