"""Segment one patient: NIfTI case folder in, label NIfTI out.

    python -m brats_jax.predict --workdir=RUN --input=CASE_DIR --output=SEG.nii.gz
    python -m brats_jax.predict --workdir=RUN --flair=F --t1=F --t1ce=F --t2=F --output=SEG.nii.gz

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
resized back to full size. `--probabilities=FILE.nii.gz` also writes the (H, W, D, 4)
float32 class probabilities. Outputs are written atomically.
"""

import os
import pathlib

import numpy as np
from absl import app, flags

from brats_jax import MODALITIES, cli, runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run folder (holds config.json, checkpoints/).")
flags.DEFINE_string("input", None, "Case folder with the four modality NIfTI files.")
for _m in MODALITIES:
    flags.DEFINE_string(_m, None, f"{_m} NIfTI file of any name (instead of --input).")
flags.DEFINE_enum(
    "naming", None, ["2018", "2023"], "With --flair etc.: output label convention (ET 4 or 3)."
)
flags.DEFINE_string("output", None, "Output label NIfTI path (.nii or .nii.gz).")
flags.DEFINE_string("probabilities", None, "Optional output NIfTI of class probabilities.")
flags.DEFINE_integer("step", None, "Checkpoint step to use instead of the best one.")
flags.DEFINE_integer("batch_size", 0, "Slices per model call (0: the run's eval.batch_size).")


def input_normalization(source: str) -> str:
    """`brats.load_case` normalization matching what a run trained on `source` saw.

    Kaggle slices come z-scored per slice over all pixels ("slice"); NIfTI cases are
    z-scored over the brain of the whole volume ("brain"), the closest match too for the
    synthetic phantoms (z-scored per slice over the brain; demo models are not meant for
    real scans).
    """
    return "slice" if source == "kaggle_h5" else "brain"


def predict_case(workdir, case, output, *, probabilities=None, step=None, batch_size=0):
    """Predict `case` (a case folder or a `brats.Case`) with the run in `workdir`.

    Writes the label NIfTI `output` (and the class probabilities to `probabilities`).

    Returns the written label array, int16 (H, W, D), in the release's label convention.
    """
    import nibabel as nib

    from brats_jax import fileio, inference, train
    from brats_jax.data import brats

    for path in (output, probabilities):  # before the model loads and inference runs
        if path:
            fileio.check_writable(path)
    config, model, variables = train.load_trained(workdir, step=step)
    case = brats.load_case(
        case, require_label=False, normalization=input_normalization(config.data.source)
    )
    predict = inference.make_slice_predictor(model, image_size=config.data.image_size)
    probs = inference.predict_volume(
        predict, variables, case.image, batch_size=batch_size or config.eval.batch_size
    )
    labels = brats.to_release_labels(np.argmax(probs, axis=-1), case.naming).astype(np.int16)
    header = case.header.copy()
    header.set_data_dtype(np.int16)
    header.set_slope_inter(1, 0)
    _save_nifti(nib.Nifti1Image(labels, case.affine, header), output, fileio)
    if probabilities:
        prob_header = case.header.copy()
        prob_header.set_data_dtype(np.float32)
        prob_header.set_slope_inter(1, 0)
        _save_nifti(
            nib.Nifti1Image(probs.astype(np.float32), case.affine, prob_header),
            probabilities,
            fileio,
        )
    return labels


def _save_nifti(img, path, fileio) -> None:
    import nibabel as nib

    with fileio.atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def main(argv) -> None:
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("workdir", "output"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    files = {m: getattr(FLAGS, m) for m in MODALITIES if getattr(FLAGS, m)}
    if FLAGS.input:
        if files or FLAGS.naming:
            given = ", ".join(f"--{m}" for m in [*files, *(["naming"] if FLAGS.naming else [])])
            raise app.UsageError(f"give either --input or the modality files, not both ({given})")
        if not pathlib.Path(FLAGS.input).is_dir():
            raise FileNotFoundError(f"--input {FLAGS.input}: not a folder of NIfTI files")
        case = FLAGS.input
    elif files:
        from brats_jax.data import brats

        missing = [f"--{m}" for m in MODALITIES if m not in files]
        if missing:
            raise app.UsageError(f"missing {', '.join(missing)}: all four modalities are needed")
        case = brats.case_from_files(files, naming=FLAGS.naming or "2018")
    else:
        raise app.UsageError("give --input (a case folder) or --flair, --t1, --t1ce and --t2")
    labels = predict_case(
        FLAGS.workdir,
        case,
        FLAGS.output,
        probabilities=FLAGS.probabilities,
        step=FLAGS.step,
        batch_size=FLAGS.batch_size,
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
