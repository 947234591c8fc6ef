"""Work split over machines: the i-th of N deterministic parts of a list of work items.

`predict --num_parts=N --part_id=i` segments part i of a folder's cases (sorted by case ID)
and `experiments.run --shard=i/N` (or `--shard=slurm`) trains part i of a sweep's training
units (grouped runs stay together). Parts are round-robin over the sorted items, as
nnU-Net's `predict_from_raw_data` takes `list_of_lists[part_id::num_parts]`: item j goes to
part j mod N, so neighbouring (similarly costly) items spread over the machines and the
parts together hold every item exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

SLURM = "slurm"


def check_part(part_id: int, num_parts: int, *, id_name="--part_id", n_name="--num_parts"):
    """`(part_id, num_parts)` as ints; a one-line ValueError naming the flag unless
    num_parts >= 1 and 0 <= part_id < num_parts."""
    for name, value in ((n_name, num_parts), (id_name, part_id)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"{name}={value!r}; expected an integer")
    if num_parts < 1:
        raise ValueError(f"{n_name}={num_parts}; expected at least 1")
    if not 0 <= part_id < num_parts:
        raise ValueError(
            f"{id_name}={part_id} with {n_name}={num_parts}; expected 0..{num_parts - 1}"
        )
    return int(part_id), int(num_parts)


def part_of(items: Sequence[T], part_id: int, num_parts: int) -> list[T]:
    """Part `part_id` of `num_parts` of `items` (in their given order): items[part_id::N].

    Sort the items first when their order is not already deterministic (case IDs).
    """
    part_id, num_parts = check_part(part_id, num_parts)
    return list(items)[part_id::num_parts]


def parse_shard(text: str, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """`(i, N)` of `--shard=i/N` (0 <= i < N), or of `--shard=slurm`: a SLURM job array's
    SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN (0 when unset) of SLURM_ARRAY_TASK_COUNT
    tasks (`sbatch --array=0-3` or `--array=1-4`). One-line ValueError otherwise."""
    env = os.environ if environ is None else environ
    if text == SLURM:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
        missing = [n for n in names if not env.get(n)]
        if missing:
            raise ValueError(
                f"--shard=slurm: {' and '.join(missing)} not set (run it as a task of "
                "`sbatch --array=0-N`, or give --shard=i/N)"
            )
        try:
            task, count = int(env[names[0]]), int(env[names[1]])
            first = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        except ValueError:
            raise ValueError(
                f"--shard=slurm: SLURM_ARRAY_TASK_ID={env[names[0]]!r}, SLURM_ARRAY_TASK_COUNT="
                f"{env[names[1]]!r}; expected integers"
            ) from None
        return check_part(task - first, count, id_name="SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN",
                          n_name="SLURM_ARRAY_TASK_COUNT")  # fmt: skip
    i, slash, n = str(text).partition("/")
    try:
        if not slash:
            raise ValueError
        i, n = int(i), int(n)
    except ValueError:
        raise ValueError(f"--shard={text!r}; expected i/N (e.g. 0/4) or 'slurm'") from None
    return check_part(i, n, id_name="--shard i", n_name="--shard N")
