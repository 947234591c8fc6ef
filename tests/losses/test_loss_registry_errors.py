"""Bad loss arguments are one-line errors naming the argument and what was expected (the
registry's `_resolve`, `loss_params`, the core checks and the class-balanced weights)."""

import jax.numpy as jnp
import numpy as np
import pytest

from brats_jax import losses as L

X = jnp.zeros((1, 2, 2, 4))
Y = jnp.zeros((1, 2, 2), jnp.int32)


def _message(fn, *args, **kw):
    with pytest.raises(ValueError) as err:
        fn(*args, **kw)
    return str(err.value)


def test_registry_errors_exact_messages():
    assert _message(L.get_loss, "bce") == (
        "unknown loss 'bce'; valid names: ce, cb_ce, focal, cb_focal, dice, dice_ce"
    )
    assert _message(L.get_loss, "ce", gamma=2.0, beta=0.5) == (
        "unknown parameter(s) ['beta', 'gamma'] for loss 'ce'; valid: ['normalize']"
    )
    assert _message(L.get_loss, "cb_ce", beta=0.9, class_counts=[1, 2], class_weights=[1, 1]) == (
        "loss 'cb_ce': give either class_weights or (beta and class_counts), not both"
    )
    assert _message(L.get_loss, "cb_focal", class_counts=[1, 2]) == (
        "loss 'cb_focal' needs beta and class_counts (C,) or 'batch_pixels' (or class_weights); "
        "got beta=None, class_counts=[1, 2]"
    )
    assert _message(L.get_loss, "cb_ce", beta=0.9, class_counts="batch") == (
        "loss 'cb_ce': class_counts must be (C,) counts or 'batch_pixels'; got 'batch'"
    )
    assert _message(L.get_loss, "cb_ce", class_weights=[[1.0, 2.0]]) == (
        "loss 'cb_ce': class_weights must be 1-D (C,); got (1, 2)"
    )
    assert _message(L.get_loss, "focal", gamma=-0.5) == (
        "loss 'focal': gamma must be >= 0; got -0.5"
    )
    assert _message(L.get_loss, "cb_ce", beta=1.0, class_counts="batch_pixels") == (
        "beta must be in [0, 1); got 1.0"
    )
    assert _message(L.get_loss, "ce", normalize="mean") == (
        "normalize must be one of ('pixels', 'weights'); got 'mean'"
    )


def test_none_counts_as_not_given_and_gamma_zero_is_allowed():
    fn = L.get_loss("focal", gamma=0.0, normalize=None)  # None: the default "pixels"
    x = jnp.array([[[[2.0, 0.0, -1.0, 0.5]]]])
    y = jnp.array([[[0]]])
    np.testing.assert_allclose(fn(x, y), L.cross_entropy(x, y), rtol=1e-6)
    p = L.loss_params("cb_focal", beta=0.9, class_counts=[9, 1, 0, 90], normalize="weights")
    np.testing.assert_allclose(p.class_weights, L.class_balanced_weights([9, 1, 0, 90], 0.9))
    assert float(p.ce_by_weights) == 1.0 and float(p.gamma) == 1.0


def test_loss_params_and_stack_errors():
    assert _message(L.loss_params, "cb_ce", num_classes=4, class_weights=[1.0, 2.0, 3.0]) == (
        "loss 'cb_ce': class_weights has 3 entries, expected 4"
    )
    assert _message(L.stack_loss_params, []) == "stack_loss_params needs at least one LossParams"


def test_core_argument_errors():
    assert _message(L.cross_entropy, jnp.zeros((4,)), jnp.zeros((), jnp.int32)) == (
        "logits must be (B, H, W, C); got shape (4,)"
    )
    assert _message(L.cross_entropy, X, jnp.zeros((1, 2, 3), jnp.int32)) == (
        "labels shape (1, 2, 3) must equal logits shape without the class axis (1, 2, 2)"
    )
    assert _message(L.cross_entropy, X, jnp.zeros((1, 2, 2))) == (
        "labels must be an integer array; got dtype float32"
    )
    assert _message(L.cross_entropy, X, Y, class_weights=jnp.ones(3)) == (
        "class_weights must have shape (4,) to match the logits' class axis; got (3,)"
    )
    assert _message(L.focal_loss, X, Y, normalize="sum") == (
        "normalize must be one of ('pixels', 'weights'); got 'sum'"
    )
    assert _message(L.dice_loss, jnp.zeros((1, 2, 2, 1)), Y, include_background=False) == (
        "include_background=False needs at least 2 classes"
    )
    # two classes are enough to leave the background out
    assert np.isfinite(float(L.dice_loss(jnp.zeros((1, 2, 2, 2)), Y, include_background=False)))


@pytest.mark.parametrize("beta", [float("nan"), -1e-9, 1.0])
def test_beta_outside_zero_one_is_an_error(beta):
    assert (
        _message(L.class_balanced_weights, [1, 2], beta) == f"beta must be in [0, 1); got {beta!r}"
    )


def test_class_balanced_weight_errors_exact_messages():
    assert _message(L.class_balanced_weights, [], 0.5) == (
        "counts must be a non-empty 1-D array (C,); got shape (0,)"
    )
    assert _message(L.class_balanced_weights, [[1, 2]], 0.5) == (
        "counts must be a non-empty 1-D array (C,); got shape (1, 2)"
    )
    assert _message(L.class_balanced_weights, [1.0, float("inf")], 0.5) == (
        "counts must be finite and >= 0; got [1.0, inf]"
    )
    assert _message(L.class_balanced_weights, [0, 0], 0.5) == (
        "counts are all zero ([0.0, 0.0]): cannot compute class weights"
    )
    assert _message(L.slice_counts, np.zeros(4)) == (
        "per_slice_class_counts must be (N, C); got shape (4,)"
    )
    assert L.slice_counts(np.array([[0, 1], [2, 1]])).dtype == np.int64
