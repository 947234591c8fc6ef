"""Atomic writes: all-or-nothing replacement, suffixes kept, and the permissions `open` gives."""

import os
import stat

import pytest

from brats_jax import fileio
from brats_jax.metrics import folder


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_permissions_follow_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as f:  # what a non-atomic writer would have produced
        f.write("x")
    fileio.write_text(tmp_path / "a.txt", "x")
    folder.write_csv([], tmp_path / "scores.csv")
    expected = 0o666 & ~mask
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "scores.csv").stat().st_mode) == expected


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "seg.nii.gz"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with fileio.atomic_path(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")  # format from suffix
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_success_replaces_and_creates_parents(tmp_path):
    out = tmp_path / "new" / "dir" / "r.json"
    fileio.write_json(out, {"dice": 0.5})
    fileio.write_json(out, {"dice": 0.75})
    assert out.read_text() == '{\n  "dice": 0.75\n}\n'
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_check_writable_names_the_output_and_leaves_nothing(tmp_path):
    import errno

    fileio.check_writable(tmp_path / "new" / "seg.nii.gz")  # creates the folder, as a write
    assert os.listdir(tmp_path / "new") == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError) as e:  # a parent that is a file: fails even for root
        fileio.check_writable(tmp_path / "a_file" / "seg.nii.gz")
    assert e.value.errno == errno.ENOTDIR
    assert e.value.filename == str(tmp_path / "a_file")
    with pytest.raises(IsADirectoryError):
        fileio.check_writable(tmp_path / "new")


def test_drop_jsonl_rows_after_a_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert fileio.drop_jsonl_rows_after(path, 3) == 0 and not path.exists()
    rows = [
        '{"step": 2, "train_loss": 0.5}\n',
        '{"step": 3, "val_paper_dice": 0.7}\n',
        '{"step": 4, "train_loss": null}\n',
        '{"step": 5, "train_lo',  # cut by a kill
    ]
    path.write_text("".join(rows))
    assert fileio.drop_jsonl_rows_after(path, 3) == 2
    assert path.read_text() == rows[0] + rows[1]
    assert fileio.drop_jsonl_rows_after(path, 3) == 0
    assert fileio.drop_jsonl_rows_after(path, 0) == 2 and path.read_text() == ""
