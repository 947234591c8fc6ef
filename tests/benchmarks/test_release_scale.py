"""benchmarks.release_scale's Kaggle layout: links to the nearest sample slice, and a csv."""

import os

import h5py
import numpy as np

from benchmarks.release_scale import kaggle_layout
from brats_jax.data import KaggleH5Source

COLUMNS = (
    "slice_path,target,volume,slice,label0_pxl_cnt,label1_pxl_cnt,label2_pxl_cnt,background_ratio"
)


def test_kaggle_layout_links_every_slice_to_the_nearest_sample_slice(tmp_path):
    """A 3-slice sample (slices 0, 40, 100 of volume 7) laid out as 2 volumes x 155 slices:
    slice s links to the nearest of 0, 40, 100 (ties to the lower: 20 -> 0, 70 -> 40), and
    the csv row of each link carries that slice's counts under its own volume and slice."""
    sample = tmp_path / "sample"
    sample.mkdir()
    rows = [COLUMNS]
    for s, counts in ((0, (0, 0, 0)), (40, (1, 2, 3)), (100, (4, 5, 0))):
        with h5py.File(sample / f"volume_7_slice_{s}.h5", "w") as f:
            f["image"] = np.full((4, 4, 4), float(s))
            f["mask"] = np.zeros((4, 4, 3), np.uint8)
        rows.append(f"/content/data/volume_7_slice_{s}.h5,1,7,{s},{','.join(map(str, counts))},0.5")
    (sample / "meta_data.csv").write_text("\n".join(rows) + "\n")
    data = tmp_path / "release" / "content" / "data"
    assert kaggle_layout(sample, data, 2) == 2 * 155
    nearest = {0: 0, 20: 0, 21: 40, 70: 40, 71: 100, 154: 100}
    for v in (1, 2):
        for s, target in nearest.items():
            link = os.readlink(data / f"volume_{v}_slice_{s}.h5")
            assert link == str((sample / f"volume_7_slice_{target}.h5").resolve())
    src = KaggleH5Source(tmp_path / "release", stats_dir=tmp_path / "stats")
    assert len(src) == 310 and src.has_csv
    t = src.table
    expected = ((2, 50, [16 - 6, 1, 2, 3]), (1, 120, [16 - 9, 4, 5, 0]), (2, 3, [16, 0, 0, 0]))
    for v, s, counts in expected:
        (i,) = np.nonzero((t.case_id == f"volume_{v}") & (t.slice_index == s))[0]
        assert t.class_counts[i].tolist() == counts
