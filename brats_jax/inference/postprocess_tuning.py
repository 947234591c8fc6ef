"""Tune a run's (or an ensemble's) 3D post-processing on labelled cases: `tune_run` predicts
them as predict does, picks the thresholds (`postprocess.tune_postprocessing`) and writes
the choice predict then applies (`postprocess.save`)."""

import json
import pathlib

from brats_jax.data import brats, nnunet
from brats_jax.inference import ensembles, postprocess
from brats_jax.inference.case_lists import split_list
from brats_jax.inference.case_prediction import segment, spacing

OBJECTIVE_TEXT = {
    "dice": "mean over cases of the mean of the WT, TC and ET Dice",
    "lesionwise": (
        "mean over cases of the mean of the WT, TC and ET lesion-wise Dice (BraTS 2023), "
        "ties broken by the lower mean lesion-wise HD95 (mm)"
    ),
}
"""The `objective` entry of the tuning record, per `--objective`."""


def resolve_cases(cases: list[str], data_root: str) -> list:
    """Case folders as given, IDs looked up among the `brats.find_cases` of `data_root` (the
    training cases of an nnU-Net dataset folder: `nnunet.find_cases`)."""
    by_id = None
    out = []
    for c in cases:
        if pathlib.Path(c).is_dir():
            out.append(c)
            continue
        if by_id is None:
            if not data_root:
                raise ValueError(f"--cases {c}: not a folder, and no --data_root to look it up")
            find = nnunet.find_cases if nnunet.is_dataset(data_root) else brats.find_cases
            by_id = {k.case_id: k for k in find(data_root)}
        if c not in by_id:
            raise ValueError(f"--cases {c}: no such case folder or case ID under {data_root}")
        out.append(by_id[c])
    return out


def tested_cases(ensemble: ensembles.Ensemble) -> set[str]:
    """The case IDs any run of `ensemble` is tested on: its `data.test_cases`, and the cases
    its `results.json` scores (the split it drew, e.g. by `data.test_fraction`)."""
    tested = set()
    configs = ensemble.configs or [ensemble.config]
    for workdir, config in zip(ensemble.workdirs, configs, strict=True):
        tested |= set(split_list(config.data.get("test_cases", "")))
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
    objective="dice",
    log=print,
):
    """Predict `cases` (folders or IDs, see `resolve_cases`; empty: the run's
    `data.val_cases`) with the run(s), tune for `objective` ("dice" | "lesionwise", see
    `postprocess.tune_postprocessing`; each case at its header's voxel size), and write
    `output`. Returns `postprocess.Tuned`."""
    ensemble = ensembles.load_ensemble(workdirs, step=step, tta=tta)
    config = ensemble.config
    cases = split_list(cases) or split_list(config.data.get("val_cases", ""))
    if not cases:
        raise ValueError("--cases: give the tuning cases (the run has no data.val_cases)")
    preds, gts, ids, spacings = [], [], [], []
    for case in resolve_cases(cases, data_root or config.data.get("root", "")):
        data, labels, _ = segment(ensemble, case, batch_size=batch_size)
        if data.label is None:
            raise FileNotFoundError(f"case {data.case_id}: no label file; tuning needs labels")
        preds.append(labels)
        gts.append(data.label)
        ids.append(data.case_id)
        spacings.append(spacing(data))
        log(f"predicted {data.case_id}")
    if overlap := sorted(tested_cases(ensemble) & set(ids)):
        log(f"warning: tuning on the run's test case(s) {overlap}: their test scores are biased")
    tuned = postprocess.tune_postprocessing(
        preds, gts, candidates, objective=objective, spacings=spacings, log=log
    )
    tuning = {
        "cases": ids,
        "workdirs": list(ensemble.workdirs),
        "tta": tta,
        "step": step,
        "objective": OBJECTIVE_TEXT[objective],
        "score_before": tuned.score_before,
        "score_after": tuned.score_after,
        "trials": [{"config": c, "score": s} for c, s in tuned.trials],
    }
    if objective == "lesionwise":
        tuning.update(hd95_before=tuned.hd95_before, hd95_after=tuned.hd95_after)
        for trial, hd95 in zip(tuning["trials"], tuned.trials_hd95, strict=True):
            trial["hd95"] = hd95
    postprocess.save(output, tuned.config, tuning)
    return tuned
