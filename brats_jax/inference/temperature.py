"""Temperature scaling of a trained run: fit it on labelled cases (`fit_run`, the library of
`python -m brats_jax.calibrate`); `calibration_file` stores it in the run folder and reads it
back for `predict`.

The fit (`metrics.calibration.fit_temperature`: one T for class outputs, one per region for
region outputs) minimises the NLL of the cases' brain voxels (a seeded sample of at most
`max_voxels` per case) under the network's logits as the run's slice predictor gives them
(`whole_volume.make_slice_predictor(logits=True)`: mirror views and sliding windows averaged,
resized back to the case's grid). `predict` scales exactly these logits (the same predictor
with a temperature), so the fitted objective is the NLL of what it writes; its labels never
use the temperature (`ensembles.predict_calibrated`).
"""

from __future__ import annotations

import datetime

import numpy as np

from brats_jax import data
from brats_jax.data import brats, nnunet, pipeline
from brats_jax.data.patches import inference_window
from brats_jax.inference import calibration_file, whole_volume
from brats_jax.inference.case_lists import split_list
from brats_jax.inference.ensembles import (
    Ensemble,
    input_normalization,
    trained_with_modality_dropout,
)
from brats_jax.inference.postprocess_tuning import resolve_cases, tested_cases
from brats_jax.metrics import calibration as cal
from brats_jax.models import outputs
from brats_jax.runs import train_state

MAX_VOXELS = 200_000
"""Brain voxels per case the fit uses by default (a seeded random sample)."""


def validation_cases(config) -> list[str]:
    """The run's validation case IDs: its `data.val_cases`, else those its split drew
    (`data.val_fraction` or `data.num_folds`, the training's own draw over the cases under a
    NIfTI or nnU-Net `data.root`); [] when it had none or they cannot be found again."""
    d = config.data
    if listed := split_list(d.get("val_cases", "")):
        return listed
    drawn = float(d.get("val_fraction", 0)) > 0 or int(d.get("num_folds", 0)) > 0
    if not drawn or d.get("source") not in ("nifti", "nnunet"):
        return []
    find = nnunet.find_cases if nnunet.is_dataset(d.root) else brats.find_cases
    try:
        ids = [c.case_id for c in find(d.root)]
        return list(pipeline._split_case_ids(ids, d)[1])  # the draw build_splits made
    except (data.DataError, OSError):
        return []


def sample_voxels(logits, targets, mask, max_voxels: int, rng) -> tuple:
    """(logits (n, C), targets (n, C)) at up to `max_voxels` voxels where `mask` is True,
    drawn without replacement by `rng` (all of them when there are fewer)."""
    where = np.flatnonzero(np.asarray(mask, bool).ravel())
    if len(where) > max_voxels:
        where = np.sort(rng.choice(where, size=max_voxels, replace=False))
    c = logits.shape[-1]
    return logits.reshape(-1, c)[where], targets.reshape(-1, c)[where]


def logit_predictor(config, model, *, tta="none"):
    """The run's slice predictor of logits (`whole_volume.make_slice_predictor(logits=True)`
    with the run's image size, output kind and sliding window)."""
    return whole_volume.make_slice_predictor(
        model, image_size=config.data.image_size, tta=tta, output=outputs.of_config(config.model),
        window=inference_window(config, None), logits=True,
    )  # fmt: skip


def case_logits(predict, config, variables, case, *, batch_size=0):
    """(CaseData, logits (H, W, D, C)) of a labelled case folder or `brats.Case` under a
    loaded run and its `logit_predictor`."""
    loaded = brats.load_case(
        case, require_label=True, normalization=input_normalization(config.data.source),
        allow_missing=trained_with_modality_dropout([config]),
    )  # fmt: skip
    z = whole_volume.predict_volume(
        predict, variables, loaded.image, batch_size=batch_size or config.eval.batch_size,
        context_slices=data.context_slices(config),
    )  # fmt: skip
    return loaded, z


def summary(logits, targets, temperature, output: str) -> dict:
    """NLL, ECE and reliability bins (`ReliabilityBins.to_dict`) of sampled logits / targets
    (N, C) at `temperature` (C,)."""
    bins = cal.ReliabilityBins.empty(cal.channel_names(output))
    bins.add(cal.scaled_probabilities(logits, temperature, output), targets)
    nll = np.broadcast_to(cal.nll(logits, targets, temperature, output), (logits.shape[1],))
    reliability = bins.to_dict()
    return {
        "nll": calibration_file.by_channel(nll, output),
        "ece": dict(reliability["ece"]),
        "reliability": reliability,
    }


def fit_run(
    workdir, cases, *, step=None, tta="none", batch_size=0, max_voxels=MAX_VOXELS,
    data_root="", seed=0, log=print,
) -> dict:  # fmt: skip
    """Fit the temperature of the run in `workdir` on `cases` (folders or IDs under
    `data_root`, default the run's `data.root`: `postprocess_tuning.resolve_cases`; empty: its
    `validation_cases`) and return
    the calibration record (temperature, cases, NLL and ECE before / after on the sampled
    voxels, date); `save` writes it."""
    config, model, variables = train_state.load_trained(workdir, step=step)
    output = outputs.of_config(config.model)
    cases = list(cases) or validation_cases(config)
    if not cases:
        raise ValueError(
            f"--cases: give the fitting cases ({workdir} has no validation cases: "
            f"data.val_fraction={config.data.get('val_fraction', 0)}, data.val_cases empty)"
        )
    rng = np.random.default_rng(seed)
    predict = logit_predictor(config, model, tta=tta)
    zs, ys, ids = [], [], []
    for case in resolve_cases(cases, data_root or config.data.get("root", "")):
        loaded, z = case_logits(predict, config, variables, case, batch_size=batch_size)
        targets = cal.channel_targets(loaded.label, output)
        z, y = sample_voxels(z, targets, loaded.brain, max_voxels, rng)
        zs.append(z)
        ys.append(y)
        ids.append(loaded.case_id)
        log(f"{loaded.case_id}: {len(z)} brain voxels")
    run = Ensemble((str(workdir),), config, (), (), configs=(config,))
    if overlap := sorted(tested_cases(run) & set(ids)):
        log(f"warning: fitting on the run's test case(s) {overlap}: their test ECE is biased")
    z, y = np.concatenate(zs), np.concatenate(ys)
    t = cal.fit_temperature(z, y, output)
    ones = np.ones_like(t)
    return {
        "output": output,
        "temperature": calibration_file.by_channel(t, output),
        "fitted_on": {
            "cases": ids, "workdir": str(workdir), "step": step, "tta": tta,
            "voxels": cal.VOXELS, "max_voxels_per_case": max_voxels, "num_voxels": len(z),
            "seed": seed, "objective": "mean negative log-likelihood (nats)",
        },
        "before": summary(z, y, ones, output),
        "after": summary(z, y, t, output),
        "num_bins": cal.NUM_BINS,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
