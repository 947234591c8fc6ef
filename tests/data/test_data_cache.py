"""NIfTI -> slice cache: values, atomic/resumable writing, and agreement with the Kaggle slices."""

import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from brats_jax.data import (
    DataError,
    KaggleH5Source,
    NiftiCacheSource,
    case_indices,
    find_cases,
    load_case,
    load_volume,
    prepare,
)
from brats_jax.data.cache import _temp_suffix, _write_case, is_case_complete

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def release(tmp_path, write_labelled_case):
    write_labelled_case(tmp_path / "src", "A", "2018", ".nii.gz")
    write_labelled_case(tmp_path / "src", "B", "2023", ".nii.gz")
    return tmp_path / "src"


def test_cache_matches_load_case(release, tmp_path, write_labelled_case):
    src = NiftiCacheSource(prepare(release, tmp_path / "c", progress=False))
    assert len(src) == 2 * write_labelled_case.shape[2] and src.case_ids == ["A", "B"]
    data = load_case(release / "B")
    for s in range(write_labelled_case.shape[2]):
        rec = src[write_labelled_case.shape[2] + s]
        assert rec["case_id"] == "B" and rec["slice_index"] == s
        np.testing.assert_array_equal(rec["image"], data.image[:, :, s])
        np.testing.assert_array_equal(rec["label"], data.label[:, :, s])
        # table: pixel counts per class and brain fraction (any modality non-zero; rows :4 zero)
        np.testing.assert_array_equal(
            src.table.class_counts[write_labelled_case.shape[2] + s],
            np.bincount(data.label[:, :, s].ravel(), minlength=4),
        )
        assert src.table.brain_fraction[write_labelled_case.shape[2] + s] == pytest.approx(12 / 16)
    # hand-written label: slice 2 has 4 NCR and 4 ED pixels, slice 3 has 4 ET pixels
    assert src.table.class_counts[2].tolist() == [256 - 8, 4, 4, 0]
    assert src.table.class_counts[3].tolist() == [256 - 4, 0, 0, 4]
    image, label = load_volume(src, "A")
    assert (
        image.shape == write_labelled_case.shape + (4,) and label.shape == write_labelled_case.shape
    )
    np.testing.assert_array_equal(case_indices(src, "B"), np.arange(8, 16))
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[5]["image"], src[5]["image"])


def test_resumable_and_atomic(release, tmp_path):
    out = tmp_path / "c"
    prepare(release, out, progress=False)
    stamp = (out / "cases" / "A" / "image.b2nd").stat().st_mtime_ns
    # a half-written case from an interrupted run: temp folder, and a folder without marker
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    dead_tmp = out / "cases" / f".B.tmp{_temp_suffix(int(dead))}"
    legacy_tmp = out / "cases" / f".B.tmp-{dead}"  # earlier versions' name
    live_tmp = out / "cases" / f".B.tmp{_temp_suffix(os.getppid())}"  # a running process's
    for t in (dead_tmp, legacy_tmp, live_tmp):
        t.mkdir()
    os.remove(out / "cases" / "B" / "COMPLETE")
    assert not is_case_complete(out, "B")
    with pytest.raises(DataError, match="incomplete"):
        NiftiCacheSource(out)
    prepare(release, out, progress=False)
    assert (out / "cases" / "A" / "image.b2nd").stat().st_mtime_ns == stamp  # skipped
    assert is_case_complete(out, "B")
    assert not dead_tmp.exists() and not legacy_tmp.exists() and live_tmp.is_dir()
    assert len(NiftiCacheSource(out)) == 16


def test_case_completed_by_another_process_is_kept(release, tmp_path):
    """Two processes converting one case: whoever finishes second keeps the first's folder."""
    out = tmp_path / "c"
    prepare(release, out, progress=False)
    (case,) = [c for c in find_cases(release) if c.case_id == "A"]
    marker = out / "cases" / "A" / "COMPLETE"
    stamp = marker.stat().st_mtime_ns
    assert _write_case(case, out, "float32") == "A"  # as if it had raced the first prepare
    assert marker.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["A", "B"]  # no temporaries


@pytest.mark.parametrize("when", ["after_our_check", "before_our_rename"])
def test_entry_another_process_finishes_meanwhile_is_never_removed(
    release, tmp_path, monkeypatch, when
):
    """Hosts on a shared disk convert the same new case at once; the other one finishes
    while this one is still at work (right after this one looked for the entry, or right
    before it renames its copy into place). The other's entry, which the other host may
    already be reading, stays in place (its own marker); this copy is discarded."""
    import brats_jax.data.cache as cache_mod

    ref = prepare(release, tmp_path / "ref", progress=False)  # the other host's finished copy
    out = tmp_path / "c"
    (out / "cases").mkdir(parents=True)
    (case,) = [c for c in find_cases(release) if c.case_id == "A"]
    final = out / "cases" / "A"

    appeared = []

    def other_finishes():  # once
        if not appeared:
            shutil.copytree(ref / "cases" / "A", final)
            (final / "COMPLETE").write_text("the other host's\n")
            appeared.append(True)

    real_check, real_rename = cache_mod.is_case_current, os.rename

    def check(o, c):
        answer = real_check(o, c)  # true when it was asked: the other finishes right after
        if when == "after_our_check":
            other_finishes()
        return answer

    def rename(src, dst):
        if when == "before_our_rename" and pathlib.Path(src).name.startswith(".A.tmp"):
            other_finishes()
        return real_rename(src, dst)

    monkeypatch.setattr(cache_mod, "is_case_current", check)
    monkeypatch.setattr(cache_mod.os, "rename", rename)
    assert _write_case(case, out, "float32") == "A"
    assert cache_mod.is_case_complete(out, "A")
    if appeared:  # (none after our check when our copy went in without one: nothing to keep)
        assert final.joinpath("COMPLETE").read_text() == "the other host's\n"
    assert appeared or when == "after_our_check"
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["A"]  # no temporaries


def test_changed_or_unstamped_case_is_converted_again(release, tmp_path):
    """A seg file rewritten after caching (new labels, new mtime) and an entry from before
    stamps were recorded are converted again; an untouched case is skipped."""
    import json

    import nibabel as nib

    out = tmp_path / "c"
    prepare(release, out, progress=False)
    a_stamp = (out / "cases" / "A" / "image.b2nd").stat().st_mtime_ns
    seg = release / "B" / "B-seg.nii.gz"
    old = nib.load(str(seg))
    edited = np.where(np.asarray(old.dataobj) > 0, 2, 0).astype(np.uint8)  # all tumour = ED
    nib.save(nib.Nifti1Image(edited, old.affine), str(seg))
    os.utime(seg, ns=(seg.stat().st_atime_ns, seg.stat().st_mtime_ns + 10**9))
    prepare(release, out, progress=False)
    _, label = load_volume(NiftiCacheSource(out), "B")
    np.testing.assert_array_equal(label, load_case(release / "B").label)
    assert set(np.unique(label)) == {0, 2}
    assert (out / "cases" / "A" / "image.b2nd").stat().st_mtime_ns == a_stamp  # skipped
    meta = out / "cases" / "A" / "meta.json"  # as written before stamps were recorded
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                                if k != "stamps"}))  # fmt: skip
    prepare(release, out, progress=False)
    assert (out / "cases" / "A" / "image.b2nd").stat().st_mtime_ns != a_stamp


def test_failed_case_leaves_no_entry(release, tmp_path):
    (release / "B" / "B-seg.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="B-seg"):
        prepare(release, tmp_path / "c", progress=False)
    assert is_case_complete(tmp_path / "c", "A")
    assert not (tmp_path / "c" / "cases" / "B").exists()
    assert not list((tmp_path / "c" / "cases").glob(".B.tmp-*"))


def test_missing_cache_message(tmp_path):
    with pytest.raises(DataError, match="brats_jax.prepare"):
        NiftiCacheSource(tmp_path)


def _prepare(src, out) -> subprocess.CompletedProcess:
    """`python -m brats_jax.prepare --src=SRC --out=OUT` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "brats_jax.prepare", f"--src={src}", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_prepare_cli(release, tmp_path):
    out = tmp_path / "cli"
    r = _prepare(release, out)
    assert r.returncode == 0, r.stderr
    assert "16 slices" in r.stdout
    r = _prepare(tmp_path / "nope", out)
    assert r.returncode == 1 and "does not exist" in r.stderr
    (tmp_path / "a_file").write_text("")
    bad_out = tmp_path / "a_file" / "cache"  # not creatable (works as root too)
    r = _prepare(release, bad_out)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'a_file'}")
    assert r.stderr.strip().endswith("Not a directory (ENOTDIR)")


def _kaggle_zscore(x):
    m, s = x.mean((0, 1)), x.std((0, 1))
    return np.where(s > 0, (x - m) / np.where(s > 0, s, 1), 0.0)


def test_real_sample_nifti_agrees_with_kaggle(brats_sample, tmp_path):
    """Kaggle slices are volume[:, :, s] of Brats18_2013_2_1: labels exact, channels close."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    os.symlink(brats_sample / "nifti" / "Brats18_2013_2_1", src_dir / "Brats18_2013_2_1")
    nif = NiftiCacheSource(prepare(src_dir, tmp_path / "cache", progress=False))
    kag = KaggleH5Source(brats_sample / "kaggle_h5", stats_dir=tmp_path / "kstats")
    assert len(kag) == 20 and len(nif) == 155
    kag.fill_brain_fraction()
    for i in range(len(kag)):
        k = kag[i]
        n = nif[k["slice_index"]]
        np.testing.assert_array_equal(k["label"], n["label"])
        np.testing.assert_allclose(
            _kaggle_zscore(n["image"].astype(np.float64)), k["image"], atol=1e-4
        )
        s = k["slice_index"]
        np.testing.assert_array_equal(kag.table.class_counts[i], nif.table.class_counts[s])
        assert kag.table.brain_fraction[i] == pytest.approx(nif.table.brain_fraction[s], abs=1e-6)
    # independent check of the csv: slice 80 has 9 NCR, 412 ED, 153 ET pixels
    i80 = int(np.nonzero(kag.table.slice_index == 80)[0][0])
    assert kag.table.class_counts[i80].tolist() == [240 * 240 - 574, 9, 412, 153]


def test_real_sample_slice_normalization_is_the_kaggle_release(brats_sample):
    """load_case(normalization="slice") of Brats18_2013_2_1 gives the Kaggle slices' values,
    so a Kaggle-trained model sees at prediction what it saw in training."""
    from brats_jax.data import load_case
    from brats_jax.data.kaggle import read_slice_file

    case = load_case(brats_sample / "nifti" / "Brats18_2013_2_1", normalization="slice")
    files = sorted((brats_sample / "kaggle_h5").glob("volume_1_slice_*.h5"))
    assert len(files) == 20
    for f in files:
        s = int(f.stem.rsplit("_", 1)[1])
        image, label = read_slice_file(f)
        np.testing.assert_allclose(case.image[:, :, s], image, atol=1e-6, err_msg=f.name)
        np.testing.assert_array_equal(case.label[:, :, s], label)


@pytest.mark.slow
def test_real_sample_prepare_all(brats_sample, tmp_path):
    src = NiftiCacheSource(prepare(brats_sample / "nifti", tmp_path / "cache", workers=2))
    assert len(src.case_ids) == 18 and len(src) == 18 * 155
    assert set(np.unique(src.table.class_counts.nonzero()[1])) == {0, 1, 2, 3}
    shutil.rmtree(tmp_path / "cache")


_PREPARE_FOREVER = """
import os, pathlib, sys, time
from brats_jax.data import cache

def slow_case(case, out, dtype):  # a worker busy with a big case
    (pathlib.Path(sys.argv[3]) / str(os.getpid())).write_text("busy")
    time.sleep(600)

cache._write_case = slow_case
cache.prepare(sys.argv[1], sys.argv[2], workers=2, progress=False)
"""


def _gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie awaiting its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_prepare_is_killed(release, tmp_path, write_labelled_case):
    import signal
    import time

    write_labelled_case(release, "C", "2018", ".nii.gz")
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen(
        [sys.executable, "-c", _PREPARE_FOREVER, str(release), str(tmp_path / "c"), str(pids)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 120
        while len(os.listdir(pids)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p) for p in os.listdir(pids)]
        assert len(workers) == 2 and parent.pid not in workers
        assert not any(_gone(w) for w in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [w for w in workers if not _gone(w)]
    for w in alive:  # do not leave them behind when the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive


def test_watchdog_ends_a_worker_whose_prepare_process_is_gone(tmp_path):
    """The portable path (no prctl: `parent_pid` is not the worker's own parent)."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from brats_jax.data import cache; "
            f"cache._exit_with_parent({owner.pid}, poll_s=0.05); print('ready', flush=True); "
            "time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert worker.stdout.readline().strip() == "ready"
        assert worker.poll() is None
        owner.kill()
        owner.wait(timeout=30)
        assert worker.wait(timeout=10) == 1
    finally:
        for p in (owner, worker):
            if p.poll() is None:
                p.kill()
                p.wait()
