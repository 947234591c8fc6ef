"""Tune the 3D post-processing of a run on labelled cases and store the choice in the run.

    python -m brats_jax.tune_postprocessing --workdir=RUN --cases=ID1,ID2,... [--tta=flips]

Predicts each tuning case with the run (as `brats_jax.predict` does, with the same `--tta`
and `--step`), then picks the thresholds with `postprocess.tune_postprocessing` (nnU-Net
style: a step is kept when it does not lower the mean over cases of the mean WT/TC/ET Dice)
and writes them, with the scores and every trial, to `RUN/postprocessing.json`
(atomically), which `predict` then applies. `--cases` are case folders or case IDs found
under `--data_root` (default: the run's `data.root`); default: the run's `data.val_cases`.
Tune on cases the run did not train on and that are not its test cases: thresholds tuned
on test cases make test scores optimistic (a warning says so). Several comma-separated
`--workdir`s tune for their ensemble; `--output_json` is then required. `--workdir`, `--tta`,
`--step` and `--batch_size` are `brats_jax.predict`'s flags (same meaning).
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import app, flags

from brats_jax import cli, runtime
from brats_jax import predict as _predict  # noqa: F401  (defines --workdir, --tta, --step, --batch_size)

FLAGS = flags.FLAGS
flags.DEFINE_string("cases", "", "Comma-separated case folders or IDs (default data.val_cases).")
flags.DEFINE_string("data_root", "", "Where case IDs are looked up (default: the run's data.root).")
flags.DEFINE_string("output_json", "", "JSON to write (default: WORKDIR/postprocessing.json).")
flags.DEFINE_string("min_component_voxels", "50,100,250,500,1000,2500,5000", "Sizes to try.")
flags.DEFINE_bool("largest_component", True, "Also try keeping only the largest component.")
flags.DEFINE_string("connectivity", "26,6", "Connectivities to try (6 and/or 26).")
flags.DEFINE_string("et_min_voxels", "50,100,200,300,500,750,1000", "ET thresholds to try.")


def _ints(value: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{flag}={value!r}: expected comma-separated whole numbers") from None


def resolve_cases(cases: list[str], data_root: str) -> list:
    """Case folders as given, IDs looked up among the `brats.find_cases` of `data_root`."""
    from brats_jax.data import brats

    by_id = None
    out = []
    for c in cases:
        if pathlib.Path(c).is_dir():
            out.append(c)
            continue
        if by_id is None:
            if not data_root:
                raise ValueError(f"--cases {c}: not a folder, and no --data_root to look it up")
            by_id = {k.case_id: k for k in brats.find_cases(data_root)}
        if c not in by_id:
            raise ValueError(f"--cases {c}: no such case folder or case ID under {data_root}")
        out.append(by_id[c])
    return out


def _tested_cases(ensemble) -> set[str]:
    """The case IDs any run of `ensemble` is tested on: its `data.test_cases`, and the cases
    its `results.json` scores (the split it drew, e.g. by `data.test_fraction`)."""
    from brats_jax import predict

    tested = set()
    configs = ensemble.configs or [ensemble.config]
    for workdir, config in zip(ensemble.workdirs, configs, strict=True):
        tested |= set(predict.split_list(config.data.get("test_cases", "")))
        results = pathlib.Path(workdir) / "results.json"
        if results.is_file():
            per_case = json.loads(results.read_text()).get("per_case", [])
            tested |= {str(row["case_id"]) for row in per_case}
    return tested


def tune_run(
    workdirs,
    cases,
    output,
    *,
    candidates,
    data_root="",
    tta="none",
    step=None,
    batch_size=0,
    log=print,
):
    """Predict `cases` (folders or IDs, see `resolve_cases`; empty: the run's
    `data.val_cases`) with the run(s), tune, and write `output`. Returns `postprocess.Tuned`."""
    from brats_jax import predict
    from brats_jax.inference import postprocess

    ensemble = predict.load_ensemble(workdirs, step=step, tta=tta)
    config = ensemble.config
    cases = predict.split_list(cases) or predict.split_list(config.data.get("val_cases", ""))
    if not cases:
        raise ValueError("--cases: give the tuning cases (the run has no data.val_cases)")
    preds, gts, ids = [], [], []
    for case in resolve_cases(cases, data_root or config.data.get("root", "")):
        data, labels, _ = predict.segment(ensemble, case, batch_size=batch_size)
        if data.label is None:
            raise FileNotFoundError(f"case {data.case_id}: no label file; tuning needs labels")
        preds.append(labels)
        gts.append(data.label)
        ids.append(data.case_id)
        log(f"predicted {data.case_id}")
    if overlap := sorted(_tested_cases(ensemble) & set(ids)):
        log(f"warning: tuning on the run's test case(s) {overlap}: their test scores are biased")
    tuned = postprocess.tune_postprocessing(preds, gts, candidates, log=log)
    tuning = {
        "cases": ids,
        "workdirs": list(ensemble.workdirs),
        "tta": tta,
        "step": step,
        "objective": "mean over cases of the mean of the WT, TC and ET Dice",
        "score_before": tuned.score_before,
        "score_after": tuned.score_after,
        "trials": [{"config": c, "score": s} for c, s in tuned.trials],
    }
    postprocess.save(output, tuned.config, tuning)
    return tuned


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    from brats_jax import predict
    from brats_jax.inference import postprocess

    workdirs = predict.split_list(FLAGS.workdir)
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
    )
    print(
        f"wrote {output}: {tuned.config} (mean Dice {tuned.score_before:.4f} -> "
        f"{tuned.score_after:.4f})"
    )


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cli.run_app(main)


if __name__ == "__main__":
    run()
