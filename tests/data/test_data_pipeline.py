"""Pruning, patient splits, grain train iterator (resume, sharding), eval batches, resizing."""

import json

import ml_collections
import numpy as np
import pytest

from brats_jax.data import (
    DataError,
    SliceTable,
    SyntheticSource,
    build_splits,
    case_indices,
    class_pixel_counts,
    eval_batches,
    make_source,
    make_train_iterator,
    resize_image,
    resize_label,
)


class FakeSource:
    """4x4 slices whose table is written by hand; image value = record index."""

    def __init__(self, counts, brain, cases):
        n = len(cases)
        self.table = SliceTable(np.array(cases), np.arange(n) % 100, counts, brain)

    def __len__(self):
        return len(self.table)

    def __repr__(self):
        return f"FakeSource({len(self)})"

    def __getitem__(self, i):
        return dict(
            image=np.full((4, 4, 4), i, np.float32),
            label=np.zeros((4, 4), np.int32),
            case_id=str(self.table.case_id[i]),
            slice_index=int(self.table.slice_index[i]),
        )


def cfg(**kw):
    base = dict(
        source="synthetic",
        root="",
        cache_dir="",
        image_size=0,
        prune=True,
        min_brain_fraction=0.2,
        val_fraction=0.0,
        test_fraction=0.0,
        val_cases="",
        test_cases="",
        split_seed=0,
        random_flip=False,
        num_workers=0,
        synthetic_num_cases=6,
        synthetic_slices_per_case=6,
        synthetic_image_size=32,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_pruning_rule_counts():
    # record: tumour?, brain fraction -> kept?
    counts = [[16, 0, 0, 0], [16, 0, 0, 0], [15, 1, 0, 0], [16, 0, 0, 0], [14, 0, 0, 2]]
    brain = [0.1, 0.25, 0.05, 0.2, 0.0]
    src = FakeSource(counts, brain, ["a"] * 5)
    s = build_splits(src, cfg())
    # dropped: 0 (empty label, 10% brain); kept: 1 (25%), 2 and 4 (tumour), 3 (exactly 20%)
    assert s.train.tolist() == [1, 2, 3, 4]
    assert build_splits(src, cfg(min_brain_fraction=0.3)).train.tolist() == [2, 4]
    assert build_splits(src, cfg(prune=False)).train.tolist() == [0, 1, 2, 3, 4]
    assert class_pixel_counts(src, [2, 4]).tolist() == [29, 1, 0, 2]
    empty = FakeSource([[16, 0, 0, 0]] * 2, [0.0, 0.1], ["a", "b"])
    with pytest.raises(DataError, match="train split.*empty after pruning"):
        build_splits(empty, cfg())


def _cases_src(n_cases, per=2):
    cases = [f"c{k}" for k in range(n_cases) for _ in range(per)]
    return FakeSource([[16, 0, 0, 0]] * len(cases), [1.0] * len(cases), cases)


def test_split_fractions_rounding_and_disjoint():
    src = _cases_src(10)
    s = build_splits(src, cfg(val_fraction=0.2, test_fraction=0.1, split_seed=3))
    assert [len(s.cases[k]) for k in ("train", "val", "test")] == [7, 2, 1]
    all_ids = s.cases["train"] + s.cases["val"] + s.cases["test"]
    assert sorted(all_ids) == sorted({f"c{k}" for k in range(10)})
    assert len(set(all_ids)) == 10
    idx = np.concatenate([s.train, s.val, s.test])
    assert sorted(idx.tolist()) == list(range(20))
    for name in ("train", "val", "test"):
        got = set(src.table.case_id[getattr(s, name)].tolist())
        assert got == set(s.cases[name])
    # 3 cases, 5% -> round gives 0 but a nonzero fraction gets >= 1 case
    s3 = build_splits(_cases_src(3), cfg(val_fraction=0.05, test_fraction=0.05))
    assert [len(s3.cases[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    # 2 cases: no minimum, empty val/test allowed
    s2 = build_splits(_cases_src(2), cfg(val_fraction=0.05, test_fraction=0.0))
    assert len(s2.cases["val"]) == 0 and len(s2.test) == 0


def test_split_by_ids():
    src = _cases_src(6)
    s = build_splits(src, cfg(val_cases="c1, c4", test_fraction=0.5, split_seed=1))
    assert s.cases["val"] == ["c1", "c4"]
    assert len(s.cases["test"]) == 3 and not set(s.cases["test"]) & {"c1", "c4"}
    s = build_splits(src, cfg(val_cases="c0", test_cases="c5", val_fraction=0.5))
    assert s.cases == {"train": ["c1", "c2", "c3", "c4"], "val": ["c0"], "test": ["c5"]}
    with pytest.raises(DataError, match=r"unknown case id.*'zz'.*valid ids include"):
        build_splits(src, cfg(test_cases="c1,zz"))
    with pytest.raises(DataError, match="both"):
        build_splits(src, cfg(val_cases="c1", test_cases="c1"))
    with pytest.raises(DataError, match="no cases left"):
        build_splits(_cases_src(2), cfg(val_cases="c0", test_cases="c1"))


def test_max_train_cases_takes_nested_subsets_of_the_training_cases_only():
    src = _cases_src(10)
    full = build_splits(src, cfg(test_cases="c0,c1", val_cases="c2"))
    assert full.cases["train"] == [f"c{k}" for k in range(3, 10)]
    subsets = []
    for k in (1, 3, 5, 7):
        s = build_splits(src, cfg(test_cases="c0,c1", val_cases="c2", max_train_cases=k))
        assert len(s.cases["train"]) == k
        assert s.cases["test"] == ["c0", "c1"] and s.cases["val"] == ["c2"]
        assert set(src.table.case_id[s.train].tolist()) == set(s.cases["train"])
        subsets.append(set(s.cases["train"]))
    assert subsets[0] < subsets[1] < subsets[2] < subsets[3] == set(full.cases["train"])
    # a fold's training cases are subset the same way; the fold's validation cases stay
    f = build_splits(src, cfg(test_cases="c0", num_folds=3, fold=1, max_train_cases=2))
    f_all = build_splits(src, cfg(test_cases="c0", num_folds=3, fold=1))
    assert f.cases["val"] == f_all.cases["val"]
    assert len(f.cases["train"]) == 2 and set(f.cases["train"]) < set(f_all.cases["train"])
    for bad in (8, -1):
        with pytest.raises(DataError, match=rf"max_train_cases={bad}: expected 0 \(all\) or 1..7"):
            build_splits(src, cfg(test_cases="c0,c1", val_cases="c2", max_train_cases=bad))
    with pytest.raises(DataError, match="no cases left for training"):
        build_splits(_cases_src(2), cfg(val_cases="c0", test_cases="c1", max_train_cases=1))


def test_split_folds_cross_validate_the_non_test_cases():
    src = _cases_src(8)
    vals = []
    for fold in range(3):
        s = build_splits(src, cfg(test_cases="c7", num_folds=3, fold=fold, val_fraction=0.5))
        assert s.cases["test"] == ["c7"]  # the test case stays out of every fold
        assert sorted(s.cases["train"] + s.cases["val"]) == [f"c{k}" for k in range(7)]
        vals.append(s.cases["val"])
        got = set(src.table.case_id[s.val].tolist())
        assert got == set(s.cases["val"])
    assert sorted(c for v in vals for c in v) == [f"c{k}" for k in range(7)]  # each once
    assert sorted(len(v) for v in vals) == [2, 2, 3]  # val_fraction is ignored
    with pytest.raises(DataError, match="num_folds picks the validation cases"):
        build_splits(src, cfg(val_cases="c1", num_folds=3, fold=0))


def test_case_indices_sorted():
    src = FakeSource([[16, 0, 0, 0]] * 3, [1.0] * 3, ["b", "a", "b"])
    src.table.slice_index[:] = [7, 0, 3]
    assert case_indices(src, "b").tolist() == [2, 0]
    with pytest.raises(DataError, match="not in"):
        case_indices(src, "zz")


def test_train_iterator_resume_and_epochs():
    src = FakeSource([[16, 0, 0, 0]] * 10, [1.0] * 10, ["a"] * 10)
    c = cfg()
    it = make_train_iterator(src, np.arange(10), c, batch_size=4, seed=0)
    assert it.steps_per_epoch == 2
    seen = [next(it)["image"][:, 0, 0, 0].astype(int).tolist() for _ in range(5)]
    # first epoch (10 elements = 2.5 batches): a permutation of 0..9
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))
    state = it.get_state()
    json.dumps(state)
    want = next(it)
    it2 = make_train_iterator(src, np.arange(10), c, batch_size=4, seed=0)
    it2.set_state(json.loads(json.dumps(state)))
    got = next(it2)
    for k in ("image", "label", "case_id", "slice_index"):
        np.testing.assert_array_equal(got[k], want[k])


def test_batches_shapes_flip_resize_and_sharding():
    src = SyntheticSource(2, 4, 32, seed=0)
    c = cfg(image_size=16, random_flip=True)
    it = make_train_iterator(
        src, np.arange(8), c, batch_size=4, seed=1, shard_index=1, shard_count=2
    )
    b = next(it)
    assert b["image"].shape == (2, 16, 16, 4) and b["image"].dtype == np.float32
    assert b["label"].shape == (2, 16, 16) and b["label"].dtype == np.int32
    assert b["case_id"].shape == (2,) and b["case_id"].dtype.kind == "U"
    assert b["slice_index"].dtype == np.int32
    # shard 1 of 2 sees records 1, 3, 5, 7 only
    got = set()
    for _ in range(4):
        b = next(it)
        got |= {(str(c_), int(s)) for c_, s in zip(b["case_id"], b["slice_index"], strict=True)}
    assert got <= {("synth_000", 1), ("synth_000", 3), ("synth_001", 1), ("synth_001", 3)}
    # flips: each output is the resized record or its left-right mirror (axis 0), the
    # label mirrored with its image
    flipped = []
    for _ in range(6):
        b = next(it)
        for img, lab, cid, s in zip(b["image"], b["label"], b["case_id"], b["slice_index"],
                                    strict=True):  # fmt: skip
            rec = src[int(cid[-1]) * 4 + int(s)]
            ref, ref_label = resize_image(rec["image"], 16), resize_label(rec["label"], 16)
            assert not np.allclose(ref, ref[::-1])  # the image shows which way it went
            mirrored = np.allclose(img, ref[::-1])
            assert mirrored or np.allclose(img, ref)
            np.testing.assert_array_equal(lab, ref_label[::-1] if mirrored else ref_label)
            flipped.append(mirrored and (ref_label != ref_label[::-1]).any())
    assert any(flipped) and not all(flipped)  # both ways, with labels that show a flip


def test_shards_partition_the_records():
    """Two hosts' shards of a shuffled index list: disjoint, together every record exactly
    once per epoch (each host's first epoch holds each of its records once)."""
    src = SyntheticSource(2, 4, 16, seed=0)
    indices = np.array([5, 0, 7, 2, 6, 1, 3, 4])
    records = {
        (str(src[i]["case_id"]), int(src[i]["slice_index"])): int(i) for i in range(len(src))
    }
    seen = []
    for shard in (0, 1):
        it = make_train_iterator(
            src, indices, cfg(), batch_size=4, seed=2, shard_index=shard, shard_count=2
        )
        epoch = []
        for _ in range(2):  # 4 records per shard, 2 per host batch
            b = next(it)
            for img, cid, z in zip(b["image"], b["case_id"], b["slice_index"], strict=True):
                i = records[str(cid), int(z)]
                np.testing.assert_array_equal(img, src[i]["image"])  # the record it names
                epoch.append(i)
        assert len(set(epoch)) == 4, epoch  # no record twice within an epoch
        seen.append(set(epoch))
    assert not seen[0] & seen[1]
    assert sorted(seen[0] | seen[1]) == list(range(8))


def test_train_iterator_workers_resume():
    src = SyntheticSource(2, 4, 16, seed=0)
    c = cfg(num_workers=2)
    it = make_train_iterator(src, np.arange(8), c, batch_size=2, seed=5)
    next(it)
    state = it.get_state()
    want = next(it)
    it.close()
    it2 = make_train_iterator(src, np.arange(8), c, batch_size=2, seed=5)
    it2.set_state(state)
    got = next(it2)
    it2.close()
    np.testing.assert_array_equal(got["image"], want["image"])


def test_eval_batches_padding():
    src = FakeSource([[16, 0, 0, 0]] * 5, [1.0] * 5, ["a"] * 5)
    bs = list(eval_batches(src, [4, 0, 2], batch_size=2, image_size=0))
    assert len(bs) == 2
    assert bs[0]["image"][:, 0, 0, 0].tolist() == [4, 0] and bs[0]["valid"].tolist() == [1, 1]
    assert bs[1]["image"].shape == (2, 4, 4, 4) and bs[1]["valid"].tolist() == [True, False]


def test_resize_closed_forms():
    x = np.arange(4, dtype=np.float32).reshape(1, 4, 1) * np.ones((4, 1, 1), np.float32)
    # 4 -> 2, half-pixel centres: output centres at input coords 0.5 and 2.5
    np.testing.assert_allclose(resize_image(x, 2)[0, :, 0], [0.5, 2.5])
    # 2 -> 4: centres at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    y = np.array([[0.0, 1.0]] * 2, np.float32)[..., None]
    np.testing.assert_allclose(resize_image(y, 4)[0, :, 0], [0, 0.25, 0.75, 1.0])
    lab = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(resize_label(lab, 4), np.repeat(np.repeat(lab, 2, 0), 2, 1))
    np.testing.assert_array_equal(resize_label(np.repeat(np.repeat(lab, 2, 0), 2, 1), 2), lab)


def test_make_source_errors(tmp_path):
    with pytest.raises(DataError, match="not one of"):
        make_source(cfg(source="png"))
    with pytest.raises(DataError, match="needs data.root"):
        make_source(cfg(source="nifti"))
    with pytest.raises(DataError, match="does not exist"):
        make_source(cfg(source="kaggle_h5", root=str(tmp_path / "x")))
    assert len(make_source(cfg())) == 36


def test_make_source_nifti_builds_cache(tmp_path, write_labelled_case):
    write_labelled_case(tmp_path / "src", "A")
    c = cfg(source="nifti", root=str(tmp_path / "src"), cache_dir=str(tmp_path / "cache"))
    src = make_source(c)
    assert len(src) == 8 and (tmp_path / "cache" / "cache.json").is_file()
    # a prepared cache can be given as data.root directly
    assert len(make_source(cfg(source="nifti", root=str(tmp_path / "cache")))) == 8


def test_pad_batch_repeats_the_last_row_and_marks_real_rows():
    from brats_jax.data.pipeline import pad_batch

    x = np.arange(6).reshape(3, 2)
    padded, valid = pad_batch(x, 5)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(valid, [True, True, True, False, False])
    full, valid = pad_batch(x, 3)
    assert full is x and valid.all()
    with pytest.raises(ValueError, match="4 rows for a batch of 3"):
        pad_batch(np.zeros((4, 2)), 3)
