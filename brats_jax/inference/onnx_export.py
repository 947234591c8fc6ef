"""A trained run's network in ONNX (`export_run`), with a JSON beside it (`metadata`) that says
what `predict` does around the network, so that a user can segment with onnxruntime alone
(examples/segment_with_onnxruntime.py).

The ONNX model is the network of the run's best checkpoint (as `runs.train_state.load_trained`
loads it for predict) followed by its output activation: input `image`, float32
(batch, S, S, 4 (2k+1)) NHWC slices, S = the run's model input size (`data.image_size`), k =
`data.context_slices` (channels slice-major, `data.context`); output `probabilities`, float32
(batch, S, S, C): 4 softmax class probabilities or 3 sigmoid WT, TC, ET probabilities
(`model.output`), so a user need not know the activation. The batch axis is dynamic. A U-Net
with deep supervision exports its full-resolution head only (its inference output).

Converted with jax2onnx (ONNX opset `OPSET`): the network is rebuilt for the export with plain
XLA ops (`runtime.ops` only changes gradients and speed), TransUNet with its layers unrolled
(`scan=False`, `models.per_block_params`: jax2onnx cannot trace flax's `nn.scan` with a
symbolic batch), and computing in float32 (a bfloat16 run's parameters are float32 already;
onnxruntime's CPU kernels have no bfloat16 convolutions). Before the files are renamed into
place, onnxruntime runs the written model on random slices and its probabilities must equal
predict's JAX probabilities to `VERIFY_TOLERANCE`. Sliding-window inference (a run's
`eval.sliding_window`) is not exported: a one-line `ExportError` unless
`sliding_window=False` (the network then serves whole slices, as `predict
--sliding_window=off`). Both files are written atomically (`fileio.atomic_path`); existing
files are an error, never overwritten.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import pathlib

import ml_collections
import numpy as np

from brats_jax import MODALITIES, data, fileio, models
from brats_jax.data import brats, patches
from brats_jax.inference import ensembles, postprocess_choice, whole_volume
from brats_jax.labels import CLASS_NAMES, RELEASE_LABELS
from brats_jax.models import outputs
from brats_jax.runs import train_state

OPSET = 18  # onnxruntime >= 1.14; jax2onnx's opset-17 graphs of TransUNet are invalid
VERIFY_TOLERANCE = 1e-4  # largest |onnxruntime - JAX| probability accepted
FORMAT = "brats_jax-onnx-1"  # the JSON's "format": its layout's name and version
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "image", "probabilities", "batch"
INSTALL = "pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1"


class ExportError(ValueError):
    """A run that cannot be exported, or outputs that exist; one line naming why."""


def metadata_path(out) -> pathlib.Path:
    """The JSON written beside the ONNX file `out`: `out` + ".json" (model.onnx.json)."""
    return pathlib.Path(f"{out}.json")


def _converter():
    """(jax2onnx, onnx, onnxruntime), or an ExportError saying how to install them."""
    try:
        import jax2onnx
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"the ONNX export needs jax2onnx, onnx and onnxruntime ({e.name} is missing): {INSTALL}"
        ) from None
    return jax2onnx, onnx, onnxruntime


@contextlib.contextmanager
def _quiet_converter():
    """jax2onnx logs a traceback for each optional plugin whose package (equinox, dm_pix) is
    not installed and its arguments to the root logger, onnx_ir a warning per constant of
    unknown type; none of it matters."""
    quiet = {"jax2onnx": logging.ERROR, "onnx_ir": logging.ERROR, "": logging.WARNING}
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    for lg, level in zip(loggers, quiet.values(), strict=True):
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_exportable(config, sliding_window=None) -> None:
    """ExportError when the way predict uses this run cannot be exported: sliding-window
    inference (`eval.sliding_window`, or `sliding_window=True`; `False` exports the network
    for whole slices)."""
    window = patches.inference_window(config, sliding_window)
    if window:
        raise ExportError(
            f"eval.sliding_window=True: predict slides {window} px windows (data.patch_size) "
            "over each slice, which the export does not reproduce; give --sliding_window=off "
            "to export the network for whole slices (as predict --sliding_window=off)"
        )


def _float32_config(config) -> ml_collections.ConfigDict:
    """A copy of the run config computing in float32 (`model.dtype`)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = "float32"
    return config


def network_probabilities(config, variables):
    """`f(images (B, S, S, C) float32) -> probabilities (B, S, S, K)` of a run's network (its
    `config`, its `variables`) as the export converts it: plain XLA ops, float32, TransUNet
    unrolled; the variables are constants of the function."""
    config = _float32_config(config)
    model = models.from_config(config.model, ops="xla")
    if config.model.name == "transunet":
        model, variables = model.clone(scan=False), models.per_block_params(variables)
    kind = outputs.of_config(config.model)

    def probabilities(images):
        return outputs.probabilities(model.apply(variables, images, train=False), kind)

    return probabilities


def input_shape(config) -> tuple[int, int, int]:
    """(S, S, C) of one input slice of a run's model."""
    size = train_state.input_size(config)
    return size, size, data.input_channels(config)


def to_onnx(config, variables, *, opset: int = OPSET):
    """The `onnx.ModelProto` of a run's network and output activation (the module docstring
    says what it takes and gives); unused constants removed."""
    jax2onnx, _, _ = _converter()
    import onnx_ir.passes.common

    with _quiet_converter():
        model = jax2onnx.to_onnx(
            network_probabilities(config, variables),
            [(BATCH_AXIS, *input_shape(config))],
            model_name=f"brats_jax_{config.model.name}",
            opset=opset,
            return_mode="ir",
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
        onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
        return onnx_ir.to_proto(model)


def onnx_probabilities(path, images: np.ndarray) -> np.ndarray:
    """onnxruntime's (CPU) output of the exported model at `path` for float32 `images`."""
    _, _, ort = _converter()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(images, np.float32)})[0]


def _max_difference(path, config, variables) -> float:
    """Largest |onnxruntime - predict's JAX| probability on 2 random slices (2: the batch
    axis is not fixed at 1). The JAX side is `whole_volume.make_slice_predictor` of the run's
    model with its `runtime.ops` (float32)."""
    config = _float32_config(config)
    predict = whole_volume.make_slice_predictor(
        train_state.create_model(config),
        image_size=config.data.image_size,
        output=outputs.of_config(config.model),
    )
    x = np.random.default_rng(0).standard_normal((2, *input_shape(config)), np.float32)
    want = np.asarray(predict(variables, x))
    return float(np.max(np.abs(onnx_probabilities(path, x) - want)))


def metadata(config, workdir, *, step=None, sliding_window=None) -> dict:
    """What the JSON beside the ONNX file says: how predict prepares a case for the network
    and turns its probabilities into a label file."""
    kind = outputs.of_config(config.model)
    k = data.context_slices(config)
    regions = kind == "regions"
    pp = postprocess_choice.run_postprocessing(workdir, config)
    tta = config.eval.get("tta", "none")
    return {
        "format": FORMAT,
        "run": {
            "workdir": str(pathlib.Path(workdir).resolve()),
            "name": config.get("name", ""),
            "model": config.model.name,
            "checkpoint": "best by validation Dice" if step is None else f"step {step}",
            "trained_dtype": config.model.get("dtype", "float32"),
        },
        "input": {
            "name": INPUT_NAME,
            "shape": [BATCH_AXIS, *input_shape(config)],
            "layout": "NHWC",
            "dtype": "float32",
            "modalities": list(MODALITIES),
            "context_slices": k,
            "channels": (
                f"slice-major: channels [4j, 4j+4) are axial slice z-{k}+j's four modalities "
                f"(j = 0..{2 * k}; slice z's are [{4 * k}, {4 * k + 4})); neighbours beyond the "
                "first / last slice repeat it"
            ),
            "normalization": ensembles.input_normalization(config.data.source),
            "normalization_rule": {
                "brain": (
                    "per modality over the volume: (x - mean) / std with mean, std (float64) "
                    "of the brain voxels (any of the four raw modalities non-zero), applied to "
                    "every voxel; std 0 -> 1; no brain -> all 0"
                ),
                "slice": (
                    "per modality and axial slice: (x - mean) / std over all its pixels "
                    "(float64); a constant slice -> 0"
                ),
            },
            "orientation": (
                f"volumes in {''.join(brats.ORIENTATION)} voxel order (nibabel axis codes, "
                "BraTS's stored order; others are reoriented by flips and axis swaps, no "
                "resampling); axial slice z = volume[:, :, z]"
            ),
        },
        "image_size": config.data.image_size,
        "resize": (
            "slices of another size are resized to image_size x image_size before the network "
            "and the probabilities back (bilinear, half-pixel centres, edges clamped, no "
            "antialiasing: jax.image.resize 'linear'); image_size 0 (native size): the network "
            "was exported for the input shape's size, and predict resizes nothing"
        ),
        "sliding_window": bool(patches.inference_window(config, sliding_window)),
        "output": {
            "name": OUTPUT_NAME,
            "kind": kind,
            "activation": "sigmoid" if regions else "softmax",
            "channels": list(outputs.REGION_CHANNELS if regions else CLASS_NAMES),
            "threshold": 0.5 if regions else None,
            "decoding": (
                "WT = p[0] > 0.5; TC = p[1] > 0.5 and WT; ET = p[2] > 0.5 and TC; label 3 (ET) "
                "where ET, 1 (NCR) where TC but not ET, 2 (ED) where WT but not TC, else 0"
                if regions
                else "argmax over the 4 classes (the first of equal maxima)"
            ),
        },
        "tta": {
            "run": tta,
            "flip_axes": [list(a) for a in whole_volume.tta_flip_axes(tta)],
            "rule": (
                "the run's test-time flips (predict applies them with --tta=<run>): average "
                "the probabilities of each view, the batch flipped along these axes of "
                "(B, H, W, C) in and the probabilities flipped back"
            ),
        },
        "postprocessing": {
            **pp.to_dict(),
            **{k: getattr(pp, k) for k in ("tc_min_mm3", "tc_action", "et_min_mm3", "et_action")},
            "rule": (
                "on the (H, W, D) training labels, every component by scipy.ndimage.label "
                "with connectivity 6 or 26: 1. whole-tumour (label > 0) components: keep the "
                "largest only, or drop those below min_component_voxels (dropped -> 0); "
                "2. components of labels {1, 3} (TC) with voxels x the voxel volume (mm^3, "
                "the product of the voxel size in mm from the NIfTI header) < tc_min_mm3: "
                "tc_action 'relabel' -> ED (2), 'remove' -> 0; 3. components of label 3 "
                "(ET) < et_min_mm3: et_action 'relabel' -> NCR (1), 'remove' -> 0; 4. when "
                "0 < ET voxels < et_min_voxels, ET (3) -> NCR (1). null / false: off"
            ),
        },
        "labels": {
            "training_classes": dict(enumerate(CLASS_NAMES)),
            "release_labels": {c: list(v) for c, v in RELEASE_LABELS.items()},
            "rule": (
                "files are written in the input's convention: BraTS 2018-2021 naming "
                "(<ID>_flair.nii.gz) '2018', ET = 4; BraTS 2023 naming (<ID>-t2f.nii.gz) "
                "'2023', ET = 3; training class i -> release_labels[convention][i]; int16 on "
                "the input's grid, in its voxel order"
            ),
        },
    }


def export_run(workdir, out, *, step=None, sliding_window=None, opset: int = OPSET) -> dict:
    """Export run `workdir`'s network (its best checkpoint, or `step`) to the ONNX file `out`
    and its `metadata` to `metadata_path(out)`; returns the metadata (with "converter":
    versions, opset and the verified difference). ExportError when an output exists, the
    converter is missing, the run cannot be exported (`check_exportable`) or onnxruntime
    disagrees with JAX; FileNotFoundError for a folder without a run or a checkpoint."""
    out = pathlib.Path(out)
    meta_out = metadata_path(out)
    for path in (out, meta_out):
        if path.exists() or path.is_symlink():
            raise ExportError(f"--out: {path} exists; remove it or give another name")
    _, onnx, _ = _converter()
    fileio.check_writable(out)
    config, _, variables = train_state.load_trained(workdir, step=step)
    check_exportable(config, sliding_window)
    meta = metadata(config, workdir, step=step, sliding_window=sliding_window)
    proto = to_onnx(config, variables, opset=opset)
    with fileio.atomic_path(out) as tmp_model, fileio.atomic_path(meta_out) as tmp_meta:
        meta["converter"] = {
            **{name: importlib.metadata.version(name) for name in ("jax2onnx", "onnx")},
            "opset": opset,
            "verified_with_onnxruntime": importlib.metadata.version("onnxruntime"),
        }
        onnx.helper.set_model_props(proto, {"brats_jax": json.dumps(meta)})
        onnx.save(proto, str(tmp_model))
        diff = _max_difference(tmp_model, config, variables)
        if not diff <= VERIFY_TOLERANCE:
            raise ExportError(
                f"onnxruntime's probabilities differ from JAX's by {diff:.2e} (more than "
                f"{VERIFY_TOLERANCE:g}); nothing written"
            )
        meta["converter"]["verified_max_abs_difference"] = diff
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
