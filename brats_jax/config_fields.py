"""Dotted config fields: the one walker/setter over `ml_collections.ConfigDict` fields
("train.learning_rate") and the one config diff, used by training, sweeps and configs."""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections
from flax import traverse_util

from brats_jax.data.augment import OFF_FIELDS


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value of `config.<dotted>` (a group comes back as a plain dict).

    Raises KeyError naming the field, the missing part, the known fields there and the
    closest of them (:func:`suggest`).
    """
    node: Any = config
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "the config"
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = suggest(part, known)
            raise KeyError(
                f"{where} has no field {part!r}"
                + (f"; known: {', '.join(known)}" if known else "")
                + (f"; {hint}" if hint else "")
            )
        node = node[part]
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def suggest(value: Any, choices) -> str:
    """The hint "did you mean 'X'?" for the choice X closest to `value` (difflib, as
    ml_collections' own hint), or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Set `config.<dotted>` (e.g. "train.beta") in place; a KeyError names an unknown field."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise KeyError(f"unknown config field {dotted!r}: no group {p!r}")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"unknown config field {dotted!r}")
    node[leaf] = value


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """`config` with each `{dotted field: value}` of `overrides` set (in place; returned)."""
    for dotted, value in overrides.items():
        set_field(config, dotted, value)
    return config


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """`[(dotted field, old value, new value), ...]`, sorted, for fields that differ between
    two nested dicts (e.g. two `config.json`s); a field missing on one side is None there."""
    a = traverse_util.flatten_dict(old, sep=".")
    b = traverse_util.flatten_dict(new, sep=".")
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


# Fields added after run folders were first written, with the value that reproduces what
# those runs did (a saved config without them is read with these).
ADDED_FIELDS = {
    "model.output": "classes",
    "model.activation": "relu",
    "model.deep_supervision": False,
    "data.context_slices": 0,
    "data.patch_size": 0,
    "data.foreground_fraction": 0.33,
    "data.foreground_sampling": "voxels",
    "postprocess.largest_component_only": False,
    "postprocess.min_component_voxels": 0,
    "postprocess.connectivity": 26,
    "postprocess.et_min_voxels": 0,
    "postprocess.tc_min_mm3": 0.0,
    "postprocess.tc_action": "relabel",
    "postprocess.et_min_mm3": 0.0,
    "postprocess.et_action": "relabel",
    **{f"augment.{k}": v for k, v in OFF_FIELDS.items()},  # no augmentation
    "eval.num_overlay_slices": 0,
    "eval.sliding_window": False,
}


def upgrade_legacy(config_json: dict) -> dict:
    """A saved `config.json` dict in today's field names (a copy): `model.conv_impl` (run
    folders written before the rename) becomes `runtime.ops`; missing `ADDED_FIELDS` get
    their old-behaviour values (sections that exist or that the fields create)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config_json.items()}
    model = out.get("model", {})
    if isinstance(model, dict) and "conv_impl" in model:
        ops = model.pop("conv_impl")
        out["runtime"] = {"ops": ops, **out.get("runtime", {})}
    for dotted, value in ADDED_FIELDS.items():
        section, field = dotted.split(".")
        if section in out or section in ("postprocess", "augment"):
            out.setdefault(section, {}).setdefault(field, value)
    return out


def format_diff(diff: list[tuple[str, Any, Any]]) -> list[str]:
    """`["field: old -> new", ...]` (values as repr) of a :func:`config_diff`."""
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diff]
