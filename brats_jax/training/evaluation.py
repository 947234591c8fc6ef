"""Evaluation of a run during and after training: validation metrics over slices (the jitted
eval step over sharded batches), whole-volume test metrics, and the run's result files
(`results.json`, `per_case.csv`, figures). Folder-level evaluation of saved predictions is
`brats_jax.evaluate`'s job."""

import jax
import numpy as np

from brats_jax import NUM_CLASSES, data, fileio, metrics
from brats_jax.figures import plots
from brats_jax.inference import postprocess, whole_volume
from brats_jax.labels import REGIONS
from brats_jax.metrics import calibration, lesionwise
from brats_jax.models import outputs
from brats_jax.training.steps import data_mesh, device_batch


def evaluate_slices(run, eval_step, state, indices) -> dict:
    """Metrics over the slices `indices` of `run` (a `run_group.Run`): mean loss, the study's
    Dice (`paper_dice`: mean over slices of the per-slice 4-class Dice, as the study and the
    test's `paper_dice` compute it; it picks the best checkpoint), and Dice pooled over all
    slices (`pooled_dice`, `tumour_dice` without background, region `dice_WT/TC/ET`).

    `eval_step(state, batch, loss_params) -> EvalMetrics` (`steps.make_eval_step`, jitted).
    """
    if not len(indices):
        raise ValueError("evaluate_slices: no slices to evaluate")
    mesh = data_mesh()
    num_batches = -(-len(indices) // run.config.eval.batch_size)
    if run.config.eval.max_val_batches:
        num_batches = min(num_batches, run.config.eval.max_val_batches)
    total = None
    for batch in _host_eval_batches(run, indices, num_batches):
        out = jax.device_get(eval_step(state, device_batch(mesh, batch), run.loss_params))
        out = jax.tree.map(_widen, out)  # host sums in float64 / int64, as numpy
        total = out if total is None else total.merge(out)
    class_dice = metrics.dice_from_confusion(total.confusion.compute())
    return {
        "loss": float(total.loss.total) / max(int(total.loss.count), 1),
        "paper_dice": float(total.paper_dice.total) / max(int(total.paper_dice.count), 1),
        "pooled_dice": float(np.mean(class_dice)),
        "tumour_dice": float(np.mean(class_dice[1:])),
        **{
            f"dice_{k}": float(v)
            for k, v in metrics.region_dice_from_confusion(total.confusion.compute()).items()
        },
    }


def _widen(x):
    """float64 / int64 numpy copy of a device result, so host sums do not round or overflow."""
    x = np.asarray(x)
    return x.astype(np.float64 if np.issubdtype(x.dtype, np.floating) else np.int64)


def _host_eval_batches(run, indices, num_batches: int):
    """This host's part of `num_batches` global evaluation batches over `indices`.

    Global batch b holds indices[b*G:(b+1)*G] (G = eval.batch_size); host p reads its
    contiguous part of each. Every host yields exactly `num_batches` batches (padding ones
    have `valid` False), as the sharded eval step needs.
    """
    global_bs, hosts = run.config.eval.batch_size, jax.process_count()
    local_bs = global_bs // hosts
    padded = np.full(num_batches * global_bs, -1, np.int64)
    n = min(len(indices), len(padded))
    padded[:n] = np.asarray(indices, np.int64)[:n]
    mine = padded.reshape(num_batches, hosts, local_bs)[:, jax.process_index()].reshape(-1)
    mine = mine[mine >= 0]
    size, k = run.config.data.image_size, data.context_slices(run.config)
    opts = dict(image_size=size, context_slices=k)
    last = None
    for last in data.eval_batches(run.source, mine, batch_size=local_bs, **opts):
        yield last
        num_batches -= 1
    if num_batches > 0:  # this host ran out of real slices: feed all-invalid batches
        if last is None:
            first = data.eval_batches(run.source, np.asarray(indices[:1]), batch_size=local_bs,
                                      **opts)  # fmt: skip
            last = next(iter(first))
        for _ in range(num_batches):
            yield {**last, "valid": np.zeros(local_bs, bool)}


def evaluate_test_volumes(run, predict, variables) -> tuple[dict, list]:
    """Per-3D-volume BraTS metrics on the test cases, plus the study's slice metric.

    Every slice of each test case (pruned or not) is predicted, the slices are stacked back
    into the volume and the config's `postprocess` fields are applied (off by default).
    The study's metric (`paper_dice`) is the mean over the test split's (pruned) slices of
    the per-slice 4-class Dice, as the study computed it; beside
    it, `paper_dice_absent_excluded` (classes absent from a slice's target and prediction
    left out instead of scored 1) and `pooled_dice_4class` (one Dice per class pooled over
    those slices' pixels, `pooled_class_dice`, then their mean). Each case also gets the
    BraTS 2023 lesion-wise scores (`lesionwise.evaluate_volume`, `lesionwise_*` columns;
    the `lesionwise` block of the results holds their case means and summed counts).
    The `calibration` block holds the probabilities' reliability bins and ECE per class or
    region over the test cases' brain voxels (`metrics.calibration`).
    Returns `(results, figure_slices)`.
    """
    spacing = getattr(run.source, "spacing", (1.0, 1.0, 1.0))
    pp = postprocess.from_config(run.config)
    kept = set(np.asarray(run.splits.test).tolist())
    per_case, figure_slices = [], []
    readings = {"absent_one": [], "absent_excluded": [], "confusion": 0}
    kind = outputs.of_config(run.config.model)
    bins = calibration.ReliabilityBins.empty(calibration.channel_names(kind))
    for case_id in run.splits.cases["test"]:
        image, label = data.load_volume(run.source, case_id)
        probs = whole_volume.predict_volume(
            predict, variables, image, batch_size=run.config.eval.batch_size,
            context_slices=data.context_slices(run.config),
        )  # fmt: skip
        bins.add(
            probs, calibration.channel_targets(label, kind), calibration.brain_of_normalised(image)
        )
        pred = outputs.labels_from_probabilities(probs, kind)
        pred = postprocess.apply(pred, pp, spacing).astype(np.int32)  # the config's (identity: off)
        scores = metrics.evaluate_volume(
            pred, label, spacing=spacing, hd95_mode=run.config.eval.hd95_mode
        )
        scores.update(  # BraTS 2023 lesion-wise scores, the challenge's GLI constants
            lesionwise.evaluate_volume(pred, label, spacing, hd95_mode=run.config.eval.hd95_mode)
        )
        per_case.append({"case_id": case_id, **scores})
        zs = [z for z, i in enumerate(data.case_indices(run.source, case_id)) if int(i) in kept]
        r = metrics.slice_dice_readings(
            np.moveaxis(pred[..., zs], -1, 0), np.moveaxis(label[..., zs], -1, 0)
        )
        readings["absent_one"] += r["absent_one"].tolist()
        readings["absent_excluded"] += r["absent_excluded"].tolist()
        readings["confusion"] = readings["confusion"] + r["confusion"]
        z = int(np.argmax((label > 0).sum(axis=(0, 1))))
        figure_slices.append((case_id, z, image[:, :, z, 0], label[:, :, z], pred[:, :, z]))
    results = {**_summarise(per_case, readings), "postprocessing": pp.to_dict()}
    return {**results, "calibration": bins.to_dict()}, figure_slices


def _summarise(per_case: list[dict], readings: dict) -> dict:
    """The results dict: case means of the per-case scores, the slice-mean paper Dice and
    the two readings the study leaves open (EXPERIMENTS.md): absent classes left out of each
    slice's mean; one Dice per class pooled over all test slices' pixels."""
    regions = tuple(REGIONS)
    slice_scores, excluded = readings["absent_one"], readings["absent_excluded"]
    pooled = readings["confusion"]
    return {
        "paper_dice": float(np.mean(slice_scores)) if slice_scores else None,
        "paper_dice_absent_excluded": float(np.mean(excluded)) if excluded else None,
        "pooled_dice_4class": float(metrics.paper_dice_pooled(pooled)) if excluded else None,
        "pooled_class_dice": metrics.dice_from_confusion(pooled).tolist() if excluded else [],
        "class_dice": [_mean(per_case, f"class_dice_{c}") for c in range(NUM_CLASSES)],
        "dice": {r: _mean(per_case, f"dice_{r}") for r in regions},
        "hd95": {r: _mean(per_case, f"hd95_{r}") for r in regions},
        "sensitivity": {r: _mean(per_case, f"sensitivity_{r}") for r in regions},
        "specificity": {r: _mean(per_case, f"specificity_{r}") for r in regions},
        "lesionwise": lesionwise.summarise(per_case),
        "num_test_cases": len(per_case),
        "num_test_slices": len(slice_scores),
        "per_case": per_case,
    }


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def evaluate_and_write(
    run, predict, variables, steps: int, *, tested_step: int | None = None, selected_by: str = ""
) -> dict:
    """The run's test results (`evaluate_test_volumes`, or `paper_dice` None without test
    cases) with `steps` = optimizer steps taken, `tested_step` = the step whose weights
    `variables` are (default `steps`) and `selected_by` = why that step; writes the result
    files on host 0."""
    if run.splits.cases["test"]:
        results, figure_slices = evaluate_test_volumes(run, predict, variables)
    else:
        results, figure_slices = {"paper_dice": None, "per_case": []}, []
    results["steps"] = steps
    results["tested_step"] = steps if tested_step is None else tested_step
    results["selected_by"] = selected_by or "final step"
    if jax.process_index() == 0:
        write_outputs(run.workdir, run.config, results, figure_slices)
    return results


def write_per_case_csv(path, rows: list[dict]) -> None:
    """`rows` (one dict per case, same keys) as CSV; floats with 6 significant digits."""
    keys = list(rows[0]) if rows else ["case_id"]
    lines = [",".join(keys)]
    for r in rows:
        lines.append(
            ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        )
    fileio.write_text(path, "\n".join(lines) + "\n")


def write_outputs(workdir, config, results: dict, figure_slices: list) -> None:
    """`per_case.csv`, `learning_curves.png`, `test_slices.png`, `reliability.png` and, last
    (it marks the run finished), `results.json` in `workdir`."""
    write_per_case_csv(workdir / "per_case.csv", results["per_case"])
    plots.learning_curves(workdir / "metrics.jsonl", workdir / "learning_curves.png")
    if figure_slices:
        n = config.eval.num_figure_slices
        plots.overlay_grid(figure_slices[:n], workdir / "test_slices.png")
    if results.get("calibration", {}).get("num_voxels"):
        plots.reliability_diagram(results["calibration"], workdir / "reliability.png",
                                  "Reliability on the test cases (brain voxels)")  # fmt: skip
    fileio.write_json(workdir / "results.json", results)
