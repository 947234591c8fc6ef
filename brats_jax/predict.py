"""Segment patients: NIfTI case folders in, label NIfTIs out.

    python -m brats_jax.predict --workdir=RUN --input=CASE_DIR --output=SEG.nii.gz
    python -m brats_jax.predict --workdir=RUN --flair=F --t1=F --t1ce=F --t2=F --output=SEG.nii.gz
    python -m brats_jax.predict --workdir=RUN1,RUN2 --input=FOLDER_OF_CASES --output=DIR \
        [--tta=flips] [--sliding_window=auto|on|off] [--postprocessing=auto|none|FILE.json]

Uses the run's best checkpoint (by validation Dice; the newest when no validation ran),
predicts every axial slice, and writes a label volume with the input's shape, affine and
header in the input's own label convention: ET = 4 for BraTS 2018-2021 naming
(`<ID>_flair.nii.gz`), ET = 3 for BraTS 2023 naming (`<ID>-t2f.nii.gz`). Files with
other names are given one by one (`--flair` ... `--t2`) and written with ET = 4 unless
`--naming=2023`. The model expects what it was trained on: BraTS-preprocessed
volumes (the four modalities co-registered on one grid, skull-stripped), normalised as
in its training data (per volume over the brain for NIfTI-trained runs, per slice over
all pixels, the Kaggle release's way, for Kaggle-trained runs). Slices are
resized to the run's `data.image_size` for the model and the class probabilities are
resized back to full size. `--probabilities=FILE.nii.gz` also writes the float32
probabilities: (H, W, D, 4) class probabilities, or (H, W, D, 3) WT, TC, ET probabilities for
runs with `model.output=regions` (the NIfTI header's description says which). Outputs are
written atomically.

Many cases: `--input` a folder holding case folders (at any depth) or a comma-separated
list of case folders, with `--output` a folder (a name not ending in .nii/.nii.gz): one
`<ID>.nii.gz` per case (`--probabilities` is then a folder too), one load and compilation
for all, a progress bar. `--num_parts=N --part_id=i` (nnU-Net's flags) segments only part i
of the cases sorted by case ID, round-robin (`brats_jax.inference.work_split`): N processes with
i = 0..N-1 on one `--output` folder write every case once (each part its own
`uncertainty-part<i>-of-<N>.csv` and `index-part<i>-of-<N>.html`). Several comma-separated
`--workdir`s form an ensemble: their
probabilities are averaged (they must share `data.image_size`, input normalization and
`model.output`; each run gets the slice context it was trained with, its own
`data.context_slices`). Labels are the argmax of class probabilities, or region
probabilities decoded with ET inside TC inside WT (`outputs.labels_from_probabilities`).
`--tta=flips` (`flips_ud`) averages over left-right (and up-down) mirrored slices.
`--sliding_window=on` (default `auto`: the run's `eval.sliding_window`) makes a run trained on
patches (`data.patch_size`) see each slice through half-overlapping windows of the patch
size, their probabilities averaged with Gaussian weights (nnU-Net's tiling; nnU-Net
averages logits).
`--uncertainty=FILE.nii.gz` (a folder for many cases) writes the voxel-wise predictive
entropy in nats of the averaged probabilities and a summary CSV (`brats_jax.inference.uncertainty`:
`X.csv` beside `X.nii.gz`, or `uncertainty.csv` in the folder).
`--overlays=DIR` draws each case (`brats_jax.figures.overlays`: axial, coronal and sagittal slices
through the predicted tumour's centre over FLAIR and T1ce, beside the ground truth when the
case folder has one) into `DIR/<ID>.png` and lists them in `DIR/index.html`.
Post-processing (`brats_jax.inference.postprocess`): by default the run's `postprocessing.json` (made by
`python -m brats_jax.tune_postprocessing`) is applied when present, else its config's
`postprocess` fields; an ensemble applies its runs' choice when they all agree and stops
with a one-line error naming the runs that differ otherwise; `--postprocessing=none`
turns it off, `--postprocessing=FILE` applies another tuned choice.
A case folder may lack one modality file when every run was trained with modality dropout
(`augment.modality_dropout_p` > 0): that channel is 0 and a warning names it; otherwise a
missing file is an error.
"""

import json
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from absl import app, flags, logging

from brats_jax import MODALITIES, cli, fileio, runtime
from brats_jax.inference import work_split
from brats_jax.labels import et_label, to_release_labels

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run folder (holds config.json, checkpoints/).")
flags.DEFINE_string(
    "input", None, "Case folder, folder of case folders, or comma-separated case folders."
)
for _m in MODALITIES:
    flags.DEFINE_string(_m, None, f"{_m} NIfTI file of any name (instead of --input).")
flags.DEFINE_enum(
    "naming", None, ["2018", "2023"], "With --flair etc.: output label convention (ET 4 or 3)."
)
flags.DEFINE_string("output", None, "Output label NIfTI (.nii[.gz]), or a folder for many cases.")
flags.DEFINE_string(
    "probabilities", None, "Optional class (or region) probability NIfTI (folder: many)."
)
flags.DEFINE_string(
    "uncertainty", None, "Optional predictive-entropy NIfTI (nats) + summary CSV (folder: many)."
)
flags.DEFINE_enum("tta", "none", ["none", "flips", "flips_ud"], "Test-time mirror averaging.")
flags.DEFINE_enum(
    "sliding_window", "auto", ["auto", "on", "off"],
    "Slide a window of the run's data.patch_size over each slice (nnU-Net's Gaussian-weighted "
    "tiles): on, off, or auto (the run's eval.sliding_window).",
)  # fmt: skip
flags.DEFINE_string(
    "postprocessing",
    "auto",
    "auto (each run's postprocessing.json, else its config; an ensemble's runs must agree), "
    "none, or a JSON file.",
)
flags.DEFINE_integer("step", None, "Checkpoint step to use instead of the best one.")
flags.DEFINE_integer("batch_size", 0, "Slices per model call (0: the run's eval.batch_size).")
flags.DEFINE_integer("num_parts", 1, "Split a folder of cases into this many parts (machines).")
flags.DEFINE_integer(
    "part_id", 0, "The part this process segments, 0..num_parts-1 (round-robin over case IDs)."
)
flags.DEFINE_string(  # predict and evaluate share it (both may be imported: tests)
    "overlays", None, "Folder for a picture per case and an index.html.", allow_override=True
)


def input_normalization(source: str) -> str:
    """`brats.load_case` normalization matching what a run trained on `source` saw.

    Kaggle slices come z-scored per slice over all pixels ("slice"); NIfTI cases are
    z-scored over the brain of the whole volume ("brain"), the closest match too for the
    synthetic phantoms (z-scored per slice over the brain; demo models are not meant for
    real scans).
    """
    return "slice" if source == "kaggle_h5" else "brain"


class Ensemble(NamedTuple):
    """Trained runs loaded for prediction; `predictors[i]` serves `variables[i]`."""

    workdirs: tuple[str, ...]
    config: object  # the first run's ConfigDict (image size, data source)
    predictors: tuple
    variables: tuple
    context_slices: tuple = ()  # each run's data.context_slices (() = all 0)
    configs: tuple = ()  # each run's ConfigDict (post-processing: `resolve_postprocessing`)
    missing_ok: bool = False  # every run trained with modality dropout: one file may be missing


def split_list(value: str | os.PathLike | Sequence) -> list[str]:
    """A comma-separated flag value (or a sequence of paths) as a list of non-empty items."""
    if isinstance(value, str | os.PathLike):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return [str(v) for v in value]


def trained_with_modality_dropout(configs) -> bool:
    """True when every run config (dicts or ConfigDicts) has `augment.modality_dropout_p`
    > 0: its model saw a modality set to 0, so predict accepts a case lacking one file."""
    configs = list(configs)
    return bool(configs) and all(
        float(dict(c.get("augment") or {}).get("modality_dropout_p", 0)) > 0 for c in configs
    )


def _saved_configs(workdirs) -> list[dict]:
    """The runs' config.json dicts ({} for one that cannot be read: load_ensemble says why)."""
    out = []
    for w in split_list(workdirs):
        try:
            out.append(json.loads((pathlib.Path(w) / "config.json").read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def load_ensemble(workdirs, *, step=None, tta: str = "none", sliding_window=None) -> Ensemble:
    """Load one run or several (an ensemble) for prediction.

    `sliding_window`: None = each run's `eval.sliding_window`; True / False for all runs
    (True: each run slides a window of its `data.patch_size`, `patches.inference_window`).

    Runs of an ensemble must share `data.image_size`, the input normalization (the data
    source's, `input_normalization`) and `model.output` (averaging class and region
    probabilities means nothing); ValueError names the first run that differs. Each run
    keeps its own `data.context_slices` (runs with different ones may be mixed). Runs with
    the same model config share one compiled predictor (the variables are its argument).
    """
    from brats_jax import data
    from brats_jax.data.patches import inference_window
    from brats_jax.inference import whole_volume
    from brats_jax.models import outputs
    from brats_jax.training import train

    workdirs = tuple(split_list(workdirs))
    if not workdirs:
        raise ValueError("--workdir: expected a run folder (or several, comma-separated)")
    predictors, variables, contexts, configs, by_model = [], [], [], [], {}
    first = None
    for w in workdirs:
        config, model, v = train.load_trained(w, step=step)
        configs.append(config)
        if first is None:
            first = config
        for what, get in (
            ("data.image_size", lambda c: c.data.image_size),
            ("input normalization", lambda c: input_normalization(c.data.source)),
            ("model.output", lambda c: outputs.of_config(c.model)),
        ):
            if get(config) != get(first):
                raise ValueError(
                    f"--workdir {w}: {what} {get(config)!r} differs from {workdirs[0]}'s "
                    f"{get(first)!r}; an ensemble's runs must share it"
                )
        window = inference_window(config, sliding_window)
        key = (json.dumps(config.model.to_dict(), sort_keys=True), window)
        if key not in by_model:
            by_model[key] = whole_volume.make_slice_predictor(
                model,
                image_size=config.data.image_size,
                tta=tta,
                output=outputs.of_config(config.model),
                window=window,
            )
        predictors.append(by_model[key])
        variables.append(v)
        contexts.append(data.context_slices(config))  # each run gets its own context window
    missing_ok = trained_with_modality_dropout(configs)
    return Ensemble(
        workdirs,
        first,
        tuple(predictors),
        tuple(variables),
        tuple(contexts),
        tuple(configs),
        missing_ok,
    )


def member_probabilities(ensemble: Ensemble, image: np.ndarray, *, batch_size=0):
    """Yield each run's own (H, W, D, C) probabilities of a (H, W, D, 4) volume (test-time
    mirror views already averaged), one run at a time."""
    from brats_jax.inference import whole_volume

    batch_size = batch_size or ensemble.config.eval.batch_size
    contexts = ensemble.context_slices or (0,) * len(ensemble.predictors)
    runs = zip(ensemble.predictors, ensemble.variables, contexts, strict=True)
    for predict, variables, k in runs:
        yield whole_volume.predict_volume(
            predict, variables, image, batch_size=batch_size, context_slices=k
        )


def predict_probabilities(
    ensemble: Ensemble, image: np.ndarray, *, batch_size=0, member_labels=None
) -> np.ndarray:
    """(H, W, D, C) probabilities (4 classes or 3 regions: `model.output`) of a (H, W, D, 4)
    volume, averaged over the runs. A list `member_labels` gets each run's own labels
    (H, W, D) int32 appended (its probabilities decoded alone, no post-processing)."""
    from brats_jax.models import outputs

    total = None
    for probs in member_probabilities(ensemble, image, batch_size=batch_size):
        if member_labels is not None:
            member_labels.append(
                outputs.labels_from_probabilities(probs, outputs.of_config(ensemble.config.model))
            )
        total = probs if total is None else total + probs
    return total / len(ensemble.predictors)


def resolve_postprocessing(workdirs, option: str = "auto", config=None):
    """The `PostprocessConfig` predict applies.

    option: "none"; a JSON file written by `brats_jax.tune_postprocessing`; or "auto": each
    run's choice (`run_postprocessing`), applied when every run of an ensemble has one that
    acts the same (`PostprocessConfig.effective`), else a one-line ValueError naming the
    runs that differ. `config`: the runs' configs (one per run, as `Ensemble.configs`), or
    the first run's; a run without one given reads its `config.json`.
    """
    from brats_jax.inference import postprocess

    if option == "none":
        return postprocess.PostprocessConfig()
    if option != "auto":
        return postprocess.load(option)
    workdirs = split_list(workdirs)
    configs = list(config) if isinstance(config, list | tuple) else [config]
    configs += [None] * (len(workdirs) - len(configs))
    chosen = [run_postprocessing(w, c).effective() for w, c in zip(workdirs, configs, strict=True)]
    if differ := [w for w, c in zip(workdirs, chosen, strict=True) if c != chosen[0]]:
        other = chosen[workdirs.index(differ[0])]
        raise ValueError(
            f"--postprocessing=auto: ensemble runs {', '.join(differ)} differ in post-processing "
            f"from {workdirs[0]} ({other.to_dict()} vs {chosen[0].to_dict()}); give one with "
            f"--postprocessing=FILE (or none)"
        )
    return chosen[0]


def run_postprocessing(workdir, config=None):
    """One run's `PostprocessConfig`: its `postprocessing.json` when present, else the
    `postprocess` fields of `config` (its config; None: read from its `config.json`), else
    the identity (no config.json)."""
    from brats_jax import config_fields
    from brats_jax.inference import postprocess

    workdir = pathlib.Path(workdir)
    if (workdir / postprocess.POSTPROCESSING_FILE).is_file():
        return postprocess.load(workdir / postprocess.POSTPROCESSING_FILE)
    if config is None:
        path = workdir / "config.json"
        config = (
            config_fields.upgrade_legacy(json.loads(path.read_text())) if path.is_file() else {}
        )
    return postprocess.from_config(config)


def segment(ensemble: Ensemble, case, *, batch_size=0, postprocessing=None, member_labels=None):
    """Predict a case (folder or `brats.Case`) -> (CaseData, labels {0..3} int, probabilities);
    `member_labels`: see `predict_probabilities`."""
    from brats_jax.data import brats
    from brats_jax.inference import postprocess
    from brats_jax.models import outputs

    data = brats.load_case(
        case,
        require_label=False,
        normalization=input_normalization(ensemble.config.data.source),
        allow_missing=ensemble.missing_ok,  # a missing modality's channel is 0
        ignore_bad_label=True,  # only the pictures use it
    )
    _warn_unlike_brats(data)
    probs = predict_probabilities(
        ensemble, data.image, batch_size=batch_size, member_labels=member_labels
    )
    labels = outputs.labels_from_probabilities(probs, outputs.of_config(ensemble.config.model))
    if postprocessing is not None:
        labels = postprocess.apply(labels, postprocessing)
    return data, labels, probs


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


# The probability NIfTI's header description (80 bytes at most), by channel count
# (`outputs.num_channels`: 4 classes, 3 regions).
_PROBABILITY_DESCRIPTION = {
    4: "brats_jax classes softmax: bg,NCR/NET,ED,ET",
    3: "brats_jax regions sigmoid: WT,TC,ET",
}


def _write_case(data, labels, probs, output, probabilities=None) -> np.ndarray:
    """Write the labels in the case's release convention (and the probabilities), display
    ranges 0..the ET label and 0..1, in the input files' voxel order; returns the labels
    written, in that order."""
    from nibabel.orientations import apply_orientation

    from brats_jax import fileio

    labels = to_release_labels(labels, data.naming).astype(np.int16)
    et_value = float(et_label(data.naming))
    fileio.write_nifti_like(labels, data, output, display_range=(0.0, et_value))
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
):
    """Predict `case` (a case folder or a `brats.Case`) with the run in `workdir`.

    `workdir` may name several runs (comma-separated or a list): their probabilities are
    averaged. `tta`: see `whole_volume.make_slice_predictor`; `sliding_window`: see
    `load_ensemble`; `postprocessing`: see `resolve_postprocessing`. Writes the label NIfTI
    `output` (and the class probabilities, before post-processing, to `probabilities`; the
    entropy NIfTI to `uncertainty` and its `brats_jax.inference.uncertainty` summary row to the CSV
    beside it, `uncertainty.csv_path`); with `overlays_dir`, the case's picture and an
    `index.html` there (`case_pictures`), with the uncertainty row's columns when both are
    asked for.

    Returns the written label array, int16 (H, W, D), in the release's label convention and
    the input files' voxel order.
    """
    from brats_jax.inference import uncertainty as unc
    from brats_jax.models import outputs

    csv_path = unc.csv_path(uncertainty) if uncertainty else None
    for path in (output, probabilities, uncertainty, csv_path):  # before the model loads
        if path:
            fileio.check_writable(path)
    pictures = _case_pictures(overlays_dir)
    ensemble = load_ensemble(workdir, step=step, tta=tta, sliding_window=sliding_window)
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
    written = _write_case(data, labels, probs, output, probabilities)
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
) -> list[pathlib.Path]:
    """Predict many cases into `output_dir/<case ID>.nii.gz`, loading and compiling once.

    Arguments as `predict_case`; `cases` are case folders or `brats.Case`s; the
    probabilities go to `probabilities_dir/<case ID>.nii.gz` when given, the entropy maps to
    `uncertainty_dir/<case ID>.nii.gz` and their summary rows to
    `uncertainty_dir/uncertainty.csv`. With `overlays_dir`, a picture per case and an
    `index.html` (`overlays.write_index`; its `extra_columns`: case ID -> {column: value}; the
    uncertainty rows are added) there. `part` (e.g. "-part0-of-4") goes into those two
    summaries' names (`uncertainty-part0-of-4.csv`, `index-part0-of-4.html`), so processes
    that share the folders each keep theirs. Shows a progress bar. Returns the written label
    files.
    """
    from tqdm import tqdm

    from brats_jax.inference import uncertainty as unc
    from brats_jax.models import outputs

    ids = [c.case_id if hasattr(c, "case_id") else pathlib.Path(c).name for c in cases]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"--input: case ID(s) {dup[:5]} given twice; outputs would collide")
    for folder in (output_dir, probabilities_dir, uncertainty_dir):  # before the model loads
        if folder and ids:
            fileio.check_writable(pathlib.Path(folder) / f"{ids[0]}.nii.gz")
    pictures = _case_pictures(overlays_dir)
    ensemble = load_ensemble(workdir, step=step, tta=tta, sliding_window=sliding_window)
    pp = resolve_postprocessing(workdir, postprocessing, ensemble.configs or ensemble.config)
    written, rows, picture_rows, labelled = [], [], [], []
    for case, cid in zip(tqdm(cases, desc="cases", unit="case"), ids, strict=True):
        members = [] if uncertainty_dir else None
        data, labels, probs = segment(
            ensemble, case, batch_size=batch_size, postprocessing=pp, member_labels=members
        )
        out = pathlib.Path(output_dir) / f"{cid}.nii.gz"
        prob_out = pathlib.Path(probabilities_dir) / f"{cid}.nii.gz" if probabilities_dir else None
        _write_case(data, labels, probs, out, prob_out)
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


def _case_pictures(overlays_dir):
    """`overlays.CasePictures` of `overlays_dir` (checked writable now), or None."""
    if not overlays_dir:
        return None
    from brats_jax.figures import overlays

    return overlays.CasePictures(overlays_dir)


def case_picture(pictures, data, labels) -> dict:
    """Draw a predicted case (`brats.CaseData`, labels {0..3}) over its FLAIR and T1ce,
    beside its ground truth when the case folder has one; returns its index row
    (`overlays.region_summary`: predicted volumes in mL, Dice with a ground truth)."""
    from brats_jax.figures import overlays

    pictures.add(data.case_id, labels, data.label, overlays.modality_images(data.image))
    spacing = tuple(float(z) for z in data.header.get_zooms()[:3])
    return {"case_id": data.case_id, **overlays.region_summary(labels, data.label, spacing)}


def index_columns(labelled: Sequence[bool]) -> list[str]:
    """The index's columns: predicted volumes, and Dice when some case (`labelled[i]`: case
    i has a ground truth) had a ground truth."""
    volumes = [f"volume_ml_{r}" for r in ("WT", "TC", "ET")]
    return volumes + ([f"dice_{r}" for r in ("WT", "TC", "ET")] if any(labelled) else [])


def _is_nifti_name(path: str) -> bool:
    return path.endswith((".nii", ".nii.gz"))


def _check_distinct_outputs(names) -> None:
    """UsageError when two of the flags `names` name the same file or folder (one output
    would overwrite the other)."""
    seen: dict[str, str] = {}
    for name in names:
        if value := getattr(FLAGS, name):
            other = seen.setdefault(os.path.abspath(value), name)
            if other != name:
                raise app.UsageError(f"--{other} and --{name} are both {value}; give each its own")


def _cases_from_input(value: str, allow_missing: bool = False) -> list:
    """The `brats.Case`s of `--input`: case folders, found at any depth under each item
    (`allow_missing`: a folder may lack one modality file)."""
    from brats_jax.data import brats

    items = split_list(value)
    for item in items:
        if not pathlib.Path(item).is_dir():
            raise FileNotFoundError(f"--input {item}: not a folder of NIfTI files or case folders")
    return [case for item in items for case in brats.find_cases(item, allow_missing=allow_missing)]


def _single_case(files: dict):
    """The one case of `--input` (a case folder) or of the modality files."""
    from brats_jax.data import brats

    if FLAGS.input:
        if not pathlib.Path(FLAGS.input).is_dir():
            raise FileNotFoundError(f"--input {FLAGS.input}: not a folder of NIfTI files")
        return FLAGS.input
    missing = [f"--{m}" for m in MODALITIES if m not in files]
    if missing:
        raise app.UsageError(f"missing {', '.join(missing)}: all four modalities are needed")
    return brats.case_from_files(files, naming=FLAGS.naming or "2018")


def _case_part(cases: list) -> list:
    """Part `--part_id` of `--num_parts` of `cases` sorted by case ID (round-robin); a case
    ID found twice is an error here, before the parts could hide it from each other."""
    ids = [c.case_id for c in cases]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"--input: case ID(s) {dup[:5]} given twice; outputs would collide")
    cases = sorted(cases, key=lambda c: c.case_id)
    return work_split.part_of(cases, FLAGS.part_id, FLAGS.num_parts)


def main(argv) -> None:
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        work_split.check_part(FLAGS.part_id, FLAGS.num_parts)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    for name in ("workdir", "output"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    files = {m: getattr(FLAGS, m) for m in MODALITIES if getattr(FLAGS, m)}
    if FLAGS.input and (files or FLAGS.naming):
        given = ", ".join(f"--{m}" for m in [*files, *(["naming"] if FLAGS.naming else [])])
        raise app.UsageError(f"give either --input or the modality files, not both ({given})")
    if not FLAGS.input and not files:
        raise app.UsageError("give --input (a case folder) or --flair, --t1, --t1ce and --t2")
    options = dict(
        step=FLAGS.step,
        batch_size=FLAGS.batch_size,
        tta=FLAGS.tta,
        sliding_window={"auto": None, "on": True, "off": False}[FLAGS.sliding_window],
        postprocessing=FLAGS.postprocessing,
    )
    _check_distinct_outputs(("output", "probabilities", "uncertainty"))
    if not _is_nifti_name(FLAGS.output):
        if not FLAGS.input:
            raise app.UsageError(f"--output {FLAGS.output}: give a .nii or .nii.gz file name")
        for name in ("probabilities", "uncertainty"):
            if getattr(FLAGS, name) and _is_nifti_name(getattr(FLAGS, name)):
                raise app.UsageError(f"--{name}: give a folder when --output is a folder")
        missing_ok = trained_with_modality_dropout(_saved_configs(FLAGS.workdir))
        cases = _case_part(_cases_from_input(FLAGS.input, missing_ok))
        if not cases:
            print(f"part {FLAGS.part_id} of {FLAGS.num_parts}: no cases to segment")
            return
        written = predict_cases(
            FLAGS.workdir,
            cases,
            FLAGS.output,
            probabilities_dir=FLAGS.probabilities,
            uncertainty_dir=FLAGS.uncertainty,
            overlays_dir=FLAGS.overlays,
            part=f"-part{FLAGS.part_id}-of-{FLAGS.num_parts}" if FLAGS.num_parts > 1 else "",
            **options,
        )
        print(f"wrote {len(written)} segmentation(s) to {FLAGS.output}")
        return
    if FLAGS.input and "," in FLAGS.input:
        raise app.UsageError(f"--output {FLAGS.output} is one file; give a folder for many cases")
    for name in ("probabilities", "uncertainty"):  # checked before the model loads
        if getattr(FLAGS, name) and not _is_nifti_name(getattr(FLAGS, name)):
            raise app.UsageError(f"--{name} {getattr(FLAGS, name)}: give a .nii or .nii.gz file")
    if FLAGS.num_parts != 1:
        raise app.UsageError("--num_parts splits a folder of cases; give --output a folder")
    labels = predict_case(
        FLAGS.workdir,
        _single_case(files),
        FLAGS.output,
        probabilities=FLAGS.probabilities,
        uncertainty=FLAGS.uncertainty,
        overlays_dir=FLAGS.overlays,
        **options,
    )
    values, counts = np.unique(labels, return_counts=True)
    print(
        f"wrote {FLAGS.output}: shape {labels.shape}, voxels per label "
        + ", ".join(f"{v}: {c}" for v, c in zip(values, counts, strict=True))
    )


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cli.run_app(main)


if __name__ == "__main__":
    run()
