"""`MetricWriter`: clu's `write_scalars` interface into `metrics.jsonl` and TensorBoard."""

import json
import math

from brats_jax.training.metric_writer import MetricWriter


def _scalars(events):
    """(step, tag, value) of the scalar summaries among TensorBoard `Event` protos."""
    return [(e.step, v.tag, v.simple_value)
            for e in events for v in e.summary.value
            if v.WhichOneof("value") == "simple_value"]  # fmt: skip


def test_write_scalars_appends_jsonl_rows_with_null_for_non_finite(tmp_path, tensorboard_events):
    """The same scalars in both: metrics.jsonl rows (non-finite as null) and TensorBoard's
    event file read back (the value itself, inf included, at its tag and step; the text)."""
    w = MetricWriter(tmp_path)
    w.write_scalars(2, {"train_loss": 0.5, "grad_norm": math.inf})
    w.write_texts(2, {"note": "hello"})
    w.flush()
    w.write_scalars(4, {"val_paper_dice": 0.25, "train_loss": -1.75})
    w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 2, "train_loss": 0.5, "grad_norm": None},
        {"step": 4, "val_paper_dice": 0.25, "train_loss": -1.75},
    ]
    events = tensorboard_events(tmp_path / "tensorboard")
    assert _scalars(events) == [
        (2, "train_loss", 0.5),
        (2, "grad_norm", math.inf),
        (4, "val_paper_dice", 0.25),
        (4, "train_loss", -1.75),
    ]
    texts = [(e.step, v.tag, list(v.tensor.string_val))
             for e in events for v in e.summary.value if v.HasField("tensor")]  # fmt: skip
    assert texts == [(2, "note/text_summary", [b"hello"])]


def test_a_reopened_writer_appends_to_both(tmp_path, tensorboard_events):
    """A resumed run opens a second writer on the same folder: metrics.jsonl keeps the first
    rows and TensorBoard holds both writers' scalars (a second event file, even within the
    same second: tensorboardX's own name, the second and the host, would be reused and the
    first file truncated)."""
    for step, value in ((1, 2.0), (5, 3.5)):
        w = MetricWriter(tmp_path)
        w.write_scalars(step, {"train_loss": value})
        w.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "train_loss": 2.0}, {"step": 5, "train_loss": 3.5}]
    got = sorted(_scalars(tensorboard_events(tmp_path / "tensorboard")))
    assert got == [(1, "train_loss", 2.0), (5, "train_loss", 3.5)]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path, enabled=False)
    w.write_scalars(1, {"x": 1.0})
    w.flush()
    w.close()
    assert not any(tmp_path.iterdir())
