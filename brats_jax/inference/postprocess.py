"""3D post-processing of predicted label volumes and its tuning.

Label volumes use the training classes {0 background, 1 NCR, 2 ED, 3 ET}; regions WT =
{1, 2, 3}, TC = {1, 3}, ET = {3}. Steps, in this order, each off by default (a
`PostprocessConfig()` changes nothing); components are `scipy.ndimage.label`'s with the
config's `connectivity` (6 or 26):

1. Components of the whole tumour (labels > 0): keep only the largest
   (`largest_component_only`) or drop every component with fewer than
   `min_component_voxels` voxels. Dropped voxels become background.
2. Components of the tumour core (labels {1, 3}) below `tc_min_mm3` mm^3 (voxels times the
   voxel volume, `spacing`): `tc_action` "relabel" -> ED (2: the whole tumour is kept) or
   "remove" -> background.
3. Components of the enhancing tumour (label 3) below `et_min_mm3` mm^3: `et_action`
   "relabel" -> NCR (1: the core is kept) or "remove" -> background.
4. The BraTS practice for cases without enhancing tumour: when the predicted ET volume (after
   the steps above) has fewer than `et_min_voxels` voxels, its voxels are relabelled NCR.

Steps 2 and 3 are for the challenge's lesion-wise score (`brats_jax.metrics.lesionwise`),
where every small false-positive component counts as a missed lesion would.
`tune_postprocessing` picks the steps on tuning cases (nnU-Net style) for the mean region
Dice or the mean lesion-wise Dice (`objective`); the choice is stored as JSON in a run folder
(`POSTPROCESSING_FILE`) by `python -m brats_jax.tune_postprocessing`, and `predict` applies
it; a run config's `postprocess` fields give it too (`from_config`). Region outputs are
decoded to class maps before any of this (`outputs.regions_to_labels`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from brats_jax import NUM_CLASSES, fileio, metrics
from brats_jax.labels import REGIONS
from brats_jax.metrics import lesionwise, volumes

POSTPROCESSING_FILE = "postprocessing.json"
"""Name of the tuned choice inside a run folder."""

CONNECTIVITIES = (6, 26)
NCR, ED, ET = 1, 2, 3
ACTIONS = ("relabel", "remove")
"""What happens to a small TC / ET component: relabelled (TC -> ED, ET -> NCR) or removed (-> 0)."""
REGION_RULES = {"tc": ((NCR, ET), ED), "et": ((ET,), NCR)}
"""Per-region rule: (classes whose components are measured, the class "relabel" gives)."""
OBJECTIVES = ("dice", "lesionwise")
ONE_MM = (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing thresholds; the defaults (None / False) change nothing.

    min_component_voxels: whole-tumour components with fewer voxels are removed (None: off).
    largest_component_only: keep only the largest whole-tumour component (overrides
      `min_component_voxels`).
    connectivity: 6 (faces) or 26 (faces, edges and corners) for all the components.
    et_min_voxels: ET is relabelled NCR when the volume has fewer ET voxels (None: off).
    tc_min_mm3, tc_action: TC components (labels {1, 3}) smaller than this many mm^3 are
      relabelled ED ("relabel") or removed ("remove") (None: off).
    et_min_mm3, et_action: ET components (label 3) smaller than this many mm^3 are relabelled
      NCR ("relabel") or removed ("remove") (None: off).
    """

    min_component_voxels: int | None = None
    largest_component_only: bool = False
    connectivity: int = 26
    et_min_voxels: int | None = None
    tc_min_mm3: float | None = None
    tc_action: str = "relabel"
    et_min_mm3: float | None = None
    et_action: str = "relabel"

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
        for region in REGION_RULES:
            name, v = f"{region}_min_mm3", getattr(self, f"{region}_min_mm3")
            number = isinstance(v, int | float) and not isinstance(v, bool)
            if v is not None and not (number and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} {v!r}: expected a positive volume in mm^3 (null: off)")
            if v is not None:
                object.__setattr__(self, name, float(v))
            action = getattr(self, f"{region}_action")
            if action not in ACTIONS:
                raise ValueError(f"{region}_action {action!r}: expected 'relabel' or 'remove'")

    @property
    def has_components(self) -> bool:
        """True when a component step (whole tumour, TC or ET) is on."""
        return (
            self.largest_component_only
            or self.min_component_voxels is not None
            or self.tc_min_mm3 is not None
            or self.et_min_mm3 is not None
        )

    @property
    def is_identity(self) -> bool:
        """True when `apply` returns its input unchanged."""
        return not self.has_components and self.et_min_voxels is None

    def effective(self) -> PostprocessConfig:
        """The same post-processing with the fields that change nothing reset to their
        defaults (`min_component_voxels` under `largest_component_only`; `connectivity`
        with no component step; an action without its threshold), so configs that act
        alike compare equal."""
        return dataclasses.replace(
            self,
            min_component_voxels=None if self.largest_component_only else self.min_component_voxels,
            connectivity=self.connectivity if self.has_components else 26,
            tc_action=self.tc_action if self.tc_min_mm3 is not None else "relabel",
            et_action=self.et_action if self.et_min_mm3 is not None else "relabel",
        )

    def to_dict(self) -> dict:
        """The fields as a dict; a region's `{tc,et}_min_mm3` and `{tc,et}_action` only when
        its rule is set (threshold or a non-default action), so the files of configs without
        them read as before (and load in versions that predate them)."""
        d = dataclasses.asdict(self)
        for region in REGION_RULES:
            if d[f"{region}_min_mm3"] is None and d[f"{region}_action"] == "relabel":
                del d[f"{region}_min_mm3"], d[f"{region}_action"]
        return d

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "post-processing config") -> PostprocessConfig:
        """From `to_dict`'s output (missing fields: their defaults); unknown keys raise
        ValueError naming `where`."""
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
    for name in ("min_component_voxels", "et_min_voxels", "tc_min_mm3", "et_min_mm3"):
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
    components with fewer than `min_voxels` voxels are removed, except the largest, which
    always stays (nnU-Net's rule: a threshold tuned on large tumours never erases a case's
    only, small tumour). With neither, the map is returned unchanged (a copy).
    """
    labels = np.array(labels, copy=True)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label volume (H, W, D), got shape {labels.shape}")
    if not largest_only and min_voxels is None:
        return labels
    components, sizes = label_components(labels, connectivity)
    keep = _kept(sizes, min_voxels, largest_only)
    if len(sizes) > 1:
        keep[int(np.argmax(sizes))] = True  # the largest stays
    labels[~keep[components]] = 0
    return labels


def label_components(labels: np.ndarray, connectivity: int = 26, classes=None):
    """`(components int32 (H, W, D), sizes in voxels (n + 1,))` of the whole tumour (labels
    > 0), or of the voxels whose label is in `classes`; component 0 is the rest, size 0."""
    mask = labels > 0 if classes is None else np.isin(labels, classes)
    components, n = ndimage.label(mask, structure=_structure(connectivity))
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    return components, sizes


def _kept(sizes: np.ndarray, min_size, largest_only: bool) -> np.ndarray:
    """Per component id: kept? (background, id 0, is never 'kept'); `sizes` and `min_size`
    in one unit (voxels, mm^3)."""
    keep = np.zeros(len(sizes), bool)
    if len(sizes) == 1:
        return keep
    if largest_only:
        keep[int(np.argmax(sizes))] = True
    else:
        keep[1:] = sizes[1:] >= min_size
    return keep


def _region_rule(labels, components, sizes, region, min_mm3, action, spacing) -> np.ndarray:
    """`labels` with the `region` components (`label_components` of its classes) below
    `min_mm3` relabelled or removed (`action`); a new array."""
    small = ~_kept(sizes * float(np.prod(spacing)), min_mm3, False)
    small[0] = False
    new = REGION_RULES[region][1] if action == "relabel" else 0
    return np.where(small[components], new, labels).astype(labels.dtype)


def filter_region_components(
    labels: np.ndarray,
    region: str,
    min_mm3: float,
    action: str = "relabel",
    spacing: Sequence[float] = ONE_MM,
    connectivity: int = 26,
) -> np.ndarray:
    """An (H, W, D) class map with the components of `region` ("tc": labels {1, 3}; "et":
    label 3) smaller than `min_mm3` mm^3 (voxels x prod(`spacing`), mm per axis) relabelled
    (`action` "relabel": TC -> ED 2, ET -> NCR 1) or removed ("remove": -> 0); a copy."""
    if region not in REGION_RULES or action not in ACTIONS:
        raise ValueError(f"region {region!r}, action {action!r}: expected tc|et, relabel|remove")
    labels = np.asarray(labels)
    components, sizes = label_components(labels, connectivity, REGION_RULES[region][0])
    return _region_rule(labels, components, sizes, region, min_mm3, action, spacing)


def relabel_small_et(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """ET (3) voxels relabelled NCR (1) when there are fewer than `min_voxels` (a copy)."""
    labels = np.array(labels, copy=True)
    et = labels == ET
    if 0 < int(et.sum()) < min_voxels:
        labels[et] = NCR
    return labels


def apply(
    labels: np.ndarray, config: PostprocessConfig, spacing: Sequence[float] = ONE_MM
) -> np.ndarray:
    """`config`'s steps on an (H, W, D) class map {0..3}, in order: whole-tumour components,
    TC components, ET components, the total-ET relabelling. `spacing`: the voxel size in mm
    per axis (the TC / ET rules' volumes are voxels x prod(spacing) mm^3)."""
    out = np.asarray(labels)
    spacing = volumes._check_spacing(spacing, 3)
    if config.largest_component_only or config.min_component_voxels is not None:
        out = filter_components(
            out,
            min_voxels=config.min_component_voxels,
            largest_only=config.largest_component_only,
            connectivity=config.connectivity,
        )
    for region in REGION_RULES:
        min_mm3 = getattr(config, f"{region}_min_mm3")
        if min_mm3 is not None:
            action = getattr(config, f"{region}_action")
            out = filter_region_components(
                out, region, min_mm3, action, spacing, config.connectivity
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
REGION_MM3 = (10.0, 25.0, 50.0, 100.0, 200.0, 500.0)
"""The TC / ET component thresholds (mm^3) `python -m brats_jax.tune_postprocessing` tries
for `--objective=lesionwise` unless told otherwise."""


@dataclasses.dataclass(frozen=True)
class TuningCandidates:
    """What `tune_postprocessing` tries: whole-tumour component sizes (voxels), connectivities,
    TC / ET component thresholds (mm^3) with their actions, total-ET thresholds (voxels).
    The TC / ET searches are empty by default (the voxel-Dice tuning of older versions);
    `REGION_MM3` is a set for the lesion-wise objective."""

    min_component_voxels: tuple[int, ...] = (50, 100, 250, 500, 1000, 2500, 5000)
    largest_component: bool = True
    connectivities: tuple[int, ...] = (26, 6)
    et_min_voxels: tuple[int, ...] = (50, 100, 200, 300, 500, 750, 1000)
    tc_min_mm3: tuple[float, ...] = ()
    tc_actions: tuple[str, ...] = ACTIONS
    et_min_mm3: tuple[float, ...] = ()
    et_actions: tuple[str, ...] = ACTIONS


@dataclasses.dataclass(frozen=True)
class Tuned:
    """`tune_postprocessing`'s answer: the chosen config, the objective without and with it,
    and every trial as (config dict, objective) in the order tried. With the lesion-wise
    objective also the mean lesion-wise HD95 (mm) without and with it and per trial (the
    tie-break; None / empty for "dice")."""

    config: PostprocessConfig
    score_before: float
    score_after: float
    trials: tuple[tuple[dict, float], ...]
    objective: str = "dice"
    hd95_before: float | None = None
    hd95_after: float | None = None
    trials_hd95: tuple[float, ...] = ()


def mean_region_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean of the WT, TC and ET Dice of one volume (class maps {0..3}; both empty -> 1)."""
    dice = []
    for tp, fp, fn, _ in metrics.region_confusion(pred, target).values():
        dice.append(2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(dice))


_REGION_SCORES: dict = {}  # lesion-wise region scores by content (see `_Objective`)
_REGION_SCORES_MAX = 200_000  # entries (~200 bytes each); the memo is emptied when full


def _digest(mask: np.ndarray) -> bytes:
    return hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()


class _Objective:
    """The tuning objective of candidate outputs against fixed ground truths: called with the
    per-case class maps, returns `(score, hd95)`: "dice": the mean over cases of
    `mean_region_dice`, hd95 None; "lesionwise": the means over cases of the mean over WT, TC
    and ET of the lesion-wise Dice and HD95 (`lesionwise.region_scores`, the challenge's
    rules, each case at its spacing). Lesion-wise region scores are memoised by content (the
    predicted and true region masks' digests, their shape and the spacing) in this process,
    so options that leave a region unchanged, and later tunings over the same cases (e.g.
    one per fold), reuse them; the ground truths' region masks are made once."""

    def __init__(self, objective: str, gts, spacings):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r}: expected one of {list(OBJECTIVES)}")
        self.objective, self.gts, self.spacings = objective, gts, spacings
        self.luts = {r: np.isin(np.arange(NUM_CLASSES), c) for r, c in REGIONS.items()}
        self.gt_masks = [{r: lut[g] for r, lut in self.luts.items()} for g in gts]
        self.gt_keys: list[dict] = [{} for _ in gts]  # digests, made on first use

    def __call__(self, outs) -> tuple[float, float | None]:
        if self.objective == "dice":
            s = np.mean([mean_region_dice(p, g) for p, g in zip(outs, self.gts, strict=True)])
            return float(s), None
        cases = np.array([self._case(i, p) for i, p in enumerate(outs)])
        return float(np.mean(cases[:, 0])), float(np.mean(cases[:, 1]))

    def _case(self, i: int, pred: np.ndarray) -> tuple[float, float]:
        dice, hd = [], []
        for r, lut in self.luts.items():
            mask = lut[pred]
            if r not in self.gt_keys[i]:
                self.gt_keys[i][r] = _digest(self.gt_masks[i][r])
            key = (mask.shape, tuple(self.spacings[i]), self.gt_keys[i][r], _digest(mask))
            if key not in _REGION_SCORES:
                if len(_REGION_SCORES) >= _REGION_SCORES_MAX:
                    _REGION_SCORES.clear()
                _REGION_SCORES[key] = lesionwise.region_scores(
                    mask, self.gt_masks[i][r], self.spacings[i]
                )
            dice.append(_REGION_SCORES[key]["dice"])
            hd.append(_REGION_SCORES[key]["hd95"])
        return float(np.mean(dice)), float(np.mean(hd))


def _rank(result: tuple[float, float | None]) -> tuple[float, float]:
    """Sort key of an objective result: higher score first, then lower HD95."""
    return result[0], -(result[1] or 0.0)


def _component_options(c: TuningCandidates) -> list[PostprocessConfig]:
    """Least aggressive first: size thresholds ascending, then the largest component only."""
    out = []
    for conn in c.connectivities:
        out += [PostprocessConfig(min_component_voxels=int(v), connectivity=conn)
                for v in sorted(c.min_component_voxels)]  # fmt: skip
        if c.largest_component:
            out.append(PostprocessConfig(largest_component_only=True, connectivity=conn))
    return out


def _component_step(chosen, preds, candidates, spacings):
    """(option, outputs) of each whole-tumour component option. Each case is labelled once
    per connectivity; the options only choose which components stay."""
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
        yield option, outs


def _region_step(region: str, chosen, preds, candidates, spacings):
    """The TC or ET component search (`region`), (option, outputs) per option: thresholds
    ascending, each with its actions in the candidates' order; each case's region components
    are labelled once. (A plain function that `STEPS` binds with `functools.partial`, not a
    closure built at import, so a mutation test reaches its body.)"""
    thresholds = sorted(getattr(candidates, f"{region}_min_mm3"))
    classes = REGION_RULES[region][0]
    labelled = (
        [label_components(p, chosen.connectivity, classes) for p in preds] if thresholds else []
    )
    for v in thresholds:
        for action in getattr(candidates, f"{region}_actions"):
            option = dataclasses.replace(
                chosen, **{f"{region}_min_mm3": float(v), f"{region}_action": action}
            )
            outs = [_region_rule(p, *cs, region, float(v), action, s)
                    for p, cs, s in zip(preds, labelled, spacings, strict=True)]  # fmt: skip
            yield option, outs


def _et_total_step(chosen, preds, candidates, spacings):
    """(option, outputs) of each total-ET relabelling threshold, ascending."""
    for v in sorted(candidates.et_min_voxels):
        yield (
            dataclasses.replace(chosen, et_min_voxels=int(v)),
            [relabel_small_et(p, int(v)) for p in preds],
        )


STEPS = (
    ("components", _component_step, False),
    ("TC components", functools.partial(_region_step, "tc"), True),
    ("ET components", functools.partial(_region_step, "et"), True),
    ("ET relabelling", _et_total_step, False),
)
"""The tuning's steps in order: (name, generator of (option, outputs) from the choice so far,
whether the step must raise the objective to be kept: the TC / ET component rules, which
would otherwise be adopted on cases whose small components an earlier step already took,
and then remove small true lesions of new cases for nothing)."""


def _best(options, objective: _Objective, trials: list):
    """`(option, result, outputs)` of the best of `options` by `_rank` (the first of equals:
    the least aggressive), None without options; appends each to `trials`."""
    best = None
    for option, outs in options:
        result = objective(outs)
        trials.append((option.to_dict(), *result))
        if best is None or _rank(result) > _rank(best[1]):
            best = (option, result, outs)
    return best


def _check_cases(predictions, ground_truths, spacings):
    preds = [np.asarray(p) for p in predictions]
    gts = [np.asarray(g) for g in ground_truths]
    if not preds or len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions, {len(gts)} ground truths: expected >= 1 each")
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        if p.shape != g.shape or p.ndim != 3:
            raise ValueError(f"case {i}: prediction {p.shape} and ground truth {g.shape} differ")
    spacings = [ONE_MM] * len(preds) if spacings is None else list(spacings)
    if len(spacings) != len(preds):
        raise ValueError(f"{len(spacings)} spacings for {len(preds)} cases: expected one per case")
    return preds, gts, [volumes._check_spacing(s, 3) for s in spacings]


def tune_postprocessing(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    candidates: TuningCandidates = TuningCandidates(),
    *,
    objective: str = "dice",
    spacings: Sequence[Sequence[float]] | None = None,
    log: Callable[[str], None] | None = None,
) -> Tuned:
    """Pick post-processing thresholds on tuning cases, nnU-Net style.

    Maximised (`objective`): "dice", the mean over cases of each case's mean of the WT, TC
    and ET Dice (3D, `mean_region_dice`); or "lesionwise", the mean over cases of each
    case's mean lesion-wise Dice over WT, TC and ET (BraTS 2023 rules), ties broken by the
    lower mean lesion-wise HD95. Four steps (`STEPS`), in order, each starting from the
    choice so far: (1) the whole-tumour component rule (every size threshold and the
    largest-component rule, for each connectivity); (2) the TC component rule and (3) the ET
    component rule (each mm^3 threshold with each action, at the connectivity chosen so
    far); (4) the total-ET-to-NCR relabelling threshold. Steps (1) and (4) keep their best
    option when that does not lower the objective (ties keep the least aggressive option,
    and a tie with "off" adopts it: Dice barely sees a far-away island that HD95 is ruled
    by); steps (2) and (3) only when it raises the objective (no region rule without
    evidence); otherwise the step stays off. A step without candidates stays off.

    Args:
      predictions, ground_truths: per case, (H, W, D) class maps {0..3}, same shapes.
      candidates: the thresholds tried.
      objective: "dice" or "lesionwise".
      spacings: per case, the voxel size in mm per axis (default 1 mm isotropic): the TC / ET
        rules' volumes and the lesion-wise scores use it.
      log: called with one line per step.

    Returns:
      A `Tuned` with the chosen `PostprocessConfig` (tune on cases that are not the test cases).
    """
    preds, gts, spacings = _check_cases(predictions, ground_truths, spacings)
    score = _Objective(objective, gts, spacings)
    log = log or (lambda _line: None)
    name = "mean Dice" if objective == "dice" else "mean lesion-wise Dice (HD95)"
    trials: list[tuple] = []
    chosen = PostprocessConfig()
    before = current = score(preds)
    trials.append((chosen.to_dict(), *before))
    for step_name, step, strict in STEPS:
        best = _best(step(chosen, preds, candidates, spacings), score, trials)
        if best is not None and (
            _rank(best[1]) > _rank(current) if strict else _rank(best[1]) >= _rank(current)
        ):
            log(f"{step_name}: {best[0]} -> {name} {_fmt(current)} -> {_fmt(best[1])}")
            chosen, current, preds = best
        else:
            log(f"{step_name}: off (best option: {_fmt(best[1]) if best else 'none'})")
    return Tuned(
        chosen, before[0], current[0], tuple((c, s) for c, s, _ in trials), objective,
        before[1], current[1], tuple(h for *_, h in trials) if objective != "dice" else (),
    )  # fmt: skip


def _fmt(result) -> str:
    return f"{result[0]:.4f}" + (f" ({result[1]:.1f} mm)" if result[1] is not None else "")
