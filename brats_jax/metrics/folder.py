r"""Scores of a folder of saved predictions against a ground-truth folder (the library of
``python -m brats_jax.evaluate``, whose docstring describes the command).

* Predictions: ``<ID>.nii.gz``, ``<ID>_seg.nii.gz`` or ``<ID>-seg.nii.gz`` (``.nii`` too) in
  the prediction folder (:func:`find_predictions`; files that are not label maps, such as
  ``predict``'s uncertainty and probability maps, are skipped: :func:`not_a_label_map`).
* Ground truth: case folders at any depth (``<ID>/<ID>_seg.nii.gz``, BraTS 2018-2021, also
  under ``HGG/`` and ``LGG/``; ``<ID>/<ID>-seg.nii.gz``, BraTS 2023; a case folder with no such
  file but exactly one other ``*seg*.nii[.gz]`` file - e.g. BraTS20_Training_355's
  ``W39_1998.09.19_Segm.nii`` - uses that), or flat files named like the predictions at its
  top level (:func:`find_ground_truth`).
* Labels are in the release convention: ``brats2018`` = {0,1,2,4} (ET = 4, BraTS 2018-2021),
  ``brats2023`` = {0,1,2,3} (ET = 3, also the training classes). ``labels="auto"`` takes
  ``brats2023`` for GT files named ``*-seg.nii*``, ``brats2018`` for ``*_seg.nii*`` and
  otherwise decides from the GT values (a 4 means 2018, a 3 means 2023; a GT with neither
  takes 2018 if the prediction has a 4, else 2023); predictions use their case's GT
  convention unless ``pred_labels`` says otherwise. Maps are converted to the training
  classes {0,1,2,3} (:func:`to_training_classes`) before
  :func:`brats_jax.metrics.volumes.evaluate_volume` (and, on request,
  :func:`brats_jax.metrics.lesionwise.evaluate_volume`).
* Voxel spacing comes from the GT header zooms.

Cases are matched by ID. A GT case without a prediction is scored as the BraTS challenge
scores it (:func:`missing_case_row`) or left out (``missing="skip"``); predictions without GT
are reported and skipped. :func:`write_csv` writes the per-case rows atomically and
:func:`summarize` gives mean / std / median per region (and how many cases were scored 0
for a missing prediction). Bad input raises :class:`EvaluationError` with a message naming
the case or file.
"""

from __future__ import annotations

import csv
import os
import pathlib
import re
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np

from brats_jax import fileio, labels
from brats_jax.data import brats
from brats_jax.metrics import calibration, lesionwise, volumes

CONVENTIONS = tuple(labels.CONVENTION_FLAGS)
_NIFTI = re.compile(r"^(?P<stem>.+?)(?P<sep>[_-]seg)?\.nii(\.gz)?$", re.IGNORECASE)

REGION_NAMES = tuple(labels.REGIONS)
COLUMNS = (
    ["case_id"]
    + [f"{m}_{r}" for m in ("dice", "hd95", "sensitivity", "specificity") for r in REGION_NAMES]
    + ["volume_dice_4class"]
    + [f"class_dice_{c}" for c in range(4)]
)
MISSING_MODES = ("worst", "skip")
METRIC_SETS = ("standard", "lesionwise")

Postprocessing = Callable[..., np.ndarray]
"""``(prediction's training-class map, spacing=(mm, mm, mm))`` -> the map to score (see
:func:`evaluate_folder`)."""


class EvaluationError(ValueError):
    """Bad input for the evaluation (message names the case/file and what was expected)."""


def _case_id(path: pathlib.Path) -> tuple[str, str | None] | None:
    """(ID, naming) of a segmentation file name, naming in {'brats2018','brats2023',None}."""
    m = _NIFTI.match(path.name)
    if not m:
        return None
    sep = (m.group("sep") or "").lower()
    naming = {"_seg": "brats2018", "-seg": "brats2023"}.get(sep)
    return m.group("stem"), naming


# Names `predict --uncertainty/--probabilities` files are often given beside the labels
# (`<ID>_unc.nii.gz`, `<ID>_probs.nii.gz`): with a floating-point data type such a file is
# skipped without reading its values.
_COMPANION_NAME = re.compile(
    r"[_-](unc|uncertainty|entropy|prob|probs|probabilities|softmax)$", re.IGNORECASE
)


def not_a_label_map(path: pathlib.Path) -> str | None:
    """Why the NIfTI ``path`` is not a label map, or None when it may be one (or cannot be
    read: scoring it then names the error).

    Not label maps: more than three dimensions of size > 1 (``predict --probabilities``:
    (H, W, D, C) probabilities); a header description ``brats_jax ...`` (what ``predict``
    gives its entropy and probability maps; its label maps keep the input's); a
    floating-point volume named like an uncertainty or probability map (``<ID>_unc``,
    ``<ID>_probs``, ...) or whose values are not all whole numbers. A label map stored as
    floats (e.g. MONAI's default) is kept.
    """
    try:
        img = nib.load(str(path))
        shape, dtype = img.shape, img.get_data_dtype()
        descrip = np.asarray(img.header["descrip"]).item().decode("latin-1")
    except Exception:  # nibabel raises many types; _load reports them when the case is scored
        return None
    if any(n > 1 for n in shape[3:]):
        return f"{len(shape)}-D {tuple(shape)}, a probability map"
    if descrip.startswith("brats_jax "):
        return f"predict's {descrip!r}"
    if not np.issubdtype(dtype, np.floating):
        return None
    if _COMPANION_NAME.search((_case_id(path) or (path.name,))[0]):
        return f"{dtype} values named like an uncertainty or probability map"
    try:
        values = np.asanyarray(img.dataobj)
    except Exception:
        return None
    if not np.array_equal(values, np.round(values)):
        return f"non-integer {dtype} values, an uncertainty or probability map"
    return None


def find_predictions(pred_dir: pathlib.Path, log=None) -> dict[str, pathlib.Path]:
    """Map case ID -> prediction file for ``<ID>[_seg|-seg].nii[.gz]`` files in ``pred_dir``.

    Files that are not label maps (:func:`not_a_label_map`: ``predict``'s uncertainty and
    probability maps written into the same folder) are left out, named in one ``log`` line.
    """
    out: dict[str, pathlib.Path] = {}
    skipped = []
    for p in sorted(pred_dir.iterdir()):
        parsed = _case_id(p) if p.is_file() else None
        if parsed is None:
            continue
        if why := not_a_label_map(p):
            skipped.append(f"{p.name} ({why})")
            continue
        cid = parsed[0]
        if cid in out:
            raise EvaluationError(f"two prediction files for case {cid}: {out[cid]} and {p}")
        out[cid] = p
    if skipped and log is not None:
        log(
            f"note: {len(skipped)} file(s) in {pred_dir} are not label maps and are not "
            f"scored: {_some(skipped, 5)}"
        )
    return out


def find_probability_maps(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Case ID -> ``predict --probabilities`` map in `folder`: a NIfTI of shape (H, W, D, C),
    C = 4 (class softmax) or 3 (WT, TC, ET sigmoids), named ``<ID>.nii[.gz]`` (predict's
    probability folder) or like a companion of the labels (``<ID>_probs.nii.gz``, ...)."""
    out: dict[str, pathlib.Path] = {}
    for p in sorted(pathlib.Path(folder).iterdir()) if pathlib.Path(folder).is_dir() else []:
        parsed = _case_id(p) if p.is_file() else None
        if parsed is None:
            continue
        try:
            shape = nib.load(str(p)).shape
        except Exception:  # not readable as NIfTI: not a probability map
            continue
        if len(shape) == 4 and shape[3] in (3, 4):
            out.setdefault(_COMPANION_NAME.sub("", parsed[0]), p)
    return out


class FolderReliability:
    """Reliability bins (`metrics.calibration`) of the probability maps of evaluated cases:
    `add` is an `evaluate_folder` `on_case` hook; `bins` holds one `ReliabilityBins` per
    output kind met ("classes": 4 channels, "regions": 3). Voxels: the brain (any modality
    of the ground truth's case folder non-zero), all voxels when the folder has no images
    (`notes` names those cases)."""

    def __init__(self, maps: dict[str, pathlib.Path]):
        self.maps = maps
        self.bins: dict[str, calibration.ReliabilityBins] = {}
        self.notes: list[str] = []

    def add(self, case_id: str, pred, gt, gt_path) -> None:
        """Count case `case_id`'s probability map (if any) against `gt` (training classes)."""
        if case_id not in self.maps:
            return
        probs = np.asarray(nib.load(str(self.maps[case_id])).dataobj, np.float32)
        if probs.shape[:3] != np.shape(gt):
            raise EvaluationError(
                f"case {case_id}: probability map {self.maps[case_id]} has shape {probs.shape}; "
                f"expected {np.shape(gt)} + (3 or 4,)"
            )
        kind = "regions" if probs.shape[3] == 3 else "classes"
        bins = self.bins.setdefault(
            kind, calibration.ReliabilityBins.empty(calibration.channel_names(kind))
        )
        self._shape = np.shape(gt)
        bins.add(probs, calibration.channel_targets(gt, kind), self._brain(case_id, gt_path))

    def _brain(self, case_id: str, gt_path) -> np.ndarray | None:
        """Any modality non-zero, from the case folder holding `gt_path`; None: all voxels."""
        try:
            (case,) = brats.find_cases(pathlib.Path(gt_path).parent)
            brain = None
            for path in case.paths.values():
                nonzero = brats.read_nifti(path)[0] != 0
                brain = nonzero if brain is None else brain | nonzero
        except (brats.DataError, ValueError, TypeError):
            brain = None
        if brain is None or brain.shape != self._shape:
            self.notes.append(case_id)
            return None
        return brain


def _case_folder_seg(folder: pathlib.Path) -> tuple[pathlib.Path, str | None] | None:
    """(seg file, naming) of a case folder ``<ID>/<ID>[_-]seg.nii[.gz]`` (or its single other
    ``*seg*`` NIfTI, the case-355 quirk); None when ``folder`` is not a case folder."""
    cid = folder.name
    for sep, naming in (("_seg", "brats2018"), ("-seg", "brats2023")):
        for ext in (".nii.gz", ".nii"):
            f = folder / f"{cid}{sep}{ext}"
            if f.is_file():
                return f, naming
    others = [
        f
        for f in sorted(folder.iterdir())
        if f.is_file() and "seg" in f.name.lower() and _NIFTI.match(f.name)
    ]
    return (others[0], None) if len(others) == 1 else None


def find_ground_truth(gt_dir: pathlib.Path) -> dict[str, tuple[pathlib.Path, str | None]]:
    """Map case ID -> (GT seg file, naming-from-file-name or None).

    Case folders are found at any depth (e.g. the 2018-2019 releases' ``HGG/<ID>/``,
    ``LGG/<ID>/``), ``gt_dir`` itself included (then its modality images are not cases);
    files named like predictions count at the top level of ``gt_dir``.
    """
    gt_dir = pathlib.Path(os.path.abspath(gt_dir))  # "." has its folder's name
    if (found := _case_folder_seg(gt_dir)) is not None and found[1] is not None:  # <ID>_seg
        return {gt_dir.name: found}
    out: dict[str, tuple[pathlib.Path, str | None]] = {}

    def add(cid: str, found: tuple[pathlib.Path, str | None]) -> None:
        if cid in out:
            raise EvaluationError(
                f"two ground-truth files for case {cid}: {out[cid][0]}, {found[0]}"
            )
        out[cid] = found

    for dirpath, dirnames, filenames in os.walk(gt_dir, followlinks=True):
        folder = pathlib.Path(dirpath)
        dirnames.sort()
        if folder == gt_dir:  # flat files: top level only
            for name in sorted(filenames):
                path = folder / name
                if path.is_file() and (parsed := _case_id(path)) is not None:
                    add(parsed[0], (path, parsed[1]))
        elif (found := _case_folder_seg(folder)) is not None:
            add(folder.name, found)
            dirnames[:] = []
    return out


def _convention_from_values(gt: np.ndarray, pred: np.ndarray | None) -> str:
    """The GT's ET value names its convention (4: brats2018, 3: brats2023); a GT with
    neither (no enhancing tumour) says nothing, so the prediction decides when it shares the
    GT's convention."""
    et_2018, et_2023 = labels.et_label("2018"), labels.et_label("2023")
    if np.any(gt == et_2018):
        return "brats2018"
    if np.any(gt == et_2023):
        return "brats2023"
    return "brats2018" if pred is not None and np.any(pred == et_2018) else "brats2023"


def to_training_classes(label: np.ndarray, convention: str, what: str) -> np.ndarray:
    """Release labels (`convention`: brats2018 / brats2023) -> training classes {0..3} uint8;
    unknown values raise EvaluationError naming ``what``."""
    if convention not in CONVENTIONS:
        raise EvaluationError(f"unknown label convention {convention!r}; expected {CONVENTIONS}")
    try:
        classes = labels.to_train_labels(label, labels.CONVENTION_FLAGS[convention], where=what)
    except labels.LabelError as e:
        raise EvaluationError(
            f"{e}; set --labels/--pred_labels if the convention is different"
        ) from None
    return classes.astype(np.uint8)


def _load(path: pathlib.Path):
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.header.get_zooms()[:3], img.affine
    except Exception as e:  # nibabel raises many types
        raise EvaluationError(f"cannot read NIfTI {path}: {e}") from e


def _check_options(
    pred_dir: pathlib.Path,
    gt_dir: pathlib.Path,
    labels: str,
    pred_labels: str,
    hd95_mode: str,
    missing: str,
) -> None:
    """Raise EvaluationError for a missing folder or an unknown option value."""
    for name, d in (("--pred", pred_dir), ("--gt", gt_dir)):
        if not d.is_dir():
            raise EvaluationError(f"{name} folder {d} does not exist")
    if labels not in ("auto", *CONVENTIONS):
        raise EvaluationError(f"--labels={labels!r}; expected auto, {', '.join(CONVENTIONS)}")
    if pred_labels not in ("same", *CONVENTIONS):
        raise EvaluationError(
            f"--pred_labels={pred_labels!r}; expected same, {', '.join(CONVENTIONS)}"
        )
    if hd95_mode not in volumes.HD95_MODES:
        raise EvaluationError(f"--hd95_mode={hd95_mode!r}; expected one of {volumes.HD95_MODES}")
    if missing not in MISSING_MODES:
        raise EvaluationError(f"--missing={missing!r}; expected one of {MISSING_MODES}")


def _match_cases(
    preds: dict, gts: dict, pred_dir: pathlib.Path, gt_dir: pathlib.Path, missing: str, log
) -> tuple[list[str], list[str]]:
    """Pair predictions with GT cases; returns (matched ids, GT ids without prediction).

    Logs a warning for either kind of unmatched case; raises EvaluationError when none match.
    """
    ids = sorted(set(preds) & set(gts))
    if not ids:
        raise EvaluationError(
            f"no matching cases: {len(preds)} prediction file(s) in {pred_dir}, "
            f"{len(gts)} ground-truth case(s) in {gt_dir}"
        )
    if absent := sorted(set(gts) - set(preds)):
        what = (
            "skipped (--missing=skip)"
            if missing == "skip"
            else "scored Dice 0 / HD95 373.13 (--missing=skip leaves them out)"
        )
        log(f"warning: {len(absent)} GT case(s) without prediction {what}: {_some(absent)}")
    if extra := sorted(set(preds) - set(gts)):
        log(f"warning: {len(extra)} prediction(s) without GT skipped: {extra[:5]}")
    return ids, absent


def _evaluate_case(
    cid: str,
    pred_path: pathlib.Path,
    gt_path: pathlib.Path,
    naming: str | None,
    *,
    labels: str,
    pred_labels: str,
    hd95_mode: str,
    log,
    postprocessing: Postprocessing | None = None,
    lesion_options=None,
    on_case=None,
) -> dict[str, float]:
    """Load, convert and score one case; returns :func:`volumes.evaluate_volume`'s dict
    (plus :func:`lesionwise.evaluate_volume`'s with ``lesion_options``, its keyword dict).
    `on_case(cid, pred, gt, gt_path)` (training classes) is called with the scored maps.

    Dice per region and HD95 in mm (spacing from the GT header's zooms). Raises
    EvaluationError on a shape mismatch; warns when the affines differ.
    """
    gt_raw, zooms, gt_affine = _load(gt_path)
    pred_raw, _, pred_affine = _load(pred_path)
    if gt_raw.shape != pred_raw.shape:
        raise EvaluationError(
            f"case {cid}: prediction shape {pred_raw.shape} ({pred_path.name}) != "
            f"ground-truth shape {gt_raw.shape} ({gt_path.name})"
        )
    if not np.allclose(pred_affine, gt_affine, atol=1e-3):
        log(
            f"warning: case {cid}: the prediction's affine differs from the ground truth's; "
            "scored voxel by voxel, as if both were on the ground truth's grid"
        )
    conv = labels
    if conv == "auto":
        conv = naming or _convention_from_values(
            gt_raw, pred_raw if pred_labels == "same" else None
        )
    gt = to_training_classes(gt_raw, conv, f"case {cid} ground truth {gt_path}")
    pconv = conv if pred_labels == "same" else pred_labels
    pred = to_training_classes(pred_raw, pconv, f"case {cid} prediction {pred_path}")
    spacing = tuple(float(z) for z in zooms)
    if postprocessing is not None:
        pred = postprocessing(pred, spacing=spacing)
    if on_case is not None:
        on_case(cid, pred, gt, gt_path)
    scores = volumes.evaluate_volume(pred, gt, spacing=spacing, hd95_mode=hd95_mode)
    if lesion_options is not None:
        scores.update(
            lesionwise.evaluate_volume(pred, gt, spacing, hd95_mode=hd95_mode, **lesion_options)
        )
    return scores


class ScoredRows(list):
    """:func:`evaluate_folder`'s rows (a list of per-case dicts) with ``absent``, the GT case
    IDs without a prediction, and ``missing``, how they were treated (``worst``: scored by
    :func:`missing_case_row`, among the rows; ``skip``: left out); :func:`summarize` says so.
    """

    def __init__(self, rows=(), *, absent: Sequence[str] = (), missing: str = "worst"):
        super().__init__(rows)
        self.absent = list(absent)
        self.missing = missing


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    labels: str = "auto",
    pred_labels: str = "same",
    hd95_mode: str = "max",
    missing: str = "worst",
    postprocessing: Postprocessing | None = None,
    lesion_options=None,
    log=print,
    on_case=None,
) -> ScoredRows:
    """Evaluate every prediction with a matching GT case; returns one row dict per case (a
    :class:`ScoredRows` list, which also names the GT cases without a prediction).

    Args:
      pred_dir, gt_dir: folders as described in this module's docstring.
      labels: GT convention, ``auto`` | ``brats2018`` | ``brats2023``.
      pred_labels: prediction convention, ``same`` (as the case's GT) | ``brats2018`` |
        ``brats2023``.
      hd95_mode: ``max`` (MONAI) or ``pooled`` (medpy), see :func:`brats_jax.metrics.volumes.hd95`.
      missing: a GT case without prediction: ``worst`` (scored by :func:`missing_case_row`)
        or ``skip``.
      postprocessing: called as ``postprocessing(pred, spacing=GT zooms in mm)`` with each
        prediction (training classes) before it is scored; returns the map to score, e.g.
        `brats_jax.inference.postprocess.apply` of a post-processing config
        (``functools.partial(postprocess.apply, config=cfg)``).
      lesion_options: None (standard metrics only) or a dict of
        :func:`brats_jax.metrics.lesionwise.region_scores` options ({} = the challenge's): adds the
        ``lesionwise_*`` scores.
      log: called with progress/warning lines.
      on_case: called as ``on_case(case_id, pred, gt, gt_path)`` with each scored case's
        maps in the training classes (e.g. `overlays.CasePictures.add_evaluated`).

    Raises:
      EvaluationError: missing folders, no matching cases, shape mismatch, unknown labels.
    """
    pred_dir, gt_dir = pathlib.Path(pred_dir), pathlib.Path(gt_dir)
    _check_options(pred_dir, gt_dir, labels, pred_labels, hd95_mode, missing)
    preds = find_predictions(pred_dir, log)
    gts = find_ground_truth(gt_dir)
    ids, absent = _match_cases(preds, gts, pred_dir, gt_dir, missing, log)
    rows = []
    for i, cid in enumerate(ids):
        gt_path, naming = gts[cid]
        res = _evaluate_case(
            cid,
            preds[cid],
            gt_path,
            naming,
            labels=labels,
            pred_labels=pred_labels,
            hd95_mode=hd95_mode,
            log=log,
            postprocessing=postprocessing,
            lesion_options=lesion_options,
            on_case=on_case,
        )
        rows.append({"case_id": cid, **res})
        log(
            f"[{i + 1}/{len(ids)}] {cid}: "
            + " ".join(f"{r}={res[f'dice_{r}']:.4f}" for r in REGION_NAMES)
        )
    if missing == "worst":
        worst = [missing_case_row(cid, lesion_options is not None) for cid in absent]
        rows = sorted(rows + worst, key=lambda r: r["case_id"])
    return ScoredRows(rows, absent=absent, missing=missing)


def missing_case_row(case_id: str, with_lesionwise: bool = False) -> dict[str, float | str]:
    """The BraTS challenge's score of a case without prediction: Dice 0 and HD95 373.13 mm in
    every region, sensitivity and specificity 0, the study's and per-class Dice 0; with
    ``with_lesionwise`` also lesion-wise Dice 0 and HD95 374 mm (lesion counts left empty)."""
    row: dict[str, float | str] = {"case_id": case_id}
    for col in COLUMNS[1:]:
        row[col] = volumes.HD95_EMPTY if col.startswith("hd95_") else 0.0
    if with_lesionwise:
        for r in REGION_NAMES:
            row[f"lesionwise_dice_{r}"] = 0.0
            row[f"lesionwise_hd95_{r}"] = lesionwise.HD95_WORST
    return row


def _some(ids: Sequence[str], n: int = 10) -> str:
    """The first `n` ids, comma-separated, and how many more."""
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more


def write_csv(rows: Sequence[dict], out: str | os.PathLike) -> None:
    """Write per-case rows to ``out`` atomically (temporary file in the same folder + replace);
    the ``lesionwise_*`` columns follow :data:`COLUMNS` when the rows have them."""
    lesion = any("lesionwise_dice_WT" in r for r in rows)
    fields = COLUMNS + (lesionwise.COLUMNS if lesion else [])
    with fileio.atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def summarize(rows: Sequence[dict]) -> str:
    """Mean, std and median per region for Dice and HD95 (plus the 4-class volume Dice), as text.

    The first line counts the cases; for :class:`ScoredRows` with GT cases without a
    prediction it says, in that line, how many were scored 0 (and how to leave them out) or
    left out.
    """
    absent = len(getattr(rows, "absent", ()))
    count = f"{len(rows)} case(s)"
    if absent and getattr(rows, "missing", "worst") == "worst":
        count += (
            f", {absent} of them without a prediction and scored Dice 0 / HD95 373.13 "
            f"(--missing=skip leaves them out: {len(rows) - absent} case(s))"
        )
    elif absent:
        count += f" ({absent} GT case(s) without a prediction left out: --missing=skip)"
    lines = [count, f"{'metric':<20}{'mean':>10}{'std':>10}{'median':>10}"]
    keys = [f"dice_{r}" for r in REGION_NAMES] + [f"hd95_{r}" for r in REGION_NAMES]
    for k in [*keys, "volume_dice_4class"]:
        v = np.array([r[k] for r in rows], np.float64)
        lines.append(f"{k:<20}{v.mean():>10.4f}{v.std():>10.4f}{np.median(v):>10.4f}")
    if rows and all("lesionwise_dice_WT" in r for r in rows):
        lines.append(lesionwise.summary_table(rows))
    return "\n".join(lines)
