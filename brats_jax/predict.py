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
Temperature scaling: a run folder holding `calibration.json` (`python -m brats_jax.calibrate`)
has its logits divided by its temperature(s) before the softmax / sigmoid of the
`--probabilities` and `--uncertainty` outputs (an ensemble: each run by its own, 1 for a run
without the file, then averaged); the labels are decoded from the unscaled probabilities,
so the segmentation is the same with and without it. `--calibration=false` (or
`--nocalibration`) writes the unscaled probabilities.
JAX's persistent compilation cache is on (`--compile_cache`, default
~/.cache/brats_jax/jax_compile_cache; empty: off): a later predict with the same run, batch
size and image shapes loads its compiled functions instead of compiling them again.
`--overlays=DIR` draws each case (`brats_jax.figures.overlays`: axial, coronal and sagittal slices
through the predicted tumour's centre over FLAIR and T1ce, beside the ground truth when the
case folder has one) into `DIR/<ID>.png` and lists them in `DIR/index.html`.
Post-processing (`brats_jax.inference.postprocess`): by default the run's
`postprocessing.json` (made by `python -m brats_jax.tune_postprocessing`) is applied when
present, else its config's `postprocess` fields; an ensemble applies its runs' choice when
they all agree and stops with a one-line error naming the runs that differ otherwise;
`--postprocessing=none` turns it off, `--postprocessing=FILE` applies another tuned choice.
nnU-Net raw data: `--input` an images folder (`DatasetXXX_Name/imagesTs`, or any folder of
`<ID>_0000.nii.gz` .. `<ID>_0003.nii.gz` files with a dataset.json in it or its parent, which
says which file is which modality: `brats_jax.data.nnunet`) and `--output` a folder: one
`<ID>.nii.gz` per case in the dataset's own label values (its dataset.json `labels`: the
region form of nnU-Net's BraTS conversion writes ED 1, NCR 2, ET 3), as nnU-Net does.
A case folder may lack one modality file when every run was trained with modality dropout
(`augment.modality_dropout_p` > 0): that channel is 0 and a warning names it; otherwise a
missing file is an error.
"""

import os

import numpy as np
from absl import app, flags

from brats_jax import MODALITIES, cli, runtime
from brats_jax.data import brats, nnunet
from brats_jax.inference import (
    calibration_file,
    case_lists,
    case_prediction,
    ensembles,
    work_split,
)

FLAGS = flags.FLAGS
# The flags every command using trained runs shares are defined once, in brats_jax.cli
# (allow_override: one process may import several commands); predict's --workdir takes an
# ensemble. --overlays is shared with evaluate, defined alike there.
cli.define_run_flags("tta", "step", "batch_size", "sliding_window", workdir="ensemble")
flags.DEFINE_string(
    "input",
    None,
    "Case folder, folder of case folders, comma-separated case folders, or an nnU-Net images "
    "folder (imagesTs; its dataset.json in it or its parent).",
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
flags.DEFINE_bool(
    "calibration", True,
    "Temperature-scale --probabilities and --uncertainty by each run's calibration.json when "
    "it has one (brats_jax.calibrate); false: unscaled. Labels never change.",
)  # fmt: skip
flags.DEFINE_string(
    "postprocessing",
    "auto",
    "auto (each run's postprocessing.json, else its config; an ensemble's runs must agree), "
    "none, or a JSON file.",
)
flags.DEFINE_integer("num_parts", 1, "Split a folder of cases into this many parts (machines).")
flags.DEFINE_integer(
    "part_id", 0, "The part this process segments, 0..num_parts-1 (round-robin over case IDs)."
)
flags.DEFINE_string(
    "overlays", None, "Folder for a picture per case and an index.html.", allow_override=True
)
flags.DEFINE_string(
    "compile_cache", str(runtime.default_compile_cache_dir()),
    "Folder of JAX's persistent compilation cache: a second predict of the same run skips "
    "most compilation. Empty: no cache.",
)  # fmt: skip


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


def _single_case(files: dict):
    """The one case of `--input` (a case folder) or of the modality files."""
    if FLAGS.input:
        if not os.path.isdir(FLAGS.input):
            raise FileNotFoundError(f"--input {FLAGS.input}: not a folder of NIfTI files")
        if nnunet.is_images_folder(FLAGS.input):  # an nnU-Net images folder of one case
            missing_ok = ensembles.trained_with_modality_dropout(
                ensembles.saved_configs(FLAGS.workdir)
            )
            cases = nnunet.cases_in_folder(FLAGS.input, allow_missing=missing_ok)
            if len(cases) != 1:
                raise app.UsageError(
                    f"--input {FLAGS.input} holds {len(cases)} nnU-Net cases; give --output a "
                    "folder"
                )
            return cases[0]
        return FLAGS.input
    missing = [f"--{m}" for m in MODALITIES if m not in files]
    if missing:
        raise app.UsageError(f"missing {', '.join(missing)}: all four modalities are needed")
    return brats.case_from_files(files, naming=FLAGS.naming or "2018")


def _predict_folder(options: dict) -> None:
    """`--output` a folder: segment the cases of `--input` (this process's part of them)."""
    if not FLAGS.input:
        raise app.UsageError(f"--output {FLAGS.output}: give a .nii or .nii.gz file name")
    for name in ("probabilities", "uncertainty"):
        if getattr(FLAGS, name) and _is_nifti_name(getattr(FLAGS, name)):
            raise app.UsageError(f"--{name}: give a folder when --output is a folder")
    missing_ok = ensembles.trained_with_modality_dropout(ensembles.saved_configs(FLAGS.workdir))
    cases = case_lists.cases_from_input(FLAGS.input, missing_ok)
    cases = case_lists.case_part(cases, FLAGS.part_id, FLAGS.num_parts)
    if not cases:
        print(f"part {FLAGS.part_id} of {FLAGS.num_parts}: no cases to segment")
        return
    written = case_prediction.predict_cases(
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


def _predict_file(files: dict, options: dict) -> None:
    """`--output` a NIfTI file: segment the one case of `--input` or of the modality files."""
    if FLAGS.input and "," in FLAGS.input:
        raise app.UsageError(f"--output {FLAGS.output} is one file; give a folder for many cases")
    for name in ("probabilities", "uncertainty"):  # checked before the model loads
        if getattr(FLAGS, name) and not _is_nifti_name(getattr(FLAGS, name)):
            raise app.UsageError(f"--{name} {getattr(FLAGS, name)}: give a .nii or .nii.gz file")
    if FLAGS.num_parts != 1:
        raise app.UsageError("--num_parts splits a folder of cases; give --output a folder")
    labels = case_prediction.predict_case(
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


def _note_calibration() -> None:
    """Say which runs' temperatures scale the probabilities / uncertainty written."""
    if not (FLAGS.calibration and (FLAGS.probabilities or FLAGS.uncertainty)):
        return
    files = [calibration_file.path_of(w) for w in case_lists.split_list(FLAGS.workdir)]
    if found := [str(f) for f in files if f.is_file()]:
        print(f"probabilities temperature-scaled by {', '.join(found)} (--calibration=false: off)")


def main(argv) -> None:
    # fast XLA:CPU flags, the compile cache etc., before JAX computes (brats_jax.runtime)
    runtime.setup(compile_cache=FLAGS.compile_cache or None)
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
        sliding_window=cli.SLIDING_WINDOW[FLAGS.sliding_window],
        postprocessing=FLAGS.postprocessing,
        calibration=FLAGS.calibration,
    )
    _note_calibration()
    _check_distinct_outputs(("output", "probabilities", "uncertainty"))
    if _is_nifti_name(FLAGS.output):
        _predict_file(files, options)
    else:
        _predict_folder(options)


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
