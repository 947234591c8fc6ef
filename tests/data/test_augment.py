"""On-device augmentation (brats_jax/data/augment.py): spatial maps against numpy, intensity
transforms against their closed forms, randomness streams, the train step, predict."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import optax
import pytest
import scipy.ndimage

from brats_jax import config_fields, losses
from brats_jax.data import augment, brats
from brats_jax.data.augment import AugmentConfig
from brats_jax.data.common import DataError
from brats_jax.inference import case_lists, case_prediction, ensembles, whole_volume
from brats_jax.runs import train_state
from brats_jax.training import steps
from configs import default, unet

KEY = jax.random.PRNGKey(0)
# every transform on, strong ranges
STRONG = AugmentConfig(
    **{
        **{k: 1.0 for k in augment.OFF_FIELDS if k.endswith("_p")},
        "rotation_degrees": 180.0,
        "scale_min": 0.5,
        "scale_max": 1.6,
        "elastic_magnitude": 0.2,
        "blur_p_per_modality": 1.0,
        "lowres_p_per_modality": 1.0,
    }
)


def _sample(h=12, w=12, c=4, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(h, w, c)).astype(np.float32)
    label = rng.integers(0, 4, (h, w)).astype(np.int32)
    return image, label


def _aug(cfg, image, label, key=KEY):
    out = jax.jit(lambda k, i, l: augment.augment_batch(k, i, l, cfg))(
        key, jnp.asarray(image)[None], jnp.asarray(label)[None]
    )
    return np.asarray(out[0][0]), np.asarray(out[1][0])


def test_identity_at_zero_magnitude_is_bit_exact():
    image, label = _sample(16, 12)
    cfg = AugmentConfig(
        rotation_p=1, rotation_degrees=0, scale_p=1, scale_min=1, scale_max=1,
        brightness_p=1, brightness_min=1, brightness_max=1,
    )  # fmt: skip
    out_image, out_label = _aug(cfg, image, label)
    assert np.array_equal(out_image.view(np.uint32), image.view(np.uint32))
    assert np.array_equal(out_label, label)


def test_rotation_90_and_mirrors_equal_numpy():
    """+90 degrees is np.rot90(x, 1, axes=(0, 1)) (row axis towards the column axis)."""
    image = np.arange(5 * 5 * 4, dtype=np.float32).reshape(5, 5, 4)  # no symmetry
    label = (np.arange(25).reshape(5, 5) % 4).astype(np.int32)
    coords = augment.coordinate_map((5, 5), angle=np.pi / 2)
    got_image, got_label = augment.resample(jnp.asarray(image), jnp.asarray(label), coords)
    np.testing.assert_allclose(got_image, np.rot90(image, 1, axes=(0, 1)), atol=1e-4)
    assert np.array_equal(got_label, np.rot90(label, 1, axes=(0, 1)))
    for mirror, axes in (((True, False), 0), ((False, True), 1), ((True, True), (0, 1))):
        coords = augment.coordinate_map((5, 5), mirror=mirror)
        got_image, got_label = augment.resample(jnp.asarray(image), jnp.asarray(label), coords)
        assert np.array_equal(got_image, np.flip(image, axes))
        assert np.array_equal(got_label, np.flip(label, axes))
    # through the config: mirror_p = 1 flips both axes
    out_image, out_label = _aug(AugmentConfig(mirror_p=1), image, label)
    assert np.array_equal(out_image, np.flip(image, (0, 1)))
    assert np.array_equal(out_label, np.flip(label, (0, 1)))


@pytest.mark.parametrize(
    "degrees, scale, mirror",
    [(30.0, 1.3, (False, True)), (0.0, 0.75, (False, False)), (-115.0, 0.9, (True, False))],
)
def test_between_pixel_centres_images_are_bilinear_and_labels_nearest(degrees, scale, mirror):
    """A non-right angle / non-integer scale on a 12 x 10 slice: the image equals
    `scipy.ndimage.affine_transform(order=1)` at the same map (written here as a matrix:
    input = centre + scale R(angle) M (output - centre), R turning rows towards columns, M
    the mirrors), the labels its nearest source pixel (order=0) where that is unambiguous,
    one of the 2 x 2 source pixels around the point everywhere (never a blend), label 0
    and each channel's minimum outside the half-pixel border. (Random draws of these maps:
    test_augment_properties.py.)"""
    h, w = 12, 10
    image, label = _sample(h, w, seed=4)
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    matrix = scale * rot @ np.diag([-1.0 if m else 1.0 for m in mirror])
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - matrix @ centre
    coords = augment.coordinate_map((h, w), angle=np.float32(a), scale=scale, mirror=mirror)
    got_image, got_label = (np.asarray(x) for x in augment.resample(image, label, coords))
    # where each output pixel samples, by hand
    out = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(float)
    r, c = np.moveaxis(out @ matrix.T + offset, -1, 0)
    inside = (r >= -0.5) & (r <= h - 0.5) & (c >= -0.5) & (c <= w - 0.5)
    between = np.abs(r - np.rint(r)) > 0.05
    assert inside.mean() > 0.5 and between[inside].mean() > 0.5  # not at pixel centres
    for ch in range(4):
        want = scipy.ndimage.affine_transform(
            image[..., ch].astype(np.float64), matrix, offset, order=1, mode="nearest"
        )
        np.testing.assert_allclose(got_image[..., ch][inside], want[inside], atol=2e-5)
        assert np.all(got_image[..., ch][~inside] == image[..., ch].min())
    nearest = scipy.ndimage.affine_transform(label, matrix, offset, order=0, mode="nearest")
    sure = inside & (np.abs(r % 1 - 0.5) > 1e-3) & (np.abs(c % 1 - 0.5) > 1e-3)
    assert got_label.dtype == np.int32 and sure.mean() > 0.5
    np.testing.assert_array_equal(got_label[sure], nearest[sure])
    i0, j0 = np.floor(r).astype(int), np.floor(c).astype(int)
    around = np.stack([label[np.clip(i0 + di, 0, h - 1), np.clip(j0 + dj, 0, w - 1)]
                       for di in (0, 1) for dj in (0, 1)], -1)  # fmt: skip
    assert np.all((got_label[..., None] == around).any(-1)[inside])
    assert np.all(got_label[~inside] == 0)


@pytest.mark.slow
def test_outside_is_background_and_labels_stay_integers():
    image, label = _sample(16, 16, c=8)
    image[:, :, 3] += 5.0
    # zoom out by 2: the border ring comes from outside the image
    coords = augment.coordinate_map((16, 16), scale=2.0)
    out_image, out_label = augment.resample(jnp.asarray(image), jnp.asarray(label), coords)
    assert np.all(np.asarray(out_label)[0] == 0)
    edge = np.broadcast_to(image.min((0, 1)), (16, 8))
    np.testing.assert_array_equal(np.asarray(out_image)[0], edge)
    for seed in range(6):
        _, lab = _aug(STRONG, image, label, jax.random.PRNGKey(seed))
        assert lab.dtype == np.int32 and set(np.unique(lab)) <= {0, 1, 2, 3}


def test_crop_inside_the_brain_gets_its_slice_background_not_its_own_minimum():
    """A patch with no background pixel, zoomed out by 2: the ring from outside the patch is
    the `background` given (the whole slice's), not the patch's own minimum."""
    image = np.linspace(0.0, 1.0, 8 * 8 * 4, dtype=np.float32).reshape(8, 8, 4)  # all brain
    label = np.full((8, 8), 2, np.int32)
    background = np.array([-1.5, -2.0, -2.5, -3.0], np.float32)  # -mean/std of each modality
    zoom_out = AugmentConfig(scale_p=1, scale_min=2, scale_max=2)
    out = jax.jit(lambda i, l, b: augment.augment_batch(KEY, i, l, zoom_out, b))(
        jnp.asarray(image)[None], jnp.asarray(label)[None], jnp.asarray(background)[None]
    )
    ring = np.asarray(out[0][0])[0]  # row 0 samples row 3.5 - 2 x 3.5 = -3.5: outside
    np.testing.assert_array_equal(ring, np.broadcast_to(background, (8, 4)))
    assert np.all(np.asarray(out[1][0])[0] == 0)


class _Pointwise(nn.Module):
    """A 1x1 convolution: the loss sees every pixel the augmentation wrote."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(4, (1, 1))(x)


def test_train_step_fills_with_the_batch_background():
    model, tx = _Pointwise(), optax.sgd(0.1)
    state = train_state.init_state(model, tx, 0, image_size=8)
    image, label = _sample(8, 8, c=4)
    zoom_out = AugmentConfig(scale_p=1, scale_min=2, scale_max=2)
    step = jax.jit(steps.make_train_step(model, tx, augment_cfg=zoom_out))

    def loss(**extra):
        batch = {"image": jnp.asarray(image)[None], "label": jnp.asarray(label)[None], **extra}
        return float(step(state, batch, losses.loss_params("ce"))[1]["loss"])

    own_minimum = jnp.asarray(image.min((0, 1)))[None]
    assert loss() == loss(background=own_minimum)
    assert loss(background=own_minimum - 5.0) != loss()


def _constant(value=0.7, shape=(16, 16, 12)):
    return np.full(shape, value, np.float32), np.zeros(shape[:2], np.int32)


def test_brightness_and_contrast_closed_forms():
    image, label = _constant(0.7)
    cfg = AugmentConfig(brightness_p=1, brightness_min=1.2, brightness_max=1.2)
    out, _ = _aug(cfg, image, label)
    np.testing.assert_allclose(out, 0.7 * 1.2, rtol=1e-6)
    two = np.where(np.arange(16)[:, None, None] < 8, -1.0, 3.0) * np.ones((16, 16, 4))
    two = two.astype(np.float32)  # mean 1: (x - 1) * 0.5 + 1 -> 0 and 2
    out, _ = _aug(AugmentConfig(contrast_p=1, contrast_min=0.5, contrast_max=0.5), two, label)
    np.testing.assert_allclose(out, np.where(two < 0, 0.0, 2.0), atol=1e-6)
    out, _ = _aug(AugmentConfig(contrast_p=1, contrast_min=2, contrast_max=2), two, label)
    np.testing.assert_allclose(out, two, atol=1e-6)  # -3 and 5 clipped back to [-1, 3]


def _nnunet_gamma(x, g, invert):
    """batchgeneratorsv2 GammaTransform (retain_stats) on one channel, numpy float64."""
    x = -x if invert else x
    mean, std = x.mean(), x.std()
    lo, span = x.min(), x.max() - x.min()
    y = ((x - lo) / max(span, 1e-7)) ** g * span + lo
    y = (y - y.mean()) * (std / max(y.std(), 1e-7)) + mean
    return -y if invert else y


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_matches_nnunet_formula(invert):
    ramp = np.linspace(-2, 3, 16 * 16 * 4).reshape(16, 16, 4).astype(np.float32)
    ramp[..., 1] = ramp[..., 1] ** 2  # channels differ
    field = "gamma_inverted_p" if invert else "gamma_p"
    cfg = AugmentConfig(**{field: 1.0, "gamma_min": 1.4, "gamma_max": 1.4})
    out, _ = _aug(cfg, ramp, np.zeros((16, 16), np.int32))
    for m in range(4):
        want = _nnunet_gamma(ramp[..., m].astype(np.float64), 1.4, invert)
        np.testing.assert_allclose(out[..., m], want, atol=2e-5)
    assert not np.allclose(out, ramp, atol=1e-3)


def test_noise_variance_blur_and_low_resolution_of_constant():
    image, label = _constant(0.3, (64, 64, 4))
    cfg = AugmentConfig(noise_p=1, noise_std_min=0.2, noise_std_max=0.2)
    out, _ = _aug(cfg, image, label)
    assert abs(out.mean() - 0.3) < 0.01  # se 0.2 / 128
    assert abs(out.var() / 0.04 - 1) < 0.05  # se of the variance ratio ~ sqrt(2 / 16384)
    for cfg in (
        AugmentConfig(blur_p=1, blur_p_per_modality=1, blur_sigma_min=1.0, blur_sigma_max=1.0),
        AugmentConfig(
            lowres_p=1, lowres_p_per_modality=1, lowres_scale_min=0.5, lowres_scale_max=0.5
        ),  # fmt: skip
    ):
        out, _ = _aug(cfg, image, label)
        np.testing.assert_allclose(out, 0.3, rtol=1e-6)
        ramp = np.broadcast_to(np.arange(64, dtype=np.float32)[:, None, None], (64, 64, 4))
        changed, _ = _aug(cfg, np.ascontiguousarray(ramp**2), label)
        assert not np.allclose(changed, ramp**2)  # ... but they do act on a non-constant


def test_low_resolution_half_is_nearest_then_bilinear():
    """scale 0.5 on a length-4 axis: nearest-exact keeps x[1], x[3]; bilinear (half-pixel
    centres, torch's) back to 4 gives x1, 0.75 x1 + 0.25 x3, 0.25 x1 + 0.75 x3, x3."""
    x = np.array([0.0, 1.0, 5.0, 9.0], np.float32)
    xm = jnp.asarray(np.broadcast_to(x[:, None, None, None], (4, 1, 1, 4)))
    got = np.asarray(augment._lowres_axis(xm, jnp.full((4,), 0.5), 0))[:, 0, 0, 0]
    np.testing.assert_allclose(got, [1.0, 3.0, 7.0, 9.0], rtol=1e-6)


def test_same_key_same_draws_other_key_other_draws():
    image, label = _sample(16, 16, c=4)
    a = _aug(STRONG, image, label, jax.random.PRNGKey(3))
    b = _aug(STRONG, image, label, jax.random.PRNGKey(3))
    c = _aug(STRONG, image, label, jax.random.PRNGKey(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


def test_context_slices_transformed_alike():
    """2.5D: equal context slices stay equal (noise is per pixel, so it is left out)."""
    one, label = _sample(16, 16, c=4)
    image = np.concatenate([one] * 3, axis=-1)  # k = 1: slices z-1, z, z+1
    cfg = dataclasses.replace(STRONG, noise_p=0.0, modality_dropout_p=0.5)
    for seed in range(3):
        out, _ = _aug(cfg, image, label, jax.random.PRNGKey(seed))
        assert not np.allclose(out[..., :4], one)
        for j in (1, 2):
            np.testing.assert_allclose(out[..., 4 * j : 4 * j + 4], out[..., :4], atol=1e-5)


def test_modality_dropout_zeroes_one_modality_in_every_slice():
    rng = np.random.default_rng(0)
    image = (rng.random((8, 8, 12)) + 1).astype(np.float32)  # no zeros
    seen = set()
    for seed in range(12):
        out, _ = _aug(AugmentConfig(modality_dropout_p=1), image, np.zeros((8, 8), np.int32),
                      jax.random.PRNGKey(seed))  # fmt: skip
        zero = [m for m in range(4) if np.all(out[..., m::4] == 0)]
        assert len(zero) == 1
        keep = [c for c in range(12) if c % 4 != zero[0]]
        assert np.array_equal(out[..., keep], image[..., keep])
        seen.add(zero[0])
    assert len(seen) > 1


def _tiny_step_parts(size=16):
    config = unet.get_config("tiny")
    model = train_state.create_model(config)
    tx = train_state.create_optimizer(config.train, 10)
    state = train_state.init_state(model, tx, 0, image_size=size)
    image, label = _sample(size, size, c=4)
    batch = {"image": jnp.asarray(np.stack([image, image[::-1]])),
             "label": jnp.asarray(np.stack([label, label[:, ::-1]]))}  # fmt: skip
    return model, tx, state, batch, losses.loss_params("ce")


@pytest.mark.slow
def test_train_step_without_augmentation_is_todays_step():
    """Reference: the step as it was (dropout key fold_in(rng, step), no augmentation)."""
    model, tx, state, batch, loss_params = _tiny_step_parts()

    def reference(state, batch, loss_params):  # arguments, not constants, as in the step
        def loss_of(params):
            logits, _ = model.apply(
                {"params": params, **state.model_state}, batch["image"], train=True,
                rngs={"dropout": jax.random.fold_in(state.rng, state.step)},
                mutable=list(state.model_state.keys()),
            )  # fmt: skip
            return losses.combined_loss(logits, batch["label"], loss_params)

        grads = jax.grad(loss_of)(state.params)
        updates, _ = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates)

    want = jax.jit(reference)(state, batch, loss_params)  # eager op-by-op rounds differently
    identity = AugmentConfig(rotation_p=1, rotation_degrees=0, scale_p=1, scale_min=1, scale_max=1)
    for cfg in (None, AugmentConfig(), identity):
        step = jax.jit(steps.make_train_step(model, tx, augment_cfg=cfg))
        new, _ = step(state, batch, loss_params)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want), strict=True):
            assert np.array_equal(a, b)


@pytest.mark.slow
def test_grouped_runs_draw_their_own_augmentation():
    model, tx, state, batch, loss_params = _tiny_step_parts()
    other = state.replace(rng=jax.random.PRNGKey(7))
    stacked_batch = steps.stack_trees([batch, batch])
    stacked_params = steps.stack_trees([loss_params, loss_params])
    cheap = AugmentConfig(mirror_p=0.5, brightness_p=1.0)  # one compile for both pairs

    def stepper(cfg):
        step = steps.make_train_step(model, tx, augment_cfg=cfg)
        return jax.jit(steps.map_over_runs(step, "vmap"))

    def losses_of(step, states):
        _, out = step(steps.stack_trees(states), stacked_batch, stacked_params)
        return np.asarray(out["loss"])

    step = stepper(cheap)
    aug = losses_of(step, [state, other])
    assert aug[0] != aug[1]
    same = losses_of(step, [state, state])
    assert same[0] == same[1]
    off = losses_of(stepper(None), [state, other])
    assert off[0] == off[1]  # the tiny U-Net has no dropout: only augmentation differs


def test_config_fields_defaults_and_errors():
    c = default.base_config()
    assert dict(c.augment) == augment.OFF_FIELDS
    assert not augment.from_config(c).enabled and augment.from_config({}) == AugmentConfig()
    assert set(augment.NNUNET_2D) == set(augment.OFF_FIELDS)
    old = config_fields.upgrade_legacy({"model": {"name": "unet"}})
    assert old["augment"] == augment.OFF_FIELDS  # runs from before the section: all off
    for field, value, words in (
        ("rotation_p", 1.5, "augment.rotation_p=1.5; expected a probability"),
        ("scale_min", 2.0, "augment.scale_min=2.0 > augment.scale_max=1.4"),
        ("bogus", 1, "augment.bogus: unknown field"),
    ):
        cfg = ml_collections.ConfigDict({"augment": {field: value}})
        with pytest.raises(ValueError, match=words.replace("(", r"\(")) as err:
            augment.from_config(cfg)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------
# predict with a modality file missing


class _ScaleModel:
    def apply(self, variables, x, train):
        return x * variables["scale"]


@pytest.fixture
def stand_in_runs(tmp_path, monkeypatch, stand_in_config):
    """Run folders with a config.json; `load_trained` serves a pointwise stand-in model
    (logits = input), so the class probabilities show the channels the model was given."""

    def load_trained(workdir, step=None):
        saved = json.loads((tmp_path / workdir / "config.json").read_text())
        return ml_collections.ConfigDict(saved), _ScaleModel(), {"scale": np.float32(1)}

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    monkeypatch.setattr(whole_volume, "make_slice_predictor", whole_volume.make_slice_predictor)

    def add(name, dropout):
        run = tmp_path / name
        run.mkdir()
        config = stand_in_config(**{"data.image_size": 12, "augment.modality_dropout_p": dropout})
        (run / "config.json").write_text(json.dumps(config.to_dict()))
        return str(run)

    return add


def test_predict_missing_modality_only_after_modality_dropout(
    stand_in_runs, tmp_path, caplog, write_nifti_case
):
    case = write_nifti_case(  # 12 x 12 = image_size: no resizing
        tmp_path / "data", "Brats18_X_1", shape=(12, 12, 4), background_rows=2,
        modalities=("flair", "t1", "t2"),
    )  # fmt: skip
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(DataError, match=r"missing modality file\(s\) \['t1ce'\]") as err:
        case_prediction.predict_case(stand_in_runs("plain", 0.0), case, out)
    assert "\n" not in str(err.value) and "Brats18_X_1_t1ce.nii[.gz]" in str(err.value)
    with pytest.raises(DataError, match="t1ce"):
        case_lists.cases_from_input(str(case.parent), False)

    run = stand_in_runs("dropout", 0.2)
    assert ensembles.trained_with_modality_dropout(ensembles.saved_configs(run))
    assert [c.paths["t1ce"] for c in case_lists.cases_from_input(str(case.parent), True)] == [None]
    probs_out = tmp_path / "probs.nii.gz"
    case_prediction.predict_case(run, case, out, probabilities=probs_out, postprocessing="none")
    assert any("no t1ce file" in r.getMessage() for r in caplog.records)
    data = brats.load_case(case, allow_missing=True)
    assert np.all(data.image[..., 2] == 0)  # the missing modality is 0 (as trained)
    # the stand-in's logits are its input: probabilities = softmax(flair, t1, 0, t2)
    want = np.asarray(jax.nn.softmax(jnp.asarray(data.image), axis=-1))
    np.testing.assert_allclose(np.asarray(nib.load(str(probs_out)).dataobj), want, atol=1e-5)
