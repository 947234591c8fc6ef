"""Sliding-window inference (`eval.sliding_window`): window offsets, Gaussian tile weights,
the weighted average of overlapping tiles, and the config and `predict` plumbing.

Expected values come from nnU-Net's recipe written independently (offsets by its
`compute_steps_for_sliding_window` formula, worked by hand; weights as its
`compute_gaussian`: a delta filtered by `scipy.ndimage.gaussian_filter`) and from
hand-computed averages of a stand-in model whose output depends on the tile it sees.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from brats_jax import config_fields
from brats_jax.data.common import DataError
from brats_jax.data.patches import inference_window
from brats_jax.inference import ensembles, whole_volume
from brats_jax.models.unet import UNet
from brats_jax.runs import train_state


class _TileMeanModel:
    """Stand-in: every pixel of an input gets logits (mean of that input, 0, 0, 0), so a pixel's
    output says which tile it was seen through."""

    def apply(self, variables, x, train):
        m = x.mean(axis=(1, 2, 3))[:, None, None]
        return jnp.stack([m + 0 * x[..., 0], *(jnp.zeros(x.shape[:3]),) * 3], -1)


def _p0(m):
    """Class-0 softmax probability of logits (m, 0, 0, 0)."""
    return np.exp(m) / (np.exp(m) + 3)


@pytest.mark.parametrize(
    "size, window, starts",
    [
        (240, 128, [0, 56, 112]),  # ceil(112 / 64) + 1 = 3 windows, step 112 / 2
        (12, 8, [0, 4]),
        (16, 8, [0, 4, 8]),
        (160, 64, [0, 32, 64, 96]),
        (100, 64, [0, 18, 36]),  # ceil(36 / 32) + 1 = 3, step 18
        (128, 128, [0]),
    ],
)
def test_window_starts_are_nnunets_half_overlapping_steps(size, window, starts):
    assert whole_volume.window_starts(size, window) == starts


@pytest.mark.parametrize("size, window", [(8, 12), (8, 0)])
def test_a_window_larger_than_the_slice_or_empty_is_an_error(size, window):
    with pytest.raises(ValueError, match=f"sliding window of {window} px over {size} px"):
        whole_volume.window_starts(size, window)


@pytest.mark.parametrize("window", [9, 17])
def test_gaussian_weights_equal_nnunets_filtered_delta(window):
    delta = np.zeros((window, window))
    delta[window // 2, window // 2] = 1
    peer = ndimage.gaussian_filter(delta, window / 8, mode="constant", cval=0)
    np.testing.assert_allclose(whole_volume.gaussian_weights(window), peer / peer.max(), rtol=1e-5)


def test_overlapping_tiles_average_with_gaussian_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 12, 12, 4)).astype(np.float32)
    predict_fn = whole_volume.make_slice_predictor(_TileMeanModel(), image_size=0, window=8)
    got = np.asarray(predict_fn({}, jnp.asarray(x)))[0, ..., 0]
    # tiles at rows/columns {0, 4} x {0, 4}; m[a, b] = mean of the tile at (4a, 4b)
    m = np.array([[x[0, 4 * a : 4 * a + 8, 4 * b : 4 * b + 8].mean() for b in (0, 1)]
                  for a in (0, 1)])  # fmt: skip
    np.testing.assert_allclose(got[0, 0], _p0(m[0, 0]), rtol=1e-5)  # only tile (0, 0)
    np.testing.assert_allclose(got[10, 2], _p0(m[1, 0]), rtol=1e-5)  # only tile (4, 0)
    # pixel 5 is at 5 in a tile at 0 and at 1 in a tile at 4; sigma = 1 about the centre 3.5
    w = {0: np.exp(-(1.5**2) / 2), 1: np.exp(-(2.5**2) / 2)}
    num = sum(w[a] * w[b] * _p0(m[a, b]) for a in (0, 1) for b in (0, 1))
    den = sum(w[a] * w[b] for a in (0, 1) for b in (0, 1))
    np.testing.assert_allclose(got[5, 5], num / den, rtol=1e-5)


def test_a_window_the_size_of_the_slice_is_whole_slice_inference():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 4)), jnp.float32)
    model = UNet(features=2, depth=2)
    variables = model.init(jax.random.PRNGKey(0), x)
    for tta in ("none", "flips"):
        whole = whole_volume.make_slice_predictor(model, image_size=0, tta=tta)
        one_tile = whole_volume.make_slice_predictor(model, image_size=0, tta=tta, window=16)
        np.testing.assert_allclose(one_tile(variables, x), whole(variables, x), atol=1e-6)


def test_inference_window_is_the_patch_size_when_sliding(tiny_config):
    sliding = tiny_config(**{"data.patch_size": 64, "eval.sliding_window": True})
    whole = tiny_config(**{"data.patch_size": 64, "eval.sliding_window": False})
    assert inference_window(sliding) == 64
    assert inference_window(whole) == 0
    assert inference_window(whole, sliding_window=True) == 64
    assert inference_window(sliding, sliding_window=False) == 0
    no_patches = tiny_config(**{"data.patch_size": 0, "eval.sliding_window": True})
    with pytest.raises(DataError, match=r"eval.sliding_window=True needs data.patch_size > 0"):
        inference_window(no_patches)


def test_predict_slides_the_runs_patch_when_asked(tmp_path, monkeypatch):
    """`load_ensemble`'s predictor follows eval.sliding_window (auto) or the override."""
    run = tmp_path / "run"
    run.mkdir()
    saved = {"data": {"image_size": 12, "patch_size": 8, "source": "nifti"},
             "model": {"name": "unet", "depth": 2}, "eval": {"sliding_window": True}}  # fmt: skip
    (run / "config.json").write_text(json.dumps(saved))

    def load_trained(workdir, step=None):
        config = json.loads((run / "config.json").read_text())
        return ml_collections.ConfigDict(config_fields.upgrade_legacy(config)), _TileMeanModel(), {}

    monkeypatch.setattr(train_state, "load_trained", load_trained)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 12, 12, 4)), jnp.float32)
    whole = np.asarray(whole_volume.make_slice_predictor(_TileMeanModel(), image_size=12)({}, x))
    tiled = np.asarray(
        whole_volume.make_slice_predictor(_TileMeanModel(), image_size=12, window=8)({}, x)
    )
    assert np.abs(tiled - whole).max() > 1e-3  # the stand-in tells the two apart
    for option, want in ((None, tiled), (True, tiled), (False, whole)):
        ens = ensembles.load_ensemble(str(run), sliding_window=option)
        np.testing.assert_allclose(ens.predictors[0]({}, x), want, rtol=1e-6)


def test_a_run_asking_for_sliding_windows_without_patches_stops_before_training(tiny_config):
    from brats_jax.training import run_group

    patches = tiny_config(**{"data.patch_size": 16, "eval.sliding_window": True})
    run_group._check_config(patches)  # fine
    no_patches = tiny_config(**{"data.patch_size": 0, "eval.sliding_window": True})
    with pytest.raises(DataError, match="eval.sliding_window=True needs data.patch_size > 0"):
        run_group._check_config(no_patches)
