"""Folds: the errors name what was wrong (the duplicated IDs, a non-whole fold count)."""

import re

import pytest

from brats_jax.data.folds import fold_cases

CASES = [f"C{i:02d}" for i in range(8)]


def test_duplicate_error_names_only_the_duplicated_ids():
    with pytest.raises(ValueError) as err:
        fold_cases(["C03", *CASES, "C05"], 2, 0)
    assert re.search(r"case IDs \['C03', 'C05'\] appear more than once", str(err.value))


def test_duplicate_error_lists_at_most_five_ids():
    dups = CASES[:6]
    with pytest.raises(ValueError) as err:
        fold_cases(CASES + dups, 2, 0)
    assert str(err.value) == f"case IDs {dups[:5]} appear more than once"


@pytest.mark.parametrize("num_folds", [2.5, True, "3"])
def test_num_folds_must_be_a_whole_number(num_folds):
    with pytest.raises(ValueError) as err:
        fold_cases(CASES, num_folds, 0)
    assert str(err.value) == f"data.num_folds {num_folds!r}: expected a whole number >= 2"
