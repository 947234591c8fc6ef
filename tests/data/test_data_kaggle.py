"""Kaggle sliced-HDF5 source on tiny files written here."""

import pickle

import h5py
import numpy as np
import pytest

from brats_jax.data import DataError, KaggleH5Source
from brats_jax.data.kaggle import mask_to_label

H = W = 8


def write_slice(d, v, s, label=None, brain_rows=4):
    rng = np.random.default_rng(v * 1000 + s)
    raw = np.zeros((H, W, 4))
    raw[:brain_rows] = rng.uniform(1, 10, (brain_rows, W, 4))
    m, sd = raw.mean((0, 1)), raw.std((0, 1))
    image = (raw - m) / np.where(sd > 0, sd, 1)
    mask = np.zeros((H, W, 3), np.uint8)
    if label is not None:
        for c in (1, 2, 3):
            mask[label == c, c - 1] = 1
    with h5py.File(d / f"volume_{v}_slice_{s}.h5", "w") as f:
        f["image"] = image
        f["mask"] = mask
    return image


def test_mask_to_label():
    m = np.zeros((2, 2, 3), np.uint8)
    m[0, 1, 0] = 1
    m[1, 0, 1] = 1
    m[1, 1, 2] = 1
    np.testing.assert_array_equal(mask_to_label(m), [[0, 1], [2, 3]])


def _label():
    lab = np.zeros((H, W), np.int32)
    lab[1, 1], lab[1, 2:4], lab[2, :3] = 1, 2, 3
    return lab


def test_listing_without_csv(tmp_path):
    lab = _label()
    img = write_slice(tmp_path, 2, 10, lab)
    write_slice(tmp_path, 2, 9)
    write_slice(tmp_path, 1, 3, brain_rows=2)
    src = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    assert len(src) == 3 and not src.has_csv
    assert src.table.case_id.tolist() == ["volume_1", "volume_2", "volume_2"]
    assert src.table.slice_index.tolist() == [3, 9, 10]
    rec = src[2]
    np.testing.assert_array_equal(rec["label"], lab)
    np.testing.assert_allclose(rec["image"], img.astype(np.float32))
    assert rec["image"].dtype == np.float32 and rec["case_id"] == "volume_2"
    assert src.table.class_counts[2].tolist() == [64 - 6, 1, 2, 3]
    np.testing.assert_allclose(src.table.brain_fraction, [2 / 8, 4 / 8, 4 / 8])
    # measured stats persist: a new source reads them back without touching the files
    again = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    np.testing.assert_allclose(again._table.brain_fraction, [2 / 8, 4 / 8, 4 / 8])
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[2]["label"], lab)


def test_stats_of_a_rewritten_slice_are_measured_again(tmp_path, monkeypatch):
    """Without the csv: a slice rewritten after its stats were cached (new size or mtime)
    is read again; the unchanged one is not."""
    import os

    from brats_jax.data import kaggle

    write_slice(tmp_path, 1, 0, _label())
    write_slice(tmp_path, 1, 1)
    first = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats").table
    assert first.class_counts[0].tolist() == [64 - 6, 1, 2, 3]
    moved = np.where(_label() > 0, 3, 0)  # the same tumour, all ET now
    write_slice(tmp_path, 1, 0, moved)
    path = tmp_path / "volume_1_slice_0.h5"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    read = []
    real = kaggle.read_slice_file
    monkeypatch.setattr(kaggle, "read_slice_file", lambda p: read.append(p) or real(p))
    table = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats").table
    assert table.class_counts.tolist() == [[64 - 6, 0, 0, 6], [64, 0, 0, 0]]
    assert [os.path.basename(p) for p in read] == ["volume_1_slice_0.h5"]


def test_interrupted_first_pass_keeps_the_statistics_it_saved(tmp_path, monkeypatch):
    """Without the csv the first pass reads every file (57,195 in the release); statistics
    are saved every `_SAVE_EVERY` slices, so after an interruption at the 4th of 5 files
    (saves every 2) the next source reads only the 3 slices not yet saved, and its table
    holds every slice's counts."""
    import os

    from brats_jax.data import kaggle

    for s in range(5):
        write_slice(tmp_path, 1, s, _label() if s == 3 else None)
    monkeypatch.setattr(kaggle, "_SAVE_EVERY", 2)
    read, real = [], kaggle.read_slice_file

    def interrupted(p):
        if len(read) == 3:
            raise KeyboardInterrupt
        read.append(p)
        return real(p)

    monkeypatch.setattr(kaggle, "read_slice_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _ = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats").table
    read.clear()
    monkeypatch.setattr(kaggle, "read_slice_file", lambda p: read.append(p) or real(p))
    table = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats").table
    assert [os.path.basename(p) for p in read] == [f"volume_1_slice_{s}.h5" for s in (2, 3, 4)]
    empty = [64, 0, 0, 0]
    assert table.class_counts.tolist() == [empty, empty, empty, [64 - 6, 1, 2, 3], empty]
    np.testing.assert_allclose(table.brain_fraction, np.full(5, 4 / 8))


def test_csv_rerooted_and_counts(tmp_path):
    lab = _label()
    write_slice(tmp_path, 1, 0)
    write_slice(tmp_path, 1, 1, lab)
    (tmp_path / "meta_data.csv").write_text(
        "slice_path,target,volume,slice,label0_pxl_cnt,label1_pxl_cnt,label2_pxl_cnt,background_ratio\n"
        "/content/data/volume_1_slice_1.h5,1,1,1,1,2,3,0.9\n"
        "/content/data/volume_1_slice_0.h5,0,1,0,0,0,0,1.0\n"
        "/content/data/volume_1_slice_7.h5,0,1,7,0,0,0,1.0\n"  # absent: skipped
    )
    src = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    assert src.has_csv and len(src) == 2
    assert src.table.class_counts.tolist() == [[64, 0, 0, 0], [58, 1, 2, 3]]
    assert np.isnan(src.table.brain_fraction).all()  # not in the csv: measured on demand
    src.fill_brain_fraction([0])
    assert src.table.brain_fraction[0] == pytest.approx(0.5) and np.isnan(
        src.table.brain_fraction[1]
    )
    np.testing.assert_array_equal(src[1]["label"], lab)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        KaggleH5Source(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DataError, match="no volume_"):
        KaggleH5Source(tmp_path / "empty")
    write_slice(tmp_path, 1, 0)
    write_slice(tmp_path, 1, 1)
    src = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    p = tmp_path / "volume_1_slice_1.h5"
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError, match=r"volume_1_slice_1\.h5.*truncated or corrupt"):
        src[1]
    with h5py.File(p, "w") as f:
        f["image"] = np.full((H, W, 4), np.nan)
        f["mask"] = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(DataError, match=r"volume_1_slice_1\.h5.*non-finite"):
        src[1]
    with h5py.File(p, "w") as f:
        f["image"] = np.zeros((H, W, 4))
    with pytest.raises(DataError, match=r"expected datasets 'image'"):
        src[1]


def test_bad_files_are_found_when_the_source_opens(tmp_path):
    for s in range(3):
        write_slice(tmp_path, 1, s)
    with h5py.File(tmp_path / "volume_1_slice_1.h5", "w") as f:
        f["image"] = np.zeros((H, W, 4))  # no mask
    (tmp_path / "volume_2_slice_0.h5").write_text("not HDF5")
    with pytest.raises(DataError) as e:
        KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    msg = str(e.value)
    assert msg.startswith(f"2 of 4 Kaggle slice files in {tmp_path} are not valid slices")
    assert "volume_1_slice_1.h5: expected datasets 'image' (H,W,4) and 'mask'" in msg
    assert "\n" not in msg
    (tmp_path / "volume_2_slice_0.h5").unlink()
    write_slice(tmp_path, 1, 1)
    with h5py.File(tmp_path / "volume_1_slice_2.h5", "w") as f:
        f["image"] = np.zeros((H, W, 4), np.int16)  # integer image
        f["mask"] = np.zeros((H, W, 3), np.uint8)
    with pytest.raises(DataError, match=r"volume_1_slice_2\.h5: 'image' has dtype int16"):
        KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    with h5py.File(tmp_path / "volume_1_slice_2.h5", "w") as f:
        f["image"] = np.zeros((H, W + 1, 4))
        f["mask"] = np.zeros((H, W + 1, 3), np.uint8)
    with pytest.raises(DataError, match="Kaggle slices differ in shape"):
        KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")


def test_checked_files_are_not_reopened_until_they_change(tmp_path, monkeypatch):
    from brats_jax.data import kaggle

    for s in range(3):
        write_slice(tmp_path, 1, s)
    opened = []
    real = kaggle.check_slice_file
    monkeypatch.setattr(kaggle, "check_slice_file", lambda p: opened.append(p) or real(p))
    assert KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats").image_shape == (H, W, 4)
    assert len(opened) == 3
    KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    assert len(opened) == 3  # remembered by size and modification time
    with h5py.File(tmp_path / "volume_1_slice_1.h5", "w") as f:
        f["mask"] = np.zeros((H, W, 3), np.uint8)  # rewritten without an image
    with pytest.raises(DataError, match=r"volume_1_slice_1\.h5: expected datasets"):
        KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    assert len(opened) == 4


@pytest.mark.parametrize(
    "value, match",
    [
        (
            (1, 1, 0),
            r"2 pixel\(s\) with more than one class set \(first at \(3, 4\): \[1, 1, 0\]\)",
        ),
        ((0.5, 0, 0), r"'mask' value 0.5 at \(3, 4, 0\); expected one-hot 0/1"),
    ],
)
def test_mask_that_is_not_one_hot_is_rejected_on_read(tmp_path, value, match):
    write_slice(tmp_path, 1, 0)
    src = KaggleH5Source(tmp_path, stats_dir=tmp_path / "stats")
    mask = np.zeros((H, W, 3), np.float32)
    mask[3, 4] = value
    mask[5, 6] = value
    with h5py.File(tmp_path / "volume_1_slice_0.h5", "r+") as f:
        del f["mask"]
        f["mask"] = mask
    with pytest.raises(DataError, match=r"volume_1_slice_0\.h5: ('mask' has )?" + match):
        src[0]
    mask[5, 6] = mask[3, 4] = (0, 0, 1)
    with h5py.File(tmp_path / "volume_1_slice_0.h5", "r+") as f:
        del f["mask"]
        f["mask"] = mask  # one-hot in float: fine
    assert src[0]["label"][3, 4] == 3
