"""The config's name-valued fields (`train.loss`, `model.name`, ...) checked against the
values the code accepts, before any data is read or model built: one table, one line per
field, the allowed values taken from the constants of the modules that use them."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from brats_jax import config_fields, losses, metrics, models
from brats_jax.data import patches, pipeline
from brats_jax.inference import whole_volume
from brats_jax.models import outputs, pretrained, transunet, unet
from brats_jax.ops import impls
from brats_jax.runs import train_state


def _losses(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Region outputs train only the region losses (`losses.region_loss_params`)."""
    regions = config_fields.get_field(config, "model.output") == "regions"
    return losses.REGION_LOSS_NAMES if regions else losses.LOSS_NAMES


# dotted field -> its allowed values, or a function of the config giving them. A field the
# config lacks (an old run's config) is not checked.
CHOICES: dict[str, tuple | Callable[[ml_collections.ConfigDict], tuple]] = {
    "data.source": pipeline.SOURCES,
    "data.foreground_sampling": patches.FOREGROUND_SAMPLING,
    "model.name": tuple(models.MODELS),
    "model.output": outputs.OUTPUTS,
    "model.norm": unet.NORMS,
    "model.padding": unet.PADDINGS,
    "model.activation": tuple(unet.ACTIVATIONS),
    "model.preset": tuple(transunet.PRESETS),
    "model.pretrained_root_conv": pretrained.ROOT_METHODS,
    "runtime.ops": impls.IMPLS,
    "train.loss": _losses,
    "train.class_counts": losses.CLASS_COUNTS,
    "train.optimizer": train_state.OPTIMIZERS,
    "train.schedule": train_state.SCHEDULES,
    "eval.tta": whole_volume.TTA_MODES,
    "eval.hd95_mode": metrics.HD95_MODES,
}


def choice_errors(config: ml_collections.ConfigDict) -> list[str]:
    """One message per :data:`CHOICES` field whose value is not allowed, e.g.
    "train.loss='dice_cee' is not one of ce, ..., dice_ce; did you mean 'dice_ce'?"."""
    errors = []
    for field, allowed in CHOICES.items():
        try:
            value = config_fields.get_field(config, field)
        except KeyError:
            continue
        allowed = allowed(config) if callable(allowed) else allowed
        if value not in allowed:
            hint = config_fields.suggest(value, allowed)
            errors.append(
                f"{field}={value!r} is not one of {', '.join(map(str, allowed))}"
                + (f"; {hint}" if hint else "")
            )
    return errors


def check_choices(config: ml_collections.ConfigDict, what: str = "") -> None:
    """Raises one ValueError (one line, prefixed by `what`, e.g. a run name) listing every
    :func:`choice_errors` message; returns None when all fields are allowed."""
    errors = choice_errors(config)
    if errors:
        raise ValueError((f"{what}: " if what else "") + "; ".join(errors))
