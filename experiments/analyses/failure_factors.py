"""Which case properties go with a poor whole-tumour Dice: tumour size and oedema contrast.

    python -m experiments.analyses.failure_factors --data_root=NIFTI_ROOT [--scores=PER_CASE.csv]
    python -m experiments.analyses.failure_factors --data_root=NIFTI_ROOT --scores=ablation.json \\
        --variant=VARIANT

For every case under `--data_root`, z-scored over its brain as training sees it
(`brats.load_case`): its whole-tumour volume (cm3, voxel size from the affine) and the mean of
each modality over its oedema (label 2), in brain standard deviations, and the oedema's
contrast in interquartile ranges of the normal-appearing brain (`case_factors`). With
`--scores` (a per-case CSV with `case_id` and `dice_WT` columns, as `brats_jax.evaluate` and
a training's test pass write, or a `segmentation_ablation` record whose row `--variant`, no
TTA, largest component, is read) it prints each scored case's WT Dice beside its factors and
the Spearman rank correlation of WT Dice with each factor (`scipy.stats.spearmanr`).
"""

from __future__ import annotations

import csv
import sys

import numpy as np
from scipy import stats

from brats_jax import MODALITIES, cli
from brats_jax.data import brats
from experiments.analyses import segmentation_ablation

OEDEMA = 2  # training label of the peritumoral oedema (brats.to_train_labels)


def case_factors(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, brain: np.ndarray | None = None
) -> dict[str, float]:
    """A case's failure factors: `wt_cm3` (label > 0 voxels x the affine's voxel volume, cm3)
    and `oedema_<modality>` (the mean of (H, W, D, 4) `image` over label == 2, NaN without
    oedema), `label` (H, W, D) in {0..3}. With `brain` (bool (H, W, D)) also
    `iqr_<modality>`: (median over the oedema - median over the normal-appearing brain,
    brain & label == 0) / that brain's interquartile range: the oedema's contrast as a
    median/IQR normalisation would show it, unchanged by any per-case scaling a * x + b (a > 0),
    so no per-case linear normalisation (z-scoring, percentile scaling) can change it."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine)[:3, :3])))
    out = {"wt_cm3": float((label > 0).sum()) * voxel_mm3 / 1000.0}
    oedema = label == OEDEMA
    for i, m in enumerate(MODALITIES):
        out[f"oedema_{m}"] = float(image[..., i][oedema].mean()) if oedema.any() else np.nan
    if brain is not None:
        normal = brain & (label == 0)
        for i, m in enumerate(MODALITIES):
            q1, median, q3 = np.percentile(image[..., i][normal], [25, 50, 75])
            lesion = np.median(image[..., i][oedema]) if oedema.any() else np.nan
            out[f"iqr_{m}"] = float((lesion - median) / (q3 - q1)) if q3 > q1 else np.nan
    return out


def read_wt_dice(path: str, variant: str | None = None) -> dict[str, float]:
    """{case_id: WT Dice} from a per-case CSV, or from row `variant` (TTA "none", post-processing
    "largest") of a `segmentation_ablation` record (.json)."""
    if path.endswith(".json"):
        rows = segmentation_ablation._rule_rows(segmentation_ablation._read_record(path)["rows"])
        if variant not in rows:
            raise SystemExit(f"error: --scores {path}: no row {variant!r} (tta none, largest)")
        return {c["case_id"]: float(c["dice_WT"]) for c in rows[variant]["per_case"]}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"case_id", "dice_WT"} <= set(rows[0]):
        raise SystemExit(f"error: --scores {path}: expected a CSV with case_id and dice_WT")
    return {r["case_id"]: float(r["dice_WT"]) for r in rows}


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", required=True, help="folder of the NIfTI case folders")
    p.add_argument("--scores", help="per-case CSV, or an ablation record (.json) with --variant")
    p.add_argument("--variant", help="the record's row (e.g. cb_deep_supervision+cb_intensity)")
    args = p.parse_args(argv)
    dice = read_wt_dice(args.scores, args.variant) if args.scores else {}
    factors = {}
    for case in brats.find_cases(args.data_root):
        d = brats.load_case(case, require_label=True)
        factors[case.case_id] = case_factors(d.image, d.label, d.affine, d.brain)
    names = list(next(iter(factors.values())))
    print("| case | " + " | ".join(names) + " | WT Dice |")
    print("|---|" + "---:|" * (len(names) + 1))
    for cid, f in factors.items():
        score = f"{dice[cid]:.3f}" if cid in dice else ""
        print(f"| {cid} | " + " | ".join(f"{f[n]:.2f}" for n in names) + f" | {score} |")
    scored = [cid for cid in factors if cid in dice]
    if len(scored) > 2:
        y = [dice[cid] for cid in scored]
        rho = {n: stats.spearmanr([factors[c][n] for c in scored], y).statistic for n in names}
        cells = ", ".join(f"{n} {r:+.2f}" for n, r in rho.items())
        print(f"\nSpearman rank correlation with WT Dice over {len(scored)} cases: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
