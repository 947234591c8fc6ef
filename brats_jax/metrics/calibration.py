"""Calibration of voxel probabilities: expected calibration error (ECE), the reliability
diagram's numbers, and temperature scaling fitted by negative log-likelihood (numpy / scipy,
host only).

Conventions (the issue left them open; chosen here):

* **Per channel, one-vs-rest** (the "classwise" ECE of Kull et al. 2019): for
  ``model.output=classes`` each of the 4 softmax channels against "the voxel is that class";
  for ``regions`` each sigmoid (WT, TC, ET) against "the voxel is in that region". Within a
  channel the probability p of the positive event is binned, and a bin's *frequency* is the
  share of its voxels that are positive (the reliability diagram's "accuracy").
* **Equal-width bins**, :data:`NUM_BINS` = 15 as in Guo et al. 2017, left-closed
  ``[k/15, (k+1)/15)``, the last one closed (p = 1 falls in it).
  ``ECE = sum_b n_b / N * |frequency_b - mean p_b|`` over the bins of a channel.
* **Brain voxels only** (any input modality non-zero): ~85% of a BraTS volume is the zero
  background outside the head, predicted "background, p = 1" and right, which would drive
  every all-voxel ECE towards 0 and say nothing about the brain.
* Sums are accumulated per case (:class:`ReliabilityBins`), never all cases' voxels at once.

Temperature scaling (Guo et al. 2017): probabilities ``softmax(z / T)`` with one T for the
class output (the argmax, hence the labels, cannot change), or ``sigmoid(z / T_r)`` with one
T per region for the region output (three independent binary classifiers of very different
prevalence; ``z / T_r > 0`` exactly when ``z > 0``, so each region's 0.5 threshold is kept).
:func:`fit_temperature` minimises the mean NLL over log T with a bounded 1-D search.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize, special

from brats_jax.labels import CLASS_NAMES, REGIONS
from brats_jax.models import outputs

NUM_BINS = 15
VOXELS = "brain (any input modality non-zero)"
"""Which voxels the ECE counts (the records say so)."""
T_BOUNDS = (0.05, 20.0)
"""Search range of a fitted temperature."""


def channel_names(output: str) -> tuple[str, ...]:
    """The channels of an output kind: the 4 class names, or WT, TC, ET."""
    if outputs.check_output(output) == "regions":
        return tuple(REGIONS)
    return tuple(CLASS_NAMES)


def channel_targets(label: np.ndarray, output: str) -> np.ndarray:
    """bool (..., C): the one-vs-rest events of each channel for training labels (...) in
    {0..3}: one-hot classes, or the WT, TC, ET masks (`labels.REGIONS`)."""
    label = np.asarray(label)
    if outputs.check_output(output) == "regions":
        return np.stack([np.isin(label, c) for c in REGIONS.values()], axis=-1)
    return label[..., None] == np.arange(len(CLASS_NAMES))


def brain_of_normalised(image: np.ndarray) -> np.ndarray:
    """bool (H, W, D): voxels of a normalised (H, W, D, M) volume that differ, in any
    modality, from their slice's corner voxel (0, 0). BraTS volumes are skull-stripped: raw 0
    outside the head becomes one constant per modality (per slice for slice-wise z-scores),
    the corner's value."""
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"expected a normalised volume (H, W, D, M), got shape {image.shape}")
    return np.any(image != image[:1, :1], axis=-1)


def bin_index(probs: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """int (...) bin of each probability: floor(p * num_bins), p = 1 in the last bin;
    values are clipped to [0, 1] first."""
    p = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    return np.minimum((p * num_bins).astype(np.int64), num_bins - 1)


@dataclasses.dataclass
class ReliabilityBins:
    """Per channel and bin: voxel count, sum of p, and count of positive voxels (C, B)."""

    names: tuple[str, ...]
    count: np.ndarray
    confidence_sum: np.ndarray
    positive_sum: np.ndarray

    @classmethod
    def empty(cls, names, num_bins: int = NUM_BINS) -> ReliabilityBins:
        """No voxels yet, for channels `names` and `num_bins` equal-width bins."""
        shape = (len(names), int(num_bins))
        return cls(tuple(names), np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape))

    @property
    def num_bins(self) -> int:
        """Bins per channel."""
        return self.count.shape[1]

    def add(self, probs, targets, mask=None) -> ReliabilityBins:
        """Count probabilities (..., C) against bool targets (..., C) (`channel_targets`),
        at the voxels where `mask` (...) is True (all when None). Returns self."""
        probs, targets = np.asarray(probs), np.asarray(targets, bool)
        c = len(self.names)
        if probs.shape != targets.shape or probs.shape[-1] != c:
            raise ValueError(
                f"probabilities {probs.shape} and targets {targets.shape}: expected the same "
                f"shape (..., {c}) for channels {', '.join(self.names)}"
            )
        if mask is not None:
            probs, targets = probs[np.asarray(mask, bool)], targets[np.asarray(mask, bool)]
        probs, targets = probs.reshape(-1, c), targets.reshape(-1, c)
        b = self.num_bins
        flat = (bin_index(probs, b) + b * np.arange(c)).ravel()
        size = c * b
        self.count += np.bincount(flat, minlength=size).reshape(c, b)
        p = np.clip(probs.astype(np.float64), 0.0, 1.0).ravel()
        self.confidence_sum += np.bincount(flat, weights=p, minlength=size).reshape(c, b)
        self.positive_sum += np.bincount(flat, weights=targets.ravel(), minlength=size).reshape(
            c, b
        )
        return self

    def merge(self, other: ReliabilityBins) -> ReliabilityBins:
        """The sums of both (same channels and bins)."""
        if other.names != self.names or other.num_bins != self.num_bins:
            raise ValueError("reliability bins of different channels or bin counts")
        return ReliabilityBins(
            self.names,
            self.count + other.count,
            self.confidence_sum + other.confidence_sum,
            self.positive_sum + other.positive_sum,
        )

    def mean_confidence(self) -> np.ndarray:
        """(C, B) mean p per bin (NaN for an empty bin)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.confidence_sum / self.count

    def frequency(self) -> np.ndarray:
        """(C, B) share of positive voxels per bin (NaN for an empty bin)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.positive_sum / self.count

    def ece(self) -> np.ndarray:
        """(C,) expected calibration error per channel, sum_b n_b / N |freq_b - conf_b|
        (NaN for a channel without voxels)."""
        gap = np.abs(self.positive_sum - self.confidence_sum)  # n_b |freq_b - conf_b|
        total = self.count.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return gap.sum(axis=1) / total

    def to_dict(self) -> dict:
        """JSON-ready: bins, voxels counted, ECE per channel and each channel's bins."""
        conf, freq, ece = self.mean_confidence(), self.frequency(), self.ece()
        nan_none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
        return {
            "num_bins": self.num_bins,
            "voxels": VOXELS,
            "num_voxels": int(self.count[0].sum()),
            "ece": {n: nan_none([e])[0] for n, e in zip(self.names, ece, strict=True)},
            "bins": {
                n: {"count": self.count[i].tolist(), "confidence": nan_none(conf[i]),
                    "frequency": nan_none(freq[i])}
                for i, n in enumerate(self.names)
            },
        }  # fmt: skip


def scaled_probabilities(logits, temperature, output: str) -> np.ndarray:
    """float64 (..., C) probabilities of logits (..., C) divided by `temperature` (a scalar
    or one per channel): softmax for classes, sigmoid per region."""
    z = np.asarray(logits, np.float64) / np.asarray(temperature, np.float64)
    if outputs.check_output(output) == "regions":
        return special.expit(z)
    return special.softmax(z, axis=-1)


def nll(logits, targets, temperature, output: str) -> np.ndarray:
    """Mean negative log-likelihood (nats) of bool targets (N, C) under logits (N, C) / T:
    classes: one value (), -log softmax of the true class; regions: (C,), one per region,
    the binary NLL log(1 + e^x) - y x with x = z / T."""
    z = np.asarray(logits, np.float64) / np.asarray(temperature, np.float64)
    y = np.asarray(targets, bool)
    if outputs.check_output(output) == "regions":
        return np.mean(np.logaddexp(0.0, z) - y * z, axis=0)
    logp = special.log_softmax(z, axis=-1)
    return np.asarray(-np.mean(logp[y]))


def _fit_one(loss) -> float:
    """argmin over T in T_BOUNDS of loss(T), searched over log T."""
    lo, hi = np.log(T_BOUNDS)
    res = optimize.minimize_scalar(
        lambda s: float(loss(np.exp(s))), bounds=(lo, hi), method="bounded",
        options={"xatol": 1e-4},
    )  # fmt: skip
    return float(np.exp(res.x))


def fit_temperature(logits, targets, output: str) -> np.ndarray:
    """Temperatures (C,) minimising the mean NLL (:func:`nll`) of bool targets (N, C)
    (`channel_targets`) under logits (N, C): one shared T for classes (all C values equal),
    one per region for regions. ValueError without voxels, or for classes when a voxel's
    targets are not one-hot."""
    z, y = np.asarray(logits, np.float64), np.asarray(targets, bool)
    if z.ndim != 2 or z.shape != y.shape or not len(z):
        raise ValueError(f"logits {z.shape} and targets {y.shape}: expected the same (N, C), N > 0")
    if outputs.check_output(output) == "regions":
        return np.array(
            [_fit_one(lambda t, c=c: nll(z[:, c : c + 1], y[:, c : c + 1], t, output)[0])
             for c in range(z.shape[1])]
        )  # fmt: skip
    if not np.all(y.sum(axis=1) == 1):
        raise ValueError("class targets must be one-hot: exactly one class per voxel")
    t = _fit_one(lambda t: nll(z, y, t, output))
    return np.full(z.shape[1], t)
