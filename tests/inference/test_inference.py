"""Whole-volume inference: resizing as in training, batching, one compilation per shape."""

import numpy as np
import pytest

from brats_jax.data import resize_image
from brats_jax.inference import whole_volume


class _ScaleModel:
    """A stand-in model whose logits are its input times `variables["scale"]`."""

    def apply(self, variables, x, train):
        assert train is False
        return x * variables["scale"]


def _reference(images, scale, size):
    """numpy: resize like training (`resize_image`), softmax, resize back."""
    h, w = images.shape[1:3]
    logits = resize_image(images, size) * scale
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return resize_image(e / e.sum(-1, keepdims=True), (h, w))


@pytest.mark.parametrize("native,size", [((40, 36), 24), ((20, 20), 32), ((24, 24), 0)])
def test_slice_predictor_resizes_as_training_does(native, size):
    rng = np.random.default_rng(0)
    # a checkerboard-rich input: antialiasing (which training does not do) would change it
    images = rng.normal(0, 2, (3, *native, 4)).astype(np.float32)
    predict = whole_volume.make_slice_predictor(_ScaleModel(), image_size=size)
    got = np.asarray(predict({"scale": 1.5}, images))
    ref = _reference(images, 1.5, size or native)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_predict_volume_batches_pad_and_compile_once():
    rng = np.random.default_rng(1)
    predict = whole_volume.make_slice_predictor(_ScaleModel(), image_size=16)
    variables = {"scale": 1.0}
    for depth in (7, 3, 12):  # a new depth must not recompile: the batch size is fixed
        volume = rng.normal(size=(20, 18, depth, 4)).astype(np.float32)
        got = whole_volume.predict_volume(predict, variables, volume, batch_size=5)
        assert got.shape == (20, 18, depth, 4)
        ref = _reference(np.moveaxis(volume, 2, 0), 1.0, 16)
        np.testing.assert_allclose(got, np.moveaxis(ref, 0, 2), atol=2e-5)
    assert predict._cache_size() == 1
    with pytest.raises(ValueError, match="batch_size 0"):
        whole_volume.predict_volume(predict, variables, volume, batch_size=0)
    with pytest.raises(ValueError, match=r"\(H, W, D, 4\)"):
        whole_volume.predict_volume(predict, variables, volume[..., 0], batch_size=5)


class _RampModel:
    """Ignores its input: class-1 logits a*i + b*j at pixel (i, j), other logits 0."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def apply(self, variables, x, train):
        i = np.arange(x.shape[1])[:, None]
        j = np.arange(x.shape[2])[None, :]
        ramp = np.broadcast_to(self.a * i + self.b * j, x.shape[:3])
        zeros = np.zeros(x.shape[:3], np.float32)
        return np.stack([zeros, ramp, zeros, zeros], axis=-1).astype(np.float32) + 0 * x


@pytest.mark.parametrize("tta", ["flips", "flips_ud"])
def test_tta_equals_plain_for_a_mirror_symmetric_input_and_model(tta):
    """A pointwise model maps a mirror-symmetric input to a symmetric output: TTA changes
    nothing. On an asymmetric input it changes nothing either, but only if every mirrored
    prediction is mirrored back (averaging unmirrored ones would blur the two halves)."""
    rng = np.random.default_rng(2)
    half = rng.normal(0, 2, (3, 10, 6, 4)).astype(np.float32)
    sym = np.concatenate([half, half[:, ::-1]], axis=1)  # left-right symmetric
    if tta == "flips_ud":
        sym = np.concatenate([sym, sym[:, :, ::-1]], axis=2)  # up-down too
    plain = whole_volume.make_slice_predictor(_ScaleModel(), image_size=16)
    flipped = whole_volume.make_slice_predictor(_ScaleModel(), image_size=16, tta=tta)
    for images in (sym, rng.normal(0, 2, sym.shape).astype(np.float32)):
        np.testing.assert_allclose(
            flipped({"scale": 1.5}, images), plain({"scale": 1.5}, images), atol=1e-6
        )


@pytest.mark.parametrize("tta", ["none", "flips", "flips_ud"])
def test_tta_averages_the_mirrored_predictions_mirrored_back(tta):
    """By hand: the ramp model's class-1 probability at (i, j) is e^r / (e^r + 3) with
    r = a i + b j; a mirrored input gives the same ramp, which mirrored back reads at
    (H-1-i, j) (left-right) or (i, W-1-j) (up-down)."""
    h, w, a, b = 6, 5, 0.7, -0.4
    images = np.zeros((2, h, w, 4), np.float32)
    predict = whole_volume.make_slice_predictor(_RampModel(a, b), image_size=0, tta=tta)
    got = np.asarray(predict({}, images))[..., 1]

    def p1(i, j):
        r = a * i + b * j
        return np.exp(r) / (np.exp(r) + 3)

    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    views = {"none": [(i, j)], "flips": [(i, j), (h - 1 - i, j)]}
    views["flips_ud"] = views["flips"] + [(i, w - 1 - j), (h - 1 - i, w - 1 - j)]
    expected = np.mean([p1(ii, jj) for ii, jj in views[tta]], axis=0)
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-6)
    if tta != "none":  # without mirroring back, every view would read the plain ramp
        assert np.abs(got[0] - p1(i, j)).max() > 0.05


def test_tta_predict_volume_compiles_once():
    rng = np.random.default_rng(3)
    predict = whole_volume.make_slice_predictor(_ScaleModel(), image_size=16, tta="flips_ud")
    for depth in (7, 3, 12):
        volume = rng.normal(size=(20, 18, depth, 4)).astype(np.float32)
        got = whole_volume.predict_volume(predict, {"scale": 1.0}, volume, batch_size=5)
        ref = _reference(np.moveaxis(volume, 2, 0), 1.0, 16)
        np.testing.assert_allclose(got, np.moveaxis(ref, 0, 2), atol=2e-5)
    assert predict._cache_size() == 1
    with pytest.raises(ValueError, match="tta 'mirror'"):
        whole_volume.make_slice_predictor(_ScaleModel(), image_size=16, tta="mirror")
