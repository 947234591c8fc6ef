"""Output kinds (`models/outputs.py`): channel counts, probabilities and label decoding checked
against hand-made tables and numpy's softmax/sigmoid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax.models import outputs

# (WT, TC, ET) probabilities -> label, at threshold 0.5 (strictly above counts)
TABLE = [
    ((0.9, 0.9, 0.9), 3),  # ET inside TC inside WT
    ((0.9, 0.9, 0.1), 1),  # TC but not ET: NCR/NET
    ((0.9, 0.1, 0.1), 2),  # WT only: edema
    ((0.1, 0.1, 0.1), 0),
    ((0.1, 0.9, 0.9), 0),  # TC/ET outside WT are dropped
    ((0.9, 0.1, 0.9), 2),  # ET outside TC is dropped
    ((0.5, 0.9, 0.9), 0),  # exactly at the threshold: not predicted
    ((0.9, 0.5, 0.9), 2),
    ((0.9, 0.9, 0.5), 1),
]


def test_check_output_and_channels():
    assert outputs.check_output("regions") == "regions"
    assert outputs.num_channels("classes") == 4 and outputs.num_channels("regions") == 3
    with pytest.raises(ValueError) as err:
        outputs.num_channels("logits")
    assert str(err.value) == "model.output 'logits': expected one of classes, regions"


def test_of_config_defaults_to_classes_for_old_runs():
    assert outputs.of_config({}) == "classes"
    assert outputs.of_config({"output": "regions"}) == "regions"
    with pytest.raises(ValueError, match="model.output 'x'"):
        outputs.of_config({"output": "x"})


def test_probabilities_are_float32_softmax_or_sigmoid():
    logits = np.array([[2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, -4.0]], np.float32)
    ex = np.exp(logits - logits.max(-1, keepdims=True))
    soft = outputs.probabilities(jnp.asarray(logits, jnp.bfloat16), "classes")
    assert soft.dtype == jnp.float32
    np.testing.assert_allclose(soft, ex / ex.sum(-1, keepdims=True), atol=2e-2)
    np.testing.assert_allclose(
        outputs.probabilities(logits, "classes"), ex / ex.sum(-1, keepdims=True), rtol=1e-5
    )
    # (B, H, W, C) logits: the softmax runs over the last axis only
    cube = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) % 5 - 2.0
    e = np.exp(cube)
    np.testing.assert_allclose(
        outputs.probabilities(cube, "classes"), e / e.sum(-1, keepdims=True), rtol=1e-5
    )
    sig = outputs.probabilities(logits[:, :3], "regions")
    assert sig.dtype == jnp.float32
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-logits[:, :3])), rtol=1e-5)


def test_regions_to_labels_table_numpy_and_jax():
    probs = np.array([p for p, _ in TABLE], np.float32)
    want = np.array([lab for _, lab in TABLE])
    got = outputs.regions_to_labels(probs)
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    got_jax = outputs.regions_to_labels(jnp.asarray(probs))
    assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_jax), want)


def test_regions_to_labels_threshold_is_used():
    probs = np.array([[0.4, 0.35, 0.2], [0.4, 0.2, 0.35], [0.25, 0.1, 0.1]], np.float32)
    np.testing.assert_array_equal(outputs.regions_to_labels(probs, threshold=0.3), [1, 2, 0])
    np.testing.assert_array_equal(outputs.regions_to_labels(probs), [0, 0, 0])


def test_regions_to_labels_rejects_other_channel_counts():
    with pytest.raises(ValueError) as err:
        outputs.regions_to_labels(np.zeros((2, 4)))
    assert str(err.value) == "region probabilities must be (..., 3) WT, TC, ET; got (2, 4)"


def test_labels_from_probabilities_of_both_kinds():
    classes = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]])
    got = outputs.labels_from_probabilities(classes, "classes")
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, [2, 0, 3])
    got_jax = outputs.labels_from_probabilities(jnp.asarray(classes), "classes")
    assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_jax), [2, 0, 3])
    regions = np.array([p for p, _ in TABLE], np.float32)
    np.testing.assert_array_equal(
        outputs.labels_from_probabilities(regions, "regions"), [lab for _, lab in TABLE]
    )
    with pytest.raises(ValueError, match="model.output"):
        outputs.labels_from_probabilities(classes, "class")
