"""Class-balanced weights: what n_i counts (train.class_counts) and the per-batch weights.

Expected values are hand-computed from Cui et al.'s formula w_c = (1 - beta) / (1 - beta**n_c)
(absent classes 0, present classes renormalised to sum to their number).
"""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from brats_jax import losses as L
from brats_jax.runs import train_state
from brats_jax.training import train

# One (1, 4, 5) slice: 12 background, 5 NCR, 2 ED, 1 ET pixels.
LABELS = jnp.asarray(
    [[[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 2, 2, 3]]], jnp.int32
)
COUNTS = (12, 5, 2, 1)


def _renormalised(raw):
    raw = np.asarray(raw, np.float64)
    return raw * (np.count_nonzero(raw) / raw.sum())


def _logits(seed=0, shape=(1, 4, 5)):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(*shape, 4)) * 2, jnp.float32)


def test_batch_weights_hand_computed_beta_05_and_099():
    # beta 0.5: (1/2) / (1 - 2**-n) = 2**(n-1) / (2**n - 1)
    raw_05 = [2048 / 4095, 16 / 31, 2 / 3, 1.0]
    np.testing.assert_allclose(
        L.batch_class_balanced_weights(LABELS, 0.5), _renormalised(raw_05), rtol=1e-6
    )
    raw_099 = [0.01 / (1 - 0.99**n) for n in COUNTS]
    got = L.batch_class_balanced_weights(LABELS, 0.99)
    np.testing.assert_allclose(got, _renormalised(raw_099), rtol=1e-5)
    assert float(got[3]) > 5 * float(got[0])  # 1 ET pixel vs 12 background pixels
    # beta 0: equal weights
    np.testing.assert_allclose(L.batch_class_balanced_weights(LABELS, 0.0), np.ones(4))


def test_absent_class_gets_zero_and_present_are_renormalised():
    labels = jnp.where(LABELS == 2, 1, LABELS)  # ED absent: counts 12, 7, 0, 1
    raw = [0.01 / (1 - 0.99**12), 0.01 / (1 - 0.99**7), 0.0, 0.01 / (1 - 0.99**1)]
    got = L.batch_class_balanced_weights(labels, 0.99)
    np.testing.assert_allclose(got, _renormalised(raw), rtol=1e-5)
    assert float(got[2]) == 0.0 and float(jnp.sum(got)) == pytest.approx(3.0)


def test_twenty_pixel_region_beside_50000_background():
    """The EXPERIMENTS.md example: ~5.5x at beta 0.99, ~1x at beta 0.5."""
    labels = jnp.zeros((1, 50020), jnp.int32).at[0, :20].set(3)
    w = L.batch_class_balanced_weights(labels, 0.99)
    want = (0.01 / (1 - 0.99**20)) / 0.01  # background: 1 - 0.99**50000 = 1
    assert float(w[3] / w[0]) == pytest.approx(want, rel=1e-4) and 5.4 < want < 5.5
    w = L.batch_class_balanced_weights(labels, 0.5)
    assert float(w[3] / w[0]) == pytest.approx(1 / (1 - 0.5**20), rel=1e-6)


def test_cb_ce_batch_pixels_differs_from_ce_in_loss_and_gradient():
    x = _logits(1)
    ce = L.loss_params("ce")
    cb = L.loss_params("cb_ce", beta=0.99, class_counts=L.BATCH_PIXELS)
    ce_v, ce_g = jax.value_and_grad(L.combined_loss)(x, LABELS, ce)
    cb_v, cb_g = jax.value_and_grad(L.combined_loss)(x, LABELS, cb)
    assert abs(float(cb_v) - float(ce_v)) > 1e-3
    assert float(jnp.max(jnp.abs(cb_g - ce_g))) > 1e-3
    # the value is CE weighted by the hand-computed weights (pixel normalisation)
    w = _renormalised([0.01 / (1 - 0.99**n) for n in COUNTS])
    logp = np.asarray(jax.nn.log_softmax(x), np.float64)[0]
    y = np.asarray(LABELS)[0]
    nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    assert float(cb_v) == pytest.approx(float(np.mean(w[y] * nll)), rel=1e-5)
    # the registry function agrees with the array-parameterised loss
    fn = L.get_loss("cb_ce", beta=0.99, class_counts=L.BATCH_PIXELS)
    assert float(fn(x, LABELS)) == pytest.approx(float(cb_v), rel=1e-6)


def test_empty_classes_and_masked_batches_stay_finite():
    x = _logits(2)
    background = jnp.zeros_like(LABELS)
    for beta in (0.0, 0.5, 0.99, 0.9999):
        p = L.loss_params("cb_focal", beta=beta, class_counts=L.BATCH_PIXELS)
        for labels, mask in ((background, None), (LABELS, jnp.zeros(LABELS.shape, bool))):
            w = L.effective_class_weights(labels, p, mask)
            v, g = jax.value_and_grad(L.combined_loss)(x, labels, p, mask)
            assert bool(jnp.all(jnp.isfinite(w))) and np.isfinite(float(v)), beta
            assert bool(jnp.all(jnp.isfinite(g))), beta
        np.testing.assert_allclose(L.effective_class_weights(background, p), [1, 0, 0, 0])
        assert float(jnp.sum(L.effective_class_weights(LABELS, p, LABELS < 0))) == 0.0


def test_masked_pixels_are_not_counted():
    other = jnp.full_like(LABELS, 3)  # a padded sample full of ET
    labels = jnp.concatenate([LABELS, other])
    valid = jnp.asarray([True, False])[:, None, None]
    np.testing.assert_allclose(
        L.batch_class_balanced_weights(labels, 0.99, valid),
        L.batch_class_balanced_weights(LABELS, 0.99),
        rtol=1e-6,
    )
    p = L.loss_params("cb_ce", beta=0.99, class_counts=L.BATCH_PIXELS)
    x = jnp.concatenate([_logits(3), _logits(4)])
    np.testing.assert_allclose(
        L.combined_loss(x, labels, p, valid), L.combined_loss(x[:1], LABELS, p), rtol=1e-6
    )


def test_vmap_over_runs_with_different_beta_and_mode_equals_single_runs():
    params = [
        L.loss_params("cb_ce", beta=0.99, class_counts=L.BATCH_PIXELS),
        L.loss_params("cb_focal", beta=0.5, class_counts=L.BATCH_PIXELS),
        L.loss_params("cb_ce", beta=0.99, class_counts=[5, 50, 500, 5000]),
        L.loss_params("ce"),
    ]
    rng = np.random.default_rng(5)
    ys = jnp.asarray(rng.choice(4, size=(4, 2, 4, 5), p=[0.7, 0.2, 0.08, 0.02]), jnp.int32)
    xs = jnp.asarray(rng.normal(size=(4, 2, 4, 5, 4)), jnp.float32)
    stacked = L.stack_loss_params(params)
    got = jax.jit(jax.vmap(jax.value_and_grad(L.combined_loss)))(xs, ys, stacked)
    got_w = jax.vmap(L.effective_class_weights)(ys, stacked)
    for i, p in enumerate(params):
        v, g = jax.value_and_grad(L.combined_loss)(xs[i], ys[i], p)
        np.testing.assert_allclose(got[0][i], v, rtol=1e-5)
        np.testing.assert_allclose(got[1][i], g, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got_w[i], L.effective_class_weights(ys[i], p), rtol=1e-6)
    np.testing.assert_allclose(got_w[2], L.class_balanced_weights([5, 50, 500, 5000], 0.99))
    np.testing.assert_allclose(got_w[3], np.ones(4))


def _train_config(loss="cb_ce", mode="batch_pixels", beta=0.99):
    return ml_collections.ConfigDict(
        {"loss": loss, "beta": beta, "gamma": 1.0, "dice_weight": 0.5, "class_counts": mode}
    )


def test_split_pixels_is_all_ones_at_brats_sized_counts():
    """The documented degenerate case: millions of pixels make beta**n = 0 for every class."""
    # 1000 slices of 240x240: ~57,000 background, ~1,000 ED, ~400 NCR, ~200 ET pixels each
    per_slice = np.tile([56_000, 400, 1_000, 200], (1000, 1))
    for beta in (0.5, 0.75, 0.99, 0.9999):
        p = train_state.create_loss_params(_train_config(mode="split_pixels", beta=beta), per_slice)
        np.testing.assert_array_equal(np.asarray(p.class_weights), np.ones(4, np.float32))
        assert float(p.batch_counts) == 0.0
    # slices: 1000 slices per class -> 1 - 0.99**1000 = 1 - 4.3e-5: weights within 1e-4 of 1
    p = train_state.create_loss_params(_train_config(mode="split_slices"), per_slice)
    np.testing.assert_allclose(np.asarray(p.class_weights), np.ones(4), atol=1e-4)
    # per-batch counts are selected by the mode and carry beta
    p = train_state.create_loss_params(_train_config(mode="batch_pixels", beta=0.75), per_slice)
    assert float(p.batch_counts) == 1.0 and float(p.beta) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="train.class_counts 'slices'"):
        train_state.create_loss_params(_train_config(mode="slices"), per_slice)


def test_split_slices_counts_slices_holding_each_class():
    per_slice = np.array([[10, 0, 0, 0], [5, 3, 0, 0], [5, 0, 2, 1], [4, 1, 1, 0]])
    p = train_state.create_loss_params(_train_config(mode="split_slices", beta=0.5), per_slice)
    raw = [0.5 / (1 - 0.5**n) for n in (4, 2, 2, 1)]
    np.testing.assert_allclose(np.asarray(p.class_weights), _renormalised(raw), rtol=1e-6)


def test_split_pixels_at_small_counts_hand_computed():
    """Column sums (24, 4, 3, 1) pixels; beta 0.5: w = 0.5 / (1 - 0.5**n), then the four
    present classes scaled to sum to 4."""
    per_slice = np.array([[10, 0, 0, 0], [5, 3, 0, 0], [5, 0, 2, 1], [4, 1, 1, 0]])
    p = train_state.create_loss_params(_train_config(mode="split_pixels", beta=0.5), per_slice)
    raw = np.array([0.5 / (1 - 0.5**24), 0.5 / (1 - 0.5**4), 0.5 / (1 - 0.5**3), 0.5 / 0.5])
    want = raw * 4 / raw.sum()
    np.testing.assert_allclose(np.asarray(p.class_weights), want, rtol=1e-6)
    assert float(p.batch_counts) == 0.0  # fixed weights, not per batch
    # an absent class (no ET pixel in the split) gets 0, the other three sum to 3
    no_et = per_slice.copy()
    no_et[:, 3] = 0
    p = train_state.create_loss_params(_train_config(mode="split_pixels", beta=0.5), no_et)
    raw3 = raw[:3]
    np.testing.assert_allclose(np.asarray(p.class_weights), [*(raw3 * 3 / raw3.sum()), 0.0])


def test_split_pixels_counts_only_the_training_slices(tmp_path):
    """`build_run` computes split_pixels weights from the training split's slices alone: at
    beta 0.99999 the ~10^4 pixels of the tiny data give weights far from 1, and those of
    all slices (or of the validation / test slices) differ."""
    from brats_jax.training import run_group
    from configs import unet as unet_config

    c = unet_config.get_config("tiny")
    c.train.loss, c.train.class_counts, c.train.beta = "cb_ce", "split_pixels", 0.99999
    run = run_group.build_run(c, tmp_path)
    table = run.source.table.class_counts  # (N slices, 4) pixels per class
    train_ids = np.asarray(run.splits.train)
    others = np.concatenate([run.splits.val, run.splits.test]).astype(np.int64)
    assert len(train_ids) and len(others) and not set(train_ids.tolist()) & set(others.tolist())

    def hand(n):
        raw = (1 - 0.99999) / (1 - 0.99999 ** n.astype(np.float64))
        return raw * 4 / raw.sum()

    want = hand(table[train_ids].sum(0))
    got = np.asarray(run.loss_params.class_weights)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.abs(want - 1).max() > 0.1  # not the degenerate all-ones case
    assert np.abs(hand(table.sum(0)) - want).max() > 1e-3  # all slices would differ


def test_unweighted_losses_have_all_one_effective_weights():
    for name in ("ce", "focal", "dice", "dice_ce"):
        p = train_state.create_loss_params(_train_config(loss=name), np.ones((2, 4)))
        np.testing.assert_array_equal(L.effective_class_weights(LABELS, p), np.ones(4))


def _hand_dice_ce_terms(logits, labels):
    """(CE, Dice loss) by hand in numpy float64: CE the mean over pixels of -log p_y;
    Dice TransUNet's: one Dice per class over the whole batch, squared denominators,
    background included, smooth 1e-5, loss = mean over classes of 1 - Dice."""
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g = np.eye(4)[np.asarray(labels)]
    ce = -np.mean(np.log(np.sum(p * g, -1)))
    inter = (p * g).sum((0, 1, 2))
    den = (p * p).sum((0, 1, 2)) + (g * g).sum((0, 1, 2))
    return ce, np.mean(1 - (2 * inter + 1e-5) / (den + 1e-5))


def test_dice_ce_at_dice_weight_0_3_is_0_7_ce_plus_0_3_dice():
    """`train.dice_weight = 0.3` (not the default 0.5, where a swap hides): the loss is
    0.7 CE + 0.3 Dice, both terms by hand, for class and region outputs' weights."""
    labels = jnp.concatenate([LABELS, LABELS[:, ::-1]])  # 2 samples: the batch Dice sums both
    logits = _logits(3, (2, 4, 5))
    ce, dice = _hand_dice_ce_terms(logits, labels)
    assert abs(ce - dice) > 0.5  # a swapped weight moves the loss by 0.4 |ce - dice|
    config = _train_config(loss="dice_ce")
    config.dice_weight = 0.3
    p = train_state.create_loss_params(config, np.ones((2, 4)))
    assert float(p.dice_weight) == pytest.approx(0.3) and float(p.ce_weight) == pytest.approx(0.7)
    got = float(L.combined_loss(logits, labels, p))
    assert got == pytest.approx(0.7 * ce + 0.3 * dice, rel=1e-5)
    regions = train_state.create_loss_params(config, np.ones((2, 4)), output="regions")
    assert float(regions.dice_weight) == pytest.approx(0.3)
    assert float(regions.ce_weight) == pytest.approx(0.7)


@pytest.mark.slow
def test_training_logs_mean_effective_weights(tmp_path):
    """metrics.jsonl holds class_weight_0..3: ones for CE, per-batch weights for CB-CE."""
    from configs import unet as unet_config

    rows = {}
    for loss in ("ce", "cb_ce"):
        c = unet_config.get_config("tiny")
        c.train.loss = loss
        c.train.num_steps = 2
        c.train.log_every_steps = 2
        results = train.train_and_evaluate(c, tmp_path / loss)
        # the study's metric and the two other readings, next to each other (issue 16 B)
        for key in ("paper_dice", "paper_dice_absent_excluded", "pooled_dice_4class"):
            assert 0.0 <= results[key] <= 1.0, key
        assert len(results["pooled_class_dice"]) == 4
        header = (tmp_path / loss / "per_case.csv").read_text().splitlines()[0].split(",")
        assert "volume_dice_4class" in header and "paper_dice" not in header
        lines = (tmp_path / loss / "metrics.jsonl").read_text().splitlines()
        rows[loss] = [json.loads(r) for r in lines if "train_loss" in r][-1]
    keys = [f"class_weight_{c}" for c in range(4)]
    assert [rows["ce"][k] for k in keys] == [1.0, 1.0, 1.0, 1.0]
    cb = [rows["cb_ce"][k] for k in keys]
    assert all(w is None or math.isfinite(w) for w in cb)
    assert any(w is not None and abs(w - 1.0) > 1e-3 for w in cb)


def test_logged_class_weights_are_the_mean_over_the_steps_the_class_was_in(tmp_path):
    """A 2-step cb_ce (batch_pixels) run logging at step 2: class_weight_c is the mean of
    `batch_class_balanced_weights` of the two training batches (recorded from the run's own
    pipeline) over the batches holding class c. Seed 1: NCR is absent from the first batch,
    so its logged weight is the second batch's alone (a plain mean would halve it)."""
    from brats_jax.training import run_group
    from configs import unet as unet_config

    c = unet_config.get_config("tiny")
    c.train.loss, c.train.seed, c.train.num_steps, c.train.log_every_steps = "cb_ce", 1, 2, 2
    c.data.val_fraction = c.data.test_fraction = 0.0
    seen = []
    real = run_group.RunGroup.next_batch

    def recording(self):
        batch = real(self)
        seen.append(np.asarray(batch["label"]))
        return batch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_group.RunGroup, "next_batch", recording)
        train.train_and_evaluate(c, tmp_path)
    assert len(seen) == 2 and seen[0].shape == (2, 32, 32)
    present = np.array([[bool((b == k).any()) for k in range(4)] for b in seen])  # (2, 4)
    assert present.sum(0).tolist() == [2, 1, 2, 2]  # NCR only in the second batch
    w = np.array([np.asarray(L.batch_class_balanced_weights(jnp.asarray(b), 0.99)) for b in seen])
    want = [w[present[:, k], k].mean() for k in range(4)]
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in logged] == [2]
    got = [logged[0][f"class_weight_{k}"] for k in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(want[1] - w[:, 1].mean()) > 0.1  # the "present" rule matters here
