"""A run's temperature-scaling file, `calibration.json` (written by `python -m
brats_jax.calibrate`, `inference.temperature.fit_run`): `save` it atomically, `load` its
temperatures for `predict` (`ensembles.load_ensemble`).

Its `temperature` is one number for `model.output=classes` (one T for the softmax) or
{"WT": T, "TC": T, "ET": T} for `regions` (one per sigmoid); `output` names the kind; the
other fields record the fit (cases, voxels, NLL and ECE before / after, date).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from brats_jax import fileio
from brats_jax.metrics import calibration as cal

CALIBRATION_FILE = "calibration.json"


def path_of(workdir) -> pathlib.Path:
    """The calibration file of a run folder."""
    return pathlib.Path(workdir) / CALIBRATION_FILE


def by_channel(values: np.ndarray, output: str):
    """JSON form of per-channel values: one number for classes (they share one T), else
    {region: value}."""
    if output == "classes":
        return float(values[0])
    return {n: float(v) for n, v in zip(cal.channel_names(output), values, strict=True)}


def load(workdir, output: str) -> np.ndarray | None:
    """The run's temperatures (C,) float32 for `output` ("classes": one T repeated, "regions":
    WT, TC, ET), or None when it has no calibration file. A file that does not parse, is of
    another output kind or holds a temperature that is not a positive finite number is a
    one-line ValueError naming the file."""
    path = path_of(workdir)
    if not path.is_file():
        return None
    names = cal.channel_names(output)
    try:
        record = json.loads(path.read_text())
        t = record["temperature"]
        kind = record.get("output", output)
        if kind != output:
            raise ValueError(f"fitted for model.output={kind!r}, the run's is {output!r}")
        if output == "classes":
            values = [t] * len(names)
        elif isinstance(t, dict) and set(t) == set(names):
            values = [t[n] for n in names]
        else:
            raise ValueError(f"'temperature' {t!r}: expected {{{', '.join(names)}: T}}")
        if not all(_positive_number(v) for v in values):
            raise ValueError(f"'temperature' {t!r}: expected positive finite numbers")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ValueError(
            f"{path}: {what}; fix or delete it (python -m brats_jax.calibrate writes it)"
        ) from None
    return np.asarray(values, np.float32)


def _positive_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def save(workdir, record: dict) -> pathlib.Path:
    """Write `record` (`fit_run`'s) to the run's calibration file atomically."""
    path = path_of(workdir)
    fileio.write_json(path, record)
    return path
