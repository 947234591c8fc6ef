"""One process per workdir: the lock file, its holder in the error, stale locks taken over."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from brats_jax.runs import workdir_lock as L

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HOLD = textwrap.dedent(
    """
    import sys, time
    from brats_jax.runs.workdir_lock import WorkdirLock
    with WorkdirLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # hold until told to go
    """
)


def _holder(workdir):
    """A real second process holding the lock of `workdir` (released when its stdin closes)."""
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_process_is_refused_naming_the_holder(tmp_path):
    p = _holder(tmp_path / "run")
    try:
        with pytest.raises(L.WorkdirBusy) as e, L.WorkdirLock(tmp_path / "run"):
            pass
        msg = str(e.value)
        assert "\n" not in msg and isinstance(e.value, ValueError)
        assert f"pid {p.pid} on host {socket.gethostname()}" in msg
        assert str(tmp_path / "run" / ".lock") in msg
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    assert not (tmp_path / "run" / ".lock").exists()  # released on exit
    with L.WorkdirLock(tmp_path / "run") as lock:  # and free again
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists()


def _try_lock(folder, queue, release):
    try:
        with L.WorkdirLock(folder):
            queue.put("got")
            release.wait(60)  # hold until every process has tried
    except L.WorkdirBusy:
        queue.put("busy")


def test_processes_started_together_one_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    q, release = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_try_lock, args=(tmp_path / "run", q, release)) for _ in range(3)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    release.set()
    for p in procs:
        p.join(timeout=60)
    assert results == ["busy", "busy", "got"]
    assert not (tmp_path / "run" / ".lock").exists()


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    p = _holder(tmp_path)
    p.kill()  # SIGKILL: no chance to release
    p.wait(timeout=30)
    assert (tmp_path / ".lock").exists()
    with caplog.at_level("WARNING"), L.WorkdirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert any(
        "stale lock" in r.getMessage() and str(p.pid) in r.getMessage() for r in caplog.records
    )
    assert sorted(x.name for x in tmp_path.iterdir()) == []  # nothing left behind


def test_lock_of_a_reused_pid_is_stale_and_of_another_host_is_kept(tmp_path):
    lock = tmp_path / ".lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": "not-my-start"}
    lock.write_text(json.dumps(me))
    if L.process_start_time(os.getpid()) is not None:  # Linux: same pid, other start time = reused
        with L.WorkdirLock(tmp_path):
            pass
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "x"}))
    with pytest.raises(L.WorkdirBusy, match="pid 1 on host elsewhere"), L.WorkdirLock(tmp_path):
        pass
    lock.write_text("garbage")
    with pytest.raises(L.WorkdirBusy, match="unreadable"), L.WorkdirLock(tmp_path):
        pass
    assert lock.read_text() == "garbage"  # a refused process never removes the lock


def test_the_holder_may_take_its_own_lock_again(tmp_path):
    with L.WorkdirLock(tmp_path) as outer:
        with L.WorkdirLock(tmp_path):  # e.g. experiments.run around train_and_evaluate
            pass
        assert outer.path.exists()  # the inner exit leaves the outer's lock in place
    assert not outer.path.exists()
