"""Training patches (`data.patch_size`, `data.foreground_fraction`,
`data.foreground_sampling`, `data.patches`): crop shapes and windows, foreground sampling by
voxel and by region, determinism and resume, whole-slice evaluation of a
run trained on patches, grouped runs, and the config errors."""

import ml_collections
import numpy as np
import pytest

from brats_jax.data import DataError, SliceTable, make_train_iterator
from brats_jax.data.patches import check_patch_config, crop_offset
from brats_jax.inference import whole_volume
from brats_jax.training import run_group, steps, train

S = 24  # slice size of the hand-made sources


class _PositionSource:
    """S x S slices of one case; image[y, x, m] = 100000 r + 1000 y + 10 x + m (r = record),
    so every value says where it came from; label = `labels[r]` (default: 1 + y S + x)."""

    def __init__(self, n, labels=None):
        self.table = SliceTable(np.array(["a"] * n), np.arange(n), np.zeros((n, 4)), np.ones(n))
        y, x, m = np.meshgrid(np.arange(S), np.arange(S), np.arange(4), indexing="ij")
        self.base = (1000 * y + 10 * x + m).astype(np.float32)
        position = 1 + np.arange(S)[:, None] * S + np.arange(S)[None]
        self.labels = labels if labels is not None else [position.astype(np.int32)] * n

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return dict(
            image=self.base + 100000 * i,
            label=np.asarray(self.labels[i], np.int32),
            case_id="a",
            slice_index=i,
        )


def _data(**kw):
    base = dict(image_size=0, random_flip=False, num_workers=0, context_slices=0, patch_size=8,
                foreground_fraction=0.0)  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


def _batches(src, n, config, *, batch_size=4, seed=0):
    it = make_train_iterator(src, np.arange(len(src)), config, batch_size=batch_size, seed=seed)
    return [next(it) for _ in range(n)]


def _one_pixel_labels(rng, n, size=S):
    """n labels with one tumour voxel each (class 3) at a random position; the positions."""
    where = [tuple(rng.integers(size, size=2)) for _ in range(n)]
    labels = [np.zeros((size, size), np.int32) for _ in range(n)]
    for lab, (y, x) in zip(labels, where, strict=True):
        lab[y, x] = 3
    return labels, where


def test_crops_are_exact_windows_of_their_slice_in_every_context_channel():
    src = _PositionSource(5)
    for k in (0, 1):
        for b in _batches(src, 6, _data(context_slices=k), batch_size=5):
            assert b["image"].shape == (5, 8, 8, 4 * (2 * k + 1)) and b["label"].shape == (5, 8, 8)
            for img, lab, z in zip(b["image"], b["label"], b["slice_index"], strict=True):
                y0, x0 = int(img[0, 0, 4 * k] % 100000) // 1000, int(img[0, 0, 4 * k] % 1000) // 10
                window = np.s_[y0 : y0 + 8, x0 : x0 + 8]
                records = np.clip(int(z) + np.arange(-k, k + 1), 0, len(src) - 1)
                want = np.concatenate([src[int(r)]["image"][window] for r in records], -1)
                np.testing.assert_array_equal(img, want)
                np.testing.assert_array_equal(lab, src[int(z)]["label"][window])


def test_crops_carry_their_whole_slices_background():
    """`background` is each channel's minimum over the whole slice(s) the crop came from
    (record r's channel m: 100000 r + m at y = x = 0), which the crop itself rarely holds."""
    src = _PositionSource(5)
    for k in (0, 1):
        for b in _batches(src, 4, _data(context_slices=k, random_flip=True), batch_size=5):
            assert b["background"].shape == (5, 4 * (2 * k + 1))
            for bg, z in zip(b["background"], b["slice_index"], strict=True):
                records = np.clip(int(z) + np.arange(-k, k + 1), 0, len(src) - 1)
                want = (100000 * records[:, None] + np.arange(4)).ravel()
                np.testing.assert_array_equal(bg, want)
    whole = _batches(src, 1, _data(patch_size=0))[0]
    assert "background" not in whole  # whole slices hold their own background


def test_flipped_crops_are_mirrored_windows():
    src = _PositionSource(4)
    flipped = []
    for b in _batches(src, 4, _data(random_flip=True)):
        for img, lab, z in zip(b["image"], b["label"], b["slice_index"], strict=True):
            mirrored = bool(img[0, 0, 0] > img[-1, 0, 0])  # rows (axis 0, x) run backwards
            crop, lab = (img[::-1], lab[::-1]) if mirrored else (img, lab)
            y0, x0 = int(crop[0, 0, 0] % 100000) // 1000, int(crop[0, 0, 0] % 1000) // 10
            window = np.s_[y0 : y0 + 8, x0 : x0 + 8]
            np.testing.assert_array_equal(crop, src[int(z)]["image"][window])
            np.testing.assert_array_equal(lab, src[int(z)]["label"][window])
            flipped.append(mirrored)
    assert any(flipped) and not all(flipped)


def test_random_crops_cover_every_offset_and_stay_inside():
    label = np.zeros((S, S), np.int32)
    rng = np.random.default_rng(0)
    offsets = {crop_offset(label, 8, 1.0, rng) for _ in range(4000)}  # no tumour: falls back
    assert offsets == {(y, x) for y in range(S - 8 + 1) for x in range(S - 8 + 1)}


def test_foreground_fraction_one_always_holds_the_single_tumour_pixel():
    labels, where = _one_pixel_labels(np.random.default_rng(1), 8)
    src = _PositionSource(8, labels)
    for b in _batches(src, 10, _data(foreground_fraction=1.0), batch_size=8):
        for lab, z in zip(b["label"], b["slice_index"], strict=True):
            assert (lab == 3).sum() == 1, (int(z), where[int(z)])
    # corner and edge voxels too (the window is shifted inwards, never padded)
    rng = np.random.default_rng(2)
    for y, x in [(0, 0), (0, S - 1), (S - 1, S - 1), (S - 1, 3), (12, 12)]:
        label = np.zeros((S, S), np.int32)
        label[y, x] = 1
        for _ in range(20):
            y0, x0 = crop_offset(label, 8, 1.0, rng)
            assert 0 <= y0 <= S - 8 and 0 <= x0 <= S - 8
            assert y0 <= y < y0 + 8 and x0 <= x < x0 + 8
    # the centre is drawn uniformly from the tumour voxels: a 2-voxel tumour far apart
    label = np.zeros((S, S), np.int32)
    label[2, 2] = label[21, 21] = 1
    corners = [crop_offset(label, 8, 1.0, rng) for _ in range(2000)]
    near_first = np.mean([c == (0, 0) for c in corners])
    assert abs(near_first - 0.5) < 0.05 and {c for c in corners} == {(0, 0), (16, 16)}


def test_foreground_share_matches_the_fraction_on_a_mixed_batch():
    # 64 px slices, 8 px crops, tumour = one pixel: a uniform crop holds it with p <= 1/57
    n, size = 8, 64
    labels, _ = _one_pixel_labels(np.random.default_rng(3), n, size)
    for lab in labels[::2]:  # half the slices have no tumour
        lab[:] = 0
    src = _PositionSource(n, labels)
    src.base = np.zeros((size, size, 4), np.float32)
    with_tumour = {z for z in range(n) if labels[z].any()}
    hits = {True: [], False: []}
    for b in _batches(src, 60, _data(foreground_fraction=0.33), batch_size=8):
        for lab, z in zip(b["label"], b["slice_index"], strict=True):
            hits[int(z) in with_tumour].append(bool(lab.any()))
    assert len(hits[True]) == 240 and not any(hits[False])
    assert abs(np.mean(hits[True]) - 0.33) < 0.1, np.mean(hits[True])
    rng = np.random.default_rng(4)  # many draws of one slice with tumour
    for fraction in (0.33, 0.7):
        fg = [labels[1][y : y + 8, x : x + 8].any() for y, x in
              (crop_offset(labels[1], 8, fraction, rng) for _ in range(5000))]  # fmt: skip
        assert abs(np.mean(fg) - fraction) < 0.025, (fraction, np.mean(fg))


def test_same_seed_same_crops_and_resume_gives_the_next_batches():
    labels, _ = _one_pixel_labels(np.random.default_rng(5), 6)
    src = _PositionSource(6, labels)
    config = _data(foreground_fraction=0.5, random_flip=True, context_slices=1)
    a, b = _batches(src, 5, config, seed=7), _batches(src, 5, config, seed=7)
    other = _batches(src, 5, config, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, other, strict=True))
    it = make_train_iterator(src, np.arange(6), config, batch_size=4, seed=7)
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    fresh = make_train_iterator(src, np.arange(6), config, batch_size=4, seed=7)
    fresh.set_state(state)
    for x, y in zip(after, [next(fresh) for _ in range(2)], strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(after[0]["image"], a[3]["image"])


# Slice order and flips of seed 0 on `_PositionSource(4)`, batch 4, random_flip, recorded
# with the pipeline before data.patch_size existed (/work/main at 42d12f7).
BEFORE_PATCHES = [
    [(1, False), (2, True), (3, False), (0, False)],
    [(0, False), (3, True), (1, False), (2, False)],
    [(3, True), (0, True), (2, False), (1, False)],
]


def test_patch_size_zero_is_the_whole_slice_pipeline_of_before():
    src = _PositionSource(4)
    for fields in ({"patch_size": 0, "foreground_fraction": 1.0}, {}):  # {}: an old config
        config = ml_collections.ConfigDict(
            dict(image_size=0, random_flip=True, num_workers=0, context_slices=0, **fields)
        )
        got = []
        for b in _batches(src, 3, config):
            assert b["image"].shape == (4, S, S, 4)
            for img, z in zip(b["image"], b["slice_index"], strict=True):
                mirrored = bool(img[0, 0, 0] > img[-1, 0, 0])
                np.testing.assert_array_equal(img[::-1] if mirrored else img, src[int(z)]["image"])
                got.append((int(z), mirrored))
        assert got == [r for batch in BEFORE_PATCHES for r in batch]


PATCHES = {"data.patch_size": 16}  # `tiny` trained on 16 x 16 patches of its 32 px slices


def _spy_shapes(monkeypatch):
    """Records the image shapes the train step, the eval step and the test pass see, and
    the background shapes (per-channel fill for spatial augmentation) the steps get."""
    seen = {"train": set(), "eval": set(), "test": set(), "background": set()}

    def wrap(make, key):
        def made(*args, **kw):
            step = make(*args, **kw)

            def spied(state, batch, loss_params):
                seen[key].add(tuple(batch["image"].shape[-3:]))
                if "background" in batch:
                    seen["background"].add((key, *batch["background"].shape[-1:]))
                return step(state, batch, loss_params)

            return spied

        return made

    monkeypatch.setattr(steps, "make_train_step", wrap(steps.make_train_step, "train"))
    monkeypatch.setattr(steps, "make_eval_step", wrap(steps.make_eval_step, "eval"))
    make_predictor = whole_volume.make_slice_predictor

    def predictor(*args, **kw):
        f = make_predictor(*args, **kw)

        def spied(variables, images):
            seen["test"].add(tuple(images.shape[-3:]))
            return f(variables, images)

        return spied

    monkeypatch.setattr(whole_volume, "make_slice_predictor", predictor)
    return seen


@pytest.mark.slow
def test_tiny_run_on_patches_validates_and_tests_whole_slices(
    tmp_path, monkeypatch, tiny_config, recompute_test_pass
):
    seen = _spy_shapes(monkeypatch)
    results = train.train_and_evaluate(
        tiny_config(**PATCHES | {"train.num_steps": 3}), tmp_path / "run"
    )
    assert results["per_case"]
    assert seen == {"train": {(16, 16, 4)}, "eval": {(32, 32, 4)}, "test": {(32, 32, 4)},
                    "background": {("train", 4)}}  # fmt: skip
    want = recompute_test_pass(tmp_path / "run", tmp_path)
    assert results["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6)


@pytest.mark.slow
def test_tiny_run_with_sliding_window_tests_through_patch_windows(
    tmp_path, monkeypatch, tiny_config, recompute_test_pass
):
    """eval.sliding_window: the test pass slides 16 px windows over the 32 px slices."""
    windows = []
    make = whole_volume.make_slice_predictor

    def recording(*args, **kw):
        windows.append(kw.get("window", 0))
        return make(*args, **kw)

    monkeypatch.setattr(whole_volume, "make_slice_predictor", recording)
    fields = {"train.num_steps": 2, "eval.sliding_window": True}
    results = train.train_and_evaluate(tiny_config(**PATCHES | fields), tmp_path / "run")
    assert 16 in windows
    want = recompute_test_pass(tmp_path / "run", tmp_path)  # through 16 px windows too
    assert results["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6)


@pytest.mark.slow
def test_grouped_runs_with_patches_context_and_regions(
    tmp_path, monkeypatch, tiny_config, recompute_test_pass
):
    seen = _spy_shapes(monkeypatch)
    fields = {"train.num_steps": 3, "data.context_slices": 1, "model.output": "regions",
              "train.loss": "dice_ce"}  # fmt: skip
    other = {"data.foreground_fraction": 1.0, "train.seed": 1}
    configs = [tiny_config(**PATCHES | fields), tiny_config(**PATCHES | fields | other)]
    results = train.train_runs(configs, [tmp_path / "a", tmp_path / "b"], mapping="map")
    assert len(results) == 2
    assert seen == {"train": {(16, 16, 12)}, "eval": {(32, 32, 12)}, "test": {(32, 32, 12)},
                    "background": {("train", 12)}}  # fmt: skip
    for name, result in zip("ab", results, strict=True):
        want = recompute_test_pass(tmp_path / name, tmp_path)
        assert result["paper_dice"] == pytest.approx(want["paper_dice"], abs=1e-6), name


def test_grouped_runs_share_the_patch_size_not_the_fraction(tiny_config):
    a = tiny_config(**PATCHES)
    b = tiny_config(**PATCHES | {"data.foreground_fraction": 1.0})
    assert run_group.group_key(a) == run_group.group_key(b)
    assert run_group.group_key(a) != run_group.group_key(tiny_config(**{"data.patch_size": 8}))


def _core_and_oedema(size=64):
    """A size x size label: oedema (2) on rows 40.., one necrosis voxel (1) at (2, 2) and one
    enhancing voxel (3) at (2, size - 4), so an 8 px crop holds at most one of the three."""
    label = np.zeros((size, size), np.int32)
    label[40:] = 2
    label[2, 2], label[2, size - 4] = 1, 3
    return label


def test_region_sampling_draws_one_present_region_then_a_voxel():
    # regions WT = 1538 voxels, TC = {NCR, ET}, ET = {ET}; each drawn with p 1/3:
    # P(ET voxel in crop) = 1/3 (ET) + 1/6 (TC) + 1/3 / 1538 (WT), P(NCR) = 1/6 + 1/3 / 1538
    label, rng = _core_and_oedema(), np.random.default_rng(5)
    n_wt = int((label > 0).sum())
    for sampling, p_et, p_ncr in (
        ("regions", 1 / 2 + 1 / (3 * n_wt), 1 / 6 + 1 / (3 * n_wt)),
        ("voxels", 1 / n_wt, 1 / n_wt),
    ):
        crops = [label[y : y + 8, x : x + 8] for y, x in
                 (crop_offset(label, 8, 1.0, rng, sampling) for _ in range(6000))]  # fmt: skip
        assert abs(np.mean([(c == 3).any() for c in crops]) - p_et) < 0.025, sampling
        assert abs(np.mean([(c == 1).any() for c in crops]) - p_ncr) < 0.02, sampling
        assert all(c.any() for c in crops)  # fraction 1: every crop holds tumour
    # only regions the slice holds are drawn: a lone oedema voxel is in every crop
    label = np.zeros((64, 64), np.int32)
    label[30, 50] = 2
    for _ in range(200):
        y0, x0 = crop_offset(label, 8, 1.0, rng, "regions")
        assert label[y0 : y0 + 8, x0 : x0 + 8].any()


def test_region_sampling_reaches_the_training_batches():
    src = _PositionSource(4, [_core_and_oedema()] * 4)
    src.base = np.zeros((64, 64, 4), np.float32)
    share = {}
    for sampling in ("voxels", "regions"):
        config = _data(foreground_fraction=1.0, foreground_sampling=sampling)
        labels = [lab for b in _batches(src, 50, config, batch_size=4) for lab in b["label"]]
        share[sampling] = np.mean([(lab == 3).any() for lab in labels])
    assert share["voxels"] < 0.02 and abs(share["regions"] - 0.5) < 0.08, share


@pytest.mark.parametrize(
    "fields, size, match",
    [
        ({"data.patch_size": 48}, 32, "data.patch_size=48 is larger than the 32-pixel slices"),
        ({"data.patch_size": 18}, 32, r"patch_size=18 is not a multiple of 2\*\*model.depth = 4"),
        ({"data.patch_size": 16}, 30, r"data.image_size \(slice size\)=30 is not a multiple"),
        ({"data.patch_size": -1}, 32, "data.patch_size=-1; expected an integer >= 0"),
        ({"data.foreground_fraction": 1.5}, 32, "data.foreground_fraction=1.5; expected"),
    ],
)  # fmt: skip
def test_bad_patch_fields_are_one_line_errors(fields, size, match, tiny_config):
    with pytest.raises(DataError, match=match) as e:
        check_patch_config(tiny_config(**PATCHES | fields), size)
    assert "\n" not in str(e.value)


def test_patch_errors_at_run_build_and_for_transunet(tmp_path, tiny_config):
    with pytest.raises(DataError, match="data.patch_size=48 is larger") as e:
        run_group.build_run(tiny_config(**{"data.patch_size": 48}), tmp_path)
    assert "\n" not in str(e.value)
    config = tiny_config(model="transunet", **PATCHES)
    with pytest.raises(DataError, match="TransUNet's position grid") as e:
        run_group.build_run(config, tmp_path)
    assert "\n" not in str(e.value)
    config.data.patch_size = config.data.image_size  # a whole-slice "patch" is allowed
    assert check_patch_config(config, config.data.image_size) == config.data.image_size
    native = tiny_config(**{"data.image_size": 0, "data.patch_size": 48})  # native 32 px slices
    with pytest.raises(DataError, match="larger than the 32-pixel slices"):
        run_group.build_run(native, tmp_path)


def test_core_coverage_counts_the_share_of_the_slices_core_in_each_crop():
    from experiments.analyses.crop_core_coverage import core_shares

    label = np.zeros((S, S, 3), np.int32)
    label[2, 2, 0], label[21, 21, 0] = 1, 3  # two core voxels 19 px apart: an 8 px crop holds one
    label[5:9, 5:9, 1] = 2  # oedema only: not a core slice
    label[10:12, 10:12, 2] = 3  # a 2x2 core: every crop centred on it holds all 4 voxels
    rng = np.random.default_rng(6)
    for sampling in ("voxels", "regions"):
        shares = core_shares(label, 8, 400, rng, sampling)
        assert set(np.round(shares, 6)) == {0.5, 1.0}, sampling
        assert abs(np.mean(shares == 1.0) - 0.5) < 0.08  # the two core slices, drawn alike
