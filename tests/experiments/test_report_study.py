"""experiments.report: the study's metric beside its two other readings, the mean effective
class weights of class-balanced cells, and repeats of a cell with other seeds."""

import json
import pathlib

import pytest

from experiments import report, sweeps


def _write_run(root: pathlib.Path, name, loss, seed, dice, weights, train_losses, beta=None):
    """A finished run folder as experiments.run + train_and_evaluate leave it."""
    wd = root / name
    wd.mkdir(parents=True)
    row = next(s.label for s in sweeps.LOSS_SETTINGS if s.loss == loss and s.beta == beta)
    info = {"name": name, "model": "unet", "scale": "smoke",
            "placements": {"table1": {"row": row, "col": "LR 1e-4", "study": None}}}  # fmt: skip
    (wd / "run.json").write_text(json.dumps(info))
    train = {"loss": loss, "seed": seed, "beta": beta or 0.99, "class_counts": "batch_pixels"}
    (wd / "config.json").write_text(json.dumps({"train": train, "data": {"image_size": 64}}))
    res = {"paper_dice": dice, "paper_dice_absent_excluded": dice - 0.2,
           "pooled_dice_4class": dice - 0.1, "dice": {"WT": dice - 0.3}, "steps": 4}  # fmt: skip
    (wd / "results.json").write_text(json.dumps(res))
    with open(wd / "metrics.jsonl", "w") as f:
        for step, (w, loss_value) in enumerate(zip(weights, train_losses, strict=True), 1):
            row = {"step": step, "train_loss": loss_value}
            row.update({f"class_weight_{c}": v for c, v in enumerate(w)})
            f.write(json.dumps(row) + "\n")


def test_report_shows_readings_weights_and_seed_repeats(tmp_path):
    ones = [[1.0, 1.0, 1.0, 1.0]] * 2
    _write_run(tmp_path, "unet-ce-lr1e-4", "ce", 0, 0.80, ones, [0.4, 0.2])
    _write_run(tmp_path, "unet-ce-lr1e-4-seed1", "ce", 1, 0.70, ones, [0.5, 0.3])
    _write_run(tmp_path, "unet-ce-lr1e-4-seed2", "ce", 2, 0.75, ones, [0.5, 0.3])
    # class ET absent from every batch of the second interval: logged null, skipped
    cb_w = [[0.5, 1.0, 1.5, 1.0], [0.7, 1.2, 1.1, None]]
    _write_run(tmp_path, "unet-cb_ce-b0.99-lr1e-4", "cb_ce", 0, 0.60, cb_w, [0.6, 0.4], 0.99)
    report.make_report(tmp_path)
    md = (tmp_path / "report" / "report.md").read_text()
    lines = md.splitlines()
    # the table cell shows the run named as the cell (seed 0), not a repeat
    ce_row = next(line for line in lines if line.startswith("| Unweighted CE | 0.8000"))
    assert ce_row
    # repeats: n = 3, seeds 0,1,2, mean 0.75 +- std 0.05 (ddof 1)
    rep = next(line for line in lines if line.startswith("| Unweighted CE | LR 1e-4 | 3 |"))
    assert "0,1,2" in rep and "0.7500 ± 0.0500" in rep
    # the study's metric next to the two other readings
    read = next(line for line in lines if line.startswith("| CE, beta=0.99 | LR 1e-4 | 0.6000"))
    assert "| 0.4000 | 0.5000 |" in read
    # mean effective weights: (0.5 + 0.7) / 2 = 0.6, 1.1, 1.3, ET 1.0 (null skipped);
    # mean train loss 0.5 vs the unweighted twin's 0.3, test Dice 0.6 vs 0.8
    cw = next(line for line in lines if line.startswith("| CE, beta=0.99 | LR 1e-4 | batch_"))
    assert "| 0.600 | 1.100 | 1.300 | 1.000 |" in cw
    assert "0.5000 / 0.3000" in cw and "0.6000 / 0.8000" in cw
    assert "64 px" in md


def test_mean_class_weights_without_logged_weights(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n')
    assert report.mean_class_weights(tmp_path / "metrics.jsonl") == [None] * 4
    assert report.mean_class_weights(tmp_path / "missing.jsonl") == [None] * 4


@pytest.mark.parametrize("key", list(report.READINGS))
def test_metric_reads_the_readings(tmp_path, key):
    r = report.RunRecord("x", tmp_path, {}, {key: 0.5}, {}, False)
    assert r.metric(key) == 0.5
