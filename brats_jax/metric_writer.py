"""Scalar logging: TensorBoard event files (tensorboardX, no TensorFlow) and `metrics.jsonl`."""

import json
import math
import pathlib


class MetricWriter:
    """Writes scalars to `workdir/tensorboard/` and appends them to `workdir/metrics.jsonl`.

    Each JSONL line is `{"step": int, name: float, ...}`; non-finite values become null.
    A disabled writer (non-zero hosts) writes nothing.
    """

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            workdir = pathlib.Path(workdir)
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            self._tb.add_scalar(name, value, int(step))
            row[name] = value if math.isfinite(value) else None
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False
