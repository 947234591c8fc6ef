"""Would a lower region threshold recover the tumour a model misses? Out of fold, per threshold.

    python -m experiments.analyses.region_thresholds --ablation=runs/cv3 --data_root=NIFTI_ROOT \\
        --variant=cb_deep_supervision+cb_intensity [--thresholds=0.2,0.3,0.4,0.5]

For each fold run `<ablation>/runs/<variant>-fold<k>` of a `segmentation_ablation --folds`
directory (a region-output variant, `model.output="regions"`), the fold's test cases
(`<ablation>/folds.json`) are predicted once (no TTA) and decoded at each threshold t
(`outputs.regions_to_labels`: a region where its probability exceeds t, then nested), the
largest whole-tumour component kept and scored (`metrics.evaluate_volume`) as the ablation's
`largest` rows: at t = 0.5 the scores are the ablation's. Per case it also prints the share of
the whole tumour missed at 0.5 and the share of those missed voxels whose WT probability is at
most 0.1 (`missed_whole_tumour`): near 1, the model does not see that tumour and no threshold
(nor a loss that only trades precision for recall) recovers it.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from brats_jax import cli
from brats_jax.data import brats
from brats_jax.inference import ensembles, postprocess
from brats_jax.models import outputs
from experiments.analyses.postprocessing_ablation import REGIONS, load_scored_case, score_case
from experiments.analyses.segmentation_ablation import run_dir

LARGEST = postprocess.PostprocessConfig(largest_component_only=True)


def missed_whole_tumour(wt_probability, label, threshold=0.5, low=0.1) -> tuple[float, float]:
    """(share of the whole tumour (label > 0) with WT probability <= `threshold`, share of those
    missed voxels with probability <= `low`); (H, W, D) float probabilities and labels {0..3};
    (0, 0) where nothing is missed, NaN for the first where there is no tumour."""
    p, tumour = np.asarray(wt_probability), np.asarray(label) > 0
    missed = tumour & (p <= threshold)
    if not tumour.any():
        return float("nan"), 0.0
    if not missed.any():
        return 0.0, 0.0
    return float(missed.sum() / tumour.sum()), float((p[missed] <= low).mean())


def scores_by_threshold(probs, label, spacing, thresholds, hd95_mode="max") -> dict:
    """{t: {dice_/hd95_ WT, TC, ET}} of (H, W, D, 3) region probabilities decoded at each
    threshold t, largest whole-tumour component kept, against (H, W, D) labels {0..3}."""
    out = {}
    for t in thresholds:
        pred = postprocess.apply(
            outputs.regions_to_labels(probs, t).astype(np.uint8), LARGEST, spacing
        )
        out[t] = score_case(pred, label, spacing, hd95_mode)
    return out


def _summary(per_case: list[dict], thresholds) -> list[str]:
    lines = ["| threshold | Dice WT | Dice TC | Dice ET | mean Dice | HD95 WT / TC / ET (mm) "
             "| WT < 0.75 |", "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for t in thresholds:
        dice = [np.mean([c[t][f"dice_{r}"] for c in per_case]) for r in REGIONS]
        hd95 = [np.mean([c[t][f"hd95_{r}"] for c in per_case]) for r in REGIONS]
        low = sum(c[t]["dice_WT"] < 0.75 for c in per_case)
        lines.append(
            f"| {t} | " + " | ".join(f"{d:.3f}" for d in dice) + f" | {np.mean(dice):.3f} | "
            + " / ".join(f"{h:.1f}" for h in hd95) + f" | {low} |"
        )  # fmt: skip
    return lines


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ablation", required=True, help="a segmentation_ablation --folds directory")
    p.add_argument("--data_root", required=True, help="folder of the NIfTI case folders")
    p.add_argument("--variant", required=True, help="a region-output variant with fold runs")
    p.add_argument("--thresholds", default="0.2,0.3,0.4,0.5")
    p.add_argument("--hd95_mode", default="max", choices=("max", "pooled"))
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    folds = json.loads((pathlib.Path(args.ablation) / "folds.json").read_text())["folds"]
    cases = {c.case_id: c for c in brats.find_cases(args.data_root)}
    absent = sorted({c for ids in folds for c in ids} - set(cases))
    if absent:
        raise SystemExit(f"error: --data_root={args.data_root} lacks the folds' cases {absent}")
    per_case = []
    for k, ids in enumerate(folds):
        run = run_dir(pathlib.Path(args.ablation), args.variant, k)
        ensemble = ensembles.load_ensemble(str(run))
        if ensemble.config.model.output != "regions":
            raise SystemExit(f"error: {run}: model.output is {ensemble.config.model.output!r}; "
                             "expected 'regions' (thresholds of region probabilities)")  # fmt: skip
        for cid in ids:
            image, label, spacing = load_scored_case(cases[cid], ensemble.config.data.source)
            probs = ensembles.predict_probabilities(ensemble, image)
            scores = scores_by_threshold(probs, label, spacing, thresholds, args.hd95_mode)
            missed, unseen = missed_whole_tumour(probs[..., 0], label)
            per_case.append(scores)
            dice = " ".join(f"{t}: {s['dice_WT']:.3f}" for t, s in scores.items())
            print(f"fold {k} {cid} WT Dice {dice}; missed at 0.5 {missed:.2f}, "
                  f"of which p <= 0.1 {unseen:.2f}", flush=True)  # fmt: skip
    print("\n".join(_summary(per_case, thresholds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
