"""Post-processing and test-time flips, measured on a trained run's test cases.

    python -m experiments.analyses.postprocessing_ablation --workdir=RUN --data_root=NIFTI_ROOT \\
        --tune_cases=ID,... [--test_cases=ID,...] --out=DIR

Every tuning and test case is predicted once per test-time augmentation setting (none,
flips, flips_ud); then each row of the table is scored on the test cases with
`metrics.evaluate_volume` (Dice and HD95 per region WT/TC/ET, HD95 as the run's
`eval.hd95_mode`):

* baseline (no TTA, no post-processing);
* + largest component (26-connectivity; a fixed rule, nothing tuned);
* + small-component removal, + ET relabelling (each step alone, threshold tuned);
* + TTA flips, + TTA flips_ud (the settings of `--ttas`, default all three);
* tuned post-processing (both nnU-Net steps), and each TTA setting + its tuned
  post-processing; the "best combination" is the one with the highest objective on the
  tuning cases (never chosen on the test cases).

Thresholds are tuned with `postprocess.tune_postprocessing` on the `--tune_cases`
predictions made the same way (same TTA setting), never on the test cases. Writes
`DIR/ablation.json` (per-case scores, tuned choices) and `DIR/ablation.md` (the table).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

from brats_jax import cli, fileio, labels, metrics, runtime
from brats_jax.data import brats
from brats_jax.inference import ensembles, postprocess
from brats_jax.inference.case_lists import split_list
from brats_jax.metrics import lesionwise
from brats_jax.models import outputs

TTAS = ("none", "flips", "flips_ud")
REGIONS = tuple(labels.REGIONS)
KEYS = tuple(f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS)  # the scores tabled
# which post-processing steps a row tunes on the tuning cases
STEP_CANDIDATES = {
    "size": postprocess.TuningCandidates(largest_component=False, et_min_voxels=()),
    "et": postprocess.TuningCandidates(min_component_voxels=(), largest_component=False),
    "full": postprocess.TuningCandidates(),
}


def score_case(pred, gt, spacing, hd95_mode="max", lesion_wise=False) -> dict[str, float]:
    """The tabled scores (`KEYS`: Dice and HD95 mm per region) of a (H, W, D) label map
    against the ground truth (`metrics.evaluate_volume`); with `lesion_wise` also the BraTS
    2023 lesion-wise scores (`lesionwise.COLUMNS`: Dice, HD95 mm and TP/FN/FP lesion counts
    per region, `lesionwise.evaluate_volume`)."""
    res = metrics.evaluate_volume(pred, gt, spacing=spacing, hd95_mode=hd95_mode)
    out = {k: float(res[k]) for k in KEYS}
    if lesion_wise:
        out.update(lesionwise.evaluate_volume(pred, gt, spacing, hd95_mode=hd95_mode))
    return out


def load_scored_case(case, source: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A labelled case as a run trained on `source` sees it: the (H, W, D, 4) normalised
    image, the (H, W, D) uint8 training labels and the voxel spacing (mm, header zooms)."""
    data = brats.load_case(
        case, require_label=True, normalization=ensembles.input_normalization(source)
    )
    spacing = tuple(float(z) for z in data.header.get_zooms()[:3])
    return data.image, data.label.astype(np.uint8), spacing


def predict_all(
    workdir: str, cases: dict, *, ttas=TTAS, step=None, sliding_window=None, log=print
) -> tuple[dict, dict, dict]:
    """`({tta: {case_id: labels uint8 (H, W, D)}}, {case_id: ground truth}, {case_id:
    spacing mm})`, each case loaded once and predicted once per TTA setting.
    `sliding_window`: as `ensembles.load_ensemble` (None = the run's `eval.sliding_window`)."""
    by_tta = {
        t: ensembles.load_ensemble(workdir, step=step, tta=t, sliding_window=sliding_window)
        for t in ttas
    }
    source = next(iter(by_tta.values())).config.data.source
    labels: dict = {t: {} for t in ttas}
    gts, spacings = {}, {}
    for cid, case in cases.items():
        image, gts[cid], spacings[cid] = load_scored_case(case, source)
        for t, ens in by_tta.items():
            start = time.perf_counter()
            probs = ensembles.predict_probabilities(ens, image)
            output = outputs.of_config(ens.config.model)
            labels[t][cid] = outputs.labels_from_probabilities(probs, output).astype(np.uint8)
            log(f"predicted {cid} tta={t} ({time.perf_counter() - start:.1f} s)")
    return labels, gts, spacings


def plan_rows(labels: dict, gts: dict, tune_ids: list, log=print) -> tuple[list, dict]:
    """`[(row name, tta, PostprocessConfig)]` and the tuning record per tuned row."""

    def tune(tta, kind):
        preds = [labels[tta][c] for c in tune_ids]
        tuned = postprocess.tune_postprocessing(
            preds, [gts[c] for c in tune_ids], STEP_CANDIDATES[kind], log=log
        )
        log(f"tuned {kind} on tta={tta}: {tuned.config}")
        return tuned

    ttas = list(labels)
    tuned = {("none", k): tune("none", k) for k in ("size", "et")}
    tuned.update({(t, "full"): tune(t, "full") for t in ttas})
    rows = [
        ("baseline", "none", postprocess.PostprocessConfig()),
        ("+ largest component", "none", postprocess.PostprocessConfig(largest_component_only=True)),
        ("+ small-component removal", "none", tuned["none", "size"].config),
        ("+ ET relabelling", "none", tuned["none", "et"].config),
        ("+ TTA flips", "flips", postprocess.PostprocessConfig()),
        ("+ TTA flips_ud", "flips_ud", postprocess.PostprocessConfig()),
        ("tuned post-processing", "none", tuned["none", "full"].config),
    ]
    rows += [(f"TTA {t} + tuned post-processing", t, tuned[t, "full"].config) for t in ttas[1:]]
    rows += [(f"TTA {t} + largest component", t, rows[1][2]) for t in ttas[1:]]
    rows = [r for r in rows if r[1] in labels]
    best = max(ttas, key=lambda t: tuned[t, "full"].score_after)
    rows.append(("best combination (chosen on tuning cases)", best, tuned[best, "full"].config))
    record = {
        f"{tta}/{kind}": {
            "config": t.config.to_dict(),
            "tuning_score_before": t.score_before,
            "tuning_score_after": t.score_after,
        }
        for (tta, kind), t in tuned.items()
    }
    return rows, record


def score_rows(rows, labels, gts, spacings, test_ids, hd95_mode="max") -> list[dict]:
    """Per row: name, tta, config and per-case `evaluate_volume` scores on the test cases
    (rows with the same TTA setting and post-processing are scored once)."""
    out, done = [], {}
    for name, tta, cfg in rows:
        key = (tta, cfg)
        if key not in done:
            per_case = []
            for cid in test_ids:
                pred = postprocess.apply(labels[tta][cid], cfg, spacings[cid])
                per_case.append(
                    {"case_id": cid, **score_case(pred, gts[cid], spacings[cid], hd95_mode)}
                )
            done[key] = per_case
        out.append(
            {"row": name, "tta": tta, "postprocessing": cfg.to_dict(), "per_case": done[key]}
        )
    return out


def _cell(values, digits) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


def markdown(scored: list[dict]) -> str:
    """The ablation table (mean [min, max] over test cases) and the per-case tables."""
    head = "| setting | TTA | post-processing | " + " | ".join(
        [f"Dice {r}" for r in REGIONS] + [f"HD95 {r} (mm)" for r in REGIONS]
    )
    lines = [head + " |", "|---|---|---|" + "---:|" * 6]
    for s in scored:
        pp = _describe(postprocess.PostprocessConfig(**s["postprocessing"]))
        cells = [_cell([c[k] for c in s["per_case"]], 3 if "dice" in k else 1) for k in KEYS]
        lines.append(f"| {s['row']} | {s['tta']} | {pp} | " + " | ".join(cells) + " |")
    for s in (scored[0], scored[-1]):
        lines += ["", f"Per case, {s['row']}:", "", "| case | " + " | ".join(KEYS) + " |"]
        lines.append("|---|" + "---:|" * 6)
        for c in s["per_case"]:
            vals = [f"{c[k]:.3f}" if "dice" in k else f"{c[k]:.1f}" for k in KEYS]
            lines.append(f"| {c['case_id']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _describe(cfg: postprocess.PostprocessConfig) -> str:
    parts = []
    if cfg.largest_component_only:
        parts.append(f"largest component ({cfg.connectivity}-conn.)")
    elif cfg.min_component_voxels is not None:
        parts.append(
            f"components < {cfg.min_component_voxels} vx removed ({cfg.connectivity}-conn.)"
        )
    for region, into in (("tc", "ED"), ("et", "NCR")):
        if (mm3 := getattr(cfg, f"{region}_min_mm3")) is not None:
            action = into if getattr(cfg, f"{region}_action") == "relabel" else "removed"
            parts.append(f"{region.upper()} components < {mm3:g} mm3 -> {action}")
    if cfg.et_min_voxels is not None:
        parts.append(f"ET < {cfg.et_min_voxels} vx -> NCR")
    return "; ".join(parts) or "none"


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--data_root", required=True, help="folder of the NIfTI case folders")
    p.add_argument("--tune_cases", required=True, help="comma-separated case IDs")
    p.add_argument("--test_cases", default="", help="default: the run's data.test_cases")
    p.add_argument("--out", required=True, help="folder for ablation.json and ablation.md")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--ttas", default=",".join(TTAS), help="TTA settings, 'none' first")
    args = p.parse_args(argv)
    runtime.setup()  # fast XLA:CPU flags, as for every entry point, before JAX computes
    config = json.loads((pathlib.Path(args.workdir) / "config.json").read_text())
    test_ids = split_list(args.test_cases or config["data"]["test_cases"])
    tune_ids = split_list(args.tune_cases)
    if overlap := sorted(set(test_ids) & set(tune_ids)):
        raise SystemExit(f"error: tuning and test cases overlap: {overlap}")
    found = {c.case_id: c for c in brats.find_cases(args.data_root)}
    if missing := sorted(set(test_ids + tune_ids) - set(found)):
        raise SystemExit(f"error: case(s) {missing} not under {args.data_root}")
    cases = {c: found[c] for c in tune_ids + test_ids}
    start = time.perf_counter()
    ttas = split_list(args.ttas)
    if ttas[0] != "none" or not set(ttas) <= set(TTAS):
        raise SystemExit(f"error: --ttas={args.ttas}: expected 'none' first, then of {TTAS}")
    labels, gts, spacings = predict_all(args.workdir, cases, ttas=ttas, step=args.step)
    seconds = {"predict": time.perf_counter() - start}
    rows, tuning = plan_rows(labels, gts, tune_ids)
    seconds["tune"] = time.perf_counter() - start - seconds["predict"]
    hd95_mode = config["eval"].get("hd95_mode", "max")
    scored = score_rows(rows, labels, gts, spacings, test_ids, hd95_mode)
    seconds["score"] = time.perf_counter() - start - seconds["predict"] - seconds["tune"]
    table = markdown(scored)
    out = pathlib.Path(args.out)
    fileio.write_json(
        out / "ablation.json",
        {
            "workdir": args.workdir,
            "step": args.step,
            "tune_cases": tune_ids,
            "test_cases": test_ids,
            "hd95_mode": hd95_mode,
            "tuning": tuning,
            "rows": scored,
            "seconds": seconds,
        },
    )
    fileio.write_text(out / "ablation.md", table)
    print(table)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
