r"""BraTS metrics for a folder of predicted segmentations against ground truth.

Usage::

  python -m brats_jax.evaluate --pred=DIR --gt=DIR --out=FILE.csv [--hd95_mode=max|pooled]
      [--missing=worst|skip] [--apply_postprocessing=FILE.json] [--metrics=standard|lesionwise]
      [--overlays=DIR]

* Predictions: ``<ID>.nii.gz``, ``<ID>_seg.nii.gz`` or ``<ID>-seg.nii.gz`` (``.nii`` too) in
  ``--pred``. Files there that are not label maps - ``predict``'s ``--uncertainty`` and
  ``--probabilities`` maps (4-D, non-integer floats, or floats named ``<ID>_unc``,
  ``<ID>_probs``, ...) - are skipped with a note naming them.
* Ground truth ``--gt``: case folders at any depth (``<ID>/<ID>_seg.nii.gz``, BraTS
  2018-2021, also under ``HGG/`` and ``LGG/``; ``<ID>/<ID>-seg.nii.gz``, BraTS 2023; a case
  folder with no such file but exactly one other ``*seg*.nii[.gz]`` file - e.g.
  BraTS20_Training_355's ``W39_1998.09.19_Segm.nii`` - uses that), or flat files named like
  the predictions at its top level.
* Labels are in the release convention: ``brats2018`` = {0,1,2,4} (ET = 4, BraTS 2018-2021),
  ``brats2023`` = {0,1,2,3} (ET = 3, also the training classes). ``--labels=auto`` (default)
  takes ``brats2023`` for GT files named ``*-seg.nii*``, ``brats2018`` for ``*_seg.nii*`` and
  otherwise decides from the GT values (a 4 means 2018, a 3 means 2023; a GT with neither
  takes 2018 if the prediction has a 4, else 2023); predictions use their case's GT
  convention unless ``--pred_labels`` says otherwise. Maps are converted to the
  training classes {0,1,2,3} before :func:`brats_jax.metrics.evaluate_volume`.
* Voxel spacing comes from the GT header zooms.

``--apply_postprocessing=FILE.json`` (a run's ``postprocessing.json`` from
``brats_jax.tune_postprocessing``, or any file ``brats_jax.inference.postprocess.save``
wrote) applies that 3D post-processing to each prediction before it is scored.

``--metrics=lesionwise`` adds the BraTS 2023 lesion-wise Dice and HD95 per region
(:mod:`brats_jax.metrics.lesionwise`; ``--lesion_dilation``, ``--lesion_dilation_neighbours``,
``--lesion_neighbours`` and ``--lesion_min_volume`` change the challenge's GLI constants):
``lesionwise_*`` columns in the CSV and a second table in the printout. The default
``standard`` writes today's columns only.

``--overlays=DIR`` draws each scored case (`brats_jax.figures.overlays`: axial, coronal and sagittal
slices through the predicted tumour's centre, ground truth beside prediction, over FLAIR and
T1ce read from the ground truth's case folder, labels only when they are not there) into
``DIR/<ID>.png`` and writes ``DIR/index.html``, worst whole-tumour Dice first (with
``--metrics=lesionwise`` also the lesion-wise Dice and false-positive / missed lesions). When
``predict --probabilities`` maps are found for scored cases - in ``--probabilities=DIR``
(predict's folder: ``<ID>.nii.gz``) or beside the predictions (``<ID>_probs.nii.gz``, any
4-D map of 3 or 4 channels) - it also draws their reliability diagram over all those cases'
brain voxels into ``DIR/reliability.png`` (``reliability_classes.png`` and
``reliability_regions.png`` when both kinds are there) and prints the expected calibration
error per class or region (:mod:`brats_jax.metrics.calibration`: 15 equal-width bins,
one-vs-rest).

Cases are matched by ID. A GT case without a prediction is scored as the BraTS challenge
scores it: Dice 0 and HD95 373.13 mm in every region (sensitivity and specificity 0, the
study's and the per-class Dice 0), with a warning naming the cases and their count in the
summary's first line; ``--missing=skip`` leaves them out instead. Predictions without GT are
reported and skipped. Writes one CSV row per case (atomically) and prints mean / std /
median per region for Dice and HD95. Errors end with a one-line message and exit status 1.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from brats_jax import cli, runtime
from brats_jax.figures import overlays, plots
from brats_jax.inference import postprocess
from brats_jax.metrics import lesionwise, volumes
from brats_jax.metrics.folder import (
    CONVENTIONS,
    METRIC_SETS,
    MISSING_MODES,
    REGION_NAMES,
    FolderReliability,
    evaluate_folder,
    find_probability_maps,
    summarize,
    write_csv,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("pred", None, "Folder of predicted segmentation NIfTIs.")
flags.DEFINE_string("gt", None, "Ground-truth folder (case folders or flat seg files).")
flags.DEFINE_string("out", None, "Per-case CSV to write.", allow_override=True)
flags.DEFINE_enum("labels", "auto", ["auto", *CONVENTIONS], "Ground-truth label convention.")
flags.DEFINE_enum("pred_labels", "same", ["same", *CONVENTIONS], "Prediction convention.")
flags.DEFINE_enum("hd95_mode", "max", list(volumes.HD95_MODES), "HD95 definition.")
flags.DEFINE_enum(
    "missing", "worst", list(MISSING_MODES), "GT case without prediction: score 0 or skip."
)
flags.DEFINE_string(
    "apply_postprocessing", None, "A postprocessing.json to apply to each prediction first."
)
flags.DEFINE_enum(
    "metrics", "standard", list(METRIC_SETS), "lesionwise: add BraTS 2023 lesion-wise scores."
)
flags.DEFINE_integer(
    "lesion_dilation", lesionwise.DILATION_ITERATIONS, "Lesion-wise: GT dilation iterations."
)
flags.DEFINE_enum(
    "lesion_dilation_neighbours", str(lesionwise.DILATION_NEIGHBOURS), ["6", "18", "26"],
    "Lesion-wise: neighbourhood of one dilation step.",
)  # fmt: skip
flags.DEFINE_enum(
    "lesion_neighbours", str(lesionwise.COMPONENT_NEIGHBOURS), ["6", "18", "26"],
    "Lesion-wise: connectivity of the connected components.",
)  # fmt: skip
flags.DEFINE_float(
    "lesion_min_volume", lesionwise.MIN_VOLUME, "Lesion-wise: GT lesions <= this (mm^3) ignored."
)

flags.DEFINE_string(  # predict and evaluate share it (both may be imported: tests)
    "overlays", None, "Folder for a picture per case and an index.html.", allow_override=True
)
flags.DEFINE_string(
    "probabilities", None,
    "With --overlays: folder of predict's probability maps (default: beside --pred's files) "
    "for a reliability diagram.",
    allow_override=True,
)  # fmt: skip


def _lesion_options() -> dict | None:
    """`evaluate_folder`'s lesion_options from the flags (None for --metrics=standard)."""
    if FLAGS.metrics != "lesionwise":
        return None
    return dict(
        dilation_iterations=FLAGS.lesion_dilation,
        dilation_neighbours=int(FLAGS.lesion_dilation_neighbours),
        component_neighbours=int(FLAGS.lesion_neighbours),
        min_volume=FLAGS.lesion_min_volume,
    )


# The per-case scores the pictures' index.html shows (all are in --out's CSV); with
# --metrics=lesionwise also the lesion-wise Dice and the false-positive and missed lesions.
INDEX_COLUMNS = [f"{m}_{r}" for m in ("dice", "hd95") for r in REGION_NAMES]
LESIONWISE_INDEX_COLUMNS = [
    f"lesionwise_{m}_{r}" for m in ("dice", "fp", "fn") for r in REGION_NAMES
]


def index_columns(rows) -> list[str]:
    """The index's columns: `INDEX_COLUMNS`, and `LESIONWISE_INDEX_COLUMNS` when the rows
    hold lesion-wise scores."""
    lesion = any("lesionwise_dice_WT" in r for r in rows)
    return INDEX_COLUMNS + (LESIONWISE_INDEX_COLUMNS if lesion else [])


def _reliability() -> FolderReliability | None:
    """The probability maps of --probabilities (else beside --pred), or None without any."""
    maps = find_probability_maps(pathlib.Path(FLAGS.probabilities or FLAGS.pred))
    if FLAGS.probabilities and not maps:
        raise ValueError(f"--probabilities {FLAGS.probabilities}: no (H, W, D, 3 or 4) NIfTI maps")
    return FolderReliability(maps) if maps else None


def _hooks(pictures, reliability):
    """evaluate_folder's on_case: draw the case and count its probabilities (either may be
    None)."""
    hooks = [h for h in (pictures and pictures.add_evaluated, reliability and reliability.add) if h]
    if not hooks:
        return None

    def on_case(*case) -> None:
        for hook in hooks:
            hook(*case)

    return on_case


def _write_reliability(reliability: FolderReliability | None) -> None:
    """Reliability diagram(s) into --overlays and one ECE line per output kind."""
    if reliability is None or not reliability.bins:
        return
    if reliability.notes:
        print(f"note: no images beside the ground truth of {_names(reliability.notes)}: all "
              "their voxels count in the reliability diagram", file=sys.stderr)  # fmt: skip
    for kind, bins in reliability.bins.items():
        name = "reliability.png" if len(reliability.bins) == 1 else f"reliability_{kind}.png"
        path = pathlib.Path(FLAGS.overlays) / name
        plots.reliability_diagram(bins.to_dict(), path, f"Reliability of {FLAGS.pred}")
        ece = ", ".join(f"{n} {e:.4f}" for n, e in zip(bins.names, bins.ece(), strict=True))
        print(f"ECE ({kind}, {bins.num_bins} bins, brain voxels): {ece}; wrote {path}")


def _names(ids: Sequence[str]) -> str:
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def main(argv: Sequence[str]) -> None:
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("pred", "gt", "out"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    try:
        pp = None
        if FLAGS.apply_postprocessing:
            pp = functools.partial(
                postprocess.apply, config=postprocess.load(FLAGS.apply_postprocessing)
            )
        pictures = overlays.CasePictures(FLAGS.overlays) if FLAGS.overlays else None
        reliability = _reliability() if pictures else None
        rows = evaluate_folder(
            FLAGS.pred,
            FLAGS.gt,
            labels=FLAGS.labels,
            pred_labels=FLAGS.pred_labels,
            hd95_mode=FLAGS.hd95_mode,
            missing=FLAGS.missing,
            postprocessing=pp,
            lesion_options=_lesion_options(),
            on_case=_hooks(pictures, reliability),
        )
        write_csv(rows, FLAGS.out)
        if pictures:
            pictures.write_index(rows, index_columns(rows))
            _write_reliability(reliability)
    except (ValueError, OSError) as e:  # EvaluationError is a ValueError
        raise SystemExit(f"brats_jax.evaluate: error: {e}") from None
    print(summarize(rows))
    print(f"wrote {FLAGS.out}", file=sys.stderr)


def run() -> None:
    """Console entry (as ``python -m brats_jax.evaluate``): a user mistake ends in one line."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
