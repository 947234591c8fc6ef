"""Trained runs loaded for prediction (`load_ensemble`: one run or several, an ensemble) and
their probabilities of a volume, averaged over the runs (`predict_probabilities`; beside
them the temperature-scaled ones, `predict_calibrated`)."""

import json
import pathlib
from typing import NamedTuple

import numpy as np

from brats_jax import data
from brats_jax.data.patches import inference_window
from brats_jax.inference import calibration_file, whole_volume
from brats_jax.inference.case_lists import split_list
from brats_jax.models import outputs
from brats_jax.runs import train_state


def input_normalization(source: str) -> str:
    """`brats.load_case` normalization matching what a run trained on `source` saw.

    Kaggle slices come z-scored per slice over all pixels ("slice"); NIfTI cases are
    z-scored over the brain of the whole volume ("brain"), the closest match too for the
    synthetic phantoms (z-scored per slice over the brain; demo models are not meant for
    real scans).
    """
    return "slice" if source == "kaggle_h5" else "brain"


class Ensemble(NamedTuple):
    """Trained runs loaded for prediction; `predictors[i]` serves `variables[i]`."""

    workdirs: tuple[str, ...]
    config: object  # the first run's ConfigDict (image size, data source)
    predictors: tuple
    variables: tuple
    context_slices: tuple = ()  # each run's data.context_slices (() = all 0)
    configs: tuple = ()  # each run's ConfigDict (`postprocess_choice.resolve_postprocessing`)
    missing_ok: bool = False  # every run trained with modality dropout: one file may be missing
    temperatures: tuple = ()  # each run's (C,) temperatures (its calibration.json), or None


def trained_with_modality_dropout(configs) -> bool:
    """True when every run config (dicts or ConfigDicts) has `augment.modality_dropout_p`
    > 0: its model saw a modality set to 0, so predict accepts a case lacking one file."""
    configs = list(configs)
    return bool(configs) and all(
        float(dict(c.get("augment") or {}).get("modality_dropout_p", 0)) > 0 for c in configs
    )


def saved_configs(workdirs) -> list[dict]:
    """The runs' config.json dicts ({} for one that cannot be read: load_ensemble says why)."""
    out = []
    for w in split_list(workdirs):
        try:
            out.append(json.loads((pathlib.Path(w) / "config.json").read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def _check_like_first(workdir, config, first_workdir, first) -> None:
    """ValueError when run `workdir` differs from the ensemble's first run in what its runs
    must share: `data.image_size`, the input normalization and `model.output`."""
    for what, get in (
        ("data.image_size", lambda c: c.data.image_size),
        ("input normalization", lambda c: input_normalization(c.data.source)),
        ("model.output", lambda c: outputs.of_config(c.model)),
    ):
        if get(config) != get(first):
            raise ValueError(
                f"--workdir {workdir}: {what} {get(config)!r} differs from {first_workdir}'s "
                f"{get(first)!r}; an ensemble's runs must share it"
            )


def load_ensemble(
    workdirs, *, step=None, tta: str = "none", sliding_window=None, calibration: bool = False
) -> Ensemble:
    """Load one run or several (an ensemble) for prediction.

    `sliding_window`: None = each run's `eval.sliding_window`; True / False for all runs
    (True: each run slides a window of its `data.patch_size`, `patches.inference_window`).
    `calibration`: read each run's temperatures (`calibration_file.load`; None for a run
    without the file) for `predict_calibrated`.

    Runs of an ensemble must share `data.image_size`, the input normalization (the data
    source's, `input_normalization`) and `model.output` (averaging class and region
    probabilities means nothing); ValueError names the first run that differs. Each run
    keeps its own `data.context_slices` (runs with different ones may be mixed). Runs with
    the same model config share one compiled predictor (the variables are its argument).
    """
    workdirs = tuple(split_list(workdirs))
    if not workdirs:
        raise ValueError("--workdir: expected a run folder (or several, comma-separated)")
    predictors, variables, contexts, configs, by_model = [], [], [], [], {}
    for w in workdirs:
        config, model, v = train_state.load_trained(w, step=step)
        configs.append(config)
        _check_like_first(w, config, workdirs[0], configs[0])
        window = inference_window(config, sliding_window)
        key = (json.dumps(config.model.to_dict(), sort_keys=True), window)
        if key not in by_model:
            by_model[key] = whole_volume.make_slice_predictor(
                model,
                image_size=config.data.image_size,
                tta=tta,
                output=outputs.of_config(config.model),
                window=window,
            )
        predictors.append(by_model[key])
        variables.append(v)
        contexts.append(data.context_slices(config))  # each run gets its own context window
    missing_ok = trained_with_modality_dropout(configs)
    temperatures = tuple(
        calibration_file.load(w, outputs.of_config(c.model)) if calibration else None
        for w, c in zip(workdirs, configs, strict=True)
    )
    return Ensemble(
        workdirs,
        configs[0],
        tuple(predictors),
        tuple(variables),
        tuple(contexts),
        tuple(configs),
        missing_ok,
        temperatures,
    )


def is_calibrated(ensemble: Ensemble) -> bool:
    """True when some run of `ensemble` was loaded with a temperature."""
    return any(t is not None for t in ensemble.temperatures)


def member_probabilities(ensemble: Ensemble, image: np.ndarray, *, batch_size=0, calibrated=False):
    """Yield each run's own (H, W, D, C) probabilities of a (H, W, D, 4) volume (test-time
    mirror views already averaged), one run at a time; with `calibrated`, (H, W, D, 2C):
    beside them (channels C:) those of its logits divided by its temperatures (1 for a run
    without any), `whole_volume.make_slice_predictor`."""
    batch_size = batch_size or ensemble.config.eval.batch_size
    contexts = ensemble.context_slices or (0,) * len(ensemble.predictors)
    temps = ensemble.temperatures or (None,) * len(ensemble.predictors)
    channels = outputs.num_channels(outputs.of_config(ensemble.config.model))
    runs = zip(ensemble.predictors, ensemble.variables, contexts, temps, strict=True)
    for predict, variables, k, t in runs:
        scale = {"temperature": np.ones(channels, np.float32) if t is None else t}
        yield whole_volume.predict_volume(
            predict, variables, image, batch_size=batch_size, context_slices=k,
            **(scale if calibrated else {}),
        )  # fmt: skip


def _average(ensemble: Ensemble, image, batch_size, member_labels, calibrated) -> np.ndarray:
    """Mean over the runs of `member_probabilities`; each run's labels (of its channels :C,
    the probabilities without temperature) appended to a list `member_labels`."""
    kind = outputs.of_config(ensemble.config.model)
    channels = outputs.num_channels(kind)
    total = None
    for probs in member_probabilities(
        ensemble, image, batch_size=batch_size, calibrated=calibrated
    ):
        if member_labels is not None:
            member_labels.append(outputs.labels_from_probabilities(probs[..., :channels], kind))
        total = probs if total is None else total + probs
    return total / len(ensemble.predictors)


def predict_probabilities(
    ensemble: Ensemble, image: np.ndarray, *, batch_size=0, member_labels=None
) -> np.ndarray:
    """(H, W, D, C) probabilities (4 classes or 3 regions: `model.output`) of a (H, W, D, 4)
    volume, averaged over the runs. A list `member_labels` gets each run's own labels
    (H, W, D) int32 appended (its probabilities decoded alone, no post-processing)."""
    return _average(ensemble, image, batch_size, member_labels, calibrated=False)


def predict_calibrated(
    ensemble: Ensemble, image: np.ndarray, *, batch_size=0, member_labels=None
) -> tuple[np.ndarray, np.ndarray]:
    """`(probabilities, calibrated)`, both (H, W, D, C), from one pass over the runs: the
    `predict_probabilities` (labels are decoded from these, so a temperature never changes
    them) and the mean over the runs of each run's probabilities of its logits divided by its
    temperatures (`load_ensemble(calibration=True)`; 1 for runs without a calibration file),
    what `predict --probabilities` and `--uncertainty` write."""
    both = _average(ensemble, image, batch_size, member_labels, calibrated=True)
    channels = both.shape[-1] // 2
    return both[..., :channels], both[..., channels:]
