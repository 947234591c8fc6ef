"""The lists predict and tune_postprocessing are given: comma-separated values
(`split_list`), the cases under folders (`cases_from_input`: case folders, or an nnU-Net
images folder) and one process's part of them (`case_part`)."""

import os
import pathlib
from collections.abc import Sequence

from brats_jax.data import brats, nnunet
from brats_jax.data.common import DataError
from brats_jax.inference import work_split


def split_list(value: str | os.PathLike | Sequence) -> list[str]:
    """A comma-separated flag value (or a sequence of paths) as a list of non-empty items."""
    if isinstance(value, str | os.PathLike):
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return [str(v) for v in value]


def cases_from_input(value: str, allow_missing: bool = False) -> list:
    """The `brats.Case`s of `--input`: case folders, found at any depth under each item, or
    the cases of an nnU-Net images folder (imagesTs, or any folder of `<ID>_0000.nii.gz`
    ... files; read through the dataset.json in it or its parent, `nnunet.cases_in_folder`)
    (`allow_missing`: a case may lack one modality file)."""
    items = split_list(value)
    for item in items:
        if not pathlib.Path(item).is_dir():
            raise FileNotFoundError(f"--input {item}: not a folder of NIfTI files or case folders")
    return [case for item in items for case in _cases_of(item, allow_missing)]


def _cases_of(item: str, allow_missing: bool) -> list:
    if nnunet.is_images_folder(item):
        return nnunet.cases_in_folder(item, allow_missing=allow_missing)
    if nnunet.is_dataset(item):
        raise DataError(
            f"--input {item} is an nnU-Net dataset folder; give its images folder "
            f"({pathlib.Path(item) / 'imagesTs'} or imagesTr)"
        )
    return brats.find_cases(item, allow_missing=allow_missing)


def case_part(cases: list, part_id: int, num_parts: int) -> list:
    """Part `part_id` of `num_parts` of `cases` sorted by case ID (round-robin,
    `work_split.part_of`); a case ID found twice is an error here, before the parts could
    hide it from each other."""
    ids = [c.case_id for c in cases]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"--input: case ID(s) {dup[:5]} given twice; outputs would collide")
    cases = sorted(cases, key=lambda c: c.case_id)
    return work_split.part_of(cases, part_id, num_parts)
