"""`MetricWriter`: clu's `write_scalars` interface into `metrics.jsonl` and TensorBoard."""

import json
import math

from brats_jax.training.metric_writer import MetricWriter


def test_write_scalars_appends_jsonl_rows_with_null_for_non_finite(tmp_path):
    w = MetricWriter(tmp_path)
    w.write_scalars(2, {"train_loss": 0.5, "grad_norm": math.inf})
    w.write_texts(2, {"note": "hello"})
    w.flush()
    w.write_scalars(4, {"val_paper_dice": 0.25})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 2, "train_loss": 0.5, "grad_norm": None},
        {"step": 4, "val_paper_dice": 0.25},
    ]
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path, enabled=False)
    w.write_scalars(1, {"x": 1.0})
    w.flush()
    w.close()
    assert not any(tmp_path.iterdir())
