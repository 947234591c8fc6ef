"""Fit temperature scaling of a trained run on labelled cases and store it in the run folder.

    python -m brats_jax.calibrate --workdir=RUN [--cases=ID1,ID2,...] [--tta=flips]

Predicts the network's logits of each case (as `brats_jax.predict` does, with the same
`--tta` and `--step`), samples up to `--max_voxels` brain voxels per case (any modality
non-zero; seeded) and fits the temperature that minimises their negative log-likelihood:
one T for a run with `model.output=classes` (softmax(z / T): the argmax cannot change), one
per region for `regions` (sigmoid(z / T_r): the sign of z, hence the 0.5 threshold, cannot
change). Writes `RUN/calibration.json` (atomically; a previous one is replaced): the
temperature, the cases, and the NLL, expected calibration error (15 bins, one-vs-rest per
class or region) and reliability bins before and after on those voxels; and beside it
`RUN/calibration.png`, their reliability diagram (before and after). `predict --probabilities` and
`--uncertainty` then use it (`--calibration=false` turns it off); the labels never do.
`--cases` are case folders or case IDs found under `--data_root` (default: the run's
`data.root`); default: the run's validation cases (`data.val_cases`, or those its split drew
with `data.val_fraction` / `data.num_folds`). Fit on cases the run did not train on and that
are not its test cases (a warning names test cases). The work is
`brats_jax.inference.temperature.fit_run`.
"""

from __future__ import annotations

from absl import app, flags

from brats_jax import cli, runtime
from brats_jax.figures import plots
from brats_jax.inference import calibration_file, temperature
from brats_jax.inference.case_lists import split_list

FLAGS = flags.FLAGS
FIGURE = "calibration.png"  # the fitting voxels' reliability diagram, beside calibration.json
# --workdir (one run), --tta, --step, --batch_size and --data_root: brats_jax.cli, shared with
# predict and tune_postprocessing. --cases is tune_postprocessing's too, with another default.
cli.define_run_flags("tta", "step", "batch_size", "data_root", workdir="one")
flags.DEFINE_string(
    "cases", "", "Comma-separated case folders or IDs (default: the run's validation cases).",
    allow_override=True,
)  # fmt: skip
flags.DEFINE_integer(
    "max_voxels", temperature.MAX_VOXELS, "Brain voxels per case used (a seeded sample)."
)


def _describe(record: dict) -> str:
    """One line: the temperature(s) and the ECE before -> after."""
    t = record["temperature"]
    temps = (
        f"T = {t:.3f}"
        if isinstance(t, float)
        else ", ".join(f"T_{k} = {v:.3f}" for k, v in t.items())
    )
    ece = ", ".join(
        f"{k} {record['before']['ece'][k]:.4f} -> {v:.4f}"
        for k, v in record["after"]["ece"].items()
        if v is not None
    )
    return f"{temps}; ECE on the fitting voxels: {ece}"


def main(argv) -> None:
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if len(split_list(FLAGS.workdir)) != 1:
        raise app.UsageError("--workdir: one run (each run of an ensemble gets its own file)")
    if FLAGS.max_voxels < 1:
        raise app.UsageError(f"--max_voxels {FLAGS.max_voxels}: expected at least 1")
    record = temperature.fit_run(
        FLAGS.workdir,
        split_list(FLAGS.cases),
        step=FLAGS.step,
        tta=FLAGS.tta,
        batch_size=FLAGS.batch_size,
        max_voxels=FLAGS.max_voxels,
        data_root=FLAGS.data_root,
    )
    path = calibration_file.save(FLAGS.workdir, record)
    figure = path.with_name(FIGURE)
    plots.reliability_diagram(
        record["after"]["reliability"], figure, before=record["before"]["reliability"],
        title="Fitting cases' brain voxels: before / after temperature scaling",
    )  # fmt: skip
    print(_describe(record))
    print(f"wrote {path} ({len(record['fitted_on']['cases'])} case(s)) and {figure}")


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
