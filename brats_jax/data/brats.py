"""BraTS NIfTI releases: case discovery (both namings), loading, z-scoring.

Two namings are recognised inside a case folder `<ID>/`:

- "2018" (BraTS 2018-2021): `<ID>_{t1,t1ce,t2,flair,seg}.nii[.gz]`, labels {0,1,2,4};
  the raw BraTS 2020 case 355 names its label file `W39_1998.09.19_Segm.nii`, which is
  accepted as that case's label file (so is any single `*_Segm.nii[.gz]` when `<ID>_seg` is absent).
- "2023" (BraTS 2023 GLI): `<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz`, labels {0,1,2,3}.

Arrays are in the voxel order every BraTS release stores (`ORIENTATION`, LPS: axes
towards left, posterior, superior): slice `s` of a case is `volume[:, :, s]`, an axial slice,
the same slicing as the Kaggle sliced release. A file stored otherwise (e.g. RAS after
MONAI's `Orientationd` or nibabel's `as_closest_canonical`, or a sagittal acquisition) is
reoriented when read (flips and axis swaps, no resampling; `read_volume`), so models see
what they were trained on; `CaseData.to_file` maps outputs back to the files' voxel order
(`fileio.write_nifti_like` applies it).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import zlib

import numpy as np
from absl import logging

from brats_jax import MODALITIES
from brats_jax.data.common import DataError
from brats_jax.labels import LabelError, LabelMap, label_map, to_train_labels

# Modality -> file stem suffix, per naming. Channel order is MODALITIES (flair, t1, t1ce, t2).
_SUFFIXES = {
    "2018": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"},
}
_EXTS = (".nii.gz", ".nii")
ORIENTATION = ("L", "P", "S")  # nibabel axis codes of BraTS's stored voxel order
_SEGM_QUIRK = re.compile(r".*_Segm\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class Case:
    """One case: `paths` maps each of MODALITIES to a file; `seg` may be None.

    `naming` is the file naming ("2018", "2023", or "nnunet": `data.nnunet`); the label
    convention is the release's of the naming, or `label_map` when given (an nnU-Net
    dataset's own, from its dataset.json): `convention`.
    """

    case_id: str
    directory: pathlib.Path
    naming: str  # "2018" | "2023" | "nnunet"
    paths: dict
    seg: pathlib.Path | None
    label_map: LabelMap | None = None

    @property
    def convention(self) -> LabelMap:
        """The label convention of the case's files (`labels.LabelMap`)."""
        return self.label_map or label_map(self.naming)


@dataclasses.dataclass
class CaseData:
    """A loaded case.

    image: float32 (H, W, D, 4) in MODALITIES order, each modality z-scored with the mean and
      std of its brain (non-zero) voxels; the affine map is applied to every voxel, so
      background becomes the constant -mean/std of that modality (see `zscore_brain`).
      With `load_case(..., normalization="slice")`: z-scored per axial slice instead.
    label: int32 (H, W, D) in {0..3} (ET = 3), or None when the case has no label file.
    brain: bool (H, W, D), voxels where any raw modality is non-zero.
    affine, header: of these arrays (in `ORIENTATION`).
    naming, label_map: the case's (`Case`); `convention` the label convention of its files,
      what a prediction for it is written in.
    to_file: nibabel orientation transform from these arrays to the files' voxel order, or
      None when the files are stored in `ORIENTATION` (every BraTS release).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    brain: np.ndarray
    affine: np.ndarray
    header: object
    naming: str
    to_file: np.ndarray | None = None
    label_map: LabelMap | None = None

    @property
    def convention(self) -> LabelMap:
        """The label convention of the case's files (`labels.LabelMap`)."""
        return self.label_map or label_map(self.naming)


def _find_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for ext in _EXTS:
        p = directory / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _case_from_dir(directory: pathlib.Path, allow_missing: bool = False) -> Case | None:
    """Returns the Case in `directory`, None if it is not a case folder; DataError if partial
    (with `allow_missing`: if more than one modality file is missing; a missing one's path
    is None)."""
    case_id = pathlib.Path(os.path.abspath(directory)).name  # "." and ".." have names too
    names = os.listdir(directory)
    for naming, suffixes in _SUFFIXES.items():
        stems = {m: f"{case_id}{suffixes[m]}" for m in MODALITIES}
        found = {m: _find_file(directory, s) for m, s in stems.items()}
        if not any(found.values()):
            continue
        missing = [m for m, p in found.items() if p is None]
        if len(missing) > (1 if allow_missing else 0):
            expected = ", ".join(f"{stems[m]}.nii[.gz]" for m in missing)
            raise DataError(
                f"case {case_id} ({directory}): missing modality file(s) {missing}; "
                f"expected {expected} (BraTS {naming} naming)"
            )
        seg = _find_file(directory, f"{case_id}{suffixes['seg']}")
        if seg is None:
            quirks = sorted(n for n in names if _SEGM_QUIRK.match(n))
            if len(quirks) == 1:
                seg = directory / quirks[0]
        return Case(case_id, directory, naming, found, seg)
    return None


def case_from_files(
    files: dict[str, str | os.PathLike], *, naming: str = "2018", case_id: str | None = None
) -> Case:
    """A Case from four modality files with any names (a new patient's own NIfTI files).

    `files` maps each of MODALITIES (flair, t1, t1ce, t2) to a .nii/.nii.gz path; `naming`
    ("2018": ET = 4, "2023": ET = 3) is the label convention written for it; `case_id`
    defaults to the FLAIR file's name without extension. The case has no label file.
    Raises DataError naming a missing modality or file, or an unknown naming.
    """
    if naming not in _SUFFIXES:
        raise DataError(f"naming {naming!r}: expected one of {sorted(_SUFFIXES)}")
    unknown = sorted(set(files) - set(MODALITIES))
    missing = [m for m in MODALITIES if not files.get(m)]
    if unknown or missing:
        raise DataError(
            f"modality files: missing {missing}, unknown {unknown}; expected exactly {MODALITIES}"
        )
    paths = {m: pathlib.Path(files[m]) for m in MODALITIES}
    for m, path in paths.items():
        if not path.is_file():
            raise DataError(f"{m} file {path} does not exist")
    if case_id is None:
        name = paths["flair"].name
        case_id = next((name[: -len(e)] for e in _EXTS if name.endswith(e)), name)
    return Case(case_id, paths["flair"].parent, naming, paths, None)


def find_cases(root: str | os.PathLike, *, allow_missing: bool = False) -> list[Case]:
    """Finds BraTS case folders under `root` (recursively), both namings, .nii and .nii.gz.

    `root` may itself be a case folder. Returns cases sorted by case id. Raises DataError when
    `root` is missing, when a case folder lacks a modality file (with `allow_missing`: more
    than one; the missing one's path is None), or when nothing is found.
    """
    root = pathlib.Path(root)
    if not root.exists():
        raise DataError(
            f"NIfTI root {root} does not exist; expected a folder of BraTS case folders"
        )
    if not root.is_dir():
        raise DataError(f"NIfTI root {root} is not a folder")
    cases = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        dirnames.sort()
        case = _case_from_dir(pathlib.Path(dirpath), allow_missing)
        if case is not None:
            cases.append(case)
            dirnames[:] = []
    if not cases:
        raise DataError(
            f"no BraTS case folders under {root}; expected <ID>/<ID>_{{t1,t1ce,t2,flair,seg}}"
            ".nii[.gz] or <ID>/<ID>-{t1n,t1c,t2w,t2f,seg}.nii.gz"
        )
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"duplicate case ids under {root}: {dup[:5]}")
    return sorted(cases, key=lambda c: c.case_id)


def read_nifti(path: str | os.PathLike):
    """Reads a NIfTI file -> (array in stored dtype with scaling applied, affine (4,4), header).

    Raises DataError naming the file when it is truncated or corrupt.
    """
    import nibabel as nib

    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"NIfTI file {path} does not exist")
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise DataError(
            f"cannot read NIfTI file {path} (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    return np.asarray(arr), np.asarray(img.affine, np.float64), img.header


def zscore_brain(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(x - mean) / std with mean, std over `brain` voxels, applied to all voxels -> float32.

    volume: (H, W, D) any real dtype; brain: bool (H, W, D). An empty brain or zero std gives
    (x - mean) with std taken as 1 (all zeros when the volume is constant).
    """
    x = volume.astype(np.float64)
    if not brain.any():
        return np.zeros(x.shape, np.float32)
    mean, std = brain_mean_std(volume, brain)
    return ((x - mean) / std).astype(np.float32)


def brain_mean_std(volume: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """The (mean, std) that `zscore_brain` applies: float64 over `brain` voxels, std taken as
    1.0 when not > 0; (0.0, 1.0) for an empty brain. volume: (H, W, D); brain: bool."""
    vals = volume[brain].astype(np.float64)
    if vals.size == 0:
        return 0.0, 1.0
    mean, std = float(vals.mean()), float(vals.std())
    return mean, (std if std > 0 else 1.0)


def zscore_slices(volume: np.ndarray) -> np.ndarray:
    """Z-scores each axial slice of a (H, W, D) volume over all its pixels -> float32.

    The Kaggle sliced release's normalisation (background included; a constant slice
    becomes 0), for models trained on it. Computed in float64.
    """
    x = volume.astype(np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)
    std = x.std(axis=(0, 1), keepdims=True)
    return np.where(std > 0, (x - mean) / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)


NORMALIZATIONS = ("brain", "slice")


def read_volume(path) -> tuple[np.ndarray, np.ndarray, object, np.ndarray | None]:
    """A 3-D NIfTI volume in `ORIENTATION` -> (array (H, W, D), its affine, its header,
    `to_file`: the orientation transform back to the file's voxel order, None when the file
    is stored in `ORIENTATION`). A trailing singleton 4th axis is dropped; DataError unless
    3-D or when the file cannot be read (`read_nifti`)."""
    import nibabel as nib
    from nibabel import orientations

    arr, aff, hdr = read_nifti(path)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {arr.shape}")
    stored, wanted = nib.io_orientation(aff), orientations.axcodes2ornt(ORIENTATION)
    if np.array_equal(stored, wanted):
        return arr, aff, hdr, None
    img = nib.Nifti1Image(arr, aff, hdr).as_reoriented(orientations.ornt_transform(stored, wanted))
    back = orientations.ornt_transform(wanted, stored)
    return np.asarray(img.dataobj), np.asarray(img.affine, np.float64), img.header, back


def _read_modalities(case: Case, present) -> tuple[list, np.ndarray, object, np.ndarray | None]:
    """The raw volumes of ``present`` modalities of ``case`` (each (H,W,D), in
    `ORIENTATION`), the first one's affine, header and `to_file` (`read_volume`); DataError
    when shapes or affines differ between files or a float volume has non-finite voxels."""
    raws, affine0, header0, first, to_file0 = [], None, None, None, None
    for m in present:
        p = case.paths[m]
        arr, aff, hdr, to_file = read_volume(p)
        if first is None:
            affine0, header0, first, to_file0 = aff, hdr, p, to_file
        elif arr.shape != raws[0].shape:
            raise DataError(
                f"case {case.case_id}: {p.name} has shape {arr.shape} but {first.name} has "
                f"{raws[0].shape}; all modalities must have the same shape"
            )
        elif not np.allclose(aff, affine0, atol=1e-3):
            raise DataError(
                f"case {case.case_id}: {p.name} affine differs from {first.name}'s; "
                "modalities must be co-registered on the same grid"
            )
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            n = int(np.size(arr) - np.isfinite(arr).sum())
            raise DataError(f"{p}: {n} non-finite voxel(s) (NaN/inf); expected finite intensities")
        raws.append(arr)
    return raws, affine0, header0, to_file0


def _read_label(case: Case, shape, affine) -> np.ndarray:
    """The case's label file in `ORIENTATION` as training classes {0..3}; DataError when its
    grid differs from the modalities' (`shape`, `affine`) or a value is outside the
    release's label set."""
    lab, aff, _, _ = read_volume(case.seg)
    if lab.shape != shape:
        raise DataError(
            f"case {case.case_id}: label {case.seg.name} has shape {lab.shape}, expected "
            f"{shape} like the modalities"
        )
    if not np.allclose(aff, affine, atol=1e-3):
        raise DataError(f"case {case.case_id}: label {case.seg.name} affine differs")
    try:
        return to_train_labels(lab, case.convention, where=f"case {case.case_id} ({case.seg})")
    except LabelError as e:
        raise DataError(str(e)) from None


def load_case(
    case: Case | str | os.PathLike,
    *,
    require_label: bool = False,
    normalization: str = "brain",
    allow_missing: bool = False,
    ignore_bad_label: bool = False,
) -> CaseData:
    """Loads a case folder (or Case): all four modalities + label, validated.

    Returns CaseData (image float32 (H,W,D,4), label int32 (H,W,D) {0..3} or None), in
    `ORIENTATION` whatever the files' voxel order (`read_volume`). The image is z-scored per
    modality over the volume's brain voxels (`normalization="brain"`, see `zscore_brain`) or
    per axial slice over all pixels as in the Kaggle release ("slice", see `zscore_slices`);
    `normalization=None` leaves the files' intensities as they are (image in the modalities'
    common dtype, `np.result_type`: what the slice cache stores). Raises DataError on
    missing files, mismatched shapes/affines between files, non-finite voxels, label values
    outside the release's set, or corrupt files (with `ignore_bad_label`, a label file that
    fails these checks is only warned about and dropped: for prediction, where a new
    patient's folder may hold a seg file of another convention); ValueError on an unknown
    `normalization`. `allow_missing`: one missing modality file is accepted (a warning names
    it) and its channel is 0 (what modality dropout, `augment.modality_dropout_p`, trains
    the model on).
    """
    if normalization not in (*NORMALIZATIONS, None):
        raise ValueError(f"normalization {normalization!r}: expected one of {NORMALIZATIONS}")
    if not isinstance(case, Case):
        d = pathlib.Path(case)
        if not d.is_dir():
            raise DataError(f"case folder {d} does not exist")
        c = _case_from_dir(d, allow_missing)
        if c is None:
            raise DataError(
                f"{d} is not a BraTS case folder; expected {d.name}_flair.nii[.gz] etc. "
                f"or {d.name}-t2f.nii.gz etc."
            )
        case = c
    if require_label and case.seg is None:
        suffix = _SUFFIXES.get(case.naming, {}).get("seg", "")  # nnU-Net: labelsTr/<ID>
        expected = f"{case.case_id}{suffix}.nii[.gz]"
        raise DataError(f"case {case.case_id} ({case.directory}): missing label file {expected}")
    present = [m for m in MODALITIES if case.paths.get(m) is not None]
    raws, affine0, header0, to_file = _read_modalities(case, present)
    shape0 = raws[0].shape
    brain = np.zeros(shape0, bool)
    for r in raws:
        brain |= r != 0
    zscore = {"slice": zscore_slices, "brain": lambda r: zscore_brain(r, brain)}.get(
        normalization, lambda r: r
    )
    normalized = dict(zip(present, (zscore(r) for r in raws), strict=True))
    for m in sorted(set(MODALITIES) - set(present)):
        logging.warning("case %s (%s): no %s file; its channel is filled with 0",
                        case.case_id, case.directory, m)  # fmt: skip
    dtype = np.float32 if normalization else np.result_type(*raws)
    zeros = np.zeros(shape0, dtype)
    image = np.stack([normalized.get(m, zeros) for m in MODALITIES], axis=-1)
    label = None
    if case.seg is not None:
        try:
            label = _read_label(case, shape0, affine0)
        except DataError as e:
            if not ignore_bad_label:
                raise
            logging.warning("%s; the label file is not needed here, so it is ignored", e)
    return CaseData(
        case.case_id, image, label, brain, affine0, header0, case.naming, to_file, case.label_map
    )


class NiftiDecodedSource:
    """Baseline slice source that decodes the four NIfTI volumes (+ label) on EVERY read.

    Far too slow for training (kept as the benchmark baseline). Same record dict as the other
    sources. No table: the index is built from file headers only (no decoding).
    """

    def __init__(self, root: str | os.PathLike):
        import nibabel as nib

        self.root = str(root)
        self._cases = find_cases(root)
        self._offsets = [0]
        for c in self._cases:
            depth = nib.load(str(c.paths["flair"])).shape[2]
            self._offsets.append(self._offsets[-1] + depth)

    def __len__(self) -> int:
        return self._offsets[-1]

    def __repr__(self) -> str:
        return (
            f"NiftiDecodedSource(root={self.root!r}, cases={len(self._cases)}, slices={len(self)})"
        )

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        s = i - self._offsets[k]
        data = load_case(self._cases[k])
        label = data.label[:, :, s] if data.label is not None else np.zeros(data.image.shape[:2])
        return dict(
            image=np.ascontiguousarray(data.image[:, :, s, :]),
            label=label.astype(np.int32),
            case_id=self._cases[k].case_id,
            slice_index=s,
        )
