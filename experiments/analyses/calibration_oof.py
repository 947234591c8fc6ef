"""How well calibrated are a run's probabilities, and does temperature scaling help? Out of fold.

    python -m experiments.analyses.calibration_oof --workdir=RUN --extra_root=MORE_CASES \\
        --out=experiments/results/calibration_ece_out_of_fold.json [--figure=F.png] [--folds=5]

The cases: the run's test cases (its results.json, found under its data.root) and every
case folder under `--extra_root` (cases the run never saw; none may be a training case).
They are split into `--folds` seeded folds; each fold's temperature
(`metrics.calibration.fit_temperature`, one per region or one for classes) is fitted on the
other folds' cases (their logits at up to `--max_voxels` sampled brain voxels per case,
`inference.temperature`) and used only on its own cases, so no case is scored by a
temperature fitted on it. Each case is then predicted the way `predict` does with
its fold's temperature (`ensembles.predict_calibrated`: the unscaled and the scaled
probabilities of the same model calls; labels decoded from the unscaled ones, the run's
post-processing): the expected calibration error (15 bins, one-vs-rest per class / region,
brain voxels) of the probabilities before and after, pooled over all cases and per case, the
NLL of the held-out sampled voxels, the region Dice of predict's labels (the same with and
without a temperature) and, for comparison, of labels decoded from the scaled probabilities,
with the number of voxels whose label that would change. Writes the record to `--out` and,
with `--figure`, the pooled reliability diagram (before and after).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import sys
import time

import numpy as np

from brats_jax import cli, runtime
from brats_jax.data import brats
from brats_jax.figures import plots
from brats_jax.inference import ensembles, postprocess, temperature
from brats_jax.metrics import calibration as cal
from brats_jax.metrics import volumes
from brats_jax.models import outputs
from brats_jax.runs import train_state


def region_dice(pred, label) -> dict[str, float]:
    """Dice per BraTS region of training-class maps (both empty: 1)."""
    out = {}
    for r, (tp, fp, fn, _) in volumes.region_confusion(pred, label).items():
        out[r] = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return out


def assign_folds(ids: list[str], k: int, seed: int) -> dict[str, int]:
    """Case ID -> fold 0..k-1: a seeded permutation of the sorted IDs, dealt round-robin."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return {sorted(ids)[j]: i % k for i, j in enumerate(order)}


def _cases(workdir: pathlib.Path, config, extra_root: str) -> dict[str, brats.Case]:
    """The run's test cases and the cases under `extra_root`, by ID; SystemExit when one of
    them is a training case of the run."""
    per_case = json.loads((workdir / "results.json").read_text())["per_case"]
    tested = {str(r["case_id"]) for r in per_case}
    sample = {c.case_id: c for c in brats.find_cases(config.data.root)}
    extra = {c.case_id: c for c in brats.find_cases(extra_root)} if extra_root else {}
    if seen := sorted((set(sample) - tested) & set(extra)):
        raise SystemExit(f"error: --extra_root holds training case(s) of the run: {seen}")
    return {**{c: sample[c] for c in sorted(tested)}, **extra}


def _fit_folds(config, model, variables, cases, folds, k, max_voxels, seed):
    """Per fold: the temperature fitted on the other folds' sampled voxels and the held-out
    sample's NLL before / after."""
    predict = temperature.logit_predictor(config, model)
    output = outputs.of_config(config.model)
    rng = np.random.default_rng(seed)
    samples = {}
    for cid, case in cases.items():
        loaded, z = temperature.case_logits(predict, config, variables, case)
        samples[cid] = temperature.sample_voxels(
            z, cal.channel_targets(loaded.label, output), loaded.brain, max_voxels, rng
        )
        print(f"logits {cid} (fold {folds[cid]})", flush=True)
    fits = []
    for f in range(k):
        train = [samples[c] for c in cases if folds[c] != f]
        held = [samples[c] for c in cases if folds[c] == f]
        t = cal.fit_temperature(*(np.concatenate(a) for a in zip(*train, strict=True)), output)
        z, y = (np.concatenate(a) for a in zip(*held, strict=True))
        fits.append({"temperature": t, "nll_before": cal.nll(z, y, 1.0, output),
                     "nll_after": cal.nll(z, y, t, output)})  # fmt: skip
        print(f"fold {f}: T = {np.round(t, 3).tolist()}", flush=True)
    return fits


def _score(workdir, config, cases, folds, fits) -> dict:
    """Predict every case once with its fold's temperature (`ensembles.predict_calibrated`:
    the unscaled and the scaled probabilities of the same model calls); bins of both, the
    Dice of predict's labels (decoded from the unscaled ones, with the run's post-processing:
    the same with and without a temperature) and of labels decoded from the scaled ones."""
    base = ensembles.load_ensemble(str(workdir))
    pp = postprocess.from_config(config)
    output = outputs.of_config(config.model)
    names = cal.channel_names(output)
    pooled = {w: cal.ReliabilityBins.empty(names) for w in ("before", "after")}
    rows = []
    for cid, case in cases.items():
        t = fits[folds[cid]]["temperature"].astype(np.float32)
        data = brats.load_case(
            case,
            require_label=True,
            normalization=ensembles.input_normalization(config.data.source),
        )
        p_before, p_after = ensembles.predict_calibrated(
            base._replace(temperatures=(t,)), data.image
        )
        targets = cal.channel_targets(data.label, output)
        row = {"case_id": cid, "fold": folds[cid]}
        for when, p in (("before", p_before), ("after", p_after)):
            bins = cal.ReliabilityBins.empty(names).add(p, targets, data.brain)
            pooled[when] = pooled[when].merge(bins)
            row[f"ece_{when}"] = dict(zip(names, bins.ece().tolist(), strict=True))
        decoded = [outputs.labels_from_probabilities(p, output) for p in (p_before, p_after)]
        row["dice"] = region_dice(postprocess.apply(decoded[0], pp), data.label)
        row["dice_if_decoded_from_scaled"] = region_dice(
            postprocess.apply(decoded[1], pp), data.label
        )
        row["voxels_changed_if_decoded_from_scaled"] = int((decoded[0] != decoded[1]).sum())
        rows.append(row)
        changed = row["voxels_changed_if_decoded_from_scaled"]
        print(f"{cid}: ECE {row['ece_before']} -> {row['ece_after']}; {changed} voxels "
              "would change", flush=True)  # fmt: skip
    return {"pooled": pooled, "per_case": rows}


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run folder")
    p.add_argument("--extra_root", default="", help="more case folders the run never saw")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_voxels", type=int, default=temperature.MAX_VOXELS)
    p.add_argument("--out", required=True, help="the JSON record to write")
    p.add_argument("--figure", default="", help="PNG of the pooled reliability diagram")
    args = p.parse_args(argv)
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes
    workdir = pathlib.Path(args.workdir)
    start = time.time()
    config, model, variables = train_state.load_trained(workdir)
    cases = _cases(workdir, config, args.extra_root)
    folds = assign_folds(list(cases), args.folds, args.seed)
    fits = _fit_folds(config, model, variables, cases, folds, args.folds, args.max_voxels,
                      args.seed)  # fmt: skip
    scored = _score(workdir, config, cases, folds, fits)
    output = outputs.of_config(config.model)
    rows = scored["per_case"]
    record = {
        "what": __doc__.split("\n")[0],
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), CPU",
        "command": "python -m experiments.analyses.calibration_oof " + " ".join(sys.argv[1:]),
        "run": {"workdir": str(workdir), "output": output, "steps": config.train.num_steps,
                "image_size": config.data.image_size, "postprocess": pp_dict(config)},
        "folds": args.folds, "seed": args.seed, "max_voxels_per_case": args.max_voxels,
        "num_bins": cal.NUM_BINS, "voxels": cal.VOXELS,
        "cases": folds,
        "temperature_by_fold": [f["temperature"].tolist() for f in fits],
        "nll_held_out_sample": [
            {"before": np.atleast_1d(f["nll_before"]).tolist(),
             "after": np.atleast_1d(f["nll_after"]).tolist()} for f in fits
        ],
        "ece": {w: b.to_dict()["ece"] for w, b in scored["pooled"].items()},
        "dice_mean": {w: {r: float(np.mean([row[w][r] for row in rows]))
                          for r in ("WT", "TC", "ET")}
                      for w in ("dice", "dice_if_decoded_from_scaled")},
        "voxels_changed_if_decoded_from_scaled": sum(
            r["voxels_changed_if_decoded_from_scaled"] for r in rows
        ),
        "per_case": rows,
        "reliability": {w: b.to_dict() for w, b in scored["pooled"].items()},
        "wall_seconds": round(time.time() - start, 1),
    }  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.figure:
        plots.reliability_diagram(
            record["reliability"]["after"], args.figure, before=record["reliability"]["before"],
            title=f"{len(rows)} cases, out of fold, brain voxels: before / after scaling",
        )  # fmt: skip
    print(json.dumps({k: record[k] for k in ("ece", "dice_mean", "temperature_by_fold")}))
    return 0


def pp_dict(config) -> dict:
    """The run's post-processing as a dict."""
    return postprocess.from_config(config).to_dict()


if __name__ == "__main__":
    sys.exit(main())
