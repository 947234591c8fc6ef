"""3D post-processing of predicted label volumes and its tuning.

Label volumes use the training classes {0 background, 1 NCR, 2 ED, 3 ET}. Steps, each off
by default (a `PostprocessConfig()` changes nothing):

1. Connected components of the whole tumour (labels > 0, 6- or 26-connectivity,
   `scipy.ndimage.label`): keep only the largest (`largest_component_only`) or drop every
   component with fewer than `min_component_voxels` voxels. Dropped voxels become background.
2. The BraTS practice for cases without enhancing tumour: when the predicted ET volume (after
   step 1) has fewer than `et_min_voxels` voxels, its voxels are relabelled NCR (TC unchanged).

`tune_postprocessing` picks the steps on tuning cases (nnU-Net style); the choice is stored
as JSON in a run folder (`POSTPROCESSING_FILE`) by `python -m brats_jax.tune_postprocessing`,
and `predict` applies it; a run config's `postprocess` fields give it too (`from_config`).
Region outputs are decoded to class maps before any of this (`outputs.regions_to_labels`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from brats_jax import fileio, metrics

POSTPROCESSING_FILE = "postprocessing.json"
"""Name of the tuned choice inside a run folder."""

CONNECTIVITIES = (6, 26)
NCR, ET = 1, 3


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing thresholds; the defaults (None / False) change nothing.

    min_component_voxels: whole-tumour components with fewer voxels are removed (None: off).
    largest_component_only: keep only the largest whole-tumour component (overrides
      `min_component_voxels`).
    connectivity: 6 (faces) or 26 (faces, edges and corners) for the components.
    et_min_voxels: ET is relabelled NCR when the volume has fewer ET voxels (None: off).
    """

    min_component_voxels: int | None = None
    largest_component_only: bool = False
    connectivity: int = 26
    et_min_voxels: int | None = None

    def __post_init__(self):
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(f"connectivity {self.connectivity!r}: expected 6 or 26")
        for name in ("min_component_voxels", "et_min_voxels"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} {v!r}: expected a positive whole number of voxels")
        if not isinstance(self.largest_component_only, bool):
            raise ValueError(
                f"largest_component_only {self.largest_component_only!r}: expected true/false"
            )

    @property
    def is_identity(self) -> bool:
        """True when `apply` returns its input unchanged."""
        comp = self.largest_component_only or self.min_component_voxels is not None
        return not comp and self.et_min_voxels is None

    def effective(self) -> PostprocessConfig:
        """The same post-processing with the fields that change nothing reset to their
        defaults (`min_component_voxels` under `largest_component_only`; `connectivity`
        with no component step), so configs that act alike compare equal."""
        comp = self.largest_component_only or self.min_component_voxels is not None
        return dataclasses.replace(
            self,
            min_component_voxels=None if self.largest_component_only else self.min_component_voxels,
            connectivity=self.connectivity if comp else 26,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "post-processing config") -> PostprocessConfig:
        """From `to_dict`'s output; unknown keys raise ValueError naming `where`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object of thresholds, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"{where}: unknown field(s) {unknown}; expected {sorted(known)}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def from_config(config) -> PostprocessConfig:
    """The `PostprocessConfig` of a run config's `postprocess` fields (0 = off); a config
    without them (runs older than the fields) gets the identity. ValueError names the field."""
    pp = config.get("postprocess")
    if pp is None:
        return PostprocessConfig()
    d = pp.to_dict() if hasattr(pp, "to_dict") else dict(pp)
    for name in ("min_component_voxels", "et_min_voxels"):
        d[name] = d.get(name) or None
    return PostprocessConfig.from_dict(d, where="config postprocess")


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity {connectivity!r}: expected 6 or 26")
    return ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)


def filter_components(
    labels: np.ndarray,
    *,
    min_voxels: int | None = None,
    largest_only: bool = False,
    connectivity: int = 26,
) -> np.ndarray:
    """Whole-tumour components removed from an (H, W, D) class map (a copy; removed -> 0).

    `largest_only` keeps the largest component (ties: the first in scan order); otherwise
    components with fewer than `min_voxels` voxels are removed (all of them when every
    component is that small). With neither, the map is returned unchanged (a copy).
    """
    labels = np.array(labels, copy=True)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label volume (H, W, D), got shape {labels.shape}")
    if not largest_only and min_voxels is None:
        return labels
    components, sizes = label_components(labels, connectivity)
    labels[~_kept(sizes, min_voxels, largest_only)[components]] = 0
    return labels


def label_components(labels: np.ndarray, connectivity: int = 26):
    """`(components int32 (H, W, D), sizes (n + 1,))` of the whole tumour (labels > 0);
    component 0 is the background, its size set to 0."""
    components, n = ndimage.label(labels > 0, structure=_structure(connectivity))
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    return components, sizes


def _kept(sizes: np.ndarray, min_voxels: int | None, largest_only: bool) -> np.ndarray:
    """Per component id: kept? (background, id 0, is never 'kept')."""
    keep = np.zeros(len(sizes), bool)
    if len(sizes) == 1:
        return keep
    if largest_only:
        keep[int(np.argmax(sizes))] = True
    else:
        keep[1:] = sizes[1:] >= min_voxels
    return keep


def relabel_small_et(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """ET (3) voxels relabelled NCR (1) when there are fewer than `min_voxels` (a copy)."""
    labels = np.array(labels, copy=True)
    et = labels == ET
    if 0 < int(et.sum()) < min_voxels:
        labels[et] = NCR
    return labels


def apply(labels: np.ndarray, config: PostprocessConfig) -> np.ndarray:
    """`config`'s steps on an (H, W, D) class map {0..3}: components first, then ET relabelling."""
    out = np.asarray(labels)
    if config.largest_component_only or config.min_component_voxels is not None:
        out = filter_components(
            out,
            min_voxels=config.min_component_voxels,
            largest_only=config.largest_component_only,
            connectivity=config.connectivity,
        )
    if config.et_min_voxels is not None:
        out = relabel_small_et(out, config.et_min_voxels)
    return out


def save(path: str | os.PathLike, config: PostprocessConfig, tuning: dict | None = None) -> None:
    """Write `{"postprocessing": config, "tuning": tuning}` as JSON, atomically."""
    fileio.write_json(path, {"postprocessing": config.to_dict(), "tuning": tuning or {}})


def load(path: str | os.PathLike) -> PostprocessConfig:
    """Read the config written by `save` (FileNotFoundError / ValueError naming the file)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"post-processing file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "postprocessing" not in d:
        raise ValueError(f"{path}: expected a JSON object with a 'postprocessing' entry")
    return PostprocessConfig.from_dict(d["postprocessing"], where=str(path))


# --------------------------------------------------------------------------------------------
# Tuning (nnU-Net style)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TuningCandidates:
    """Thresholds `tune_postprocessing` tries (voxel counts; 1 mm^3 voxels in BraTS)."""

    min_component_voxels: tuple[int, ...] = (50, 100, 250, 500, 1000, 2500, 5000)
    largest_component: bool = True
    connectivities: tuple[int, ...] = (26, 6)
    et_min_voxels: tuple[int, ...] = (50, 100, 200, 300, 500, 750, 1000)


@dataclasses.dataclass(frozen=True)
class Tuned:
    """`tune_postprocessing`'s answer: the chosen config, the objective without and with it,
    and every trial as (config dict, objective) in the order tried."""

    config: PostprocessConfig
    score_before: float
    score_after: float
    trials: tuple[tuple[dict, float], ...]


def mean_region_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean of the WT, TC and ET Dice of one volume (class maps {0..3}; both empty -> 1)."""
    dice = []
    for tp, fp, fn, _ in metrics.region_confusion(pred, target).values():
        dice.append(2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(dice))


def _objective(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    return float(np.mean([mean_region_dice(p, g) for p, g in zip(preds, gts, strict=True)]))


def _component_options(c: TuningCandidates) -> list[PostprocessConfig]:
    """Least aggressive first: size thresholds ascending, then the largest component only."""
    out = []
    for conn in c.connectivities:
        out += [PostprocessConfig(min_component_voxels=int(v), connectivity=conn)
                for v in sorted(c.min_component_voxels)]  # fmt: skip
        if c.largest_component:
            out.append(PostprocessConfig(largest_component_only=True, connectivity=conn))
    return out


def _best_component_option(preds, gts, candidates, trials):
    """`(config, objective, outputs)` of the best component option (None if there is none);
    appends every option's (config dict, objective) to `trials`. Each case is labelled
    once per connectivity; the options only choose which components stay."""
    best = None
    labelled: dict = {}
    for option in _component_options(candidates):
        outs = []
        for i, p in enumerate(preds):
            key = (i, option.connectivity)
            if key not in labelled:
                labelled[key] = label_components(p, option.connectivity)
            components, sizes = labelled[key]
            keep = _kept(sizes, option.min_component_voxels, option.largest_component_only)
            outs.append(np.where(keep[components], p, 0).astype(p.dtype))
        score = _objective(outs, gts)
        trials.append((option.to_dict(), score))
        if best is None or score > best[1]:
            best = (option, score, outs)
    return best


def tune_postprocessing(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    candidates: TuningCandidates = TuningCandidates(),
    *,
    log: Callable[[str], None] | None = None,
) -> Tuned:
    """Pick post-processing thresholds on tuning cases, nnU-Net style.

    Maximised: the mean over cases of each case's mean of the WT, TC and ET Dice (3D,
    `mean_region_dice`). Two steps, in order, each starting from the choice so far:
    (1) the component rule (every size threshold and the largest-component rule, for each
    connectivity); (2) the ET-to-NCR relabelling threshold. A step keeps its best option
    when that does not lower the objective (ties keep the least aggressive option, and a
    tie with "off" adopts it: Dice barely sees a far-away island that HD95 is ruled by);
    otherwise the step stays off.

    Args:
      predictions, ground_truths: per case, (H, W, D) class maps {0..3}, same shapes.
      candidates: the thresholds tried.
      log: called with one line per step.

    Returns:
      A `Tuned` with the chosen `PostprocessConfig` (tune on cases that are not the test cases).
    """
    preds = [np.asarray(p) for p in predictions]
    gts = [np.asarray(g) for g in ground_truths]
    if not preds or len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions, {len(gts)} ground truths: expected >= 1 each")
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        if p.shape != g.shape or p.ndim != 3:
            raise ValueError(f"case {i}: prediction {p.shape} and ground truth {g.shape} differ")
    log = log or (lambda _line: None)
    trials: list[tuple[dict, float]] = []
    chosen = PostprocessConfig()
    before = current = _objective(preds, gts)
    trials.append((chosen.to_dict(), before))
    best = _best_component_option(preds, gts, candidates, trials)
    if best is not None and best[1] >= current:
        chosen, current, preds = best
        log(f"components: {chosen} -> mean Dice {before:.4f} -> {current:.4f}")
    else:
        log(f"components: off (best option would give {best[1] if best else float('nan'):.4f})")
    best = None
    for v in sorted(candidates.et_min_voxels):
        s = _objective([relabel_small_et(p, int(v)) for p in preds], gts)
        option = dataclasses.replace(chosen, et_min_voxels=int(v))
        trials.append((option.to_dict(), s))
        if best is None or s > best[1]:
            best = (option, s)
    if best is not None and best[1] >= current:
        log(f"ET relabelling below {best[0].et_min_voxels} voxels: {current:.4f} -> {best[1]:.4f}")
        chosen, current = best
    else:
        log("ET relabelling: off")
    return Tuned(chosen, before, current, tuple(trials))
