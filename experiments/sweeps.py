"""The study's results and the follow-ups its conclusion asks for, as sweeps of configs.

A *sweep* is a named list of `SweepRun`s: each is one training run (one cell of the sweep's
table), described by the model and the config fields it sets on top of the model's base
config. `expand(name, scale)` turns a sweep into `(sweep run, config)` pairs at a scale:

- "paper": `configs/<model>.py:paper` (the study: pruned 240x240 slices, batch 1, Adam,
  10 epochs) with the cell's fields; meant for a GPU or TPU.
- "smoke": the `tiny` preset's sizes (32 px synthetic slices, 6 cases of 6 slices, a 4-feature
  depth-2 U-Net or the tiny TransUNet) and `SMOKE_STEPS` steps with an evaluation every
  `SMOKE_EVAL_EVERY` steps (so each run has a learning curve); a whole table runs on 2 CPU
  cores in minutes. The cell's learning rate, loss and batch size are kept as they are.

Run names depend only on the cell (never on the scale) and leave out the study's defaults
(gamma 1 for focal losses, batch 1, 10 epochs, seed 0), so one configuration has one name in
every sweep: `unet-ce-lr1e-4`, `unet-cb_focal-b0.99-lr1e-5`, `transunet-ce-lr1e-5-bs16`,
`unet-focal-g2-lr1e-4`, `unet-ce-lr1e-4-seed1`, `unet-ce-lr1e-4-ep30`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from brats_jax import config_fields
from configs import default as default_config
from configs import transunet as transunet_config
from configs import unet as unet_config

SCALES = ("smoke", "paper")
MODELS = ("unet", "transunet")
MODEL_LABELS = {"unet": "U-Net", "transunet": "TransUNet"}

# Smoke scale (the configs' "smoke" preset): steps per run (x LONG_EPOCHS/10 for the `long`
# sweep), evaluation cadence.
SMOKE_STEPS = default_config.SMOKE_STEPS
SMOKE_EVAL_EVERY = default_config.SMOKE_EVAL_EVERY
LONG_EPOCHS = 30  # the `long` sweep (the study: 10)


@dataclasses.dataclass(frozen=True)
class LossSetting:
    """One row of Tables 1 and 2: a loss with its class-balancing beta (None = unweighted)."""

    key: str  # name fragment, e.g. "cb_focal-b0.99"
    label: str  # the study's row label
    loss: str  # train.loss
    beta: float | None = None


LOSS_SETTINGS = (
    LossSetting("ce", "Unweighted CE", "ce"),
    LossSetting("cb_ce-b0.5", "CE, beta=0.5", "cb_ce", 0.5),
    LossSetting("cb_ce-b0.75", "CE, beta=0.75", "cb_ce", 0.75),
    LossSetting("cb_ce-b0.99", "CE, beta=0.99", "cb_ce", 0.99),
    LossSetting("focal", "Unweighted Focal", "focal"),
    LossSetting("cb_focal-b0.5", "Focal, beta=0.5", "cb_focal", 0.5),
    LossSetting("cb_focal-b0.75", "Focal, beta=0.75", "cb_focal", 0.75),
    LossSetting("cb_focal-b0.99", "Focal, beta=0.99", "cb_focal", 0.99),
)
STUDY_LRS = (1e-4, 1e-5)
STUDY_BATCHES = (1, 16)
FOCAL_GAMMAS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
LR_RANGE = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
SEEDS = (0, 1, 2, 3, 4)
# What n_i counts in the cb_* cells (EXPERIMENTS.md, "What n_i counts"); set in every cell
# so that `--config.train.class_counts=split_pixels|split_slices` may override it.
CB_CLASS_COUNTS = "batch_pixels"
# The study's best cell per model (Tables 1 and 2): unweighted CE, batch 1.
BEST_LR = {"unet": 1e-4, "transunet": 1e-5}

# The study's test Dice (its 4-class slice mean, background included): paper.md Tables 1, 2.
# loss setting: (U-Net at LR 1e-4, 1e-5 (Table 1), TransUNet at LR 1e-4, 1e-5 (Table 2))
_STUDY_DICE = {
    "ce": (0.84240, 0.83930, 0.80036, 0.87480),
    "cb_ce-b0.5": (0.73105, 0.78333, 0.68717, 0.83365),
    "cb_ce-b0.75": (0.72120, 0.70263, 0.68035, 0.78808),
    "cb_ce-b0.99": (0.64190, 0.62797, 0.57009, 0.73566),
    "focal": (0.77056, 0.78319, 0.75144, 0.84543),
    "cb_focal-b0.5": (0.74594, 0.68743, 0.65378, 0.74749),
    "cb_focal-b0.75": (0.65048, 0.62573, 0.55289, 0.68219),
    "cb_focal-b0.99": (0.51534, 0.53782, 0.41114, 0.55809),
}
STUDY_TABLE1 = {k: v[:2] for k, v in _STUDY_DICE.items()}  # U-Net
STUDY_TABLE2 = {k: v[2:] for k, v in _STUDY_DICE.items()}  # TransUNet
STUDY_TABLES = {"unet": STUDY_TABLE1, "transunet": STUDY_TABLE2}


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep (one cell of its table); `experiments.run.PlannedRun` is
    the same run with its full config and folder, `brats_jax.training.run_group.Run` while it
    trains.

    Attributes:
      name: run name = folder name under the sweep's output folder.
      model: "unet" | "transunet".
      settings: dotted config field -> value set on the model's base config.
      row, col: where the run sits in the sweep's table (labels, strings).
      study: the study's test Dice for this cell when it reported one, else None.
      epochs: the cell's training length in the study's epochs (10 = the study's); a
        cell with more stretches the run's budget by epochs/10 (see `cell_config`).
    """

    name: str
    model: str
    settings: dict[str, Any]
    row: str
    col: str
    study: float | None = None
    epochs: int = 10


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A named result: its cells and how its table is laid out."""

    name: str
    title: str
    cells: tuple[SweepRun, ...]
    row_header: str


def fmt_lr(lr: float) -> str:
    """`1e-4`, `3e-5`, `2.5e-4`: the shortest scientific spelling of a learning rate."""
    return np.format_float_scientific(float(lr), trim="-", exp_digits=1)


def fmt_num(x: float) -> str:
    """`0.5`, `2`, `0.99`: a short spelling of beta/gamma for run names."""
    return f"{float(x):g}"


def run_name(
    model: str,
    loss: str,
    lr: float,
    *,
    beta: float | None = None,
    gamma: float = 1.0,
    batch_size: int = 1,
    epochs: int = 10,
    seed: int = 0,
) -> str:
    """The stable, readable run name of a configuration (defaults left out)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    parts = [model, loss]
    if loss in ("cb_ce", "cb_focal"):
        if beta is None:
            raise ValueError(f"loss {loss!r} needs a beta")
        parts.append(f"b{fmt_num(beta)}")
    if loss in ("focal", "cb_focal") and float(gamma) != 1.0:
        parts.append(f"g{fmt_num(gamma)}")
    parts.append(f"lr{fmt_lr(lr)}")
    if batch_size != 1:
        parts.append(f"bs{batch_size}")
    if epochs != 10:
        parts.append(f"ep{epochs}")
    if seed != 0:
        parts.append(f"seed{seed}")
    return "-".join(parts)


def make_cell(
    model: str,
    setting: LossSetting,
    lr: float,
    *,
    row: str,
    col: str,
    gamma: float = 1.0,
    batch_size: int = 1,
    epochs: int = 10,
    seed: int = 0,
    study: float | None = None,
) -> SweepRun:
    """A cell for `model` trained with `setting`'s loss at `lr` (other fields: the study's)."""
    settings: dict[str, Any] = {
        "train.loss": setting.loss,
        "train.learning_rate": float(lr),
        "train.gamma": float(gamma),
        "train.batch_size": int(batch_size),
        "train.seed": int(seed),
        "train.class_counts": CB_CLASS_COUNTS,  # used by cb_* cells only
    }
    if setting.beta is not None:
        settings["train.beta"] = float(setting.beta)
    name = run_name(
        model, setting.loss, lr, beta=setting.beta, gamma=gamma, batch_size=batch_size,
        epochs=epochs, seed=seed,
    )  # fmt: skip
    return SweepRun(name, model, settings, row, col, study, epochs)


_CE = LOSS_SETTINGS[0]
_FOCAL = LOSS_SETTINGS[4]


def _loss_table(model: str) -> tuple[SweepRun, ...]:
    study = STUDY_TABLES[model]
    return tuple(
        make_cell(model, s, lr, row=s.label, col=f"LR {fmt_lr(lr)}", study=study[s.key][j])
        for s in LOSS_SETTINGS
        for j, lr in enumerate(STUDY_LRS)
    )


def _figure6() -> tuple[SweepRun, ...]:
    # The study gives Figure 6's numbers only as bars; batch 1 equals Table 2's CE row.
    return tuple(
        make_cell(
            "transunet",
            _CE,
            lr,
            batch_size=bs,
            row=f"batch {bs}",
            col=f"LR {fmt_lr(lr)}",
            study=STUDY_TABLE2["ce"][j] if bs == 1 else None,
        )  # fmt: skip
        for bs in STUDY_BATCHES
        for j, lr in enumerate(STUDY_LRS)
    )


def _focal_gamma() -> tuple[SweepRun, ...]:
    cells = []
    for model in MODELS:
        lr = BEST_LR[model]
        j = STUDY_LRS.index(lr)
        for g in FOCAL_GAMMAS:
            study = STUDY_TABLES[model]["focal"][j] if g == 1.0 else None
            cells.append(
                make_cell(
                    model,
                    _FOCAL,
                    lr,
                    gamma=g,
                    row=f"gamma {fmt_num(g)}",
                    col=MODEL_LABELS[model],
                    study=study,
                )  # fmt: skip
            )
    return tuple(cells)


def _lr_range() -> tuple[SweepRun, ...]:
    cells = []
    for model in MODELS:
        for lr in LR_RANGE:
            study = STUDY_TABLES[model]["ce"][STUDY_LRS.index(lr)] if lr in STUDY_LRS else None
            cells.append(
                make_cell(
                    model, _CE, lr, row=f"LR {fmt_lr(lr)}", col=MODEL_LABELS[model], study=study
                )  # fmt: skip
            )
    return tuple(cells)


def _best_ce(model: str, *, col: str, **fields) -> SweepRun:
    """The study's best cell of `model` (unweighted CE at its best LR, batch 1) with `fields`
    (epochs, seed) changed, in the model's row of a sweep's table."""
    lr = BEST_LR[model]
    study = STUDY_TABLES[model]["ce"][STUDY_LRS.index(lr)]
    return make_cell(model, _CE, lr, row=MODEL_LABELS[model], col=col, study=study, **fields)


def _long() -> tuple[SweepRun, ...]:
    return tuple(_best_ce(m, col=f"{LONG_EPOCHS} epochs", epochs=LONG_EPOCHS) for m in MODELS)


def _seeds() -> tuple[SweepRun, ...]:
    return tuple(_best_ce(m, col=f"seed {s}", seed=s) for m in MODELS for s in SEEDS)


SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in (
        Sweep(
            "table1",
            "Table 1: U-Net test Dice across losses and learning rates",
            _loss_table("unet"),
            "Loss",
        ),
        Sweep(
            "table2",
            "Table 2: TransUNet test Dice across losses and learning rates",
            _loss_table("transunet"),
            "Loss",
        ),
        Sweep(
            "figure6",
            "Figure 6: TransUNet, learning rate x batch size (unweighted CE)",
            _figure6(),
            "Batch",
        ),
        Sweep(
            "focal_gamma",
            "Focal gamma (unweighted focal, each model's best LR)",
            _focal_gamma(),
            "Gamma",
        ),
        Sweep(
            "lr_range", "Learning rate range (unweighted CE, batch 1)", _lr_range(), "Learning rate"
        ),
        Sweep(
            "long", f"{LONG_EPOCHS} epochs (the study: 10), best cell per model", _long(), "Model"
        ),
        Sweep(
            "seeds",
            f"Repeat runs: the best cell per model, {len(SEEDS)} seeds each",
            _seeds(),
            "Model",
        ),
    )  # fmt: skip
}


def get_sweep(name: str) -> Sweep:
    """The sweep called `name`; a clear error listing the known ones otherwise."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; expected one of {', '.join(SWEEPS)}")
    return SWEEPS[name]


# ----------------------------------------------------------------------------- configs


def base_config(model: str, scale: str) -> ml_collections.ConfigDict:
    """The model's config at `scale` before the run's fields: its "smoke" or "paper" preset."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    module = {"unet": unet_config, "transunet": transunet_config}.get(model)
    if module is None:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return module.get_config(scale)


def cell_config(
    cell: SweepRun, scale: str, overrides: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The full config of `cell` at `scale` (a fresh ConfigDict); `config.name` = run name.

    Order: the scale's base config, the cell's fields, then `overrides` (dotted field ->
    typed value, applied to every run; `refused_overrides` lists the fields a sweep varies,
    which must not be overridden). A cell with `epochs` E != 10 (the `long` sweep) then
    stretches the run's budget by E/10: `num_steps` when it is > 0 (smoke scale or a
    command-line override), else `num_epochs`. The run name is computed from the final
    config, so an override of a named field (e.g. `train.batch_size=8`, or
    `train.num_epochs=30` at paper scale) shows in it.
    """
    c = base_config(cell.model, scale)
    config_fields.apply_overrides(c, cell.settings)
    config_fields.apply_overrides(c, overrides or {})
    if cell.epochs != 10:
        if c.train.num_steps > 0:
            c.train.num_steps = int(math.ceil(c.train.num_steps * cell.epochs / 10))
        else:
            c.train.num_epochs = int(math.ceil(c.train.num_epochs * cell.epochs / 10))
    t = c.train
    beta = t.beta if t.loss in ("cb_ce", "cb_focal") else None
    gamma = t.gamma if t.loss in ("focal", "cb_focal") else 1.0
    # a budget in epochs is named as it is (overrides included); a step budget (smoke scale,
    # or a num_steps override) keeps the cell's relative epochs
    epochs = t.num_epochs if t.num_steps <= 0 else cell.epochs
    c.name = run_name(
        c.model.name, t.loss, t.learning_rate, beta=beta, gamma=gamma,
        batch_size=t.batch_size, epochs=epochs, seed=t.seed,
    )  # fmt: skip
    return c


def refused_overrides(sweep: Sweep) -> set[str]:
    """Dotted fields a command-line override may not set for `sweep`: those its cells vary."""
    keys = {k for c in sweep.cells for k in c.settings}
    refused = {"model.name"}
    for k in keys:
        values = {repr(c.settings.get(k)) for c in sweep.cells}
        if len(values) > 1:
            refused.add(k)
    return refused


def expand(
    name: str, scale: str = "smoke", overrides: dict[str, Any] | None = None
) -> list[tuple[SweepRun, ml_collections.ConfigDict]]:
    """`[(cell, config), ...]` of sweep `name` at `scale`, in table order.

    `config.name` is the run name (equal to `cell.name` unless an override changed a
    field that names carry, such as the batch size).
    """
    sweep = get_sweep(name)
    return [(cell, cell_config(cell, scale, overrides)) for cell in sweep.cells]
