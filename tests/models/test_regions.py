"""Region outputs (`model.output="regions"`): targets, BCE + Dice loss, decoding to labels,
inference, the train/eval steps, training through `brats_jax.training.train` and prediction."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from brats_jax import config_fields, losses, metrics, models
from brats_jax.inference import case_prediction, ensembles, whole_volume
from brats_jax.models import outputs
from brats_jax.runs import train_state
from brats_jax.runs.train_state import TrainState, create_loss_params
from brats_jax.training import steps, train
from configs import unet as unet_config

# --------------------------------------------------------------------------------------------
# Targets and decoding
# --------------------------------------------------------------------------------------------


def test_region_targets_of_a_hand_made_label_map():
    labels = np.array([[[0, 1], [2, 3]]])  # (1, 2, 2)
    # WT = {1,2,3}, TC = {1,3}, ET = {3}, channels in that order
    expected = np.array([[[[0, 0, 0], [1, 1, 0]], [[1, 0, 0], [1, 1, 1]]]], np.float32)
    got = losses.region_targets(labels)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, expected)
    assert outputs.REGION_CHANNELS == ("WT", "TC", "ET") == tuple(metrics.REGIONS)


# (WT, TC, ET) probabilities -> expected label, written by hand
_DECODE_CASES = [
    ((0.1, 0.1, 0.1), 0),  # nothing
    ((0.9, 0.1, 0.1), 2),  # WT only: edema
    ((0.9, 0.8, 0.1), 1),  # WT and TC: necrosis / non-enhancing core
    ((0.9, 0.8, 0.7), 3),  # all three: enhancing tumour
    ((0.9, 0.2, 0.9), 2),  # ET > 0.5 but TC < 0.5: not ET (ET only inside TC) -> WT only
    ((0.2, 0.9, 0.1), 0),  # TC outside WT: dropped -> background
    ((0.2, 0.9, 0.9), 0),  # TC and ET outside WT: background
    ((0.4, 0.4, 0.9), 0),  # ET alone
    ((0.5, 0.9, 0.9), 0),  # exactly the threshold is not above it
]


@pytest.mark.parametrize("as_jax", [False, True])
def test_regions_to_labels_nests_et_in_tc_in_wt(as_jax):
    probs = np.array([[p for p, _ in _DECODE_CASES]], np.float32)  # (1, 9, 3)
    expected = np.array([[e for _, e in _DECODE_CASES]])
    x = jnp.asarray(probs) if as_jax else probs
    got = outputs.regions_to_labels(x)
    assert isinstance(got, jax.Array) == as_jax
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(
        np.asarray(outputs.labels_from_probabilities(x, "regions")), expected
    )
    jitted = jax.jit(lambda p: outputs.labels_from_probabilities(p, "regions"))
    np.testing.assert_array_equal(jitted(jnp.asarray(probs)), expected)


def test_labels_from_class_probabilities_is_the_argmax():
    probs = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.1, 0.2, 0.7]])
    np.testing.assert_array_equal(outputs.labels_from_probabilities(probs, "classes"), [2, 0, 3])


def test_unknown_output_kind_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"model.output 'masks': expected one of classes, regions"):
        outputs.of_config(ml_collections.ConfigDict({"output": "masks"}))
    assert outputs.of_config(ml_collections.ConfigDict({"name": "unet"})) == "classes"  # old runs


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_region_loss_closed_form_at_zero_logits():
    """Logits 0: p = 1/2 everywhere, so BCE = log 2 exactly. Labels (1, 2) = [NCR, ED]:
    WT g = [1, 1]: D = 2*1 / (1 + 2) = 2/3; TC g = [1, 0]: D = 2*0.5 / (1 + 1) = 1/2;
    ET g = [0, 0]: D = 0 / (1 + 0) = 0 (up to the 1e-5 smoothing)."""
    logits = jnp.zeros((1, 1, 2, 3))
    labels = jnp.array([[[1, 2]]])
    dice_term = ((1 - 2 / 3) + (1 - 1 / 2) + 1.0) / 3  # = 11/18
    got = losses.region_bce_dice_loss(logits, labels, bce_weight=0.3, dice_weight=0.7)
    assert float(got) == pytest.approx(0.3 * math.log(2) + 0.7 * dice_term, abs=1e-5)
    only_bce = losses.region_bce_dice_loss(logits, labels, bce_weight=1.0, dice_weight=0.0)
    assert float(only_bce) == pytest.approx(math.log(2), rel=1e-6)


def _numpy_region_loss(logits, labels, mask, bce_w, dice_w, smooth=1e-5):
    """Reference: BCE mean over counted pixels x 3 regions, batch soft Dice per region."""
    x = np.asarray(logits, np.float64)
    lut = np.array([[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float64)  # WT, TC, ET
    g = lut[labels]
    p = 1 / (1 + np.exp(-x))
    m = np.broadcast_to(mask, labels.shape)[..., None].astype(np.float64)
    bce = -(g * np.log(p) + (1 - g) * np.log(1 - p))
    bce = (bce * m).sum() / (m.sum() * 3)
    inter = (p * g * m).sum((0, 1, 2))
    dice = (2 * inter + smooth) / ((p * m).sum((0, 1, 2)) + (g * m).sum((0, 1, 2)) + smooth)
    return bce_w * bce + dice_w * np.mean(1 - dice)


def test_region_loss_matches_numpy_with_a_mask_over_a_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 5, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 5, 4))
    mask = rng.random((2, 5, 4)) > 0.3
    got = losses.region_bce_dice_loss(
        logits, labels, bce_weight=0.4, dice_weight=0.6, mask=jnp.asarray(mask)
    )
    ref = _numpy_region_loss(logits, labels, mask, 0.4, 0.6)
    assert float(got) == pytest.approx(ref, rel=1e-5)
    # batch Dice: one Dice per region over both samples, not the mean of per-sample Dice
    one = [
        _numpy_region_loss(logits[i, None], labels[i, None], mask[i, None], 0.0, 1.0)
        for i in range(2)
    ]
    per_sample = np.mean(one)
    batch = _numpy_region_loss(logits, labels, mask, 0.0, 1.0)
    assert abs(per_sample - batch) > 1e-4
    got_dice = losses.region_bce_dice_loss(
        logits, labels, bce_weight=0.0, dice_weight=1.0, mask=jnp.asarray(mask)
    )
    assert float(got_dice) == pytest.approx(batch, rel=1e-5)


def test_region_loss_gradient_is_finite_for_extreme_logits_and_empty_batches():
    labels = jnp.array([[[0, 1], [2, 3]]])
    grad = jax.grad(lambda x, m: losses.region_bce_dice_loss(x, labels, mask=m), argnums=0)
    for logits in (jnp.full((1, 2, 2, 3), 1e4), jnp.full((1, 2, 2, 3), -1e4)):
        for m in (None, jnp.zeros((1, 2, 2))):
            g = grad(logits, m)
            assert np.all(np.isfinite(np.asarray(g)))
    assert (
        float(
            losses.region_bce_dice_loss(jnp.zeros((1, 2, 2, 3)), labels, mask=jnp.zeros((1, 2, 2)))
        )
        == 0.0
    )
    with pytest.raises(ValueError, match=r"region logits must be .*\(3,\)"):
        losses.region_bce_dice_loss(jnp.zeros((1, 2, 2, 4)), labels)


def _train_config(**fields):
    c = ml_collections.ConfigDict(
        {
            "loss": "ce",
            "dice_weight": 0.25,
            "beta": 0.99,
            "gamma": 1.0,
            "class_counts": "batch_pixels",
        }
    )
    c.update(fields)
    return c


@pytest.mark.parametrize(
    "name,bce,dice", [("ce", 1.0, 0.0), ("dice", 0.0, 1.0), ("dice_ce", 0.75, 0.25)]
)
def test_train_loss_maps_onto_bce_and_dice_weights(name, bce, dice):
    counts = np.ones((3, 4), np.int64)
    p = create_loss_params(_train_config(loss=name), counts, "regions")
    assert float(p.ce_weight) == bce and float(p.dice_weight) == dice
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (2, 3, 3, 3)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 3, 3))
    ref = _numpy_region_loss(logits, labels, np.ones(labels.shape, bool), bce, dice)
    assert float(losses.region_combined_loss(logits, labels, p)) == pytest.approx(ref, rel=1e-5)
    # the train step reports ones as class weights: the region loss weighs no class
    np.testing.assert_array_equal(losses.effective_class_weights(labels, p), np.ones(4))


@pytest.mark.parametrize("name", ["cb_ce", "focal", "cb_focal"])
def test_class_balanced_and_focal_losses_have_no_region_form(name):
    with pytest.raises(ValueError, match=rf"train.loss '{name}' .*model.output 'regions'"):
        create_loss_params(_train_config(loss=name), np.ones((3, 4)), "regions")


def test_stacked_region_loss_params_vmap_over_runs():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, (2, 1, 4, 4, 3)).astype(np.float32)  # (K runs, B, H, W, 3)
    labels = rng.integers(0, 4, (2, 1, 4, 4))
    params = [losses.region_loss_params("ce"), losses.region_loss_params("dice_ce", 0.5)]
    got = jax.vmap(losses.region_combined_loss)(logits, labels, losses.stack_loss_params(params))
    for k, (bce, dice) in enumerate([(1.0, 0.0), (0.5, 0.5)]):
        ref = _numpy_region_loss(logits[k], labels[k], np.ones((1, 4, 4), bool), bce, dice)
        assert float(got[k]) == pytest.approx(ref, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Model, inference, steps
# --------------------------------------------------------------------------------------------


def test_from_config_builds_3_region_or_4_class_channels():
    saved = unet_config.get_config("tiny").to_dict()
    del saved["model"]["output"]  # a run folder written before the field existed: classes
    old = ml_collections.ConfigDict(saved["model"])
    regions = ml_collections.ConfigDict({**saved["model"], "output": "regions"})
    x = jnp.zeros((1, 32, 32, 4))
    for model_config, channels in ((old, 4), (regions, 3)):
        model = models.from_config(model_config)
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x, train=False))
        out = jax.eval_shape(lambda v, m=model: m.apply(v, x, train=False), variables)
        assert out.shape == (1, 32, 32, channels)
    with pytest.raises(ValueError, match="model.output 'both'"):
        models.from_config(ml_collections.ConfigDict({**saved["model"], "output": "both"}))


class _FirstThreeModel:
    """Stand-in model: region logits = the first 3 input channels times `scale`."""

    def apply(self, variables, x, train):
        return x[..., :3] * variables["scale"]


def test_slice_predictor_gives_sigmoid_probabilities_for_regions():
    rng = np.random.default_rng(3)
    images = rng.normal(0, 2, (2, 6, 5, 4)).astype(np.float32)
    predict_fn = whole_volume.make_slice_predictor(
        _FirstThreeModel(), image_size=0, output="regions"
    )
    got = np.asarray(predict_fn({"scale": 1.5}, images))
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-1.5 * images[..., :3])), rtol=1e-5)
    with pytest.raises(ValueError, match="model.output 'softmax'"):
        whole_volume.make_slice_predictor(_FirstThreeModel(), image_size=0, output="softmax")


class _RampModel:
    """Stand-in that depends on position: logits = the first C input channels times
    `scale` plus a ramp along x (rows) and y (columns), a different one per channel."""

    channels = 3

    def apply(self, variables, x, train):
        h, w = x.shape[1:3]
        ramp = ramp_logits(h, w, self.channels)
        return x[..., : self.channels] * variables["scale"] + jnp.asarray(ramp)[None]


def ramp_logits(h, w, channels):
    """(H, W, C) float32: 0.5 x - 0.25 y, times (1, -0.5, 2, 0.75)[c] (shared with predict)."""
    ramp = 0.5 * np.arange(h)[:, None] - 0.25 * np.arange(w)[None, :]
    return (ramp[..., None] * np.array([1.0, -0.5, 2.0, 0.75])[:channels]).astype(np.float32)


@pytest.mark.parametrize(
    "tta,views", [("flips", [(), (1,)]), ("flips_ud", [(), (1,), (2,), (1, 2)])]
)
def test_tta_is_the_mean_over_mirrored_back_views_for_regions(tta, views):
    """By hand in numpy: each view is the model on the mirrored slices, its sigmoid
    mirrored back; TTA is their mean, and it differs from the plain prediction because the
    stand-in is not mirror-symmetric."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, (3, 10, 6, 4)).astype(np.float32)
    ramp = ramp_logits(10, 6, 3)[None]
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    want = np.mean(
        [np.flip(sigmoid(np.flip(x, a)[..., :3] * 1.5 + ramp), a) for a in views], axis=0
    )
    plain_want = sigmoid(x[..., :3] * 1.5 + ramp)
    kw = dict(image_size=0, output="regions")
    plain = whole_volume.make_slice_predictor(_RampModel(), **kw)({"scale": 1.5}, x)
    got = whole_volume.make_slice_predictor(_RampModel(), tta=tta, **kw)({"scale": 1.5}, x)
    np.testing.assert_allclose(plain, plain_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(got) - plain_want).max() > 0.05


class _FixedLogitsModel:
    def __init__(self, logits):
        self.logits = jnp.asarray(logits)

    def apply(self, variables, x, train):
        return self.logits


def test_eval_step_scores_decoded_region_labels_and_the_region_loss():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (2, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 4, 4)).astype(np.int32)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params={},
        model_state={},
        opt_state=(),
        rng=jax.random.PRNGKey(0),
    )
    batch = {"image": jnp.zeros((2, 4, 4, 4)), "label": labels, "valid": np.array([True, False])}
    params = losses.region_loss_params("dice_ce", 0.5)
    out = steps.make_eval_step(_FixedLogitsModel(logits), "regions")(state, batch, params)
    # labels decoded by hand: logit > 0 <=> sigmoid > 0.5
    wt, tc, et = (logits[0, ..., r] > 0 for r in range(3))
    pred = np.where(wt & tc & et, 3, np.where(wt & tc, 1, np.where(wt, 2, 0)))
    cm = np.zeros((4, 4), np.int64)
    np.add.at(cm, (labels[0].ravel(), pred.ravel()), 1)  # only the valid slice counts
    np.testing.assert_array_equal(np.asarray(out.confusion.compute()), cm)
    ref = _numpy_region_loss(logits[:1], labels[:1], np.ones((1, 4, 4), bool), 0.5, 0.5)
    assert float(out.loss.compute()) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="model.output"):
        steps.make_eval_step(_FixedLogitsModel(logits), "labels")


# --------------------------------------------------------------------------------------------
# Training through brats_jax.training.train, prediction from the run folder
# --------------------------------------------------------------------------------------------

# The predicted case's `write_nifti_case` arguments (its modalities drawn from t1 on).
CASE = {"background_rows": 4, "modalities": ("t1", "t1ce", "t2", "flair")}


@pytest.fixture(scope="module")
def regions_run(tmp_path_factory, tiny_config):
    config = tiny_config(**{"model.output": "regions", "train.loss": "dice_ce"})
    workdir = tmp_path_factory.mktemp("regions_run")
    return workdir, train.train_and_evaluate(config, workdir)


def test_tiny_regions_run_trains_validates_and_tests(regions_run, tmp_path, recompute_test_pass):
    workdir, results = regions_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["steps"] == 6
    # the test pass scores labels decoded from the region sigmoids (recomputed in numpy)
    want = recompute_test_pass(workdir, tmp_path)
    assert saved["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6)
    assert set(saved["dice"]) == {"WT", "TC", "ET"} and len(saved["class_dice"]) == 4
    assert json.loads((workdir / "config.json").read_text())["model"]["output"] == "regions"
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val_paper_dice" in r]
    train_rows = [r for r in logged if "train_loss" in r]
    assert val and all(np.isfinite(r["val_loss"]) for r in val)
    assert train_rows and all(r["class_weight_0"] == 1.0 for r in train_rows)


def test_predict_from_a_regions_run_writes_decoded_labels(regions_run, tmp_path, write_nifti_case):
    workdir, _ = regions_run
    shape = (36, 32, 5)
    case = write_nifti_case(tmp_path, "Brats18_R_1_1", shape=shape, **CASE)
    out, probs_out = tmp_path / "seg.nii.gz", tmp_path / "probs.nii.gz"
    labels = case_prediction.predict_case(workdir, case, out, probabilities=probs_out)
    img = nib.load(str(out))
    assert img.shape == shape
    written = np.asarray(img.dataobj)
    np.testing.assert_array_equal(written, labels)
    assert set(np.unique(written).tolist()) <= {0, 1, 2, 4}
    prob_img = nib.load(str(probs_out))
    probs = np.asarray(prob_img.dataobj)
    assert probs.shape == (*shape, 3) and probs.min() >= 0 and probs.max() <= 1
    assert b"regions" in prob_img.header["descrip"].tobytes()
    # the labels are the written WT, TC, ET probabilities decoded by hand (ET 3 -> 4)
    wt, tc, et = (probs[..., r] > 0.5 for r in range(3))
    expected = np.where(wt & tc & et, 4, np.where(wt & tc, 1, np.where(wt, 2, 0)))
    np.testing.assert_array_equal(written, expected)


def _region_logits(model, variables, image):
    """(H, W, D, 3) logits of a (H, W, D, 4) volume at the model's size, slice by slice."""
    x = jnp.asarray(np.moveaxis(image, 2, 0))
    return np.moveaxis(np.asarray(model.apply(variables, x, train=False), np.float64), 0, 2)


def test_regions_test_pass_scores_the_tested_checkpoint(regions_run, tmp_path):
    """results.json's per-case scores, recomputed here from the tested checkpoint's logits:
    sigmoid, `outputs.regions_to_labels`, `metrics.evaluate_volume` per test case."""
    from brats_jax import data
    from brats_jax.training import run_group

    workdir, _ = regions_run
    saved = json.loads((workdir / "results.json").read_text())
    config, model, variables = train_state.load_trained(workdir, step=saved["tested_step"])
    run = run_group.build_run(config, tmp_path)
    assert [r["case_id"] for r in saved["per_case"]] == list(run.splits.cases["test"])
    for row, case_id in zip(saved["per_case"], run.splits.cases["test"], strict=True):
        image, label = data.load_volume(run.source, case_id)
        probs = 1 / (1 + np.exp(-_region_logits(model, variables, image)))
        want = metrics.evaluate_volume(outputs.regions_to_labels(probs), label)
        for key in ("dice_WT", "dice_TC", "dice_ET", "hd95_WT", "class_dice_1"):
            assert row[key] == pytest.approx(want[key], abs=1e-6), (case_id, key)


def test_predict_writes_the_sigmoid_of_the_region_logits(regions_run, tmp_path, write_nifti_case):
    """At the model's own size (no resizing) the written probabilities are the sigmoid of the
    logits of the case's normalised input, and the labels their nested decoding."""
    from brats_jax.data import brats

    workdir, _ = regions_run
    shape = (32, 32, 5)
    case = write_nifti_case(tmp_path, "Brats18_R_1_1", shape=shape, **CASE)
    labels = case_prediction.predict_case(
        workdir, case, tmp_path / "s.nii.gz", probabilities=tmp_path / "p.nii.gz"
    )
    config, model, variables = train_state.load_trained(workdir)
    image = brats.load_case(case, require_label=False, normalization="brain").image
    want = 1 / (1 + np.exp(-_region_logits(model, variables, image)))
    got = np.asarray(nib.load(str(tmp_path / "p.nii.gz")).dataobj)
    assert got.shape == (*shape, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    decoded = np.asarray(outputs.regions_to_labels(want))
    np.testing.assert_array_equal(labels, np.where(decoded == 3, 4, decoded))


class _StandIn:
    def apply(self, variables, x, train):
        return x[..., : variables["channels"]]


def test_ensemble_of_a_classes_and_a_regions_run_is_an_error(
    tmp_path, monkeypatch, stand_in_config
):
    table = {}

    def load_trained(workdir, step=None):
        output = table[str(workdir)]
        config = stand_in_config(**{"model.output": output})
        return config, _StandIn(), {"channels": outputs.num_channels(output)}

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    for name in ("c", "r"):
        (tmp_path / name).mkdir()
        table[str(tmp_path / name)] = {"c": "classes", "r": "regions"}[name]
    c, r = str(tmp_path / "c"), str(tmp_path / "r")
    with pytest.raises(ValueError, match=r"r: model.output 'regions' differs from .*c's 'classes'"):
        ensembles.load_ensemble(f"{c},{r}")
    assert len(ensembles.load_ensemble(f"{r},{r}").variables) == 2


# Tiny region runs of 2 steps, validated at the end.
REGIONS = {"model.output": "regions", "train.num_steps": 2, "train.eval_every_steps": 2}


def test_runs_with_different_model_outputs_are_not_trained_together(tmp_path, tiny_config):
    """Two configs equal but for model.output: refused, and the message names that field."""
    regions = tiny_config(**REGIONS)
    classes = tiny_config(**REGIONS | {"model.output": "classes"})
    assert [k for k, _, _ in config_fields.config_diff(classes.to_dict(), regions.to_dict())] == [
        "model.output"
    ]
    with pytest.raises(
        ValueError, match=r"must share .*; run 1 differs from run 0 in model\.output$"
    ):
        train.train_runs([classes, regions], [tmp_path / "a", tmp_path / "b"])


@pytest.mark.slow
def test_vmapped_region_runs_match_the_run_alone(tmp_path, tiny_config):
    """Two region runs with different losses in one vmapped program: the first one's
    training and validation losses equal those of the same run trained alone."""
    dice_ce = {"train.loss": "dice_ce", "train.seed": 1}
    configs = [tiny_config(**REGIONS), tiny_config(**REGIONS | dice_ce)]
    alone = train.train_and_evaluate(configs[0], tmp_path / "alone")
    group = train.train_runs(configs, [tmp_path / "g0", tmp_path / "g1"], mapping="vmap")

    def curve(workdir, key):
        rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows if key in r]

    for key in ("train_loss", "val_loss", "val_paper_dice"):
        a, g = curve(tmp_path / "alone", key), curve(tmp_path / "g0", key)
        assert len(a) == len(g) > 0
        np.testing.assert_allclose(a, g, rtol=2e-3, atol=2e-4, err_msg=key)
    assert group[0]["paper_dice"] == pytest.approx(alone["paper_dice"], abs=2e-3)
    assert curve(tmp_path / "g1", "train_loss") != curve(tmp_path / "g0", "train_loss")


def test_region_targets_then_decoding_round_trip():
    """Decoding the region masks of any label map gives the map back (the nesting holds)."""
    v = np.random.default_rng(1).integers(0, 4, (2, 6, 5))
    masks = np.asarray(losses.region_targets(v))
    np.testing.assert_array_equal(outputs.regions_to_labels(masks), v)
