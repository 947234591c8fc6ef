"""Patient-level cross-validation folds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fold_cases(
    case_ids: Sequence[str], num_folds: int, fold: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """`(train_ids, val_ids)` of fold `fold` of `num_folds` over the cases (patients).

    The IDs are sorted, shuffled with `seed` and cut into `num_folds` parts whose sizes
    differ by at most one (`numpy.array_split`); part `fold` validates, the others train.
    The folds of one seed partition the cases: each case validates in exactly one fold.
    The answer depends only on the set of IDs, `num_folds`, `fold` and `seed`, not on the
    order of `case_ids`. Each ID counts as one patient (BraTS IDs do; the same patient
    under two releases' IDs would need grouping first). Both lists come back sorted.
    """
    ids = sorted(str(c) for c in case_ids)
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise ValueError(f"case IDs {dup[:5]} appear more than once")
    if isinstance(num_folds, bool) or not isinstance(num_folds, int | np.integer):
        raise ValueError(f"data.num_folds {num_folds!r}: expected a whole number >= 2")
    if not 2 <= num_folds <= len(ids):
        raise ValueError(
            f"data.num_folds {num_folds}: expected 2..{len(ids)} (the number of cases)"
        )
    if not 0 <= fold < num_folds:
        raise ValueError(f"data.fold {fold}: expected 0..{num_folds - 1}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, num_folds)
    val = sorted(ids[i] for i in parts[fold])
    held = set(val)
    return [c for c in ids if c not in held], val
