"""Context across slices (2.5D, `data.context_slices`): positions, neighbour table, stacked
training / evaluation batches, whole-volume inference, the widened pretrained TransUNet root,
and a tiny training run that predicts from its run folder."""

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from brats_jax import metrics
from brats_jax.data import (
    SliceTable,
    SyntheticSource,
    brats,
    context_positions,
    eval_batches,
    input_channels,
    load_volume,
    make_source,
    make_train_iterator,
    neighbour_records,
    resize_image,
    stack_context,
)
from brats_jax.inference import case_prediction, ensembles, whole_volume
from brats_jax.labels import to_release_labels
from brats_jax.models import TransUNet, load_pretrained, outputs
from brats_jax.models.pretrained import widen_root_kernel
from brats_jax.runs import train_state
from brats_jax.training import train
from configs import unet as unet_config


def test_context_positions_clamp_at_both_ends():
    np.testing.assert_array_equal(
        context_positions(4, 1), [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    )
    np.testing.assert_array_equal(
        context_positions(3, 2), [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]
    )
    np.testing.assert_array_equal(context_positions(3, 0), [[0], [1], [2]])
    np.testing.assert_array_equal(context_positions(1, 1), [[0, 0, 0]])
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="data.context_slices"):
            context_positions(4, bad)


def test_stack_context_is_slice_major_with_edges_repeated():
    # voxel value = 10 * slice + modality, so every channel says where it came from
    h, w, d = 2, 3, 5
    z = np.arange(d, dtype=np.float32)[None, None, :, None]
    m = np.arange(4, dtype=np.float32)[None, None, None, :]
    volume = np.broadcast_to(10 * z + m, (h, w, d, 4))
    slices = np.moveaxis(volume, 2, 0)  # (D, H, W, 4)
    got = stack_context(slices, context_positions(d, 1))  # (D, H, W, 12)
    assert got.shape == (d, h, w, 12) and got.dtype == np.float32
    want = {
        0: [0, 1, 2, 3, 0, 1, 2, 3, 10, 11, 12, 13],
        2: [10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33],
        4: [30, 31, 32, 33, 40, 41, 42, 43, 40, 41, 42, 43],
    }
    for zz, channels in want.items():
        np.testing.assert_array_equal(got[zz], np.broadcast_to(channels, (h, w, 12)))
    # k = 0: the plain slices
    np.testing.assert_array_equal(stack_context(slices, context_positions(d, 0)), slices)
    # a batch of rows: only those slices, in the rows' order
    np.testing.assert_array_equal(
        stack_context(slices, context_positions(d, 1)[[4, 0]]), got[[4, 0]]
    )


def test_neighbour_table_of_records_out_of_slice_order():
    # two cases interleaved; case "a" has a gap (slices 0, 2, 5): neighbours are records
    case_id = np.array(["a", "b", "a", "b", "a", "b"])
    slice_index = np.array([5, 1, 0, 0, 2, 2])
    table = SliceTable(case_id, slice_index, np.zeros((6, 4)), np.ones(6))
    # case a sorted: records 2 (s0), 4 (s2), 0 (s5); case b sorted: 3 (s0), 1 (s1), 5 (s2)
    want = {0: [4, 0, 0], 1: [3, 1, 5], 2: [2, 2, 4], 3: [3, 3, 1], 4: [2, 4, 0], 5: [1, 5, 5]}
    got = neighbour_records(table, 1)
    assert got.shape == (6, 3)
    for i, row in want.items():
        assert got[i].tolist() == row, i
    np.testing.assert_array_equal(neighbour_records(table, 0), np.arange(6)[:, None])
    assert neighbour_records(table, 2)[2].tolist() == [2, 2, 2, 4, 0]


class _RecordSource:
    """4x4 slices; image value = 4 * record index + modality; hand-written table."""

    def __init__(self, case_id, slice_index):
        n = len(case_id)
        self.table = SliceTable(np.array(case_id), slice_index, np.zeros((n, 4)), np.ones(n))

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return dict(
            image=np.broadcast_to(4 * i + np.arange(4, dtype=np.float32), (4, 4, 4)).copy(),
            label=np.full((4, 4), i, np.int32),
            case_id=str(self.table.case_id[i]),
            slice_index=int(self.table.slice_index[i]),
        )


def test_eval_batches_stack_neighbour_records():
    src = _RecordSource(["a", "b", "a", "b", "a", "b"], np.array([5, 1, 0, 0, 2, 2]))
    (batch,) = eval_batches(src, [0, 2, 5], batch_size=3, context_slices=1)
    assert batch["image"].shape == (3, 4, 4, 12)
    # record 0's window: records 4, 0, 0; record 2's: 2, 2, 4; record 5's: 1, 5, 5
    for row, records in zip(
        batch["image"][:, 1, 2], ([4, 0, 0], [2, 2, 4], [1, 5, 5]), strict=True
    ):
        assert row.tolist() == [4 * r + m for r in records for m in range(4)]
    assert batch["label"][:, 0, 0].tolist() == [0, 2, 5]  # the centre slice's label
    assert batch["slice_index"].tolist() == [5, 0, 2]


def _hand_stacked(volume, z, k):
    """Slices z-k..z+k (clamped) of (H, W, D, 4), concatenated along channels."""
    d = volume.shape[2]
    return np.concatenate([volume[:, :, min(max(z + o, 0), d - 1)] for o in range(-k, k + 1)], -1)


def _data_config(**kw):
    base = dict(image_size=0, random_flip=False, num_workers=0, context_slices=1)
    return ml_collections.ConfigDict({**base, **kw})


def test_train_batches_hold_the_context_window():
    src = SyntheticSource(2, 5, 16, seed=0)
    volumes = {c: load_volume(src, c) for c in ("synth_000", "synth_001")}
    it = make_train_iterator(src, np.arange(10), _data_config(), batch_size=4, seed=0)
    seen = set()
    for _ in range(5):
        b = next(it)
        assert b["image"].shape == (4, 16, 16, 12) and b["label"].shape == (4, 16, 16)
        for img, lab, cid, z in zip(
            b["image"], b["label"], b["case_id"], b["slice_index"], strict=True
        ):
            image, label = volumes[str(cid)]
            np.testing.assert_array_equal(img, _hand_stacked(image, int(z), 1))
            np.testing.assert_array_equal(lab, label[:, :, int(z)])
            seen.add((str(cid), int(z)))
    assert {z for _, z in seen} >= {0, 4}  # both clamped edges were drawn


def test_train_batches_flip_and_resize_all_channels_alike():
    src = SyntheticSource(1, 4, 32, seed=1)
    image, label = load_volume(src, "synth_000")
    config = _data_config(image_size=16, random_flip=True)
    it = make_train_iterator(src, np.arange(4), config, batch_size=4, seed=3)
    flipped = []
    for _ in range(3):
        b = next(it)
        for img, z in zip(b["image"], b["slice_index"], strict=True):
            ref = resize_image(_hand_stacked(image, int(z), 1), 16)
            same, mirrored = (
                np.allclose(img, ref, atol=1e-5),
                np.allclose(img, ref[::-1], atol=1e-5),
            )
            assert same or mirrored
            flipped.append(mirrored and not same)
    assert any(flipped) and not all(flipped)


class _LinearModel:
    """Stand-in model: logits = input channels @ variables["w"] (C_in, 4)."""

    def apply(self, variables, x, train):
        return x @ variables["w"]


def test_predict_volume_with_context_equals_hand_stacked_volume():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(12, 10, 7, 4)).astype(np.float32)
    variables = {"w": jnp.asarray(rng.normal(size=(12, 4)).astype(np.float32))}
    predict = whole_volume.make_slice_predictor(_LinearModel(), image_size=8)
    got = whole_volume.predict_volume(predict, variables, volume, batch_size=3, context_slices=1)
    stacked = np.stack([_hand_stacked(volume, z, 1) for z in range(7)])  # (D, H, W, 12)
    want = np.moveaxis(np.asarray(predict(variables, stacked)), 0, 2)
    assert got.shape == (12, 10, 7, 4)
    np.testing.assert_allclose(got, want, atol=1e-6)


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_ensemble_members_use_their_own_context(monkeypatch, stand_in_config):
    """Four runs loaded as an ensemble with data.context_slices 0, 1, 2, 1 and their own
    weights: the probabilities are the mean over the runs of softmax(own window @ own w),
    the window stacked by hand in numpy (one run's context for all, the first run's
    weights, or a mean of logits each fail, or break the shapes)."""
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(8, 6, 5, 4)).astype(np.float32)
    contexts = (0, 1, 2, 1)
    weights = [rng.normal(size=(4 * (2 * k + 1), 4)).astype(np.float32) for k in contexts]
    served = {
        f"run{i}": (stand_in_config(**{"data.image_size": 0, "data.context_slices": k}),
                    {"w": jnp.asarray(w)})
        for i, (k, w) in enumerate(zip(contexts, weights, strict=True))
    }  # fmt: skip
    monkeypatch.setattr(
        train_state,
        "load_trained",
        lambda w, step=None: (served[w][0], _LinearModel(), served[w][1]),
    )
    ens = ensembles.load_ensemble(",".join(served))
    assert ens.context_slices == contexts
    got = ensembles.predict_probabilities(ens, volume, batch_size=2)
    members = []
    for k, w in zip(contexts, weights, strict=True):
        window = np.stack([_hand_stacked(volume, z, k) for z in range(5)], 2)  # (H, W, D, C)
        members.append(_np_softmax(window.astype(np.float64) @ w.astype(np.float64)))
    want = np.mean(members, 0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert min(np.abs(m - want).max() for m in members) > 0.05  # no member is the mean


def test_input_channels_from_config_and_old_configs():
    def config(**data):
        return ml_collections.ConfigDict({"data": data})

    assert input_channels(config()) == 4  # a run folder from before data.context_slices
    assert input_channels(config(context_slices=0)) == 4
    assert input_channels(config(context_slices=2)) == 20
    with pytest.raises(ValueError, match="data.context_slices=-1"):
        input_channels(config(context_slices=-1))
    assert unet_config.get_config("tiny").data.context_slices == 0


def test_widen_root_kernel_layout():
    k4 = np.arange(2 * 2 * 4 * 3, dtype=np.float32).reshape(2, 2, 4, 3)
    wide = widen_root_kernel(k4, 1)
    assert wide.shape == (2, 2, 12, 3)
    np.testing.assert_allclose(wide[:, :, 4:8], k4 * np.sqrt(3), rtol=1e-6)
    mean = k4.mean(axis=(0, 1, 2))  # per output filter
    for side in (slice(0, 4), slice(8, 12)):
        np.testing.assert_allclose(
            wide[:, :, side], np.broadcast_to(mean * np.sqrt(3), (2, 2, 4, 3)), rtol=1e-6
        )


_INIT, _APPLY = jax.jit(TransUNet(preset="tiny").init), jax.jit(TransUNet(preset="tiny").apply)


@pytest.mark.parametrize(
    "root_conv",
    [
        "mean",
        pytest.param("repeat", marks=pytest.mark.slow),
        pytest.param("rgb_mean", marks=pytest.mark.slow),
    ],
)
def test_widened_pretrained_transunet_computes_the_2d_model(tmp_path, root_conv, vit_checkpoint):
    """With pretrained weights, the 12-channel model (k = 1) gives the 2D model's logits on
    the centre slice whatever the neighbour slices hold."""
    vit_checkpoint.write_npz(tmp_path / "vit.npz", **vit_checkpoint.TINY)
    size, rng = 32, np.random.default_rng(2)
    v2 = _INIT(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 4)))
    v6 = _INIT(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 12)))
    p2, _ = load_pretrained(v2, tmp_path / "vit.npz", root_conv=root_conv)
    p6, report = load_pretrained(v6, tmp_path / "vit.npz", root_conv=root_conv, context_slices=1)
    assert "widened to 3 slices" in report.loaded["conv_root/kernel"]
    # everything but the root kernel from the 2D model (the decoder is random init in both)
    p6 = {**p2, "params": {**p2["params"], "conv_root": p6["params"]["conv_root"]}}
    centre = rng.normal(size=(2, size, size, 4)).astype(np.float32)
    below, above = (rng.normal(0, 3, size=(2, size, size, 4)).astype(np.float32) for _ in "ab")
    want = np.asarray(_APPLY(p2, centre))
    got = np.asarray(_APPLY(p6, np.concatenate([below, centre, above], -1)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # plain zeros for the neighbours would not do: weight standardisation moves them off 0
    kernel = np.asarray(p6["params"]["conv_root"]["kernel"]).copy()
    kernel[:, :, :4] = kernel[:, :, 8:] = 0.0
    zeros = {**p6, "params": {**p6["params"], "conv_root": {"kernel": jnp.asarray(kernel)}}}
    other = np.asarray(_APPLY(zeros, np.concatenate([below, centre, above], -1)))
    assert np.abs(other - want).max() > 1e-2


# The predicted case's `write_nifti_case` arguments (its modalities drawn from t1 on).
CASE = {"shape": (40, 36, 5), "modalities": ("t1", "t1ce", "t2", "flair")}


@pytest.mark.slow
def test_train_and_predict_with_context(
    tmp_path, tiny_config, write_nifti_case, recompute_test_pass
):
    """configs/unet.py:tiny with data.context_slices = 1: trains, tests, predicts a case."""
    config = tiny_config(**{"data.context_slices": 1})
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(config, workdir)
    want = recompute_test_pass(workdir, tmp_path)  # the test pass sees 2.5D windows
    assert results["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6)
    _, _, variables = train_state.load_trained(workdir)
    kernels_in = {x.shape[2] for x in jax.tree.leaves(variables) if x.ndim == 4}
    assert 12 in kernels_in  # the first 3x3 conv sees 4 (2k+1) channels (base_features 4)
    case = write_nifti_case(tmp_path, "Brats18_X_1_1", **CASE)
    labels = case_prediction.predict_case(workdir, case, tmp_path / "seg.nii.gz")
    assert labels.shape == CASE["shape"]
    ens = ensembles.load_ensemble(str(workdir))
    assert ens.context_slices == (1,)


def _hand_stacked_k1(volume: np.ndarray) -> np.ndarray:
    """(H, W, D, 4) -> (H, W, D, 12): channels [4j, 4j+4) are slice clamp(z-1+j)'s."""
    d = volume.shape[2]
    below = volume[:, :, [max(z - 1, 0) for z in range(d)]]
    above = volume[:, :, [min(z + 1, d - 1) for z in range(d)]]
    return np.concatenate([below, volume, above], axis=-1)


def _modality_major(volume: np.ndarray) -> np.ndarray:
    """A wrong order (each modality's three slices together), to show the check can fail."""
    x = _hand_stacked_k1(volume).reshape(*volume.shape[:3], 3, 4)
    return np.swapaxes(x, -1, -2).reshape(*volume.shape[:3], 12)


@pytest.fixture(scope="module")
def context_run(tmp_path_factory, tiny_config):
    """A 2-step tiny run with k = 1 (no validation split); what its test pass saw."""
    config = tiny_config(**{"data.context_slices": 1, "data.val_fraction": 0.0,
                            "train.num_steps": 2, "train.checkpoint_every_steps": 2})  # fmt: skip
    workdir = tmp_path_factory.mktemp("context") / "run"
    seen = {"probs": [], "labels": []}
    predict_volume, evaluate_volume = whole_volume.predict_volume, metrics.evaluate_volume

    def record_probs(*args, **kwargs):
        seen["probs"].append(predict_volume(*args, **kwargs))
        return seen["probs"][-1]

    def record_labels(pred, label, **kwargs):
        seen["labels"].append(np.asarray(pred))
        return evaluate_volume(pred, label, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(whole_volume, "predict_volume", record_probs)
        mp.setattr(metrics, "evaluate_volume", record_labels)
        results = train.train_and_evaluate(config, workdir)
    return config, workdir, results, seen


def _plain_2d(workdir):
    """The run's model as a 2D predictor of 12-channel slices, and its variables."""
    config, model, variables = train_state.load_trained(workdir)
    fn = whole_volume.make_slice_predictor(
        model, image_size=config.data.image_size, output=outputs.of_config(config.model)
    )
    return fn, variables, config.eval.batch_size


def test_test_pass_is_the_argmax_of_hand_stacked_windows(context_run):
    config, workdir, results, seen = context_run
    case_ids = [r["case_id"] for r in results["per_case"]]
    assert case_ids and len(seen["probs"]) == len(seen["labels"]) == len(case_ids)
    fn, variables, batch = _plain_2d(workdir)
    source = make_source(config.data)
    for cid, probs, labels in zip(case_ids, seen["probs"], seen["labels"], strict=True):
        image, _ = load_volume(source, cid)
        want = whole_volume.predict_volume(fn, variables, _hand_stacked_k1(image), batch_size=batch)
        np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(labels, np.argmax(want, axis=-1))
        wrong = whole_volume.predict_volume(fn, variables, _modality_major(image), batch_size=batch)
        assert np.abs(wrong - want).max() > 1e-4  # the order matters to this model


def test_predict_is_the_argmax_of_hand_stacked_windows(context_run, tmp_path, write_nifti_case):
    _, workdir, _, _ = context_run
    case = write_nifti_case(tmp_path, "Brats18_X_1_1", **CASE)
    written = case_prediction.predict_case(
        workdir, case, tmp_path / "seg.nii.gz", probabilities=tmp_path / "p.nii.gz"
    )
    fn, variables, batch = _plain_2d(workdir)
    ens = ensembles.load_ensemble(str(workdir))
    loaded = brats.load_case(
        case,
        require_label=False,
        normalization=ensembles.input_normalization(ens.config.data.source),
    )
    image = loaded.image
    want = whole_volume.predict_volume(fn, variables, _hand_stacked_k1(image), batch_size=batch)
    probs = np.asarray(nib.load(str(tmp_path / "p.nii.gz")).dataobj)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    labels = np.argmax(want, axis=-1)
    np.testing.assert_array_equal(written, to_release_labels(labels, loaded.naming))
    saved = np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(saved, written)
