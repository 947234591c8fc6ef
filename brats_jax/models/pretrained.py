"""Load Google's ImageNet-21k ``R50+ViT-B_16.npz`` into TransUNet parameters.

TransUNet's module names are the checkpoint's key names, so most arrays are placed under the
same path (``block1/unit1/conv1/kernel`` -> ``params['block1']['unit1']['conv1']['kernel']``).
The scanned model (``TransUNet(scan=True)``, the default) stacks the 12 transformer blocks and
a stage's units 2..N; its parameters are viewed per block for the placement
(:func:`~brats_jax.models.transunet.per_block_params`: ``encoderblock_{i}`` = index i of
``encoderblock``, ``block{b}/unit{u}`` = index u-2 of ``block{b}/repeated_units``) and stacked
again afterwards, so the report names the checkpoint's per-block keys.
The exceptions, all recorded in the returned :class:`LoadReport`:

* ``gn*/scale|bias`` stored as (1,1,1,C) are reshaped to (C,).
* ``Transformer/posembed_input/pos_embedding`` (1, 1+14*14, 768): the class-token slot is
  dropped and the 14x14 grid is resized bilinearly with align-corners semantics (identical to
  ``scipy.ndimage.zoom(order=1)``, which the official TransUNet loader uses) to the model's grid
  (15x15 at 240 input).
* ``conv_root/kernel`` (7,7,3,64) for a model with C != 3 input channels (4 MRI modalities):
  ``root_conv="mean"`` (default) averages the RGB filters, replicates the mean to the C channels
  and multiplies by 3/C, so an input whose C channels all equal one grey image gives the same
  response as the RGB network on that grey image (for a plain convolution: the activation scale
  is kept). TransUNet's root is weight-standardised, which removes a global factor anyway, so
  there the spatial filter pattern is what carries over. ``"repeat"`` cycles R,G,B,R,... (times
  3/C); ``"rgb_mean"`` (4 MRI channels in ``brats_jax.MODALITIES`` order) keeps the three
  pretrained filters for FLAIR, T1ce and T2 (R, G, B) and gives T1 their mean (times 3/4 in
  all, as above): what a PyTorch user widening the official model's first conv typically
  does. T1 is the one left out because it is the modality most redundant with another (T1ce
  is the same weighting plus contrast) and the least used for the BraTS labels, while FLAIR
  (whole tumour, oedema), T1ce (enhancing tumour, core) and T2 (core, oedema) each carry a
  label; ``"init"`` keeps the model's random root kernel (the key is then reported as dropped).
* With a slice context (``context_slices`` k > 0, ``data.context_slices``: 4 (2k+1) input
  channels, slice-major, the centre slice's 4 modalities at channels [4k, 4k+4)) the kernel
  is first adapted to the 4 modality channels as above (any ``root_conv`` but "init"), then
  widened by :func:`widen_root_kernel`: the neighbour slices' channels get the filter's mean
  and the whole kernel is scaled by sqrt(2k+1). The root is weight-standardised, so its
  standardised kernel is then exactly sqrt(2k+1) x the 2D one on the centre slice and 0 on
  the neighbours (plain zeros would not stay zero: standardisation subtracts the mean); the
  uniform factor is removed by ``gn_root``, so the widened model computes the 2D pretrained
  model's function of the centre slice (to float rounding and GroupNorm's eps).
* ``cls``, ``head/*`` and ``pre_logits/*`` (class token, ImageNet classifier and
  representation layer) have no counterpart and are reported as intentionally dropped.

Anything else that does not fit (missing path, wrong shape, e.g. a model with fewer layers or
another hidden size) is reported as *unplaced*; with ``strict=True`` (default) that raises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, unfreeze

from brats_jax import MODALITIES
from brats_jax.models.layers import align_corners_weights
from brats_jax.models.transunet import is_stacked, per_block_params, upgrade_params

log = logging.getLogger(__name__)

POS_KEY = "Transformer/posembed_input/pos_embedding"
ROOT_KEY = "conv_root/kernel"
DROPPED_PREFIXES = {
    "cls": "class token: the segmentation model has no class token",
    "head/": "ImageNet-21k classification head: not used for segmentation",
    "pre_logits/": "ViT pre-logits (representation) layer: not used for segmentation",
}
ROOT_METHODS = ("mean", "repeat", "rgb_mean", "init")
RGB_MODALITIES = ("flair", "t1ce", "t2")
"""The modalities that keep the R, G, B root filters with ``root_conv="rgb_mean"``."""


@dataclasses.dataclass
class LoadReport:
    """What ``load_pretrained`` did with every checkpoint key and every model parameter.

    loaded: checkpoint key -> how it was placed ("copied", "reshaped ...", ...);
    dropped: checkpoint key -> why it is intentionally not used;
    unplaced: checkpoint key -> why it could not be placed (error with ``strict=True``);
    not_in_checkpoint: model parameter paths left at their initial values (the decoder, head).
    """

    loaded: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    unplaced: dict[str, str] = dataclasses.field(default_factory=dict)
    not_in_checkpoint: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """Multi-line human-readable summary (counts plus every non-trivial entry)."""
        lines = [
            f"loaded {len(self.loaded)} arrays, dropped {len(self.dropped)}, "
            f"unplaced {len(self.unplaced)}, {len(self.not_in_checkpoint)} model parameters "
            f"not in the checkpoint (kept at init)"
        ]
        lines += [f"  loaded  {k}: {v}" for k, v in self.loaded.items() if v != "copied"]
        lines += [f"  dropped {k}: {v}" for k, v in self.dropped.items()]
        lines += [f"  UNPLACED {k}: {v}" for k, v in self.unplaced.items()]
        return "\n".join(lines)


def resize_grid_align_corners(grid: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear, align-corners resize of a (h, w, D) array to (new_h, new_w, D), float64 math.

    Same values as ``scipy.ndimage.zoom(grid, (new_h/h, new_w/w, 1), order=1)``.
    """
    out = np.asarray(grid, np.float64)
    for axis, n_out in ((0, new_hw[0]), (1, new_hw[1])):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        lo, hi, frac = align_corners_weights(n_in, n_out)
        shape = [1, 1, 1]
        shape[axis] = n_out
        f = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - f) + np.take(out, hi, axis=axis) * f
    return out


def resize_pos_embed(posemb: np.ndarray, new_grid: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Checkpoint position embedding (1, N, D) -> (1, gh*gw, D) for the model's grid.

    A leading class-token slot (N = 1 + s*s) is dropped; a square s x s grid is resized with
    :func:`resize_grid_align_corners`. Returns (array float32, description).
    """
    pe = np.asarray(posemb)
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"{POS_KEY}: expected shape (1, N, D), got {pe.shape}")
    n, d = pe.shape[1], pe.shape[2]
    notes = []
    s = math.isqrt(n)
    if s * s != n:
        s = math.isqrt(n - 1)
        if s * s != n - 1:
            raise ValueError(f"{POS_KEY}: {n} tokens is neither s*s nor 1+s*s")
        pe = pe[:, 1:]
        notes.append("class-token slot dropped")
    grid = pe[0].reshape(s, s, d)
    if (s, s) != tuple(new_grid):
        grid = resize_grid_align_corners(grid, new_grid)
        notes.append(f"grid {s}x{s} -> {new_grid[0]}x{new_grid[1]} (bilinear, align corners)")
    out = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(np.float32)
    return out, ", ".join(notes) or "copied"


def adapt_root_kernel(kernel: np.ndarray, in_channels: int, method: str = "mean") -> np.ndarray:
    """Adapt an RGB root kernel (kh, kw, 3, F) to ``in_channels`` inputs (kh, kw, C, F).

    "mean": mean over RGB replicated to C channels, times 3/C; "repeat": channels R,G,B,R,...
    times 3/C; "rgb_mean" (C == len(MODALITIES) == 4): R, G, B for the channels of
    ``RGB_MODALITIES`` (flair, t1ce, t2), the RGB mean for the remaining one (t1), times 3/4.
    With C == 3 the kernel is returned unchanged.
    """
    k = np.asarray(kernel, np.float32)
    if k.ndim != 4:
        raise ValueError(f"{ROOT_KEY}: expected (kh, kw, Cin, F), got {k.shape}")
    if k.shape[2] == in_channels:
        return k
    scale = k.shape[2] / in_channels
    if method == "mean":
        return np.repeat(k.mean(axis=2, keepdims=True), in_channels, axis=2) * scale
    if method == "repeat":
        idx = np.arange(in_channels) % k.shape[2]
        return k[:, :, idx, :] * scale
    if method == "rgb_mean":
        if in_channels != len(MODALITIES) or k.shape[2] != 3:
            raise ValueError(
                f"root_conv='rgb_mean' maps an RGB kernel to the {len(MODALITIES)} channels "
                f"{MODALITIES}; got {k.shape[2]} -> {in_channels} channels"
            )
        out = np.repeat(k.mean(axis=2, keepdims=True), in_channels, axis=2)
        out[:, :, [MODALITIES.index(m) for m in RGB_MODALITIES], :] = k
        return out * scale
    raise ValueError(f"root_conv={method!r}; expected one of {ROOT_METHODS}")


def widen_root_kernel(kernel: np.ndarray, context_slices: int) -> np.ndarray:
    """A 4-channel root kernel (kh, kw, 4, F) for a slice context of k = `context_slices`
    -> (kh, kw, 4 (2k+1), F), slice-major (`data.context`): centre slice's channels
    [4k, 4k+4) the kernel, the other slices' channels its per-filter mean over (kh, kw, 4),
    all times sqrt(2k+1), so that weight standardisation gives sqrt(2k+1) x the
    standardised 2D kernel on the centre slice and exactly 0 on the neighbours.
    """
    k = np.asarray(kernel, np.float32)
    width = 2 * int(context_slices) + 1
    out = np.repeat(k.mean(axis=(0, 1, 2), keepdims=True), len(MODALITIES) * width, axis=2)
    out = np.broadcast_to(out, k.shape[:2] + out.shape[2:]).copy()
    centre = len(MODALITIES) * int(context_slices)
    out[:, :, centre : centre + k.shape[2]] = k
    return out * np.float32(np.sqrt(width))


def _flat_params(params) -> tuple[dict, bool, dict]:
    """Per-block, flattened view of TransUNet ``params`` (or a ``variables`` dict).

    Returns ``(tree, wrapped, flat)``: the per-block tree (a fresh dict), whether it wraps a
    ``'params'`` entry, and ``'a/b/c'`` path -> array of the parameters. Raises ValueError when
    the parameters lack ``conv_root/kernel`` or the position embedding.
    """
    tree = per_block_params(unfreeze(params) if isinstance(params, FrozenDict) else dict(params))
    wrapped = "params" in tree and "conv_root" not in tree
    flat = traverse_util.flatten_dict(tree["params"] if wrapped else tree, sep="/")
    if "conv_root/kernel" not in flat or POS_KEY not in flat:
        raise ValueError(
            "load_pretrained: params do not look like TransUNet parameters "
            "(no conv_root/kernel or position embedding)"
        )
    return tree, wrapped, flat


def _drop_reason(key: str) -> str | None:
    """Why checkpoint ``key`` is intentionally not used (see ``DROPPED_PREFIXES``), else None."""
    return next(
        (
            r
            for p, r in DROPPED_PREFIXES.items()
            if key == p or (p.endswith("/") and key.startswith(p))
        ),
        None,
    )


def _place_pos_embed(value: np.ndarray, target, grid: tuple[int, int] | None):
    """Position embedding (1, N, D) -> the model's (1, gh*gw, D); returns (array, how)."""
    n = target.shape[1]
    g = grid or (math.isqrt(n), math.isqrt(n))
    if g[0] * g[1] != n:
        raise ValueError(f"model has {n} tokens; pass grid=(H/16, W/16)")
    return resize_pos_embed(value, g)


def _place_root_kernel(value: np.ndarray, target, root_conv: str, context_slices: int = 0):
    """RGB root kernel (7, 7, 3, F) -> the model's (7, 7, C, F); returns (array, how).
    With `context_slices` k > 0, C = 4 (2k+1): adapted to 4 channels, then widened."""
    if value.shape[:2] + value.shape[3:] != target.shape[:2] + target.shape[3:]:
        raise ValueError(f"shape {value.shape} vs model {tuple(target.shape)}")
    cin = target.shape[2] // (2 * context_slices + 1)
    if cin * (2 * context_slices + 1) != target.shape[2]:
        raise ValueError(
            f"model has {target.shape[2]} input channels, not a multiple of the "
            f"{2 * context_slices + 1} slices of context_slices={context_slices}"
        )
    value = adapt_root_kernel(value, cin, root_conv)
    how = (
        f"RGB -> {cin} channels ({root_conv} over RGB, x {3 / cin:.4g})"
        if root_conv != "rgb_mean"
        else f"R,G,B -> {','.join(RGB_MODALITIES)}, the others their mean, x 0.75"
    )
    if context_slices:
        value = widen_root_kernel(value, context_slices)
        how += (
            f"; widened to {2 * context_slices + 1} slices (centre slice; neighbours the "
            f"filter mean; x sqrt({2 * context_slices + 1}))"
        )
    return value, how


def _place_array(key: str, value: np.ndarray, target, root_conv: str, grid, context_slices=0):
    """Checkpoint array -> the shape of model parameter ``target``; returns (array, how).

    Raises ValueError (the reason the key is unplaced) when the shapes cannot be reconciled.
    """
    if key == POS_KEY:
        value, how = _place_pos_embed(value, target, grid)
    elif key == ROOT_KEY and value.shape != tuple(target.shape):
        value, how = _place_root_kernel(value, target, root_conv, context_slices)
    elif value.shape == tuple(target.shape):
        how = "copied"
    elif value.size == math.prod(target.shape) and value.squeeze().shape == tuple(
        d for d in target.shape if d != 1
    ):
        how = f"reshaped {value.shape} -> {tuple(target.shape)}"
        value = value.reshape(target.shape)
    else:
        raise ValueError(f"shape {value.shape} vs model {tuple(target.shape)}")
    if value.shape != tuple(target.shape):
        raise ValueError(f"shape {value.shape} vs model {tuple(target.shape)}")
    return value, how


def _place_checkpoint(
    ckpt, flat: dict, root_conv: str, grid, context_slices: int = 0
) -> tuple[dict, LoadReport]:
    """Place every key of the opened checkpoint ``ckpt`` into a copy of ``flat``.

    Returns ``(new_flat, report)``; ``report.not_in_checkpoint`` is filled in too.
    """
    new = dict(flat)
    report = LoadReport()
    placed_paths = set()
    for key in sorted(ckpt.files):
        reason = _drop_reason(key)
        if reason is not None:
            report.dropped[key] = reason
            continue
        if key not in flat:
            report.unplaced[key] = "no parameter with this path in the model"
            continue
        target = flat[key]
        value = np.asarray(ckpt[key])
        if key == ROOT_KEY and value.shape != tuple(target.shape) and root_conv == "init":
            report.dropped[key] = (
                f"RGB root kernel {value.shape} not used (root_conv='init'): kept at random init"
            )
            continue
        try:
            value, how = _place_array(key, value, target, root_conv, grid, context_slices)
        except ValueError as e:
            report.unplaced[key] = str(e)
            continue
        new[key] = jnp.asarray(value, dtype=target.dtype)
        report.loaded[key] = how
        placed_paths.add(key)
    report.not_in_checkpoint = sorted(set(flat) - placed_paths)
    return new, report


def _check_unplaced(report: LoadReport, npz_path, strict: bool) -> None:
    """Raise (``strict``) or log a warning listing the checkpoint keys that were not placed."""
    if not report.unplaced:
        return
    msg = (
        f"load_pretrained({os.fspath(npz_path)}): {len(report.unplaced)} checkpoint "
        f"keys could not be placed:\n"
        + "\n".join(f"  {k}: {v}" for k, v in report.unplaced.items())
    )
    if strict:
        raise ValueError(msg)
    log.warning(msg)


def load_pretrained(
    params,
    npz_path: str | os.PathLike,
    *,
    root_conv: str = "mean",
    grid: tuple[int, int] | None = None,
    strict: bool = True,
    context_slices: int = 0,
):
    """Place the arrays of Google's ``R50+ViT-B_16.npz`` into TransUNet parameters.

    params: the ``'params'`` collection of an initialised TransUNet (a dict or FrozenDict; a full
    ``variables`` dict with a ``'params'`` entry is accepted too and returned with the same
    structure). npz_path: the checkpoint. root_conv: "mean" | "repeat" | "rgb_mean" | "init"
    (see module docstring). grid: the model's token grid (H/16, W/16); inferred from the
    position embedding when it is square. strict: raise ValueError when any checkpoint key
    cannot be placed. context_slices: the run's ``data.context_slices`` k (the model has
    4 (2k+1) input channels; the root kernel is widened, see the module docstring).

    Returns ``(new_params, LoadReport)``; arrays are cast to the dtype of the parameter they
    replace (float32). Inputs are not modified.
    """
    if root_conv not in ROOT_METHODS:
        raise ValueError(f"root_conv={root_conv!r}; expected one of {ROOT_METHODS}")
    stacked = is_stacked(params)
    tree, wrapped, flat = _flat_params(params)
    with np.load(npz_path) as ckpt:
        new, report = _place_checkpoint(ckpt, flat, root_conv, grid, context_slices)
    _check_unplaced(report, npz_path, strict)
    log.info("load_pretrained(%s): %s", os.fspath(npz_path), report.summary())
    out = traverse_util.unflatten_dict(new, sep="/")
    if wrapped:
        tree["params"] = out
        out = tree
    return (upgrade_params(out) if stacked else out), report
