"""nnU-Net raw datasets as `brats.Case`s: the layout many BraTS users hold their data in.

    DatasetXXX_Name/dataset.json         channel_names, labels, numTraining, file_ending
    DatasetXXX_Name/imagesTr/<ID>_0000.nii.gz .. <ID>_0003.nii.gz
    DatasetXXX_Name/labelsTr/<ID>.nii.gz
    DatasetXXX_Name/imagesTs/<ID>_0000.nii.gz ..           (optional, no labels)

`dataset.json` says which `_000k` file holds which modality (`channel_names`, nnU-Net v1's
`modality`; matched to MODALITIES by name, `modality_of_channel`) and what the label values
mean (`labels`, integer or region form; `labels.dataset_label_map`). The cases come out as
`brats.Case`s with naming "nnunet", their `paths` the `_000k` files and their label
convention the dataset's map, so they enter the same slice cache (`data.cache.prepare(...,
layout="nnunet")`, `data.source=nnunet`) and are loaded (`brats.load_case`) and predicted
(`predict --input=.../imagesTs`, written in the dataset's own label values) like BraTS case
folders: the same files give the same slices, labels and results either way.

Errors are `DataError`s of one line naming dataset.json and its field, or the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

from absl import logging

from brats_jax import MODALITIES
from brats_jax.data.brats import Case
from brats_jax.data.common import DataError
from brats_jax.labels import LabelError, LabelMap, dataset_label_map

DATASET_JSON = "dataset.json"
NAMING = "nnunet"
_NIFTI_ENDINGS = (".nii.gz", ".nii")

# Modality -> channel names meaning it, lower case with everything but letters, digits and
# "+" removed ("T1-ce" -> "t1ce", "T2 FLAIR" -> "t2flair").
_CHANNEL_NAMES = {
    "flair": {"flair", "t2f", "t2flair", "t2wflair", "fl"},
    "t1": {"t1", "t1n", "t1w", "native", "t1native", "t1pre", "t1wpre", "t1precontrast"},
    "t1ce": {
        "t1ce", "t1c", "t1gd", "t1wce", "t1wgd", "t1post", "t1wpost", "t1+c", "t1+gd", "t1w+c",
        "t1contrast", "t1postcontrast", "contrast", "ce", "gd",
    },
    "t2": {"t2", "t2w"},
}  # fmt: skip
_CHANNEL_HINT = "flair/t2f, t1/t1n/t1w/native, t1ce/t1c/t1gd/contrast, t2/t2w"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset.json, read: `channels` maps each of MODALITIES to its channel index,
    `label_map` the dataset's label values onto the training classes."""

    json_path: pathlib.Path
    channels: dict
    label_map: LabelMap
    file_ending: str
    num_training: int | None


def modality_of_channel(name: str) -> str | None:
    """The modality of MODALITIES a channel name means (case-insensitive, common
    spellings: FLAIR / T2f, T1 / T1n / T1w / native, T1ce / T1c / T1Gd / T1-ce / contrast,
    T2 / T2w), None when it means none of them."""
    key = re.sub(r"[^a-z0-9+]", "", str(name).lower())
    hits = [m for m, names in _CHANNEL_NAMES.items() if key in names]
    return hits[0] if hits else None


def is_dataset(root: str | os.PathLike) -> bool:
    """True when `root` is an nnU-Net raw dataset folder (dataset.json and imagesTr/)."""
    root = pathlib.Path(root)
    return (root / DATASET_JSON).is_file() and (root / "imagesTr").is_dir()


def is_images_folder(folder: str | os.PathLike) -> bool:
    """True when `folder` directly holds nnU-Net channel files (`<ID>_0000.nii[.gz]`):
    an imagesTr / imagesTs folder, or any folder in that layout."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return False
    return any(n.endswith(tuple(f"_0000{e}" for e in _NIFTI_ENDINGS)) for n in os.listdir(folder))


def _channels(spec, where: str) -> dict:
    """channel_names ({"0": "T1", ...}) -> {modality: channel index}; DataError unless the
    four modalities are told apart (each named once, none unknown, keys 0..n-1)."""
    field = f"{where} channel_names"
    if not isinstance(spec, dict) or not spec:
        raise DataError(
            f'{field}: expected an object like {{"0": "T1", "1": "T1ce", '
            f'"2": "T2", "3": "Flair"}}, got {spec!r}'
        )
    if not all(str(k).isdigit() for k in spec):
        raise DataError(f'{field} {spec}: keys must be channel indices ("0", "1", ...)')
    found: dict[str, list[int]] = {}
    for key, name in sorted(spec.items(), key=lambda kv: int(kv[0])):
        modality = modality_of_channel(name)
        if modality is None:
            raise DataError(
                f"{field} {spec}: cannot tell which BraTS modality channel {key} "
                f"{name!r} is; expected one of {_CHANNEL_HINT}"
            )
        found.setdefault(modality, []).append(int(key))
    if dup := {m: ks for m, ks in found.items() if len(ks) > 1}:
        m, ks = next(iter(dup.items()))
        raise DataError(
            f"{field} {spec}: channels {ks} are all {m}; each of "
            f"{', '.join(MODALITIES)} must be named once"
        )
    if missing := [m for m in MODALITIES if m not in found]:
        raise DataError(
            f"{field} {spec}: no {', '.join(missing)} channel; the four BraTS "
            f"modalities are {_CHANNEL_HINT}"
        )
    if sorted(int(k) for k in spec) != list(range(len(spec))):
        raise DataError(f"{field} {spec}: keys must be the channel indices 0..{len(spec) - 1}")
    return {m: found[m][0] for m in MODALITIES}


def read_dataset(path: str | os.PathLike) -> Dataset:
    """Reads a dataset.json (or the one in folder `path`) -> Dataset. DataError (one line,
    naming the file and field) when it is missing, not JSON, or its channel_names (v1:
    modality) or labels cannot be mapped onto the BraTS modalities and classes."""
    p = pathlib.Path(path)
    p = p / DATASET_JSON if p.is_dir() else p
    if not p.is_file():
        raise DataError(
            f"{p} not found; an nnU-Net dataset needs its dataset.json (channel_names "
            "and labels) to be read"
        )
    try:
        spec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{p}: expected a JSON object")
    where = str(p)
    channel_spec = spec.get("channel_names", spec.get("modality"))
    if channel_spec is None:
        raise DataError(f"{where}: no channel_names (which _000k file is which modality)")
    channels = _channels(channel_spec, where)
    if "labels" not in spec:
        raise DataError(f"{where}: no labels (what each label value is)")
    try:
        label_map = dataset_label_map(
            spec["labels"],
            regions_class_order=spec.get("regions_class_order"),
            where=where,
            name=p.parent.name,
        )
    except LabelError as e:
        raise DataError(str(e)) from None
    ending = spec.get("file_ending", ".nii.gz")
    if ending not in _NIFTI_ENDINGS:
        raise DataError(f"{where} file_ending {ending!r}: only NIfTI (.nii.gz, .nii) is read")
    num = spec.get("numTraining")
    return Dataset(p, channels, label_map, ending, num if isinstance(num, int) else None)


def _cases_in(
    folder: pathlib.Path,
    dataset: Dataset,
    labels_folder: pathlib.Path | None,
    *,
    require_labels: bool,
    allow_missing: bool = False,
) -> list[Case]:
    """The cases of an images folder, sorted by ID: `<ID>_000k<ending>` for each channel of
    dataset.json (with `allow_missing`, one may be absent: its path is None), the label
    `labels_folder/<ID><ending>` (None when absent, unless `require_labels`)."""
    ending = dataset.file_ending
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    files: dict[str, dict[int, pathlib.Path]] = {}
    for name in sorted(os.listdir(folder)):
        if m := pattern.match(name):
            files.setdefault(m["case"], {})[int(m["channel"])] = folder / name
    if not files:
        raise DataError(
            f"{folder}: no nnU-Net image files <ID>_0000{ending} .. "
            f"<ID>_{len(MODALITIES) - 1:04d}{ending}"
        )
    names = {k: m for m, k in dataset.channels.items()}
    cases = []
    for case_id, by_channel in files.items():
        if extra := sorted(set(by_channel) - set(names)):
            raise DataError(
                f"{by_channel[extra[0]]}: channel {extra[0]} is not in "
                f"{dataset.json_path} channel_names"
            )
        missing = [k for k in sorted(names) if k not in by_channel]
        if len(missing) > (1 if allow_missing else 0):
            k = missing[0]
            raise DataError(
                f"{folder}: case {case_id} has no {case_id}_{k:04d}{ending} (channel "
                f"{k}, {names[k]} in {dataset.json_path})"
            )
        seg = labels_folder / f"{case_id}{ending}" if labels_folder else None
        if seg is not None and not seg.is_file():
            if require_labels:
                raise DataError(f"case {case_id}: label file {seg} does not exist")
            seg = None
        paths = {m: by_channel.get(k) for m, k in dataset.channels.items()}
        cases.append(Case(case_id, folder, NAMING, paths, seg, dataset.label_map))
    return cases


def find_cases(root: str | os.PathLike) -> list[Case]:
    """The training cases of an nnU-Net raw dataset folder (imagesTr + labelsTr, read
    through its dataset.json), sorted by case ID. DataError (one line) when `root` is not
    such a folder, dataset.json does not map onto the BraTS modalities and classes, or a
    case lacks a channel or label file."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"nnU-Net dataset {root} does not exist")
    if not is_dataset(root):
        raise DataError(
            f"{root} is not an nnU-Net raw dataset folder; expected "
            "DatasetXXX_Name/ with dataset.json, imagesTr/ and labelsTr/"
        )
    dataset = read_dataset(root)
    cases = _cases_in(root / "imagesTr", dataset, root / "labelsTr", require_labels=True)
    if dataset.num_training is not None and dataset.num_training != len(cases):
        logging.warning(
            "%s: numTraining is %d but imagesTr holds %d case(s)",
            dataset.json_path,
            dataset.num_training,
            len(cases),
        )
    return cases


def find_dataset_json(folder: str | os.PathLike) -> pathlib.Path:
    """The dataset.json of an images folder: in it, or in its parent (the dataset folder of
    imagesTs/). DataError naming both places when there is none."""
    folder = pathlib.Path(folder)
    for candidate in (folder / DATASET_JSON, folder.parent / DATASET_JSON):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{folder} holds nnU-Net image files (<ID>_0000.nii.gz ...) but no "
        f"{DATASET_JSON} is in it or in {folder.parent}; it is needed to know "
        "which file is which modality"
    )


def cases_in_folder(folder: str | os.PathLike, *, allow_missing: bool = False) -> list[Case]:
    """The cases of an images folder (imagesTs, imagesTr, or any folder of `<ID>_000k`
    files), read through the dataset.json in it or its parent; labels from the sibling
    labels folder (imagesTr -> labelsTr, imagesTs -> labelsTs) where present.
    `allow_missing`: a case may lack one channel file (its path is None)."""
    folder = pathlib.Path(folder)
    dataset = read_dataset(find_dataset_json(folder))
    labels = None
    if folder.name.startswith("images"):
        labels = folder.parent / ("labels" + folder.name[len("images") :])
    return _cases_in(
        folder,
        dataset,
        labels if labels is not None and labels.is_dir() else None,
        require_labels=False,
        allow_missing=allow_missing,
    )
