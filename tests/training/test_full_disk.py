"""A real full disk: training into a small tmpfs ends in one error line (no orbax thread
tracebacks), and after space is freed the same command resumes from the newest complete
checkpoint without duplicated metric rows."""

import collections
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FREE_KIB = 450  # one tiny-model checkpoint (~200 KiB) fits, the next does not
STEPS = 12


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs mounted at tmp_path/disk (unmounted afterwards); skips where mounting
    is not allowed (not root, no CAP_SYS_ADMIN, no `mount`)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _train(workdir, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # the rerun skips the compile
    env.pop("BRATS_JAX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "brats_jax.main", "--config=configs/unet.py:tiny",
         f"--workdir={workdir}", f"--config.train.num_steps={STEPS}"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def _complete_steps(workdir) -> list[int]:
    """Checkpoint steps orbax finished (renamed from `<step>.orbax-checkpoint-tmp`)."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_full_disk_one_line_then_resume(small_disk, tmp_path):
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - FREE_KIB * 1024))
    workdir = small_disk / "run"

    full = _train(workdir, tmp_path / "cache")
    assert full.returncode == 1, full.stderr
    lines = [ln for ln in full.stderr.splitlines() if ln.strip()]
    for noise in ("Traceback", "Event loop is closed", "RESOURCE_EXHAUSTED"):
        assert noise not in full.stderr, full.stderr
    assert len(lines) < 15, full.stderr  # absl's few INFO lines, the progress bar, the error
    assert lines[-1].startswith(f"error: {workdir}/checkpoints/")
    assert lines[-1].endswith(
        "No space left on device (ENOSPC); free some space or write elsewhere"
    )
    kept = _complete_steps(workdir)
    assert kept and max(kept) < STEPS, kept  # the disk filled after a first checkpoint

    filler.unlink()
    rerun = _train(workdir, tmp_path / "cache")
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed 1 run(s) from step {max(kept)}" in rerun.stderr
    assert (workdir / "results.json").is_file()
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    kinds = collections.Counter((r["step"], "val_loss" in r) for r in rows)
    assert max(kinds.values()) == 1, kinds  # no step's train or validation row twice
    # the tiny preset logs every 2 steps and validates every 3: rows as one uninterrupted run
    train_rows = sorted(s for (s, val) in kinds if not val)
    val_rows = sorted(s for (s, val) in kinds if val)
    assert train_rows == list(range(2, STEPS + 1, 2))
    assert val_rows == list(range(3, STEPS + 1, 3))
