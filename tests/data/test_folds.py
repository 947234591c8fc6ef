"""Patient-level folds: a deterministic partition of the cases."""

import pytest

from brats_jax.data.folds import fold_cases

CASES = [f"Brats18_C{i:02d}_1" for i in range(18)]


@pytest.mark.parametrize("num_folds", [2, 3, 5, 18])
def test_folds_partition_the_cases(num_folds):
    vals = []
    for fold in range(num_folds):
        train, val = fold_cases(CASES, num_folds, fold, seed=0)
        assert set(train) | set(val) == set(CASES) and not set(train) & set(val)
        assert train == sorted(train) and val == sorted(val)
        vals.append(val)
    flat = [c for v in vals for c in v]
    assert sorted(flat) == sorted(CASES)  # every case validates exactly once
    sizes = sorted(len(v) for v in vals)
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 18


def test_folds_are_deterministic_and_order_free_but_seeded():
    a = fold_cases(CASES, 3, 1, seed=7)
    assert fold_cases(list(reversed(CASES)), 3, 1, seed=7) == a
    others = {tuple(fold_cases(CASES, 3, 1, seed=s)[1]) for s in range(5)}
    assert len(others) > 1  # the seed changes the folds


def test_fold_arguments_checked():
    with pytest.raises(ValueError, match="data.fold 3: expected 0..2"):
        fold_cases(CASES, 3, 3)
    with pytest.raises(ValueError, match="data.num_folds 1"):
        fold_cases(CASES, 1, 0)
    with pytest.raises(ValueError, match="data.num_folds 19: expected 2..18"):
        fold_cases(CASES, 19, 0)
    with pytest.raises(ValueError, match="appear more than once"):
        fold_cases([*CASES, CASES[0]], 3, 0)
