"""Patient splits (`data/pipeline.py`: `build_splits` and its helpers): the errors name the
field and the value, and the brain-fraction filling of the pruning, on hand-made tables."""

import ml_collections
import numpy as np
import pytest

from brats_jax.data import DataError, SliceTable, build_splits
from brats_jax.data.pipeline import prune_keep


class Table:
    """A source of `per` label-empty, whole-brain slices per case (only the table is read)."""

    def __init__(self, n_cases, per=1, brain=1.0):
        cases = [f"c{k}" for k in range(n_cases) for _ in range(per)]
        n = len(cases)
        self.table = SliceTable(np.array(cases), np.arange(n), [[16, 0, 0, 0]] * n, [brain] * n)


def cfg(**kw):
    base = dict(val_fraction=0.0, test_fraction=0.0, val_cases="", test_cases="",
                split_seed=0, prune=True, min_brain_fraction=0.2)  # fmt: skip
    return ml_collections.ConfigDict(base | kw)


def _message(**kw):
    n = kw.pop("n", 6)
    with pytest.raises(DataError) as err:
        build_splits(Table(n), cfg(**kw))
    return str(err.value)


def test_fraction_outside_zero_one():
    assert _message(val_fraction=1.0) == "data.val_fraction=1.0 must be in [0, 1)"
    assert _message(test_fraction=-0.1) == "data.test_fraction=-0.1 must be in [0, 1)"


@pytest.mark.parametrize("n, word", [(1, "case"), (2, "cases")])
def test_a_test_fraction_that_gives_no_test_case(n, word):
    assert _message(n=n, test_fraction=0.2) == (
        f"data.test_fraction=0.2 of {n} {word} gives no test case; set data.test_fraction=0 "
        "to train without a test pass, or name the test cases in data.test_cases=ID,..."
    )


def test_id_list_errors_name_the_ids():
    assert _message(n=7, val_cases="x1,c0,x2,x3,x4,x5,x6") == (
        "data.val_cases: unknown case id(s) ['x1', 'x2', 'x3', 'x4', 'x5']; "
        "valid ids include ['c0', 'c1', 'c2', 'c3', 'c4'] (7 cases)"
    )
    assert _message(n=7, test_cases="c0,zz") == (
        "data.test_cases: unknown case id(s) ['zz']; "
        "valid ids include ['c0', 'c1', 'c2', 'c3', 'c4'] (7 cases)"
    )
    assert _message(val_cases="c1,c2", test_cases="c2,c1") == (
        "case id(s) ['c1', 'c2'] are in both data.val_cases and data.test_cases"
    )
    six = ",".join(f"c{k}" for k in range(6))
    assert _message(n=8, val_cases=six, test_cases=six) == (
        "case id(s) ['c0', 'c1', 'c2', 'c3', 'c4'] are in both data.val_cases and data.test_cases"
    )
    assert _message(val_cases="c1", num_folds=2, fold=0) == (
        "data.num_folds picks the validation cases; leave data.val_cases empty"
    )
    assert _message(n=2, val_cases="c0", test_cases="c1") == (
        "no cases left for training (2 cases: 1 val, 1 test); "
        "lower data.val_fraction/test_fraction or list fewer ids"
    )


def test_ids_as_a_list_with_spaces_and_repeats():
    s = build_splits(Table(5), cfg(val_cases=[" c3", "c1 ", "c3"], test_cases="c0,,"))
    assert s.cases == {"train": ["c2", "c4"], "val": ["c1", "c3"], "test": ["c0"]}


def test_one_case_in_three_for_a_small_fraction_and_the_seed_matters():
    s = build_splits(Table(3), cfg(val_fraction=0.1))  # round(0.3) = 0, at least 1
    assert len(s.cases["val"]) == 1 and len(s.cases["train"]) == 2
    picks = {tuple(build_splits(Table(9), cfg(val_fraction=0.3, split_seed=k)).cases["val"])
             for k in range(4)}  # fmt: skip
    assert len(picks) > 1 and all(len(p) == 3 for p in picks)
    again = {tuple(build_splits(Table(9), cfg(val_fraction=0.3, split_seed=5)).cases["val"])
             for _ in range(3)}  # fmt: skip
    assert len(again) == 1  # one seed, one split


def test_pruning_empties_the_train_split():
    with pytest.raises(DataError) as err:
        build_splits(Table(4, brain=0.1), cfg())
    assert str(err.value) == (
        "the train split (4 cases, e.g. ['c0', 'c1', 'c2']) is empty after pruning "
        "(min_brain_fraction=0.2); set data.prune=False or lower the threshold"
    )


def test_prune_keep_fills_unknown_brain_fractions_of_empty_slices_only():
    class Kaggle:
        def __init__(self):
            counts = [[16, 0, 0, 0], [15, 1, 0, 0], [16, 0, 0, 0]]
            self.table = SliceTable(np.array(["a"] * 3), np.arange(3), counts, [np.nan] * 3)
            self.filled = None

        def fill_brain_fraction(self, idx):
            self.filled = idx.tolist()
            self.table.brain_fraction[idx] = [0.5, 0.1][: len(idx)]

    src = Kaggle()
    keep = prune_keep(src, [0, 1, 2])
    assert src.filled == [0, 2]  # the tumour slice needs no brain fraction
    assert keep.tolist() == [True, True, False]
    src.filled = None  # now known: not measured again
    assert prune_keep(src, [0, 2], 0.05).tolist() == [True, True]
    assert src.filled is None


def test_folds_follow_the_split_seed():
    vals = {
        tuple(
            build_splits(Table(9), cfg(test_cases="c0", num_folds=3, fold=0, split_seed=k)).cases[
                "val"
            ]
        )
        for k in range(4)
    }
    assert len(vals) > 1  # the seed reaches the folds


def test_split_sizes_and_an_empty_test_split_are_logged(caplog):
    caplog.set_level("INFO")
    counts = [[16, 0, 0, 0], [15, 1, 0, 0], [16, 0, 0, 0], [16, 0, 0, 0]]
    src = Table(4)
    src.table = SliceTable(np.array(["c0", "c0", "c1", "c2"]), np.arange(4), counts,
                           [0.1, 0.1, 0.5, 0.5])  # fmt: skip
    build_splits(src, cfg(test_cases="c2"))
    text = [r.getMessage() for r in caplog.records]
    assert "split train: 2 cases, 3 slices before pruning, 2 after (prune=True, " \
        "min_brain_fraction=0.2)" in text  # fmt: skip
    assert "split test: 1 cases, 1 slices before pruning, 1 after (prune=True, " \
        "min_brain_fraction=0.2)" in text  # fmt: skip
    assert not any("no test cases" in t for t in text)
    caplog.clear()
    build_splits(src, cfg(prune=False, min_brain_fraction=0.25))
    text = [r.getMessage() for r in caplog.records]
    assert "split train: 3 cases, 4 slices before pruning, 4 after (prune=False, " \
        "min_brain_fraction=0.25)" in text  # fmt: skip
    assert (
        "no test cases (data.test_fraction=0, data.test_cases empty): no test pass will run; "
        "results.json will hold no test scores"
    ) in text
