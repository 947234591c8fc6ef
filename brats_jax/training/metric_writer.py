"""Scalar logging: TensorBoard event files (tensorboardX, no TensorFlow) and `metrics.jsonl`.

`MetricWriter` has the interface of `clu.metric_writers.MetricWriter` (`write_scalars`,
`write_images`, `write_hparams`, ..., `flush`, `close`), so clu's writers can replace it;
clu's own writers need TensorFlow, which this project does not install.
"""

import json
import math
import pathlib
import uuid

import numpy as np


class MetricWriter:
    """Writes scalars to `workdir/tensorboard/` (one event file per writer) and appends them
    to `workdir/metrics.jsonl`.

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
            # tensorboardX names its file by the second and the host and opens it "wb": a
            # second writer on the folder within a second (a run resumed at once) would
            # truncate the first's events; a unique suffix keeps one file per writer
            suffix = f".{uuid.uuid4().hex[:8]}"
            self._tb = SummaryWriter(str(workdir / "tensorboard"), filename_suffix=suffix)
            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` (name -> number) at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            self._tb.add_scalar(name, value, int(step))
            row[name] = value if math.isfinite(value) else None
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def write_hparams(self, hparams: dict) -> None:
        """Hyperparameters: the run's `config.json` holds them; nothing more is written."""

    def write_texts(self, step: int, texts: dict[str, str]) -> None:
        """Text summaries to TensorBoard."""
        if self.enabled:
            for name, text in texts.items():
                self._tb.add_text(name, text, int(step))

    def write_images(self, step: int, images: dict) -> None:
        """Images to TensorBoard (name -> uint8 or [0, 1] float array, (H, W, C) or
        (N, H, W, C), C in {1, 3, 4}); `metrics.jsonl` holds scalars only and skips them."""
        if self.enabled:
            for name, image in images.items():
                image = np.asarray(image)
                if image.ndim == 4:
                    self._tb.add_images(name, image, int(step), dataformats="NHWC")
                else:
                    self._tb.add_image(name, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        """Push buffered values to disk."""
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False
