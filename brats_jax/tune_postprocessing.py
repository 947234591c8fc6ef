"""Tune the 3D post-processing of a run on labelled cases and store the choice in the run.

    python -m brats_jax.tune_postprocessing --workdir=RUN --cases=ID1,ID2,... [--tta=flips]
        [--objective=dice|lesionwise]

Predicts each tuning case with the run (as `brats_jax.predict` does, with the same `--tta`
and `--step`), then picks the thresholds with `postprocess.tune_postprocessing` (nnU-Net
style: a step is kept when it does not lower the objective: with `--objective=dice`, the
default, the mean over cases of the mean WT/TC/ET Dice; with `lesionwise`, the mean over
cases of the mean WT/TC/ET lesion-wise Dice of the BraTS 2023 challenge, ties broken by the
lower lesion-wise HD95). The steps: whole-tumour components, TC components and ET components
below `--tc_min_mm3` / `--et_min_mm3` (mm^3; "auto": 10,25,50,100,200,500 for lesionwise,
none for dice) relabelled or removed (`--tc_actions`, `--et_actions`), the total-ET
relabelling. Writes them, with the scores and every trial, to `RUN/postprocessing.json`
(atomically), which `predict` then applies. `--cases` are case folders or case IDs found
under `--data_root` (default: the run's `data.root`); default: the run's `data.val_cases`.
Tune on cases the run did not train on and that are not its test cases: thresholds tuned
on test cases make test scores optimistic (a warning says so). Several comma-separated
`--workdir`s tune for their ensemble; `--output_json` is then required. `--workdir`, `--tta`,
`--step` and `--batch_size` mean what they mean to `brats_jax.predict`. The work is
`brats_jax.inference.postprocess_tuning.tune_run`.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from brats_jax import cli, runtime
from brats_jax.inference import postprocess
from brats_jax.inference.case_lists import split_list
from brats_jax.inference.postprocess_tuning import tune_run

FLAGS = flags.FLAGS
# --workdir (an ensemble), --tta, --step, --batch_size and --data_root: brats_jax.cli, shared
# with predict and calibrate. --cases is calibrate's too, with another default.
cli.define_run_flags("tta", "step", "batch_size", "data_root", workdir="ensemble")
flags.DEFINE_string(
    "cases", "", "Comma-separated case folders or IDs (default data.val_cases).",
    allow_override=True,
)  # fmt: skip
flags.DEFINE_string("output_json", "", "JSON to write (default: WORKDIR/postprocessing.json).")
flags.DEFINE_string("min_component_voxels", "50,100,250,500,1000,2500,5000", "Sizes to try.")
flags.DEFINE_bool("largest_component", True, "Also try keeping only the largest component.")
flags.DEFINE_string("connectivity", "26,6", "Connectivities to try (6 and/or 26).")
flags.DEFINE_string("et_min_voxels", "50,100,200,300,500,750,1000", "ET thresholds to try.")
flags.DEFINE_enum(
    "objective", "dice", list(postprocess.OBJECTIVES),
    "dice: mean WT/TC/ET Dice; lesionwise: mean WT/TC/ET lesion-wise Dice (BraTS 2023), "
    "ties broken by the lower lesion-wise HD95.",
)  # fmt: skip
flags.DEFINE_string(
    "tc_min_mm3", "auto", "TC component thresholds (mm^3) to try; auto: "
    "10,25,50,100,200,500 for --objective=lesionwise, none for dice; '' none.",
)  # fmt: skip
flags.DEFINE_string("tc_actions", "relabel,remove", "TC actions to try (relabel -> ED, remove).")
flags.DEFINE_string("et_min_mm3", "auto", "ET component thresholds (mm^3) to try; as --tc_min_mm3.")
flags.DEFINE_string("et_actions", "relabel,remove", "ET actions to try (relabel -> NCR, remove).")


def _ints(value: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{flag}={value!r}: expected comma-separated whole numbers") from None


def _mm3(value: str, flag: str) -> tuple[float, ...]:
    """A threshold flag's volumes; "auto": `postprocess.REGION_MM3` for the lesion-wise
    objective, none for Dice (the tuning of older versions)."""
    if value == "auto":
        return postprocess.REGION_MM3 if FLAGS.objective == "lesionwise" else ()
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = None
    if out is None or any(not 0 < v < float("inf") for v in out):
        raise ValueError(f"--{flag}={value!r}: expected auto or comma-separated volumes > 0 (mm^3)")
    return out


def _actions(value: str, flag: str) -> tuple[str, ...]:
    out = tuple(v.strip() for v in value.split(",") if v.strip())
    if not out or any(a not in postprocess.ACTIONS for a in out):
        raise ValueError(f"--{flag}={value!r}: expected relabel and/or remove, comma-separated")
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    workdirs = split_list(FLAGS.workdir)
    output = FLAGS.output_json
    if not output:
        if len(workdirs) > 1:
            raise app.UsageError("--output_json is required to tune an ensemble of several runs")
        output = str(pathlib.Path(workdirs[0]) / postprocess.POSTPROCESSING_FILE)
    candidates = postprocess.TuningCandidates(
        min_component_voxels=_ints(FLAGS.min_component_voxels, "min_component_voxels"),
        largest_component=FLAGS.largest_component,
        connectivities=_ints(FLAGS.connectivity, "connectivity"),
        et_min_voxels=_ints(FLAGS.et_min_voxels, "et_min_voxels"),
        tc_min_mm3=_mm3(FLAGS.tc_min_mm3, "tc_min_mm3"),
        tc_actions=_actions(FLAGS.tc_actions, "tc_actions"),
        et_min_mm3=_mm3(FLAGS.et_min_mm3, "et_min_mm3"),
        et_actions=_actions(FLAGS.et_actions, "et_actions"),
    )
    for conn in candidates.connectivities:
        postprocess.PostprocessConfig(connectivity=conn)  # ValueError naming a bad one
    tuned = tune_run(
        workdirs,
        FLAGS.cases,
        output,
        candidates=candidates,
        data_root=FLAGS.data_root,
        tta=FLAGS.tta,
        step=FLAGS.step,
        batch_size=FLAGS.batch_size,
        objective=FLAGS.objective,
    )
    what = "mean Dice" if FLAGS.objective == "dice" else "mean lesion-wise Dice"
    print(
        f"wrote {output}: {tuned.config} ({what} {tuned.score_before:.4f} -> "
        f"{tuned.score_after:.4f})"
    )


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
