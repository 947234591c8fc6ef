"""One NIfTI slice cache shared by the runs of a grouped sweep and by the hosts of a
multi-host run (issue 46): converted once, read by all, the hosts' shards partitioning the
training records."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import configs.unet
from brats_jax.data import cache, default_cache_dir, load_case
from brats_jax.training import run_group

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (32, 32, 6)  # x, y, slices of each hand-written case
CASES = ("C0", "C1", "C2", "C3", "C4")


@pytest.fixture
def release(tmp_path, write_nifti_case):
    """Five 32 x 32 x 6 cases of distinct random intensities and labels {0, 1, 2, 4}."""
    for k, cid in enumerate(CASES):
        seg = np.random.default_rng(100 + k).choice([0, 0, 1, 2, 4], size=SHAPE).astype(np.uint8)
        write_nifti_case(tmp_path / "src", cid, shape=SHAPE, seed=k, seg=seg)
    return tmp_path / "src"


def _config(root, split_seed: int, cache_dir: str = ""):
    c = configs.unet.get_config("tiny")
    c.data.source, c.data.root, c.data.cache_dir = "nifti", str(root), cache_dir
    c.data.split_seed = split_seed
    return c


def test_grouped_sweep_converts_once_and_reads_one_cache(release, tmp_path, monkeypatch):
    """Two units of a grouped sweep over split seeds (runs trained together share the
    architecture, not the split): the cases are converted once into the one default cache
    folder of data.root; the runs of a unit share one opened source; the second unit
    converts nothing and rewrites no byte."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))  # default cache root
    converted = []
    write_case = cache._write_case
    monkeypatch.setattr(
        cache, "_write_case", lambda c, *a: converted.append(c.case_id) or write_case(c, *a)
    )
    unit = [_config(release, 3), _config(release, 4)]
    runs = run_group._build_runs(unit, [tmp_path / "r3", tmp_path / "r4"])
    assert sorted(converted) == list(CASES)
    folder = default_cache_dir(release)
    assert runs[0].source is runs[1].source and runs[0].source.cache_dir == str(folder)
    assert [c.name for c in folder.parent.iterdir()] == [folder.name]  # one cache folder
    assert runs[0].splits.cases != runs[1].splits.cases  # the seeds do split differently
    files = sorted(p for p in (folder / "cases").rglob("*") if p.is_file())
    stamps, listing = [p.stat().st_mtime_ns for p in files], (folder / "cache.json").read_text()
    again = run_group._build_runs(
        [_config(release, 5), _config(release, 6)], [tmp_path / "r5", tmp_path / "r6"]
    )
    assert sorted(converted) == list(CASES)  # nothing converted again
    assert sorted(p for p in (folder / "cases").rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == stamps  # cases: not a byte rewritten
    assert (folder / "cache.json").read_text() == listing
    assert again[0].source.cache_dir == str(folder)


_HOST = """
import hashlib, json, pathlib, sys, time
import jax
i, root, cache_dir, work, barrier = sys.argv[1:]
jax.process_index = lambda *a, **k: int(i)  # host i of a 2-host run
jax.process_count = lambda *a, **k: 2
import configs.unet
from brats_jax.training import run_group
c = configs.unet.get_config("tiny")
c.data.source, c.data.root, c.data.cache_dir = "nifti", root, cache_dir
pathlib.Path(barrier, f"ready{i}").touch()
while not pathlib.Path(barrier, "go").exists():  # both hosts prepare at the same moment
    time.sleep(0.01)
run = run_group.build_run(c, work)
src, h = run.source, hashlib.sha1()
for r in range(len(src)):
    h.update(src[r]["image"].astype("float32").tobytes())
    h.update(src[r]["label"].astype("int32").tobytes())
it = run_group._train_iterator(run)
seen = set()
for _ in range(2 * len(run.splits.train)):  # over two epochs of this host's shard
    b = next(it)
    seen |= {(str(c), int(s)) for c, s in zip(b["case_id"], b["slice_index"])}
it.close()
train = [(str(src.table.case_id[r]), int(src.table.slice_index[r])) for r in run.splits.train]
print(json.dumps(dict(records=h.hexdigest(), n=len(src), train=sorted(train), seen=sorted(seen))))
"""


def _expected_records_sha1(release) -> str:
    """sha1 of every slice's z-scored image and label, read from the NIfTI files."""
    h = hashlib.sha1()
    for cid in CASES:
        data = load_case(release / cid)
        for s in range(SHAPE[2]):
            h.update(np.asarray(data.image[:, :, s], np.float32).tobytes())
            h.update(np.asarray(data.label[:, :, s], np.int32).tobytes())
    return h.hexdigest()


def test_two_hosts_prepare_one_cache_at_once_and_split_its_records(release, tmp_path):
    """Two processes (hosts 0 and 1 of 2: jax.process_index / process_count) build their run
    from one data.cache_dir at the same moment, as hosts on a shared disk do: both succeed,
    both read every record as the NIfTI files hold it, and their training shards are
    disjoint and together every training record."""
    shared, barrier = tmp_path / "shared_cache", tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    args = [str(release), str(shared)]
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", _HOST, str(i), *args, str(tmp_path / f"run{i}"), str(barrier)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    deadline = time.monotonic() + 120
    while not all((barrier / f"ready{i}").exists() for i in (0, 1)):
        assert all(p.poll() is None for p in hosts), [p.communicate() for p in hosts]
        assert time.monotonic() < deadline, "the host processes did not start"
        time.sleep(0.05)
    (barrier / "go").touch()
    outs = [p.communicate(timeout=120) for p in hosts]
    assert [p.returncode for p in hosts] == [0, 0], [err[-2000:] for _, err in outs]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert got[0]["n"] == got[1]["n"] == len(CASES) * SHAPE[2]
    assert got[0]["records"] == got[1]["records"] == _expected_records_sha1(release)
    assert got[0]["train"] == got[1]["train"] and len(got[0]["train"]) >= 2 * SHAPE[2]
    seen = [{tuple(r) for r in g["seen"]} for g in got]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {tuple(r) for r in got[0]["train"]}
    assert sorted(p.name for p in (shared / "cases").iterdir()) == list(CASES)  # no leftovers
