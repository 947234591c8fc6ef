"""Cross-validated ablation of the segmentation options and the generalisation recipe on real
NIfTI cases (EXPERIMENTS.md, "Segmentation options on the real sample" and "Generalisation
recipe").

    python -m experiments.analyses.segmentation_ablation all|train,predict|score \\
        --data_root=NIFTI_ROOT --out=DIR \\
        [--folds=3 | --folds_file=experiments/folds_41_cases.json] \\
        [--variants=baseline,context,regions,context_regions] [--parallel=4] \\
        [--objectives=dice,lesionwise] [--lesion_wise] [--set=FIELD=VALUE ...]

The cases under `--data_root` are cut into `--folds` patient-level folds
(`data.folds.fold_cases`, `--fold_seed`, 0 by default), or take the folds written in
`--folds_file` (issue 47's 41 real cases: `experiments/folds_41_cases.json`). Each training
variant (`VARIANTS`: the `cpu` preset's budget with the variant's fields; "a+b" is variants
a and b together) is trained once per fold: fold i's cases are that run's test cases, the
other folds' cases train it (the `cpu` preset has no validation split).
Stages, each resumable (finished parts are skipped), `all` runs them in order:

* `train`: one `python -m brats_jax.main` per (variant, fold) into `DIR/runs/<variant>-fold<i>`,
  `--parallel` at a time (they share one GPU, or the CPU cores);
* `predict`: each run segments its own test cases (out-of-fold) once per TTA setting
  (`--ttas`); labels {0..3} go to `DIR/predictions/<variant>-fold<i>.npz` (uint8, key
  "<tta>__<case>"). A variant whose extra parts set only `eval.*` fields ("a+sliding_window":
  nnU-Net's sliding-window inference at the patch size) is not trained: it predicts with
  variant a's runs (`training_variant`);
* `score`: rows per variant and TTA setting: no post-processing, the largest whole-tumour
  component (a fixed rule), and tuned post-processing (`postprocess.tune_postprocessing`,
  both nnU-Net steps; one row per `--objectives`: "tuned" for voxel Dice, "tuned_lesionwise"
  for the lesion-wise score, which also tries the TC / ET component rules) whose thresholds
  for fold i are chosen on the other folds' out-of-fold predictions, never on fold i's
  labels. `--lesion_wise` adds the BraTS 2023 lesion-wise scores, a table of them with the
  false-positive and missed lesions, the declared rule of `experiments/folds_41_cases.json`
  (`declared_choice`), issue 47's targets and the chosen row's three worst cases. Dice and
  HD95 per region per case (`metrics.evaluate_volume`, HD95 as `eval.hd95_mode`), mean and
  standard deviation over all cases, and each fold's mean. Writes `DIR/ablation.json` and
  `DIR/ablation.md`; with the generalisation recipe's rows (`cb_*`) the table ends with its
  declared rules' verdicts (`recipe_choice`, `replicate_choice` for each combination, and
  `diagnosis_candidate` when the combination's leave-one-out rows are scored on
  BraTS2021_00014).
* `final` (after `score --lesion_wise`, not part of `all`): the declared rule's row as a
  model's settings, written to `DIR/final.json` and printed as config fields (`eval.tta`,
  `postprocess.*`): a tuned row's thresholds are tuned again on all cases' out-of-fold
  predictions (as nnU-Net fixes its post-processing on the cross-validation's predictions);
  the fields of issue 47's `cpu_best` come from it.

`table --records=A.json,B.json` prints the table and verdicts of records already scored
(rows of the same folds, e.g. those kept in `experiments/results/` and a variant scored
later), without their run folders.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from brats_jax import cli, fileio, metrics, runtime
from brats_jax.data import augment, brats
from brats_jax.data.folds import fold_cases
from brats_jax.inference import postprocess
from brats_jax.labels import to_train_labels
from configs import default
from experiments.analyses.postprocessing_ablation import KEYS, REGIONS, predict_all, score_case

# Training variants: fields set on top of `configs/unet.py:cpu`.
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "context": {"data.context_slices": 1},
    "regions": {"model.output": "regions"},
    "context_regions": {"data.context_slices": 1, "model.output": "regions"},
}
# The segmentation options' rows, the default `--variants` (EXPERIMENTS.md, "Segmentation
# options on the real sample")
OPTION_VARIANTS = tuple(VARIANTS)
# The generalisation recipe's rows (EXPERIMENTS.md, "Generalisation recipe"): each of
# nnU-Net's recipe parts alone on top of the segmentation options
# (context_regions: `cpu_best`'s training fields until 2026-12-06; its largest-component rule
# is the `largest` row of `score`).
_CONTEXT_REGIONS = VARIANTS["context_regions"]
_AUGMENT = {f"augment.{k}": v for k, v in augment.NNUNET_2D.items()}
_SPATIAL = tuple(augment.NNUNET_2D_SPATIAL)
VARIANTS.update(
    {
        # native 240 px slices, 128 px training crops (the cpu budget's pixels per step)
        "cb_patches": {**_CONTEXT_REGIONS, "data.image_size": 240, "data.patch_size": 128},
        "cb_spatial": {
            **_CONTEXT_REGIONS,
            **{k: v for k, v in _AUGMENT.items() if k[8:] in _SPATIAL},
        },
        "cb_intensity": {
            **_CONTEXT_REGIONS,
            **{k: v for k, v in _AUGMENT.items() if k[8:] not in _SPATIAL and k.endswith("_p")},
        },
        # nnU-Net's contrast transform at nnUNetTrainerDA5's range, (0.5, 2) instead of
        # (0.75, 1.25) (github.com/MIC-DKFZ/nnUNet, commit 02153c6, nnunetv2/training/
        # nnUNetTrainer/variants/data_augmentation/nnUNetTrainerDA5.py:
        # ContrastAugmentationTransform contrast_range=(0.5, 2), p_per_sample 0.2,
        # p_per_channel 0.5); p stays nnU-Net's default 0.15 (per modality, so a modality is
        # changed at least as often as DA5's 0.1) and adds to "cb_intensity" without conflict
        "cb_wide_contrast": {
            **_CONTEXT_REGIONS,
            "augment.contrast_p": augment.NNUNET_2D_INTENSITY["contrast_p"],
            "augment.contrast_min": 0.5,
            "augment.contrast_max": 2.0,
        },
        # twice the `cpu` budget's steps (5,000; the cosine schedule spans them): nnU-Net
        # trains 1,000 x 250 steps, `cpu_best` ~20 passes over a fold's 981 slices; adds to
        # `cpu_best`'s parts without conflict
        "cb_long": {**_CONTEXT_REGIONS, "train.num_steps": 5000},
        # the steps that fill issue 47's 60 minutes on 2 idle cores with some margin (~0.84
        # s/step alone: 3,500 steps ~49 min); "cpu_best+cb_3500_steps" on the 41 cases' folds
        "cb_3500_steps": {"train.num_steps": 3500},
        "cb_instance_norm": {**_CONTEXT_REGIONS, "model.norm": "instance"},
        "cb_deep_supervision": {**_CONTEXT_REGIONS, "model.deep_supervision": True},
        # inference only (eval.* fields): "x+sliding_window" predicts with x's own runs
        "sliding_window": {"eval.sliding_window": True},
        # `cpu_best`'s training as the preset defines it (its fields beyond `cpu`'s, less its
        # eval.* and postprocess.* choice): the recipe whose inference options and
        # post-processing the 41-case folds choose (issue 47)
        "cpu_best": {
            k: v
            for k, v in default.PRESET_FIELDS["cpu_best"].items()
            if default.PRESET_FIELDS["cpu"].get(k, object()) != v
            and not k.startswith(("eval.", "postprocess."))
        },
    }
)
CONFIG = "configs/unet.py:cpu"
RECIPE_BASELINE = "context_regions"  # the segmentation options (cpu_best until 2026-12-06)


def variant_fields(name: str) -> dict:
    """The fields of a variant; "a+b" is variants a and b together (the recipe's combination,
    e.g. "cb_spatial+cb_intensity"); a field set differently by two parts is an error."""
    fields: dict = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(
                f"error: variant {part!r} of {name!r}: expected some of {list(VARIANTS)}"
            )
        for k, v in VARIANTS[part].items():
            if fields.get(k, v) != v:
                raise SystemExit(
                    f"error: variant {name!r}: {part} sets {k}={v}, another part {fields[k]}"
                )
            fields[k] = v
    return fields


def folds_of(case_ids, num_folds: int, seed: int = 0) -> list[list[str]]:
    """The test cases of each fold (sorted lists that partition `case_ids`); `seed` shuffles
    the cases before they are cut (`data.folds.fold_cases`), 0 = the documented folds."""
    return [fold_cases(case_ids, num_folds, i, seed=seed)[1] for i in range(num_folds)]


def declared_folds(path: pathlib.Path, case_ids) -> list[list[str]]:
    """The folds written in `path` (JSON, "folds": lists of case IDs, e.g.
    `experiments/folds_41_cases.json`); SystemExit unless they partition `case_ids`."""
    folds = json.loads(path.read_text())["folds"]
    listed = [c for f in folds for c in f]
    if len(set(listed)) != len(listed) or set(listed) != set(case_ids):
        extra, missing = sorted(set(listed) - set(case_ids)), sorted(set(case_ids) - set(listed))
        raise SystemExit(
            f"error: {path}: the folds must list every case under --data_root once "
            f"(not found there: {extra[:3]}, in no fold: {missing[:3]}, "
            f"repeated: {len(listed) - len(set(listed))})"
        )
    return [sorted(f) for f in folds]


def _inference_only(part: str) -> bool:
    return all(k.startswith("eval.") for k in VARIANTS[part])


def training_variant(name: str) -> str:
    """`name` without its inference-only parts (all fields `eval.*`, e.g. "sliding_window"):
    the variant whose runs it predicts with. "a+sliding_window" -> "a"."""
    parts = [p for p in name.split("+") if not _inference_only(p)]
    if not parts:
        raise SystemExit(f"error: variant {name!r} changes inference only; add a training part")
    return "+".join(parts)


def run_dir(out: pathlib.Path, variant: str, fold: int) -> pathlib.Path:
    """The run folder of a variant's fold; variants that differ only in inference share it."""
    return out / "runs" / f"{training_variant(variant)}-fold{fold}"


def train_command(args, variant: str, fold: int, test_ids, cache: pathlib.Path) -> list[str]:
    """The `brats_jax.main` command line of one (variant, fold) run."""
    fields = {
        "data.source": "nifti",
        "data.root": str(cache),
        "data.test_cases": ",".join(test_ids),
        "data.val_fraction": 0.0,
        **variant_fields(training_variant(variant)),
        **dict(s.split("=", 1) for s in args.set),
    }
    cmd = [sys.executable, "-m", "brats_jax.main", f"--config={args.config}"]
    cmd.append(f"--workdir={run_dir(args.out, variant, fold)}")
    return cmd + [f"--config.{k}={v}" for k, v in fields.items()]


def train(args, folds) -> None:
    """Trains every (variant, fold) run without a results.json, `args.parallel` at a time."""
    from brats_jax.data import cache as nifti_cache

    cache = args.cache_dir or args.out / "cache"
    nifti_cache.prepare(args.data_root, cache, workers=args.parallel, progress=False)
    todo = [
        (v, i)
        for v in dict.fromkeys(training_variant(v) for v in args.variants)
        for i in range(len(folds))
        if not (run_dir(args.out, v, i) / "results.json").is_file()
    ]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    running: list = []
    failed = []
    while todo or running:
        while todo and len(running) < args.parallel:
            v, i = todo.pop(0)
            log = args.out / "runs" / f"{v}-fold{i}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = train_command(args, v, i, folds[i], cache)
            proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
            running.append((v, i, proc, time.perf_counter()))
            print(f"started {v} fold {i}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            v, i, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                seconds = time.perf_counter() - start
                print(f"finished {v} fold {i}: rc {proc.returncode}, {seconds:.0f} s", flush=True)
                if proc.returncode:
                    failed.append(f"{v}-fold{i}")
    if failed:
        raise SystemExit(f"error: training failed for {failed}; see {args.out}/runs/*.log")


def predictions_path(out: pathlib.Path, variant: str, fold: int) -> pathlib.Path:
    return out / "predictions" / f"{variant}-fold{fold}.npz"


def predict_run(out: str, variant: str, fold: int, cases: dict, ttas) -> str:
    """Segments fold `fold`'s test cases (`cases`) with that fold's run of `variant`, once per
    TTA setting; writes `predictions_path` (uint8 labels, key "<tta>__<case>"). Runs in a
    worker process."""
    runtime.setup()
    path = predictions_path(pathlib.Path(out), variant, fold)
    if path.is_file():
        with np.load(path) as z:
            if {f"{t}__{c}" for t in ttas for c in cases} <= set(z.files):
                return f"{variant} fold {fold}: kept {path}"
        # made with fewer TTA settings: predicted again, whole
    start = time.perf_counter()
    workdir = run_dir(pathlib.Path(out), variant, fold)
    window = variant_fields(variant).get("eval.sliding_window")  # None: the run's own
    labels, _, _ = predict_all(
        str(workdir), cases, ttas=ttas, sliding_window=window, log=lambda *a: None
    )
    with fileio.atomic_path(path) as tmp:  # keeps the .npz suffix: savez adds none
        np.savez_compressed(tmp, **{f"{t}__{c}": labels[t][c] for t in ttas for c in cases})
    return f"{variant} fold {fold}: wrote {path} ({time.perf_counter() - start:.0f} s)"


def predict(args, folds, cases) -> None:
    """`predict_run` for every (variant, fold), `args.parallel` worker processes."""
    ctx = multiprocessing.get_context("spawn")
    jobs = [(v, i) for v in args.variants for i in range(len(folds))]
    with concurrent.futures.ProcessPoolExecutor(
        min(args.parallel, len(jobs)), mp_context=ctx
    ) as pool:
        futs = [
            pool.submit(
                predict_run, str(args.out), v, i, {c: cases[c] for c in folds[i]}, args.ttas
            )
            for v, i in jobs
        ]
        for f in concurrent.futures.as_completed(futs):
            print(f.result(), flush=True)


# The tuned rows' names by objective (`postprocess.OBJECTIVES`), and what each searches: the
# lesion-wise tuning also tries the TC / ET component rules (`REGION_MM3`), as
# `python -m brats_jax.tune_postprocessing --objective=lesionwise` does.
TUNED_ROWS = {"dice": "tuned", "lesionwise": "tuned_lesionwise"}
_TUNING_CANDIDATES = {
    "dice": postprocess.TuningCandidates(),
    "lesionwise": postprocess.TuningCandidates(
        tc_min_mm3=postprocess.REGION_MM3, et_min_mm3=postprocess.REGION_MM3
    ),
}


def _tune(preds, gts, spacings, objective="dice") -> postprocess.PostprocessConfig:
    return postprocess.tune_postprocessing(
        preds, gts, _TUNING_CANDIDATES[objective], objective=objective, spacings=spacings
    ).config


def _tune_folds(labels: dict, gts: dict, spacings: dict, folds, objective: str) -> list:
    """Fold i's tuned `PostprocessConfig` for each fold, chosen on the other folds' cases
    (`_tune`), one after the other in this process: the lesion-wise objective's memo of
    region scores then serves all folds (each case is in all but one tuning)."""
    configs = []
    for i in range(len(folds)):
        others = [c for j, f in enumerate(folds) if j != i for c in f]
        configs.append(_tune(
            [labels[c] for c in others], [gts[c] for c in others],
            [spacings.get(c, (1.0, 1.0, 1.0)) for c in others], objective,
        ))  # fmt: skip
    return configs


def plan_rows(
    predictions: dict, gts: dict, folds, pool, log=print, tuned=True, objectives=("dice",),
    spacings=None,
) -> list[dict]:  # fmt: skip
    """Rows `{variant, tta, pp, configs}` (`configs[i]`: fold i's `PostprocessConfig`): no
    post-processing, the largest whole-tumour component, and with `tuned` one tuned row per
    objective (`TUNED_ROWS`); a tuned row's config for fold i is chosen on the other folds'
    cases (`postprocess.tune_postprocessing` at each case's `spacings`, 1 mm by default),
    the tunings running in `pool`."""
    none = postprocess.PostprocessConfig()
    largest = postprocess.PostprocessConfig(largest_component_only=True)
    spacings = spacings or {}
    rows = []
    for variant, labels in predictions.items():
        for tta in labels:
            rows.append(dict(variant=variant, tta=tta, pp="none", configs=[none] * len(folds)))
            rows.append(
                dict(variant=variant, tta=tta, pp="largest", configs=[largest] * len(folds))
            )
            if len(folds) < 2 or not tuned:  # (a fixed split has no other folds to tune on)
                continue
            for objective in objectives:  # one job tunes every fold (shared memo)
                job = pool.submit(_tune_folds, labels[tta], gts, spacings, folds, objective)
                rows.append(dict(variant=variant, tta=tta, pp=TUNED_ROWS[objective], configs=job))
    for r in rows:
        if r["pp"] in TUNED_ROWS.values():
            r["configs"] = r["configs"].result()
            log(f"{r['variant']} tta={r['tta']} {r['pp']}: per fold: {r['configs']}")
    return rows


def load_predictions(out: pathlib.Path, variants, ttas, folds) -> dict:
    """{variant: {tta: {case: uint8 labels}}}: the `predict` stage's out-of-fold labels of
    every case under `out`; a one-line SystemExit when a TTA setting was not predicted."""
    predictions = {}
    for v in variants:
        by_tta: dict = {t: {} for t in ttas}
        for i in range(len(folds)):
            path = predictions_path(out, v, i)
            with np.load(path) as z:
                wanted = {f"{t}__{c}" for t in ttas for c in folds[i]}
                if missing := sorted(wanted - set(z.files)):
                    raise SystemExit(
                        f"error: {path} lacks {missing[0]} (and {len(missing) - 1} more); "
                        "run the predict stage with these --ttas"
                    )
                for t in ttas:
                    by_tta[t].update({c: z[f"{t}__{c}"] for c in folds[i]})
        predictions[v] = by_tta
    return predictions


def load_truths(cases) -> tuple[dict, dict]:
    """({case: uint8 training labels}, {case: voxel size in mm}) from the label files alone
    (scoring needs no modality), oriented as the predictions."""
    gts, spacings = {}, {}
    for cid, case in cases.items():
        if case.seg is None:
            raise SystemExit(f"error: case {cid} ({case.directory}) has no label file")
        label, _, header, _ = brats.read_volume(case.seg)  # as the predictions: ORIENTATION
        gts[cid] = to_train_labels(label, case.naming, where=str(case.seg)).astype(np.uint8)
        spacings[cid] = tuple(float(z) for z in header.get_zooms()[:3])
    return gts, spacings


def score(args, folds, cases) -> dict:
    """Scores every row on every case (`args.parallel` processes); returns the record."""
    predictions = load_predictions(args.out, args.variants, args.ttas, folds)
    gts, spacings = load_truths(cases)
    fold_of = {c: i for i, f in enumerate(folds) for c in f}
    jobs, done = {}, {}
    with concurrent.futures.ProcessPoolExecutor(args.parallel) as pool:
        rows = plan_rows(predictions, gts, folds, pool, tuned=not args.no_tuned,
                         objectives=args.objectives, spacings=spacings)  # fmt: skip
        for r in rows:
            for cid in cases:
                cfg = r["configs"][fold_of[cid]]
                key = (r["variant"], r["tta"], cfg, cid)
                if key not in jobs:
                    pred = postprocess.apply(
                        predictions[r["variant"]][r["tta"]][cid], cfg, spacings[cid]
                    )
                    jobs[key] = pool.submit(
                        score_case, pred, gts[cid], spacings[cid], args.hd95_mode,
                        args.lesion_wise,
                    )  # fmt: skip
        done = {k: f.result() for k, f in jobs.items()}
    for r in rows:
        r["per_case"] = [
            {
                "case_id": c,
                "fold": fold_of[c],
                **done[r["variant"], r["tta"], r["configs"][fold_of[c]], c],
            }
            for c in cases
        ]
        r["configs"] = [c.to_dict() for c in r["configs"]]
    return {
        "folds": folds,
        "fold_seed": args.fold_seed,
        "hd95_mode": args.hd95_mode,
        "lesion_wise": args.lesion_wise,
        "objectives": list(args.objectives),
        "rows": rows,
    }


def final(args, folds, cases) -> dict:
    """The declared rule's row of `DIR/ablation.json` as a model's settings: its TTA and its
    post-processing, a tuned row's thresholds now chosen on all cases' out-of-fold predictions
    (nnU-Net's way of fixing post-processing for the final model, which then serves cases
    outside all folds). Returns {row, config, fields}: `fields` are the config fields
    (`eval.tta`, `postprocess.*`) to put in the preset."""
    record = _read_record(str(args.out / "ablation.json"))
    if not record.get("lesion_wise"):
        raise SystemExit(
            f"error: {args.out / 'ablation.json'} has no lesion-wise scores, which the declared "
            "rule needs; run the score stage with --lesion_wise"
        )
    row = record["rows"][declared_choice(record["rows"])["index"]]
    objective = {v: k for k, v in TUNED_ROWS.items()}.get(row["pp"])
    if objective is None:  # a fixed rule: every fold's config is the same
        config = postprocess.PostprocessConfig(**row["configs"][0])
    else:
        by_tta = load_predictions(args.out, [row["variant"]], [row["tta"]], folds)
        labels = by_tta[row["variant"]][row["tta"]]
        gts, spacings = load_truths(cases)
        ids = sorted(cases)
        config = _tune(
            [labels[c] for c in ids], [gts[c] for c in ids], [spacings[c] for c in ids], objective
        )
    fields = {"eval.tta": row["tta"]}
    fields.update({f"postprocess.{k}": v for k, v in config.to_dict().items()})
    return dict(row={k: row[k] for k in ("variant", "tta", "pp")}, config=config.to_dict(),
                fields=fields)  # fmt: skip


def _summary(per_case: list[dict], key: str, folds) -> tuple[float, float, list[float]]:
    v = np.array([c[key] for c in per_case], float)
    f = [float(np.mean([c[key] for c in per_case if c["fold"] == i])) for i in range(len(folds))]
    return float(v.mean()), float(v.std()), f


def best_row(rows: list[dict]) -> dict:
    """The row with the lowest mean HD95 (mean of WT, TC, ET) among the rows whose mean Dice
    is no worse than the baseline row's (first row: baseline, no TTA, none) on every region."""
    base = rows[0]["per_case"]
    ok = [
        r
        for r in rows
        if all(
            np.mean([c[f"dice_{g}"] for c in r["per_case"]])
            >= np.mean([c[f"dice_{g}"] for c in base]) - 1e-12
            for g in REGIONS
        )
    ]
    hd = lambda r: np.mean([c[f"hd95_{g}"] for c in r["per_case"] for g in REGIONS])
    return min(ok, key=hd)


def _case_mean(row: dict, key: str) -> float:
    return float(np.mean([c[key] for c in row["per_case"]]))


def _means(row: dict, prefix: str = "") -> tuple[float, float]:
    """(mean Dice, mean HD95 in mm) of a row: the mean over WT, TC, ET of the case means of
    `{prefix}dice_*` and `{prefix}hd95_*` (prefix "lesionwise_": the lesion-wise scores)."""
    dice = np.mean([_case_mean(row, f"{prefix}dice_{g}") for g in REGIONS])
    hd95 = np.mean([_case_mean(row, f"{prefix}hd95_{g}") for g in REGIONS])
    return float(dice), float(hd95)


def _rule_rows(rows: list[dict]) -> dict[str, dict]:
    """The rows the recipe's rules compare, by variant: no TTA, largest whole-tumour
    component."""
    return {r["variant"]: r for r in rows if r["tta"] == "none" and r["pp"] == "largest"}


def recipe_choice(rows: list[dict], dice_gain=0.005, hd95_slack=1.0) -> dict:
    """EXPERIMENTS.md's declared rule ("Generalisation recipe") on the rows without TTA after
    the largest whole-tumour component: an addition ("cb_*") is kept when its mean Dice is at
    least the baseline's + `dice_gain` and its mean HD95 at most the baseline's + `hd95_slack`
    mm; the combination is the baseline plus every kept addition ("a+b"); the choice is the
    combination when it was scored, is within `dice_gain` of the best kept single row and
    within `hd95_slack` of the baseline's HD95, else the best kept single row, else the
    baseline. Returns {means: {variant: (dice, hd95)}, kept, combination, choice}."""
    means = {v: _means(r) for v, r in _rule_rows(rows).items()}
    if RECIPE_BASELINE not in means:
        raise SystemExit(f"error: no {RECIPE_BASELINE} row (tta none, largest) to compare with")
    d0, h0 = means[RECIPE_BASELINE]
    singles = [v for v in means if v.startswith("cb_") and "+" not in v]
    kept = [v for v in singles if means[v][0] >= d0 + dice_gain and means[v][1] <= h0 + hd95_slack]
    combination = "+".join(sorted(kept)) if len(kept) > 1 else (kept[0] if kept else None)
    choice = RECIPE_BASELINE
    if kept:
        best = max(kept, key=lambda v: means[v][0])
        choice = best
        if combination in means and combination != best:
            dc, hc = means[combination]
            if dc >= means[best][0] - dice_gain and hc <= h0 + hd95_slack:
                choice = combination
    return dict(means=means, kept=kept, combination=combination, choice=choice)


RECIPE_CANDIDATE = "cb_deep_supervision+cb_intensity+cb_patches"  # cpu_recipe's fields
CPU_BEST_VARIANT = "cb_deep_supervision+cb_intensity"  # cpu_best's training since 2026-12-06


def brats_win_fraction(a: list[dict], b: list[dict]) -> float:
    """BraTS's rank-then-aggregate for two rows' per-case scores (the same cases): the share
    of (case, metric) pairs, metrics `KEYS`, in which `a` is better (higher Dice, lower HD95),
    ties counting half. With two methods a's mean rank is 2 - this share: above 0.5, a
    ranks first."""
    by_case = {c["case_id"]: c for c in b}
    if set(by_case) != {c["case_id"] for c in a}:
        raise SystemExit("error: the two rows were scored on different cases")
    wins = []
    for ca in a:
        cb = by_case[ca["case_id"]]
        for k in KEYS:
            sign = 1.0 if k.startswith("dice") else -1.0
            d = sign * (ca[k] - cb[k])
            wins.append(0.5 if d == 0 else float(d > 0))
    return float(np.mean(wins))


def replicate_choice(
    rows, candidate=RECIPE_CANDIDATE, baseline=RECIPE_BASELINE, dice_gain=0.005, low_wt=0.75
) -> dict:
    """EXPERIMENTS.md's replicate rule ("A replicate with new folds and seeds, and a rule that
    counts failures", declared 2026-12-04) on the rows without TTA after the largest
    whole-tumour component: `candidate` replaces `baseline` when (1) its
    mean Dice is at least the baseline's + `dice_gain`, (2) it wins over half of the (case,
    metric) pairs (`brats_win_fraction`), (3) it has no more cases with WT Dice < `low_wt`
    and (4) no more (case, region) HD95s at `metrics.HD95_EMPTY` (a region missed or
    invented) than the baseline. Returns {stats: {variant: (mean Dice, mean HD95, n low WT,
    n empty)}, win_fraction, passed (4 bools), choice}."""
    pick = _rule_rows(rows)
    if missing := [v for v in (baseline, candidate) if v not in pick]:
        raise SystemExit(f"error: no {missing} row (tta none, largest) for the replicate rule")
    stats = {}
    for v in (baseline, candidate):
        pc = pick[v]["per_case"]
        low = sum(c["dice_WT"] < low_wt for c in pc)
        empty = sum(c[f"hd95_{g}"] == metrics.HD95_EMPTY for c in pc for g in REGIONS)
        stats[v] = (*_means(pick[v]), low, empty)
    base, cand = stats[baseline], stats[candidate]
    win = brats_win_fraction(pick[candidate]["per_case"], pick[baseline]["per_case"])
    passed = [cand[0] >= base[0] + dice_gain, win > 0.5, cand[2] <= base[2], cand[3] <= base[3]]
    choice = candidate if all(passed) else baseline
    return dict(stats=stats, win_fraction=win, passed=passed, choice=choice)


def replicate_baselines(candidate: str, scored) -> list[str]:
    """The rows a combination is held against by the replicate rule: the segmentation
    options (`RECIPE_BASELINE`) and, when `candidate` adds parts to it and it was scored (a
    name in `scored`), today's `cpu_best` row (`CPU_BEST_VARIANT`)."""
    extends = set(CPU_BEST_VARIANT.split("+")) < set(candidate.split("+"))
    on_cpu_best = extends and CPU_BEST_VARIANT in scored
    return [RECIPE_BASELINE] + ([CPU_BEST_VARIANT] if on_cpu_best else [])


def leave_one_out(combination: str = RECIPE_CANDIDATE) -> list[str]:
    """The variants that drop one part of `combination` ("a+b+c" -> "b+c", "a+c", "a+b",
    parts kept in their order)."""
    parts = combination.split("+")
    return ["+".join(p for p in parts if p != drop) for drop in parts]


DIAGNOSIS_CASE = "BraTS2021_00014"  # the case whose core the combination misses


def diagnosis_candidate(rows, case=DIAGNOSIS_CASE, combination=RECIPE_CANDIDATE) -> str | None:
    """EXPERIMENTS.md's diagnosis rule ("Which part of the combination misses
    BraTS2021_00014's core?", declared 2026-12-04) on the rows without TTA after the largest
    whole-tumour component: among `combination`'s leave-one-out rows, those
    that predict a TC and an ET on `case` (HD95 below `metrics.HD95_EMPTY`), and of those the
    one with the highest mean Dice over its scored cases; None when no row does."""
    pick = _rule_rows(rows)
    if missing := [v for v in leave_one_out(combination) if v not in pick]:
        raise SystemExit(f"error: no {missing} row (tta none, largest) for the diagnosis rule")
    found = []
    for v in leave_one_out(combination):
        scores = [c for c in pick[v]["per_case"] if c["case_id"] == case]
        if not scores:
            raise SystemExit(f"error: case {case} is not scored in row {v}")
        if all(scores[0][f"hd95_{g}"] < metrics.HD95_EMPTY for g in ("TC", "ET")):
            found.append(v)
    return max(found, key=lambda v: _means(pick[v])[0], default=None)


def markdown(record: dict) -> str:
    """The ablation table (mean ± SD [min, max] over cases), each fold's mean when there are
    several folds, the recipe rules' verdicts (`recipe_choice`; `replicate_choice` of each
    combination "a+cb_b" against the baseline) and the per-case scores of the baseline and
    the best row."""
    rows, folds = record["rows"], record["folds"]
    best = best_row(rows)
    head = "| variant | TTA | post-proc. | " + " | ".join(
        [f"Dice {r}" for r in REGIONS] + [f"HD95 {r} (mm)" for r in REGIONS]
    )
    lines = [head + " |", "|---|---|---|" + "---:|" * len(KEYS)]
    fold_lines = [
        "| variant | TTA | post-proc. | " + " | ".join(KEYS) + " |",
        "|---|---|---|" + "---:|" * len(KEYS),
    ]
    for r in rows:
        name = f"**{r['variant']}**" if r is best else r["variant"]
        cells, fcells = [], []
        for k in KEYS:
            d = 3 if k.startswith("dice") else 1
            m, s, f = _summary(r["per_case"], k, folds)
            v = [c[k] for c in r["per_case"]]
            cells.append(f"{m:.{d}f} ± {s:.{d}f} [{min(v):.{d}f}, {max(v):.{d}f}]")
            fcells.append(" / ".join(f"{x:.{d}f}" for x in f))
        lines.append(f"| {name} | {r['tta']} | {r['pp']} | " + " | ".join(cells) + " |")
        fold_lines.append(
            f"| {r['variant']} | {r['tta']} | {r['pp']} | " + " | ".join(fcells) + " |"
        )
    n = sum(len(f) for f in folds)
    split = f"{len(folds)} folds over {n} cases" if len(folds) > 1 else f"{n} test cases"
    out = [
        f"{split} (mean ± SD [min, max] over cases; bold: the best row, lowest mean HD95 "
        "among the rows with Dice no worse than the baseline on every region)",
        "",
        *lines,
    ]
    if len(folds) > 1:
        out += ["", "Fold means (" + " / ".join(f"fold {i}" for i in range(len(folds))) + "):"]
        out += ["", *fold_lines]
    names = {r["variant"] for r in rows}
    if RECIPE_BASELINE in names and any(v.startswith("cb_") for v in names):
        c = recipe_choice(rows)
        cells = ", ".join(f"{v} {d:.3f} / {h:.1f} mm" for v, (d, h) in c["means"].items())
        out += [
            "",
            f"Recipe rule (mean Dice / mean HD95, no TTA, largest): {cells}.",
            f"Kept: {c['kept'] or 'none'}; combination: {c['combination']}; choice: {c['choice']}.",
        ]
    combinations = [v for v in dict.fromkeys(r["variant"] for r in rows) if "+cb_" in v]
    tests = [(c, b) for c in combinations for b in replicate_baselines(c, names) if b in names]
    for candidate, baseline in tests:
        c = replicate_choice(rows, candidate, baseline)
        cells = ", ".join(
            f"{v} {d:.3f} / {h:.1f} mm / {n} WT < 0.75 / {e} empty"
            for v, (d, h, n, e) in c["stats"].items()
        )
        out += [
            "",
            f"Replicate rule (mean Dice / mean HD95 / cases / empty regions): {cells}; "
            f"candidate wins {c['win_fraction']:.3f} of (case, metric) pairs; "
            f"conditions {c['passed']}; choice: {c['choice']}.",
        ]
    scored = {c["case_id"] for r in rows for c in r["per_case"]}
    if set(leave_one_out()) <= set(_rule_rows(rows)) and DIAGNOSIS_CASE in scored:
        out += ["", f"Diagnosis rule ({DIAGNOSIS_CASE}): candidate {diagnosis_candidate(rows)}."]
    if record.get("lesion_wise"):
        out += lesionwise_markdown(record)
    for r in (rows[0], best):
        out += ["", f"Per case, {r['variant']} / TTA {r['tta']} / {r['pp']}:", ""]
        out += ["| case | " + " | ".join(KEYS) + " |", "|---|" + "---:|" * len(KEYS)]
        for c in r["per_case"]:
            vals = [f"{c[k]:.3f}" if k.startswith("dice") else f"{c[k]:.1f}" for k in KEYS]
            out.append(f"| {c['case_id']} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


# The declared rule of the 41-case folds (experiments/folds_41_cases.json, "selection_rule")
# and issue 47's targets (out of fold, case means): lesion-wise Dice at least, lesion-wise
# HD95 at most, voxel Dice at least, voxel HD95 at most; post-processing may lower a region's
# voxel Dice by at most PP_DICE_LOSS.
LESION_TIE = 0.005
TARGETS = {
    "lesionwise_dice": {"WT": 0.86, "TC": 0.80, "ET": 0.72},
    "lesionwise_hd95": {"WT": 30.0, "TC": 30.0, "ET": 30.0},
    "dice": {"WT": 0.87, "TC": 0.82, "ET": 0.76},
    "hd95": {"WT": 8.0, "TC": 10.0, "ET": 10.0},
}
PP_DICE_LOSS = 0.005


def declared_choice(rows: list[dict], tie: float = LESION_TIE) -> dict:
    """The declared selection rule: among the rows whose mean lesion-wise Dice is within
    `tie` of the highest, the lowest mean lesion-wise HD95, then the simpler option (the
    earlier row: `plan_rows` lists no TTA before flips and none < largest < tuned <
    tuned_lesionwise). Returns {means: [(dice, hd95) per row], close: [row indices], index}."""
    means = [_means(r, "lesionwise_") for r in rows]
    top = max(d for d, _ in means)
    close = [i for i, (d, _) in enumerate(means) if d >= top - tie]
    return dict(means=means, close=close, index=min(close, key=lambda i: (means[i][1], i)))


def _unprocessed(rows: list[dict], row: dict) -> dict | None:
    """The row of the same variant and TTA without post-processing."""
    same = [
        r for r in rows if (r["variant"], r["tta"], r["pp"]) == (row["variant"], row["tta"], "none")
    ]
    return same[0] if same else None


def target_lines(row: dict, baseline: dict | None) -> list[str]:
    """Issue 47's targets against a row's case means, and what post-processing did to each
    region's voxel Dice (against `baseline`, the same predictions unprocessed)."""
    out = []
    for metric, goals in TARGETS.items():
        cells = []
        for g, goal in goals.items():
            v = _case_mean(row, f"{metric}_{g}")
            ok = v <= goal if "hd95" in metric else v >= goal
            sign = "<=" if "hd95" in metric else ">="
            cells.append(f"{g} {v:.3f} ({sign} {goal}: {'met' if ok else 'NOT met'})")
        out.append(f"- {metric}: " + ", ".join(cells))
    if baseline is not None and baseline is not row:
        deltas = {
            g: _case_mean(row, f"dice_{g}") - _case_mean(baseline, f"dice_{g}") for g in REGIONS
        }
        worst = min(deltas.values())
        out.append(
            "- post-processing's change of voxel Dice: "
            + ", ".join(f"{g} {d:+.4f}" for g, d in deltas.items())
            + f" (may lose at most {PP_DICE_LOSS}: "
            + ("met)" if worst >= -PP_DICE_LOSS else "NOT met)")
        )
    return out


def lesionwise_markdown(record: dict) -> list[str]:
    """Lines of the lesion-wise table (mean ± SD over cases of lesion-wise Dice and HD95 per
    region, summed false-positive and missed lesions), the declared rule's choice, the
    targets and the three worst cases of the chosen row (lowest mean lesion-wise Dice)."""
    rows = record["rows"]
    choice = declared_choice(rows)
    head = ["variant", "TTA", "post-proc."] + [f"lw Dice {g}" for g in REGIONS]
    head += [f"lw HD95 {g} (mm)" for g in REGIONS] + [f"FP / missed {g}" for g in REGIONS]
    head += ["mean lw Dice", "mean lw HD95"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for i, r in enumerate(rows):
        cells = []
        for k, d in (("lesionwise_dice", 3), ("lesionwise_hd95", 1)):
            for g in REGIONS:
                m, sd, _ = _summary(r["per_case"], f"{k}_{g}", record["folds"])
                cells.append(f"{m:.{d}f} ± {sd:.{d}f}")
        for g in REGIONS:
            fp = sum(int(c[f"lesionwise_fp_{g}"]) for c in r["per_case"])
            fn = sum(int(c[f"lesionwise_fn_{g}"]) for c in r["per_case"])
            cells.append(f"{fp} / {fn}")
        d, h = choice["means"][i]
        cells += [f"{d:.4f}", f"{h:.1f}"]
        name = f"**{r['variant']}**" if i == choice["index"] else r["variant"]
        lines.append(f"| {name} | {r['tta']} | {r['pp']} | " + " | ".join(cells) + " |")
    best = rows[choice["index"]]
    close = ", ".join(f"{rows[i]['tta']}/{rows[i]['pp']}" for i in choice["close"])
    out = [
        "",
        "Lesion-wise (BraTS 2023; mean ± SD over cases; FP: predicted lesions touching no true "
        "lesion, missed: true lesions no prediction touches, summed over cases):",
        "",
        *lines,
        "",
        f"Declared rule (highest mean lesion-wise Dice; within {LESION_TIE}: {close}; then the "
        f"lower mean lesion-wise HD95, then the simpler): **{best['variant']} / TTA "
        f"{best['tta']} / {best['pp']}**. Targets (issue 47):",
        "",
        *target_lines(best, _unprocessed(rows, best)),
        "",
        "The three worst cases of the chosen row (lowest mean lesion-wise Dice):",
        "",
        "| case | fold | lw Dice WT / TC / ET | Dice WT / TC / ET | FP WT / TC / ET | "
        "missed WT / TC / ET |",
        "|---|---:|---|---|---|---|",
    ]

    def cells(c: dict, key: str, fmt: str) -> str:
        return " / ".join(fmt.format(c[f"{key}_{g}"]) for g in REGIONS)

    worst = sorted(
        best["per_case"], key=lambda c: np.mean([c[f"lesionwise_dice_{g}"] for g in REGIONS])
    )
    for c in worst[:3]:
        out.append(
            f"| {c['case_id']} | {c['fold']} | {cells(c, 'lesionwise_dice', '{:.3f}')} | "
            f"{cells(c, 'dice', '{:.3f}')} | {cells(c, 'lesionwise_fp', '{}')} | "
            f"{cells(c, 'lesionwise_fn', '{}')} |"
        )
    return out


def _read_record(path: str) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        msg = f"error: --records {path}: expected a score record (ablation.json): {e}"
        raise SystemExit(msg) from None


def merge_records(records: list[dict]) -> dict:
    """One record holding the rows of several `score` records (`ablation.json`) of the same
    folds, e.g. a record kept in `experiments/results/` and a variant scored later in another
    folder; records of other folds or HD95 modes, or a row (variant, TTA, post-processing)
    in two records, are a one-line error."""
    first = records[0]
    seen: set = set()
    rows = []
    for rec in records:
        for field in ("folds", "hd95_mode"):
            if rec[field] != first[field]:
                raise SystemExit(
                    f"error: records differ in {field}: {rec[field]} != {first[field]}"
                )
        for r in rec["rows"]:
            key = (r["variant"], r["tta"], r["pp"])
            if key in seen:
                raise SystemExit(f"error: row {key} is in two records")
            seen.add(key)
            rows.append(r)
    return {**first, "rows": rows}


def _check_same_folds(path: pathlib.Path, folds) -> None:
    """SystemExit when `path` (an earlier call's folds.json) holds other folds: that folder's
    runs and predictions were made for them (a run would be scored on cases it trained on)."""
    if path.is_file() and (old := json.loads(path.read_text())["folds"]) != folds:
        raise SystemExit(
            f"error: {path} holds other folds ({len(old)}, seed "
            f"{json.loads(path.read_text()).get('seed')}) than these: --folds, --fold_seed, "
            "--test_cases or the cases under --data_root changed; use another --out"
        )


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "stages", help="all, or some of train,predict,score,final (comma-separated), or table"
    )
    p.add_argument("--data_root", help="folder of the NIfTI case folders")
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--records", default="", help="table: ablation.json files, comma-separated")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--fold_seed", type=int, default=0, help="shuffles the cases into folds")
    p.add_argument("--test_cases", default="", help="a fixed split instead of folds: IDs")
    p.add_argument(
        "--folds_file",
        type=pathlib.Path,
        default=None,
        help='declared folds instead of --folds: a JSON file whose "folds" lists case IDs',
    )
    p.add_argument("--variants", default=",".join(OPTION_VARIANTS), help=f"of {list(VARIANTS)}")
    p.add_argument("--ttas", default="none,flips", help="TTA settings, comma-separated")
    p.add_argument("--parallel", type=int, default=2, help="processes at a time")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE for every run")
    p.add_argument("--hd95_mode", default="max")
    p.add_argument("--no_tuned", action="store_true", help="score without the tuned rows")
    p.add_argument(
        "--objectives", default="dice", help="tuned rows: dice and/or lesionwise, comma-separated"
    )
    p.add_argument(
        "--lesion_wise", action="store_true",
        help="also score lesion-wise (BraTS 2023) and apply the declared rule of --folds_file",
    )  # fmt: skip
    p.add_argument("--cache_dir", type=pathlib.Path, default=None, help="default: OUT/cache")
    args = p.parse_args(argv)
    if args.stages == "table":  # the rows of scored records, without their run folders
        if not args.records:
            raise SystemExit("error: table needs --records=A.json[,B.json...]")
        record = merge_records([_read_record(f) for f in args.records.split(",")])
        print(markdown(record))
        return 0
    if not (args.data_root and args.out):
        raise SystemExit(f"error: {args.stages} needs --data_root and --out")
    stages = ["train", "predict", "score"] if args.stages == "all" else args.stages.split(",")
    if bad := sorted(set(stages) - {"train", "predict", "score", "final"}):
        raise SystemExit(f"error: stages {bad}: expected all, or some of train,predict,score,final")
    args.variants = [v for v in args.variants.split(",") if v]
    args.ttas = [t for t in args.ttas.split(",") if t]
    args.objectives = [o for o in args.objectives.split(",") if o]
    if bad := sorted(set(args.objectives) - set(TUNED_ROWS)):
        raise SystemExit(f"error: --objectives {bad}: expected some of {list(TUNED_ROWS)}")
    for v in args.variants:
        variant_fields(v)  # a one-line error for an unknown name
    runtime.setup()
    cases = {c.case_id: c for c in brats.find_cases(args.data_root)}
    if args.test_cases:  # a fixed split: one "fold" of test cases, all other cases train
        folds = [sorted(args.test_cases.split(","))]
        if missing := sorted(set(folds[0]) - set(cases)):
            raise SystemExit(f"error: --test_cases {missing} not under {args.data_root}")
        cases = {c: cases[c] for c in folds[0]}  # only the test cases are scored
    elif args.folds_file:
        folds = declared_folds(args.folds_file, cases)
    else:
        folds = folds_of(list(cases), args.folds, args.fold_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    _check_same_folds(args.out / "folds.json", folds)
    fileio.write_json(args.out / "folds.json", {"seed": args.fold_seed, "folds": folds})
    start = time.perf_counter()
    if "train" in stages:
        train(args, folds)
        print(f"train: {time.perf_counter() - start:.0f} s", flush=True)
    if "predict" in stages:
        predict(args, folds, cases)
        print(f"predict: {time.perf_counter() - start:.0f} s", flush=True)
    if "score" in stages:
        record = score(args, folds, cases)
        fileio.write_json(args.out / "ablation.json", record)  # kept even if the table fails
        table = markdown(record)
        fileio.write_text(args.out / "ablation.md", table)
        print(table)
        print(f"score: {time.perf_counter() - start:.0f} s", flush=True)
    if "final" in stages:
        chosen = final(args, folds, cases)
        fileio.write_json(args.out / "final.json", chosen)
        print(f"final: the declared rule's row {chosen['row']}; its fields:")
        for k, v in chosen["fields"].items():
            print(f"  {k}: {v!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
