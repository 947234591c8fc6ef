"""experiments/analyses/region_thresholds: out-of-fold scores of region probabilities per
threshold."""

import json
import types

import numpy as np
import pytest

from brats_jax.data import brats
from brats_jax.inference import ensembles
from experiments.analyses import region_thresholds as R


def _case():
    """A 12-voxel oedema (label 2) whose WT probability is 0.9 on 6 voxels, 0.35 on 4 and 0.05
    on 2; 2 background voxels beside it at 0.4; a far 1-voxel island at 0.9; TC, ET 0."""
    label = np.zeros((12, 12, 6), np.uint8)
    label[2:4, 2:5, 2:4] = 2
    probs = np.zeros((12, 12, 6, 3), np.float32)
    probs[2, 2:5, 2:4, 0] = 0.9
    probs[3, 2:4, 2:4, 0] = 0.35
    probs[3, 4, 2:4, 0] = 0.05
    probs[4, 2, 2:4, 0] = 0.4  # false positives touching the 0.35 voxels
    probs[10, 10, 5, 0] = 0.9  # an island: the largest-component rule removes it
    return probs, label


def test_scores_by_threshold_by_hand():
    probs, label = _case()
    scores = R.scores_by_threshold(probs, label, (1.0, 1.0, 1.0), [0.3, 0.5])
    # t = 0.5: the 6 voxels at 0.9 (island removed): 2 * 6 / (6 + 12)
    assert scores[0.5]["dice_WT"] == pytest.approx(2 * 6 / 18)
    # t = 0.3: 10 tumour voxels + 2 false positives: 2 * 10 / (12 + 12)
    assert scores[0.3]["dice_WT"] == pytest.approx(2 * 10 / 24)
    assert scores[0.3]["dice_TC"] == scores[0.3]["dice_ET"] == 1.0  # absent from both


def test_missed_whole_tumour_by_hand():
    probs, label = _case()
    # at 0.5, 6 of 12 tumour voxels are missed; 2 of those 6 have p <= 0.1
    assert R.missed_whole_tumour(probs[..., 0], label) == pytest.approx((0.5, 2 / 6))
    assert R.missed_whole_tumour(probs[..., 0], label, threshold=0.01) == (0.0, 0.0)
    missed, unseen = R.missed_whole_tumour(probs[..., 0], np.zeros_like(label))
    assert np.isnan(missed) and unseen == 0.0


def _fold_ablation(tmp_path, monkeypatch, output="regions"):
    """An ablation folder of 2 folds (case a, case b) whose fold runs are stand-ins: fold 0's
    run gives `_case`'s probabilities, fold 1's the ground truth's (Dice 1)."""
    (tmp_path / "folds.json").write_text(json.dumps({"folds": [["a"], ["b"]]}))
    probs, label = _case()
    exact = np.zeros_like(probs)
    exact[..., 0] = label > 0
    runs = {"fold0": probs, "fold1": exact}
    config = types.SimpleNamespace(
        model=types.SimpleNamespace(output=output), data=types.SimpleNamespace(source="nifti")
    )

    def load_ensemble(workdir, **_):
        return types.SimpleNamespace(config=config, probs=runs[workdir.rsplit("-", 1)[1]])

    monkeypatch.setattr(ensembles, "load_ensemble", load_ensemble)
    monkeypatch.setattr(ensembles, "predict_probabilities", lambda ens, image: ens.probs)
    monkeypatch.setattr(brats, "find_cases", lambda root: [types.SimpleNamespace(case_id=c)
                                                             for c in "ab"])  # fmt: skip
    monkeypatch.setattr(R, "load_scored_case", lambda case, source: (None, label, (1, 1, 1)))
    return ["--ablation", str(tmp_path), "--data_root", "x", "--variant", "context_regions"]


def test_main_scores_each_case_with_its_folds_run(tmp_path, monkeypatch, capsys):
    argv = _fold_ablation(tmp_path, monkeypatch)
    assert R.main(argv + ["--thresholds=0.3,0.5"]) == 0
    out = capsys.readouterr().out
    assert (
        "fold 0 a WT Dice 0.3: 0.833 0.5: 0.667; missed at 0.5 0.50, of which p <= 0.1 0.33" in out
    )
    assert "fold 1 b WT Dice 0.3: 1.000 0.5: 1.000; missed at 0.5 0.00" in out
    # means over the two cases: WT (0.833 + 1) / 2, (0.667 + 1) / 2; TC and ET 1; 1 case < 0.75
    assert "| 0.3 | 0.917 | 1.000 | 1.000 | 0.972 |" in out
    assert "| 0.5 | 0.833 | 1.000 | 1.000 | 0.944 |" in out and out.rstrip().endswith("| 1 |")


def test_main_refuses_a_run_with_class_outputs(tmp_path, monkeypatch):
    argv = _fold_ablation(tmp_path, monkeypatch, output="classes")
    with pytest.raises(SystemExit, match="model.output is 'classes'; expected 'regions'"):
        R.main(argv)


def test_main_names_the_folds_cases_missing_from_the_data(tmp_path, monkeypatch):
    argv = _fold_ablation(tmp_path, monkeypatch)
    monkeypatch.setattr(brats, "find_cases", lambda root: [types.SimpleNamespace(case_id="a")])
    with pytest.raises(SystemExit, match=r"--data_root=x lacks the folds' cases \['b'\]"):
        R.main(argv)
