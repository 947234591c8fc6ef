"""experiments/analyses/failure_factors.py: a case's size and oedema contrast, the scores it
reads."""

import json

import numpy as np
import pytest

from experiments.analyses import failure_factors as F


def test_case_factors_by_hand():
    label = np.zeros((6, 6, 4), np.int32)
    label[0:2, 0:2, 0] = 2  # 4 oedema voxels
    label[3, 3, 1:3] = 1  # 2 necrosis voxels
    label[4, 4, 3] = 3  # 1 enhancing voxel
    image = np.zeros((6, 6, 4, 4), np.float32)
    image[..., 0] = 5.0  # FLAIR 5 everywhere but in the oedema
    image[0:2, 0:2, 0, 0] = [[1.0, 2.0], [3.0, 4.0]]  # FLAIR oedema mean 2.5
    image[0:2, 0:2, 0, 3] = -1.0  # T2 oedema mean -1
    image[3, 3, 1:3, 3] = 9.0  # T2 of the core: not oedema
    affine = np.diag([1.0, 1.0, 2.5, 1.0])  # 2.5 mm3 voxels
    f = F.case_factors(image, label, affine)
    assert f["wt_cm3"] == pytest.approx(7 * 2.5 / 1000)
    assert f["oedema_flair"] == pytest.approx(2.5)
    assert f["oedema_t2"] == pytest.approx(-1.0)
    assert f["oedema_t1"] == 0.0 and f["oedema_t1ce"] == 0.0
    assert np.isnan(F.case_factors(image, np.where(label == 2, 0, label), affine)["oedema_flair"])


def test_oedema_contrast_in_interquartile_ranges_of_the_normal_brain_by_hand():
    label = np.zeros((4, 3, 1), np.int32)
    label[0, :, 0] = 2  # oedema: FLAIR 6, 7, 11 (median 7, mean 8)
    label[1, 0, 0] = 3  # enhancing: neither oedema nor normal brain
    brain = np.ones_like(label, bool)
    brain[3, :, 0] = False  # background
    image = np.zeros((4, 3, 1, 4), np.float32)
    image[..., 0, 0] = [[6.0, 7.0, 11.0], [100.0, 0.0, 1.0], [2.0, 3.0, 4.0], [-9.0, -9.0, -9.0]]
    # normal brain FLAIR 0, 1, 2, 3, 4: median 2, quartiles 1 and 3 -> (7 - 2) / 2
    f = F.case_factors(image, label, np.eye(4), brain)
    assert f["iqr_flair"] == pytest.approx(2.5)
    scaled = F.case_factors(3.0 * image - 7.0, label, np.eye(4), brain)  # another z-scoring
    assert scaled["iqr_flair"] == pytest.approx(2.5)
    assert np.isnan(f["iqr_t2"])  # a constant modality has no spread
    assert "iqr_flair" not in F.case_factors(image, label, np.eye(4))


def test_read_wt_dice_from_a_csv_and_from_the_rule_row_of_a_record(tmp_path):
    csv_path = tmp_path / "per_case.csv"
    csv_path.write_text("case_id,dice_TC,dice_WT\na,0.1,0.8\nb,0.2,0.55\n")
    assert F.read_wt_dice(str(csv_path)) == {"a": 0.8, "b": 0.55}
    row = lambda v, tta, pp, d: dict(
        variant=v, tta=tta, pp=pp, per_case=[dict(case_id="a", dice_WT=d)]
    )
    rows = [row("x", "none", "largest", 0.3), row("x", "none", "none", 0.1)]
    rows += [row("x", "flips", "largest", 0.2), row("y", "none", "largest", 0.4)]
    (tmp_path / "r.json").write_text(json.dumps(dict(rows=rows)))
    assert F.read_wt_dice(str(tmp_path / "r.json"), "x") == {"a": 0.3}
    with pytest.raises(SystemExit, match="no row 'z'"):
        F.read_wt_dice(str(tmp_path / "r.json"), "z")
    (tmp_path / "bad.csv").write_text("case,dice\n")
    with pytest.raises(SystemExit, match="bad.csv: expected a CSV with case_id and dice_WT"):
        F.read_wt_dice(str(tmp_path / "bad.csv"))
