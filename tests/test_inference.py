"""Whole-volume inference: resizing as in training, batching, one compilation per shape."""

import numpy as np
import pytest

from brats_jax import inference
from brats_jax.data import resize_image


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
    predict = inference.make_slice_predictor(_ScaleModel(), image_size=size)
    got = np.asarray(predict({"scale": 1.5}, images))
    ref = _reference(images, 1.5, size or native)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_predict_volume_batches_pad_and_compile_once():
    rng = np.random.default_rng(1)
    predict = inference.make_slice_predictor(_ScaleModel(), image_size=16)
    variables = {"scale": 1.0}
    for depth in (7, 3, 12):  # a new depth must not recompile: the batch size is fixed
        volume = rng.normal(size=(20, 18, depth, 4)).astype(np.float32)
        got = inference.predict_volume(predict, variables, volume, batch_size=5)
        assert got.shape == (20, 18, depth, 4)
        ref = _reference(np.moveaxis(volume, 2, 0), 1.0, 16)
        np.testing.assert_allclose(got, np.moveaxis(ref, 0, 2), atol=2e-5)
    assert predict._cache_size() == 1
    with pytest.raises(ValueError, match="batch_size 0"):
        inference.predict_volume(predict, variables, volume, batch_size=0)
    with pytest.raises(ValueError, match=r"\(H, W, D, 4\)"):
        inference.predict_volume(predict, variables, volume[..., 0], batch_size=5)
