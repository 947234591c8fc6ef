"""Training patches (`data.patch_size`, `data.foreground_fraction`,
`data.foreground_sampling`): random square crops of the training slices, a share of them
centred on tumour, and the checks of the three fields.

Training draws a `patch_size` x `patch_size` crop of each slice (after the resize to
`data.image_size`; 240 = BraTS's native size). With probability `foreground_fraction` the
crop must hold tumour: its centre is a tumour voxel of the slice, drawn as
`foreground_sampling` says (a slice without tumour falls back to a uniform crop):

* "voxels": uniformly from the label > 0 voxels, so large oedema dominates the draws;
* "regions": nnU-Net's choice for region-based training (BraTS): first one of the BraTS
  regions WT, TC, ET (`labels.REGIONS`) that the slice holds, uniformly, then a voxel of
  it uniformly (nnU-Net v2 `nnUNetDataLoaderBase.get_bbox` draws among the classes or
  regions present in the case), so a small core is a crop centre as often as the oedema.

The crop always stays inside the slice (the window is shifted inwards at the borders, never
padded), so the voxel chosen as centre is always in the crop. This is nnU-Net's foreground
oversampling (`oversample_foreground_percent = 0.33`, drawn per sample as its
`nnUNetTrainer_probabilisticOversampling` does; nnU-Net pads at the borders). Validation
runs on whole slices (the U-Net is fully convolutional); the test pass and `predict` too,
unless `eval.sliding_window` makes them slide a window of the patch size over each slice
(`inference_window`, `inference.make_slice_predictor`), as nnU-Net infers. `patch_size` 0
keeps whole slices.
"""

from __future__ import annotations

import numpy as np

from brats_jax.data.common import DataError
from brats_jax.labels import REGIONS

FOREGROUND_SAMPLING = ("voxels", "regions")  # `data.foreground_sampling`, see the docstring


def check_patch_config(config, image_size: int) -> int:
    """The validated `data.patch_size` of a run config (0 = whole slices).

    `image_size`: the whole-slice size in pixels the model sees (`data.image_size`, or the
    source's native size; 0 when not yet known: the size checks then wait). Raises a
    one-line DataError for a negative patch, a patch larger than the slice, a U-Net slice
    or patch size not divisible by 2**depth, a TransUNet patch that differs from the slice
    (its position grid is tied to the input size) or a fraction outside [0, 1]
    (`data.foreground_sampling` is one of `config_choices.CHOICES`).
    """
    d = config.data
    patch, fraction = d.get("patch_size", 0), d.get("foreground_fraction", 0.33)
    if isinstance(patch, bool) or int(patch) != patch or patch < 0:
        raise DataError(f"data.patch_size={patch!r}; expected an integer >= 0 (0 = whole slices)")
    if not 0.0 <= float(fraction) <= 1.0:
        raise DataError(f"data.foreground_fraction={fraction!r}; expected a number in [0, 1]")
    patch, size = int(patch), int(image_size)
    if not patch or not size:
        return patch
    if patch > size:
        raise DataError(f"data.patch_size={patch} is larger than the {size}-pixel slices")
    if config.model.name == "transunet" and patch != size:
        raise DataError(
            f"data.patch_size={patch} differs from the {size}-pixel slices: TransUNet's position "
            "grid is tied to its input size (no sliding-window inference); use 0 or the slice size"
        )
    if config.model.name == "unet":
        m = 2 ** int(config.model.depth)
        for field, value in (("data.image_size (slice size)", size), ("data.patch_size", patch)):
            if value % m:
                raise DataError(
                    f"{field}={value} is not a multiple of 2**model.depth = {m} (U-Net poolings)"
                )
    return patch


def _tumour_voxels(label: np.ndarray, sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the voxels a foreground crop centre is drawn from (see the module
    docstring): all label > 0 voxels ("voxels"), or those of one region the slice holds,
    drawn uniformly ("regions"; one `rng.integers` draw). Empty when there is no tumour."""
    if sampling == "voxels":
        return np.flatnonzero(label > 0)
    if sampling != "regions":
        raise DataError(
            f"data.foreground_sampling={sampling!r}; expected one of {FOREGROUND_SAMPLING}"
        )
    present = [m for m in (np.isin(label, c) for c in REGIONS.values()) if m.any()]
    return np.flatnonzero(present[rng.integers(len(present))]) if present else np.zeros(0, int)


def crop_offset(
    label: np.ndarray,
    patch_size: int,
    foreground_fraction: float,
    rng: np.random.Generator,
    sampling: str = "voxels",
) -> tuple[int, int]:
    """Top-left corner `(y0, x0)` of a random `patch_size` crop of a (H, W) label.

    With probability `foreground_fraction` (one `rng.random()` draw) the crop is centred on a
    tumour voxel drawn as `sampling` ("voxels" | "regions", `data.foreground_sampling`) says
    (shifted to stay inside the slice, so the voxel stays in the crop); otherwise, or when
    the slice has no tumour, the corner is uniform over the H - p + 1 by W - p + 1 positions.
    """
    h, w = label.shape[:2]
    p = int(patch_size)
    if not 0 < p <= min(h, w):
        raise DataError(f"data.patch_size={p} does not fit a {h}x{w} slice")
    if rng.random() < foreground_fraction:
        tumour = _tumour_voxels(label, sampling, rng)
        if tumour.size:
            cy, cx = divmod(int(tumour[rng.integers(tumour.size)]), w)
            return min(max(cy - p // 2, 0), h - p), min(max(cx - p // 2, 0), w - p)
    return int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    patch_size: int,
    foreground_fraction: float,
    rng: np.random.Generator,
    sampling: str = "voxels",
) -> tuple[np.ndarray, np.ndarray]:
    """`(image[y0:y0+p, x0:x0+p], label[...])` of (H, W, C) / (H, W) at one `crop_offset`:
    every channel (all 2.5D slices) and the label share the window."""
    y0, x0 = crop_offset(label, patch_size, foreground_fraction, rng, sampling)
    p = int(patch_size)
    return image[y0 : y0 + p, x0 : x0 + p], label[y0 : y0 + p, x0 : x0 + p]


def inference_window(config, sliding_window: bool | None = None) -> int:
    """The window (pixels, at `data.image_size`) the test pass and `predict` slide over each
    slice: `data.patch_size` when `eval.sliding_window` (or `sliding_window`, which overrides
    it when not None) is on, else 0 (whole slices). Sliding windows without training patches
    are a one-line DataError."""
    on = config.eval.get("sliding_window", False) if sliding_window is None else sliding_window
    if not on:
        return 0
    patch = check_patch_config(config, 0)
    if not patch:
        raise DataError(
            "eval.sliding_window=True needs data.patch_size > 0 (the window is the training "
            "patch); this run was trained on whole slices"
        )
    return patch
