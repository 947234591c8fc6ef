"""Test setup: JAX on the CPU, tiny shapes, real-sample fixtures that skip when absent, and the
helpers the test folders share (tiny configs, stand-in run configs, a tiny trained run, NIfTI
cases, ViT checkpoints).

The test folders mirror the package (tests/data/ for brats_jax/data/, ...); they hold no
`__init__.py`, so each test file's basename is unique across the tree."""

import importlib
import math
import os
import pathlib
import struct
import sys
import tempfile
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The library's user cache (slice caches, Kaggle statistics, predict's compilation cache:
# `fileio.user_cache_dir`) goes to a folder of this test process, not the user's home; the
# commands the tests start inherit it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="brats_jax_test_cache_")

# The set-up every CLI runs first (`brats_jax.runtime.setup`: the fast XLA:CPU flags), so that
# in-process runs and the CLI runs of the tests compute bit-identical numbers.
from brats_jax import runtime  # noqa: E402

runtime.setup(quiet_logs=False)

import hypothesis  # noqa: E402
import ml_collections  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.ndimage  # noqa: E402

from brats_jax import MODALITIES  # noqa: E402
from brats_jax.models.transunet import per_block_params  # noqa: E402

# The mutation runs (TESTING.md) pass `--hypothesis-profile=mutation`: a failing example is
# not shrunk (shrinking recompiles the jitted losses per shape, and a kill needs no minimal case).
hypothesis.settings.register_profile(
    "mutation",
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate],
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "brats_sample"


@pytest.fixture(autouse=True)
def _process_logging_state_restored():
    """Process-wide logging state a test can change for the rest of its process: parsing a
    command's flags in-process sets the `absl` logger's level from `--verbosity` (WARNING by
    default), and a command that ends in an error (`cli.run_app`'s quiet shutdown) sets it
    to FATAL and replaces the unraisable and thread exception hooks. Restored after each
    test, so no later test depends on the order (a test reading INFO lines with caplog
    would see none)."""
    import threading

    from absl import logging as absl_logging

    level = absl_logging.get_absl_logger().level
    hooks = (sys.unraisablehook, threading.excepthook)
    yield
    absl_logging.get_absl_logger().setLevel(level)
    sys.unraisablehook, threading.excepthook = hooks


def _run_command(module, *flags):
    """Runs command `module` (e.g. `brats_jax.predict`) in this process as
    `python -m <module> *flags` would, and returns what its `main` returns. Its absl flags
    are reset before and after, so each call starts from the defaults."""
    name = module.__name__.rpartition(".")[2]
    module.FLAGS.unparse_flags()
    try:
        module.FLAGS([name, *map(str, flags)])
        return module.main([name])
    finally:
        module.FLAGS.unparse_flags()


@pytest.fixture
def run_command():
    """`run_command(module, *flags)`: a command run in-process (see `_run_command`)."""
    return _run_command


@pytest.fixture(scope="session")
def brats_sample() -> pathlib.Path:
    """Path of the real BraTS sample (../shared/data/brats_sample); skips when absent."""
    if not (SAMPLE / "nifti").is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE}")
    return SAMPLE


def _set_fields(tree, fields):
    """Sets each dotted field (`"train.num_steps"`) of `fields` in the nested `tree` (a
    ConfigDict, or a plain dict whose missing sections are added); returns `tree`."""
    for dotted, value in fields.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
        node[leaf] = value
    return tree


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(**{"train.num_steps": 2, ...})`: a fresh `configs/unet.py:tiny` config with
    the given dotted fields set (`preset=` picks another preset, `model="transunet"` the
    presets of configs/transunet.py). A file's own defaults are a plain dict merged in front:
    `tiny_config(**DEFAULTS | {"train.seed": 1})`."""

    def make(preset="tiny", model="unet", **overrides):
        module = importlib.import_module(f"configs.{model}")
        return _set_fields(module.get_config(preset), overrides)

    return make


@pytest.fixture(scope="session")
def stand_in_config():
    """`stand_in_config(**{"model.output": "regions", ...})`: the hand-written config of a
    stand-in run (a patched `train_state.load_trained` serves it with a stand-in model): a
    16-pixel NIfTI U-Net evaluated 4 slices at a time, as a fresh ConfigDict; dotted fields
    are set or added, an undotted one (`postprocess=`) is a whole section."""

    def make(**fields):
        config = {
            "data": {"image_size": 16, "source": "nifti"},
            "eval": {"batch_size": 4},
            "model": {"name": "unet"},
        }
        return ml_collections.ConfigDict(_set_fields(config, fields))

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_config):
    """A `configs/unet.py:tiny` run trained in-process (`train.train_and_evaluate`), once per
    session -> (workdir, results)."""
    from brats_jax.training import train

    workdir = tmp_path_factory.mktemp("tiny_run")
    results = train.train_and_evaluate(tiny_config(), workdir)
    return workdir, results


def _tensorboard_events(folder):
    """Every `Event` proto of the TensorBoard event files in `folder`, in file order: the
    TFRecord framing (8-byte length, 4-byte length CRC, data, 4-byte data CRC) read by
    hand, each record parsed with tensorboardX's `event_pb2` (TensorFlow is not installed)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            out.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
            pos += 12 + n + 4
    return out


@pytest.fixture(scope="session")
def tensorboard_events():
    """`tensorboard_events(folder)` -> the `Event` protos of its TensorBoard event files
    (`event.step`, `event.summary.value[i].tag` / `.simple_value` / `.image` / `.tensor`)."""
    return _tensorboard_events


def _slice_dice(p: np.ndarray, t: np.ndarray, absent: float | None) -> float:
    """Mean over the 4 classes of one slice's Dice; a class absent from both scores `absent`
    (None: left out of the mean)."""
    scores = []
    for c in range(4):
        n = (p == c).sum() + (t == c).sum()
        if n:
            scores.append(2 * ((p == c) & (t == c)).sum() / n)
        elif absent is not None:
            scores.append(absent)
    return float(np.mean(scores))


@pytest.fixture(scope="session")
def recompute_test_pass():
    """`recompute_test_pass(workdir, tmp_path, step=None) -> dict`: a finished run's test
    pass recomputed here from checkpoint `step`'s (default: the best) predicted labels
    (the library's whole-volume prediction with the run's output kind, 2.5D context, test-time
    flips, sliding window and post-processing) with the slice metrics written in numpy: `paper_dice`
    (absent classes 1), `paper_dice_absent_excluded`, `pooled_class_dice`,
    `num_test_slices` (test slices scored) and `num_kept` (the split's test slices)."""
    from brats_jax import data
    from brats_jax.data import patches
    from brats_jax.inference import postprocess, whole_volume
    from brats_jax.models import outputs
    from brats_jax.runs import train_state
    from brats_jax.training import run_group

    def recompute(workdir, tmp_path, step=None):
        config, model, variables = train_state.load_trained(workdir, step=step)
        run = run_group.build_run(config, tmp_path / f"recomputed_{step}")
        output = outputs.of_config(config.model)
        predict = whole_volume.make_slice_predictor(
            model, image_size=config.data.image_size, output=output,
            tta=config.eval.get("tta", "none"), window=patches.inference_window(config),
        )  # fmt: skip
        kept = set(run.splits.test.tolist())
        one, excluded, confusion = [], [], np.zeros((4, 4), np.int64)
        for case_id in run.splits.cases["test"]:
            image, label = data.load_volume(run.source, case_id)
            probs = whole_volume.predict_volume(
                predict, variables, image, batch_size=4,
                context_slices=data.context_slices(config),
            )  # fmt: skip
            pred = outputs.labels_from_probabilities(probs, output)
            pred = postprocess.apply(pred, postprocess.from_config(config))
            for z, idx in enumerate(data.case_indices(run.source, case_id)):
                if int(idx) in kept:
                    p, t = pred[..., z], label[..., z]
                    one.append(_slice_dice(p, t, absent=1.0))
                    excluded.append(_slice_dice(p, t, absent=None))
                    np.add.at(confusion, (t.ravel(), p.ravel()), 1)
        tp = np.diag(confusion)
        return {
            "paper_dice": float(np.mean(one)),
            "paper_dice_absent_excluded": float(np.mean(excluded)),
            "pooled_class_dice": (2 * tp / (confusion.sum(0) + confusion.sum(1))).tolist(),
            "num_test_slices": len(one),
            "num_kept": len(kept),
        }

    return recompute


LABELLED_CASE_SHAPE = (16, 16, 8)
BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS's LPS voxel order (brats.ORIENTATION)
_NAMES_2018 = {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"}
_NAMES_2023 = {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"}


def _raw(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 1000, LABELLED_CASE_SHAPE).astype(np.int16)
    x[:4] = 0  # background
    return x


def _label(naming):
    lab = np.zeros(LABELLED_CASE_SHAPE, np.uint8)
    lab[6:8, 6:8, 2] = 1
    lab[8:10, 6:8, 2] = 2
    lab[10:12, 6:8, 3] = 4 if naming == "2018" else 3
    return lab


def _write_labelled_case(
    root, case_id, naming="2018", ext=".nii.gz", seg_name=None, affine=None, **over
):
    """Writes a tiny labelled case; returns (case dir, raw arrays by modality, label)."""
    d = pathlib.Path(root) / case_id
    d.mkdir(parents=True, exist_ok=True)
    names = _NAMES_2018 if naming == "2018" else _NAMES_2023
    affine = BRATS_AFFINE if affine is None else affine
    raws = {}
    for k, m in enumerate(("flair", "t1", "t1ce", "t2")):
        arr = over.get(m, _raw(k))
        raws[m] = arr
        nib.save(
            nib.Nifti1Image(arr, over.get(f"{m}_affine", affine)), d / f"{case_id}{names[m]}{ext}"
        )
    lab = over.get("seg", _label(naming))
    if lab is not None:
        name = seg_name or f"{case_id}{names['seg']}{ext}"
        nib.save(nib.Nifti1Image(lab, affine), d / name)
    return d, raws, lab


_write_labelled_case.shape = LABELLED_CASE_SHAPE
_write_labelled_case.label = _label  # the default label of a naming


@pytest.fixture(scope="session")
def write_labelled_case():
    """`write_labelled_case(root, case_id, naming="2018", ext=".nii.gz", seg_name=None,
    affine=None, **over)`: a (16, 16, 8) case (its `.shape`) of integer modalities (x < 4 is
    background) and a 3-class label, BraTS's LPS affine unless given; `over` replaces a
    modality's array (`flair=`), its affine (`t1_affine=`) or the label (`seg=`; None: none);
    `.label(naming)` is the default label.
    Returns (case dir, raw arrays by modality, label)."""
    return _write_labelled_case


def _write_nifti_case(
    root,
    case_id,
    *,
    shape=(12, 10, 6),
    seed=0,
    mean=100.0,
    std=20.0,
    background_rows=0,
    modalities=MODALITIES,
    naming="2018",
    affine=BRATS_AFFINE,
    seg=None,
):
    """Writes case folder `root/case_id` of random-normal float32 modalities; returns it."""
    folder = pathlib.Path(root) / case_id
    folder.mkdir(parents=True)
    names = _NAMES_2018 if naming == "2018" else _NAMES_2023
    rng = np.random.default_rng(seed)
    for m in modalities:
        vol = rng.normal(mean, std, shape).astype(np.float32)
        vol[:background_rows] = 0
        nib.save(nib.Nifti1Image(vol, affine), str(folder / f"{case_id}{names[m]}.nii.gz"))
    if seg is not None:
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{case_id}{names['seg']}.nii.gz"))
    return folder


@pytest.fixture(scope="session")
def write_nifti_case():
    """`write_nifti_case(root, case_id, *, shape=(12, 10, 6), seed=0, mean=100.0, std=20.0,
    background_rows=0, modalities=MODALITIES, naming="2018", affine=BRATS_AFFINE, seg=None)`:
    writes folder `root/case_id` (parents made; it must not exist) of `.nii.gz` modalities,
    each `rng.normal(mean, std, shape)` as float32 with its first `background_rows` x rows 0,
    drawn from one `np.random.default_rng(seed)` in the order of `modalities` (a subset
    leaves files out), named as BraTS 2018 (`<id>_t1ce`) or 2023 (`<id>-t1c`); `seg`, an
    array, is written as given as the label file. Every file has `affine` (default: BraTS's
    LPS voxel order). Returns the folder."""
    return _write_nifti_case


def _official_shapes(
    units=(3, 4, 9),
    width=64,
    hidden=768,
    layers=12,
    heads=12,
    mlp=3072,
    grid=14,
    n_cls=21843,
    gn4d=False,
):
    """Key -> shape of the official checkpoint (transcribed from make_fake_vit_npz.py)."""
    d = {}

    def g(k, c):
        d[k + "/scale"] = (1, 1, 1, c) if gn4d else (c,)
        d[k + "/bias"] = (1, 1, 1, c) if gn4d else (c,)

    d["conv_root/kernel"] = (7, 7, 3, width)
    g("gn_root", width)
    cin = width
    for b, n_units in enumerate(units, 1):
        mid = width * 2 ** (b - 1)
        out = mid * 4
        for u in range(1, n_units + 1):
            pre = f"block{b}/unit{u}/"
            d[pre + "conv1/kernel"] = (1, 1, cin, mid)
            g(pre + "gn1", mid)
            d[pre + "conv2/kernel"] = (3, 3, mid, mid)
            g(pre + "gn2", mid)
            d[pre + "conv3/kernel"] = (1, 1, mid, out)
            g(pre + "gn3", out)
            if u == 1:
                d[pre + "conv_proj/kernel"] = (1, 1, cin, out)
                g(pre + "gn_proj", out)
            cin = out
    d["embedding/kernel"] = (1, 1, cin, hidden)
    d["embedding/bias"] = (hidden,)
    d["cls"] = (1, 1, hidden)
    d["Transformer/posembed_input/pos_embedding"] = (1, 1 + grid * grid, hidden)
    g("Transformer/encoder_norm", hidden)
    hd = hidden // heads
    for i in range(layers):
        pre = f"Transformer/encoderblock_{i}/"
        g(pre + "LayerNorm_0", hidden)
        g(pre + "LayerNorm_2", hidden)
        for n in ("query", "key", "value"):
            d[pre + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (hidden, heads, hd)
            d[pre + f"MultiHeadDotProductAttention_1/{n}/bias"] = (heads, hd)
        d[pre + "MultiHeadDotProductAttention_1/out/kernel"] = (heads, hd, hidden)
        d[pre + "MultiHeadDotProductAttention_1/out/bias"] = (hidden,)
        d[pre + "MlpBlock_3/Dense_0/kernel"] = (hidden, mlp)
        d[pre + "MlpBlock_3/Dense_0/bias"] = (mlp,)
        d[pre + "MlpBlock_3/Dense_1/kernel"] = (mlp, hidden)
        d[pre + "MlpBlock_3/Dense_1/bias"] = (hidden,)
    d["head/kernel"] = (hidden, n_cls)
    d["head/bias"] = (n_cls,)
    return d


def _write_vit_npz(path, seed=0, **sizes):
    """Write a random checkpoint with ``_official_shapes(**sizes)``; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for k, s in _official_shapes(**sizes).items():
        base = 1.0 if k.endswith("/scale") else 0.0
        arrays[k] = (base + rng.standard_normal(s) * 0.1).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


_VIT_TINY = dict(units=(1, 1, 1), width=8, hidden=32, layers=2, heads=2, mlp=64, grid=3, n_cls=10)


def _get(tree, key):
    """The array at checkpoint key ``key`` (per-block names; a scanned tree is viewed per block)."""
    tree = per_block_params(tree)
    for part in key.split("/"):
        tree = tree[part]
    return np.asarray(tree)


def _expected_value(key, arr, grid, cin):
    """The array the model should hold for checkpoint key ``key``, computed independently."""
    if key == "Transformer/posembed_input/pos_embedding":
        s = math.isqrt(arr.shape[1] - 1)
        g = arr[0, 1:].reshape(s, s, -1).astype(np.float64)
        z = scipy.ndimage.zoom(g, (grid / s, grid / s, 1), order=1)  # official loader's resize
        return z.reshape(1, grid * grid, -1)
    if key == "conv_root/kernel" and cin != 3:
        return np.repeat(arr.mean(axis=2, keepdims=True), cin, axis=2) * 3 / cin
    if key.split("/")[-2].startswith("gn") or "norm" in key or "LayerNorm" in key:
        return arr.reshape(-1)
    return arr


@pytest.fixture(scope="session")
def vit_checkpoint():
    """The R50+ViT checkpoint helpers: `write_npz(path, seed=0, **sizes)` (a random .npz with
    `official_shapes(**sizes)`; returns the arrays), `TINY` (the tiny preset's sizes), `get`,
    `expected_value`, `official_shapes`."""
    return types.SimpleNamespace(
        official_shapes=_official_shapes,
        write_npz=_write_vit_npz,
        TINY=_VIT_TINY,
        get=_get,
        expected_value=_expected_value,
    )
