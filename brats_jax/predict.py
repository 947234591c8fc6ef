"""Segment one patient: NIfTI case folder in, label NIfTI out.

    python -m brats_jax.predict --workdir=RUN --input=CASE_DIR --output=SEG.nii.gz

Uses the run's best checkpoint (by validation Dice; the newest when no validation ran),
predicts every axial slice, and writes a label volume with the input's shape, affine and
header in the input's own label convention: ET = 4 for BraTS 2018-2021 naming
(`<ID>_flair.nii.gz`), ET = 3 for BraTS 2023 naming (`<ID>-t2f.nii.gz`). Slices are
resized to the run's `data.image_size` for the model and the class probabilities are
resized back to full size. `--probabilities=FILE.nii.gz` also writes the (H, W, D, 4)
float32 class probabilities. Outputs are written atomically.
"""

import os
import pathlib

import numpy as np
from absl import app, flags

from brats_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run folder (holds config.json, checkpoints/).")
flags.DEFINE_string("input", None, "Case folder with the four modality NIfTI files.")
flags.DEFINE_string("output", None, "Output label NIfTI path (.nii or .nii.gz).")
flags.DEFINE_string("probabilities", None, "Optional output NIfTI of class probabilities.")
flags.DEFINE_integer("step", None, "Checkpoint step to use instead of the best one.")
flags.DEFINE_integer("batch_size", 0, "Slices per model call (0: the run's eval.batch_size).")


def predict_case(workdir, case_dir, output, *, probabilities=None, step=None, batch_size=0):
    """Predict `case_dir` with the run in `workdir`; write `output` (and `probabilities`).

    Returns the written label array, int16 (H, W, D), in the release's label convention.
    """
    import nibabel as nib

    from brats_jax import fileio, inference, train
    from brats_jax.data import brats

    case = brats.load_case(case_dir, require_label=False)
    config, model, variables = train.load_trained(workdir, step=step)
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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("workdir", "input", "output"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    if not pathlib.Path(FLAGS.input).is_dir():
        raise FileNotFoundError(f"--input {FLAGS.input}: not a folder of NIfTI files")
    labels = predict_case(
        FLAGS.workdir,
        FLAGS.input,
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
