"""Segment cases with loaded runs and write what predict writes per case: `segment` (a case
in, labels and probabilities out), `write_case` (label and probability NIfTIs), and
`predict_case` / `predict_cases` (one case or many, from run folders to files, with the
optional uncertainty maps and pictures)."""

import pathlib
from collections.abc import Sequence

import numpy as np
from absl import logging
from nibabel.orientations import apply_orientation
from tqdm import tqdm

from brats_jax import fileio
from brats_jax.data import brats
from brats_jax.inference import ensembles, postprocess
from brats_jax.inference import uncertainty as unc
from brats_jax.inference.postprocess_choice import resolve_postprocessing
from brats_jax.labels import to_release_labels
from brats_jax.models import outputs

# The probability NIfTI's header description (80 bytes at most), by channel count
# (`outputs.num_channels`: 4 classes, 3 regions).
_PROBABILITY_DESCRIPTION = {
    4: "brats_jax classes softmax: bg,NCR/NET,ED,ET",
    3: "brats_jax regions sigmoid: WT,TC,ET",
}


def segment(
    ensemble: ensembles.Ensemble, case, *, batch_size=0, postprocessing=None, member_labels=None
):
    """Predict a case (folder or `brats.Case`) -> (CaseData, labels {0..3} int, probabilities);
    `member_labels`: see `ensembles.predict_probabilities`. For an ensemble loaded with
    temperatures (`ensembles.is_calibrated`) the probabilities returned are the
    temperature-scaled ones (`ensembles.predict_calibrated`); the labels never are."""
    data = brats.load_case(
        case,
        require_label=False,
        normalization=ensembles.input_normalization(ensemble.config.data.source),
        allow_missing=ensemble.missing_ok,  # a missing modality's channel is 0
        ignore_bad_label=True,  # only the pictures use it
    )
    _warn_unlike_brats(data)
    calibrated = ensembles.is_calibrated(ensemble)
    predict = ensembles.predict_calibrated if calibrated else ensembles.predict_probabilities
    probs = predict(ensemble, data.image, batch_size=batch_size, member_labels=member_labels)
    probs, written = probs if calibrated else (probs, probs)
    labels = outputs.labels_from_probabilities(probs, outputs.of_config(ensemble.config.model))
    if postprocessing is not None:
        labels = postprocess.apply(labels, postprocessing, spacing(data))
    return data, labels, written


def spacing(data) -> tuple[float, float, float]:
    """A loaded case's voxel size in mm per axis of its arrays (its header's zooms)."""
    return tuple(float(z) for z in data.header.get_zooms()[:3])


def _warn_unlike_brats(data) -> None:
    """Warn when a case's voxels are not BraTS's 1 mm isotropic (what every model here is
    trained on): its structures then appear at another scale. Reorientation is done when
    reading (`brats.read_volume`); resampling is left to the user."""
    zooms = tuple(round(float(z), 3) for z in data.header.get_zooms()[:3])
    if not np.allclose(zooms, 1.0, atol=0.05):
        logging.warning(
            "case %s: voxel size %s mm, but BraTS (what the model was trained on) is 1 mm "
            "isotropic; resample the case to 1 mm first (e.g. nibabel.processing."
            "resample_to_output(image, voxel_sizes=1), or as BraTS does, co-register to SRI24)",
            data.case_id, zooms,
        )  # fmt: skip


def write_case(data, labels, probs, output, probabilities=None) -> np.ndarray:
    """Write the labels in the case's label convention (`CaseData.convention`: its release's,
    or its nnU-Net dataset's) and the probabilities, display ranges 0..the largest label value
    (ET's in BraTS releases) and 0..1, in the input files' voxel order; returns the labels
    written, in that order."""
    labels = to_release_labels(labels, data.convention).astype(np.int16)
    top = float(max(data.convention.release))
    fileio.write_nifti_like(labels, data, output, display_range=(0.0, top))
    if probabilities:
        descrip = _PROBABILITY_DESCRIPTION[probs.shape[-1]]
        fileio.write_nifti_like(
            probs.astype(np.float32), data, probabilities, descrip=descrip, display_range=(0, 1)
        )
    return labels if data.to_file is None else apply_orientation(labels, data.to_file)


def predict_case(
    workdir,
    case,
    output,
    *,
    probabilities=None,
    step=None,
    batch_size=0,
    tta="none",
    sliding_window=None,
    postprocessing="auto",
    uncertainty=None,
    overlays_dir=None,
    calibration=True,
):
    """Predict `case` (a case folder or a `brats.Case`) with the run in `workdir`.

    `workdir` may name several runs (comma-separated or a list): their probabilities are
    averaged. `tta`: see `whole_volume.make_slice_predictor`; `sliding_window`: see
    `ensembles.load_ensemble`; `postprocessing`: see
    `postprocess_choice.resolve_postprocessing`. Writes the label NIfTI `output` (and the
    class probabilities, before post-processing, to `probabilities`; the entropy NIfTI to
    `uncertainty` and its `brats_jax.inference.uncertainty` summary row to the CSV beside it,
    `uncertainty.csv_path`); with `overlays_dir`, the case's picture and an `index.html`
    there (`case_pictures`), with the uncertainty row's columns when both are asked for.
    `calibration`: the probabilities and the entropy use each run's temperature
    (`calibration_file`) when it has one (the labels never do); False: no temperature.

    Returns the written label array, int16 (H, W, D), in the release's label convention and
    the input files' voxel order.
    """
    csv_path = unc.csv_path(uncertainty) if uncertainty else None
    for path in (output, probabilities, uncertainty, csv_path):  # before the model loads
        if path:
            fileio.check_writable(path)
    pictures = case_pictures(overlays_dir)
    ensemble = ensembles.load_ensemble(
        workdir, step=step, tta=tta, sliding_window=sliding_window,
        calibration=calibration and bool(probabilities or uncertainty),
    )  # fmt: skip
    pp = resolve_postprocessing(workdir, postprocessing, ensemble.configs or ensemble.config)
    members = [] if uncertainty else None
    data, labels, probs = segment(
        ensemble, case, batch_size=batch_size, postprocessing=pp, member_labels=members
    )
    extra = None
    if uncertainty:
        kind = outputs.of_config(ensemble.config.model)
        row = unc.write_case(data, labels, probs, kind, uncertainty, members)
        unc.write_csv([row], csv_path)
        extra = unc.by_case([row])
    written = write_case(data, labels, probs, output, probabilities)
    if pictures is not None:
        row = case_picture(pictures, data, labels)
        pictures.write_index([row], index_columns([data.label is not None]), extra_columns=extra)
    return written


def predict_cases(
    workdir,
    cases,
    output_dir,
    *,
    probabilities_dir=None,
    step=None,
    batch_size=0,
    tta="none",
    sliding_window=None,
    postprocessing="auto",
    uncertainty_dir=None,
    overlays_dir=None,
    extra_columns=None,
    part="",
    calibration=True,
) -> list[pathlib.Path]:
    """Predict many cases into `output_dir/<case ID>.nii.gz`, loading and compiling once.

    Arguments as `predict_case`; `cases` are case folders or `brats.Case`s; the
    probabilities go to `probabilities_dir/<case ID>.nii.gz` when given, the entropy maps to
    `uncertainty_dir/<case ID>.nii.gz` and their summary rows to
    `uncertainty_dir/uncertainty.csv`. With `overlays_dir`, a picture per case and an
    `index.html` (`overlays.write_index`; its `extra_columns`: case ID -> {column: value}; the
    uncertainty rows are added) there. `part` (e.g. "-part0-of-4") goes into those two
    summaries' names (`uncertainty-part0-of-4.csv`, `index-part0-of-4.html`), so processes
    that share the folders each keep theirs. `calibration`: as in `predict_case`. Shows a
    progress bar. Returns the written label files.
    """
    ids = [c.case_id if hasattr(c, "case_id") else pathlib.Path(c).name for c in cases]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"--input: case ID(s) {dup[:5]} given twice; outputs would collide")
    for folder in (output_dir, probabilities_dir, uncertainty_dir):  # before the model loads
        if folder and ids:
            fileio.check_writable(pathlib.Path(folder) / f"{ids[0]}.nii.gz")
    pictures = case_pictures(overlays_dir)
    ensemble = ensembles.load_ensemble(
        workdir, step=step, tta=tta, sliding_window=sliding_window,
        calibration=calibration and bool(probabilities_dir or uncertainty_dir),
    )  # fmt: skip
    pp = resolve_postprocessing(workdir, postprocessing, ensemble.configs or ensemble.config)
    written, rows, picture_rows, labelled = [], [], [], []
    for case, cid in zip(tqdm(cases, desc="cases", unit="case"), ids, strict=True):
        members = [] if uncertainty_dir else None
        data, labels, probs = segment(
            ensemble, case, batch_size=batch_size, postprocessing=pp, member_labels=members
        )
        out = pathlib.Path(output_dir) / f"{cid}.nii.gz"
        prob_out = pathlib.Path(probabilities_dir) / f"{cid}.nii.gz" if probabilities_dir else None
        write_case(data, labels, probs, out, prob_out)
        written.append(out)
        if uncertainty_dir:
            kind = outputs.of_config(ensemble.config.model)
            path = pathlib.Path(uncertainty_dir) / f"{cid}.nii.gz"
            rows.append(unc.write_case(data, labels, probs, kind, path, members))
        if pictures is not None:
            picture_rows.append(case_picture(pictures, data, labels))
            labelled.append(data.label is not None)
    if uncertainty_dir:
        csv_name = unc.CSV_FILE.replace(".csv", f"{part}.csv")
        unc.write_csv(rows, pathlib.Path(uncertainty_dir) / csv_name)
    if pictures is not None:
        extra = {**unc.by_case(rows), **(extra_columns or {})}
        pictures.write_index(picture_rows, index_columns(labelled), extra_columns=extra or None,
                             name=f"index{part}.html")  # fmt: skip
    return written


def case_pictures(overlays_dir):
    """`overlays.CasePictures` of `overlays_dir` (checked writable now), or None."""
    if not overlays_dir:
        return None
    from brats_jax.figures import overlays  # matplotlib: imported only when drawing

    return overlays.CasePictures(overlays_dir)


def case_picture(pictures, data, labels) -> dict:
    """Draw a predicted case (`brats.CaseData`, labels {0..3}) over its FLAIR and T1ce,
    beside its ground truth when the case folder has one; returns its index row
    (`overlays.region_summary`: predicted volumes in mL, Dice with a ground truth)."""
    from brats_jax.figures import overlays  # matplotlib: imported only when drawing

    pictures.add(data.case_id, labels, data.label, overlays.modality_images(data.image))
    spacing = tuple(float(z) for z in data.header.get_zooms()[:3])
    return {"case_id": data.case_id, **overlays.region_summary(labels, data.label, spacing)}


def index_columns(labelled: Sequence[bool]) -> list[str]:
    """The index's columns: predicted volumes, and Dice when some case (`labelled[i]`: case
    i has a ground truth) had a ground truth."""
    volumes = [f"volume_ml_{r}" for r in ("WT", "TC", "ET")]
    return volumes + ([f"dice_{r}" for r in ("WT", "TC", "ET")] if any(labelled) else [])
