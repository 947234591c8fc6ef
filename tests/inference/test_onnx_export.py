"""The ONNX export (`python -m brats_jax.export`, `brats_jax.inference.onnx_export`) and the
onnxruntime example (examples/segment_with_onnxruntime.py): onnxruntime's probabilities equal
JAX's, the example segments a case as predict does, and bad exports end in one line leaving
no file behind.

Run folders are built, not trained: a tiny network's initial variables (its head scaled and
centred, so its labels vary over the case) saved as the run's checkpoint with its config.json.
"""

import json
import os
import pathlib
import runpy
import shutil
import subprocess
import sys

import flax
import jax
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

pytest.importorskip("onnxruntime", reason="the ONNX export needs onnxruntime: [export] extra")
pytest.importorskip("onnx", reason="the ONNX export needs onnx: [export] extra")
pytest.importorskip("jax2onnx", reason="the ONNX export needs pip install --no-deps jax2onnx")

from brats_jax import config_fields, data, fileio  # noqa: E402
from brats_jax.data import brats  # noqa: E402
from brats_jax.data.context import context_positions, stack_context  # noqa: E402
from brats_jax.data.synthetic import SyntheticSource  # noqa: E402
from brats_jax.inference import (  # noqa: E402
    case_prediction,
    onnx_export,
    postprocess,
    whole_volume,
)
from brats_jax.models import outputs  # noqa: E402
from brats_jax.runs import train_state  # noqa: E402
from brats_jax.runs.checkpoints import RunCheckpoints  # noqa: E402
from configs import transunet, unet  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "segment_with_onnxruntime.py"
_SUFFIXES = {"2018": ("_flair", "_t1", "_t1ce", "_t2"), "2023": ("-t2f", "-t1n", "-t1c", "-t2w")}


def _config(model="unet", **fields):
    """The model's `tiny` config with `fields` ({dotted: value}) set."""
    c = (unet if model == "unet" else transunet).get_config("tiny")
    return config_fields.apply_overrides(c, fields)


def _variables(config, seed=0, slices=None):
    """`(state, variables)`: the config's model's initial ones with the head rescaled so that
    its logits on `slices` (model inputs; default: phantom slices) have std 2 and 20 % of them
    are positive, per channel: labels of every kind in a few blobs, few near-ties (a
    saturated sigmoid averaged over mirror images gives exactly 0.5 where they disagree)."""
    model = train_state.create_model(config)
    size, channels = train_state.input_size(config), data.input_channels(config)
    state = train_state.init_state(
        model, train_state.create_optimizer(config.train, 1), seed, image_size=size,
        in_channels=channels,
    )  # fmt: skip
    params = flax.core.unfreeze(state.params)
    head = params["head" if config.model.name == "unet" else "segmentation_head"]
    if slices is None:
        source = SyntheticSource(num_cases=1, slices_per_case=8, image_size=size, seed=seed)
        slices = np.stack([source[i]["image"] for i in range(len(source))])
        slices = np.tile(slices, (1, 1, 1, channels // 4))  # neighbours like the centre
    logits = np.asarray(model.apply({"params": params, **state.model_state}, slices, train=False))
    scale = 2 / logits.std(axis=(0, 1, 2))
    head["kernel"] = head["kernel"] * scale
    head["bias"] = (head["bias"] - np.quantile(logits, 0.8, axis=(0, 1, 2))) * scale
    return state.replace(params=params), {"params": params, **state.model_state}


def _case_slices(config, case):
    """The model inputs predict makes of `case` (every slice; `whole_volume`'s resize)."""
    volume = brats.load_case(case).image
    k, size = data.context_slices(config), train_state.input_size(config)
    x = stack_context(np.moveaxis(volume, 2, 0), context_positions(volume.shape[2], k))
    return np.asarray(jax.image.resize(x, (len(x), size, size, x.shape[-1]), "linear"))


def _make_run(workdir, config, seed=0, slices=None) -> pathlib.Path:
    """A run folder (config.json, one checkpoint) of `_variables(config, seed, slices)`."""
    workdir = pathlib.Path(workdir)
    state, _ = _variables(config, seed, slices)
    ckpts = RunCheckpoints(workdir)
    ckpts.save(1, state, {"position": 0})
    ckpts.close()
    fileio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    return workdir


def _write_case(root, case_id, naming, affine, depth=18):
    """A synthetic phantom case (40 x 36 x `depth`, background 0) as four NIfTI files."""
    src = SyntheticSource(num_cases=1, slices_per_case=depth, image_size=40, seed=7)
    image = np.stack([src[i]["image"] for i in range(depth)], axis=2)[:, 2:38]
    raw = np.where(np.isclose(image, image[:1, :1]), 0, image * 100 + 1000).astype(np.float32)
    folder = pathlib.Path(root) / case_id
    folder.mkdir(parents=True)
    for m, suffix in enumerate(_SUFFIXES[naming]):
        nib.save(nib.Nifti1Image(raw[..., m], affine), folder / f"{case_id}{suffix}.nii.gz")
    return folder


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("BRATS_JAX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "brats_jax.export", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


NETWORKS = {
    "unet-classes": ("unet", {}),
    "unet-regions": ("unet", {"model.output": "regions"}),
    "unet-classes-context1-batchnorm": ("unet", {"data.context_slices": 1, "model.norm": "batch"}),
    # cpu_best's network: 2.5D, regions, deep supervision
    "unet-regions-context1-deep_supervision": (
        "unet",
        {"data.context_slices": 1, "model.output": "regions", "model.deep_supervision": True},
    ),
    "transunet-classes": ("transunet", {}),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_onnxruntime_probabilities_equal_jax(name, tmp_path):
    model_name, fields = NETWORKS[name]
    config = _config(model_name, **fields)
    _, variables = _variables(config)
    path = tmp_path / "model.onnx"
    import onnx

    onnx.save(onnx_export.to_onnx(config, variables), str(path))
    predict = whole_volume.make_slice_predictor(  # what predict computes, at the model's size
        train_state.create_model(config),
        image_size=config.data.image_size,
        output=outputs.of_config(config.model),
    )
    size, channels = train_state.input_size(config), data.input_channels(config)
    for batch in (5, 1):  # the batch axis is dynamic
        x = np.random.default_rng(batch).standard_normal((batch, size, size, channels), np.float32)
        got = onnx_export.onnx_probabilities(path, x)
        want = np.asarray(predict(variables, x))
        assert got.shape == want.shape == (batch, size, size, 3 if "regions" in name else 4)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    model = onnx.load(str(path))
    (given,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in given.type.tensor_type.shape.dim]
    assert (given.name, dims) == ("image", ["batch", size, size, channels])
    assert [o.name for o in model.graph.output] == ["probabilities"]


def _near_ties(probs, kind, eps=1e-4):
    """Voxels whose label may flip with a change of `eps` in a probability."""
    if kind == "regions":
        return (np.abs(probs - 0.5) < eps).any(-1)
    top2 = np.sort(probs, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0] < eps


# Runs the example script as `python SCRIPT ARGS` and fails when it imported JAX or this library.
_PROBE = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__');"
    "heavy = {m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax', 'brats_jax'};"
    "sys.exit(f'the example imported {sorted(heavy)}' if heavy else 0)"
)

RUNS = {
    # cpu_best's options, a 2023-named case stored in RAS voxel order (reoriented when read)
    "regions": (
        {
            "data.context_slices": 1,
            "model.output": "regions",
            "model.deep_supervision": True,
            "postprocess.largest_component_only": True,
            "eval.tta": "flips",
        },
        "BraTS-GLI-00001-000",
        "2023",
        np.diag([1.0, 1.0, 1.0, 1.0]),
    ),
    # classes with batch norm, small components dropped; a 2018-named case in BraTS's LPS order
    "classes": (
        {
            "model.norm": "batch",
            "postprocess.min_component_voxels": 40,
            "eval.tta": "flips_ud",
        },
        "Brats18_TCIA_1_1",
        "2018",
        np.diag([-1.0, -1.0, 1.0, 1.0]),
    ),
}


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_example_script_segments_like_predict(kind, tmp_path):
    fields, case_id, naming, affine = RUNS[kind]
    case = _write_case(tmp_path / "cases", case_id, naming, affine)
    config = _config(**fields)
    run = _make_run(tmp_path / "run", config, slices=_case_slices(config, case))
    model = tmp_path / "model.onnx"
    proc = _cli(f"--workdir={run}", f"--out={model}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(onnx_export.metadata_path(model).read_text())
    seg = tmp_path / "onnx.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(SCRIPT), str(model), str(case), str(seg)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    probs_path = tmp_path / "probs.nii.gz"
    want = case_prediction.predict_case(
        run, case, tmp_path / "jax.nii.gz", probabilities=probs_path, tta=meta["tta"]["run"]
    )
    got = _read(seg)
    assert got.shape == want.shape == (40, 36, 18) and got.dtype == np.int16
    ties = _near_ties(_read(probs_path), kind)
    differ = got != want
    print(f"{kind}: {differ.sum()} voxels differ, {ties.sum()} near-ties")
    assert not (differ & ~ties).any(), f"{(differ & ~ties).sum()} voxels differ off the ties"
    et = 4 if naming == "2018" else 3
    assert set(np.unique(got)) <= {0, 1, 2, et} and et in got  # the input's convention
    # what the case exercises matters: without the run's flips or its post-processing,
    # predict would give other labels
    for option in ({"tta": "none"}, {"tta": meta["tta"]["run"], "postprocessing": "none"}):
        other = case_prediction.predict_case(run, case, tmp_path / "other.nii.gz", **option)
        assert (other != want).any(), option


@pytest.mark.parametrize(
    "config, changes",
    [
        ({"largest_component_only": True}, True),
        ({"largest_component_only": True, "connectivity": 6, "et_min_voxels": 30}, True),
        ({"min_component_voxels": 8}, True),
        ({"min_component_voxels": 8, "connectivity": 6}, True),
        ({"et_min_voxels": 30}, True),
        ({"et_min_voxels": 5}, False),  # more ET voxels than that: kept
        ({}, False),
    ],
)
def test_example_postprocessing_equals_the_library(config, changes):
    example = runpy.run_path(str(SCRIPT))  # its functions, without running it
    rng = np.random.default_rng(0)
    blobs = scipy.ndimage.gaussian_filter(rng.standard_normal((24, 20, 12)), 1.5) > 0.15
    labels = np.where(blobs, rng.integers(1, 4, blobs.shape), 0)
    labels[np.isin(labels, 3) & (rng.random(blobs.shape) < 0.9)] = 2  # ~20 ET voxels
    want = postprocess.apply(labels, postprocess.PostprocessConfig(**config))
    pp = {**postprocess.PostprocessConfig().to_dict(), **config}  # as the export's JSON
    got = example["postprocess"](labels, pp)
    np.testing.assert_array_equal(got, want)
    assert (want != labels).any() == changes


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A built classes run (one checkpoint)."""
    return _make_run(tmp_path_factory.mktemp("export_run") / "run", _config())


def _listing(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


def test_a_folder_without_a_checkpoint_or_run_is_one_line(run_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run_folder / "config.json").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for workdir, message in (
        (bare, f"error: no checkpoint in {bare / 'checkpoints'}"),
        (empty, f"error: no training run in {empty}: config.json is missing"),
    ):
        proc = _cli(f"--workdir={workdir}", f"--out={out / 'model.onnx'}")
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [message]
        assert not out.exists() or _listing(out) == []


def test_a_sliding_window_run_is_one_line_unless_turned_off(run_folder, tmp_path):
    run = tmp_path / "patches"
    config = json.loads((run_folder / "config.json").read_text())
    config["data"]["patch_size"], config["eval"]["sliding_window"] = 16, True
    shutil.copytree(run_folder / "checkpoints", run / "checkpoints")
    fileio.write_json(run / "config.json", config)
    out = tmp_path / "out"
    proc = _cli(f"--workdir={run}", f"--out={out / 'model.onnx'}")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: eval.sliding_window=True: predict slides 16 px windows")
    assert "--sliding_window=off" in line
    assert not out.exists() or _listing(out) == []
    meta = onnx_export.export_run(run, out / "model.onnx", sliding_window=False)
    assert meta["sliding_window"] is False
    assert _listing(out) == ["model.onnx", "model.onnx.json"]


@pytest.mark.parametrize("existing", ["model.onnx", "model.onnx.json"])
def test_an_existing_output_is_one_line_and_kept(existing, run_folder, tmp_path):
    (tmp_path / existing).write_text("keep me")
    proc = _cli(f"--workdir={run_folder}", f"--out={tmp_path / 'model.onnx'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --out: {tmp_path / existing} exists; remove it or give another name"
    ]
    assert _listing(tmp_path) == [existing]
    assert (tmp_path / existing).read_text() == "keep me"


def test_a_failed_export_leaves_nothing(run_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "VERIFY_TOLERANCE", -1.0)  # any difference fails
    with pytest.raises(onnx_export.ExportError, match="differ from JAX's .* nothing written"):
        onnx_export.export_run(run_folder, tmp_path / "out" / "model.onnx")
    assert _listing(tmp_path / "out") == []  # neither file, nor a temporary one


def test_a_missing_converter_is_one_line_saying_how_to_install(run_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` fails
    with pytest.raises(onnx_export.ExportError, match=r"jax2onnx is missing.*--no-deps jax2onnx"):
        onnx_export.export_run(run_folder, tmp_path / "model.onnx")
    assert _listing(tmp_path) == []


def test_metadata_says_what_predict_does(run_folder):
    config = _config(**{"data.context_slices": 2, "model.output": "regions", "eval.tta": "flips"})
    meta = onnx_export.metadata(config, run_folder)
    assert meta["input"]["shape"] == ["batch", 32, 32, 20]
    assert meta["input"]["normalization"] == "brain" and meta["image_size"] == 32
    assert meta["output"]["kind"] == "regions" and meta["output"]["activation"] == "sigmoid"
    assert meta["tta"]["flip_axes"] == [[], [1]]
    assert meta["labels"]["release_labels"] == {"2018": [0, 1, 2, 4], "2023": [0, 1, 2, 3]}
    json.dumps(meta)  # JSON as it is
