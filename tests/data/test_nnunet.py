"""nnU-Net raw datasets (`data.source=nnunet`, `brats_jax.data.nnunet`): dataset.json's
channels and labels mapped by what they are, the same slices as the BraTS layout of the same
files, one-line errors for a dataset.json that does not match, and predict on imagesTs.

Each dataset is hand-written: the conftest's tiny labelled cases (16x16x8, all four
classes), written once as BraTS case folders and once in nnU-Net's layout.
"""

import json
import pathlib

import ml_collections
import nibabel as nib
import numpy as np
import pytest

from brats_jax import labels, predict
from brats_jax.data import DataError, load_case, make_source, nnunet, prepare
from brats_jax.data.cache import NiftiCacheSource
from brats_jax.inference import case_lists, case_prediction
from brats_jax.runs import train_state

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS's voxel order
# nnU-Net's BraTS 2021 conversion (Dataset137_BraTS2021): channels T1, T1ce, T2, Flair;
# file values ED 1, NCR 2, ET 3 as regions
NNUNET_CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
REGION_LABELS = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [2, 3],
    "enhancing tumor": [3],
}
REGION_VALUES = {0: 0, 1: 2, 2: 1, 3: 3}  # training class (0 bg, 1 NCR, 2 ED, 3 ET) -> file
TRAIN_FROM_2018 = {0: 0, 1: 1, 2: 2, 4: 3}  # BraTS 2018 file value -> training class


def _brats_release(root, write_labelled_case, ids=("A", "B")):
    """BraTS 2018 case folders under `root` -> {case id: (raw arrays by modality, training
    classes)}; each case's modalities differ (seeded)."""
    out = {}
    for k, cid in enumerate(ids):
        rng = np.random.default_rng(10 + k)
        over = {}
        for m in ("flair", "t1", "t1ce", "t2"):
            x = rng.integers(1, 1000, write_labelled_case.shape).astype(np.int16)
            x[:4] = 0
            over[m] = x
        _, raws, lab = write_labelled_case(root, cid, "2018", **over)
        out[cid] = (raws, np.vectorize(TRAIN_FROM_2018.get)(lab).astype(np.uint8))
    return out


def _save(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def _nnunet_dataset(
    root,
    cases,
    *,
    channels=NNUNET_CHANNELS,
    label_spec=REGION_LABELS,
    values=REGION_VALUES,
    images="imagesTr",
    extra=None,
):
    """Writes `cases` ({id: (raws by modality, training classes)}) as an nnU-Net dataset:
    `<images>/<id>_000k.nii.gz` by `channels` (index -> name; the file of a name is the
    modality the test means by it: `_MEANS`), labels as file values `values[class]` in
    labelsTr (for imagesTr), dataset.json with `label_spec`. Returns the dataset folder."""
    root = pathlib.Path(root)
    for cid, (raws, classes) in cases.items():
        for k, name in channels.items():
            _save(raws[_MEANS[name]], root / images / f"{cid}_{int(k):04d}.nii.gz")
        if images == "imagesTr":
            lut = np.zeros(max(values) + 1, np.uint8)
            for c, v in values.items():
                lut[c] = v
            _save(lut[classes], root / "labelsTr" / f"{cid}.nii.gz")
    spec = {
        "channel_names": channels,
        "labels": label_spec,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        **(extra or {}),
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


# what each channel name used by these tests means (independent of the code's own table)
_MEANS = {
    "T1": "t1", "T1ce": "t1ce", "T2": "t2", "Flair": "flair", "t2w": "t2", "FLAIR": "flair",
    "T1Gd": "t1ce", "t1n": "t1", "t2f": "flair", "T1w": "t1", "t1c": "t1ce", "native": "t1",
    "contrast": "t1ce", "t1-ce": "t1ce",
}  # fmt: skip


def _source(root, kind, cache):
    cfg = ml_collections.ConfigDict(dict(source=kind, root=str(root), cache_dir=str(cache)))
    return make_source(cfg)


def _records(src):
    return [src[i] for i in range(len(src))]


def _assert_same_source(a, b):
    assert a.case_ids == b.case_ids and len(a) == len(b)
    np.testing.assert_array_equal(a.table.class_counts, b.table.class_counts)
    np.testing.assert_array_equal(a.table.brain_fraction, b.table.brain_fraction)
    for ra, rb in zip(_records(a), _records(b), strict=True):
        assert (ra["case_id"], ra["slice_index"]) == (rb["case_id"], rb["slice_index"])
        np.testing.assert_array_equal(ra["image"], rb["image"])
        np.testing.assert_array_equal(ra["label"], rb["label"])


# ------------------------------------------------------------------------------- labels
def test_label_maps_follow_what_each_label_is_not_its_number():
    """Integer form in any numbering and spelling, nnU-Net v1's value -> name, and the region
    form all map onto the training classes (0 bg, 1 NCR, 2 ED, 3 ET) and back."""
    region = labels.dataset_label_map(REGION_LABELS, regions_class_order=[1, 2, 3])
    assert region.pairs() == [[0, 0], [1, 2], [2, 1], [3, 3]]  # ED 1, NCR 2, ET 3
    assert region.release == (0, 2, 1, 3)
    spec = {"bg": 0, "Enhancing Tumour": 1, "peritumoral oedema": 2, "NCR/NET": 5}
    shuffled = labels.dataset_label_map(spec)
    assert shuffled.pairs() == [[0, 0], [1, 3], [2, 2], [5, 1]]
    v1 = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert labels.dataset_label_map(v1).pairs() == region.pairs()
    gli = {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}  # nnU-Net's BraTS 2024 names
    assert labels.dataset_label_map(gli).pairs() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    file = np.array([0, 1, 2, 5, 1])
    classes = labels.to_train_labels(file, shuffled)
    np.testing.assert_array_equal(classes, [0, 3, 2, 1, 3])
    np.testing.assert_array_equal(labels.to_release_labels(classes, shuffled), file)
    # the releases' conventions are unchanged
    np.testing.assert_array_equal(labels.to_train_labels(np.array([0, 1, 2, 4]), "2018"),
                                  [0, 1, 2, 3])  # fmt: skip
    assert labels.et_label("2018") == 4 and labels.et_label("2023") == 3
    assert labels.et_label(region) == 3 and labels.et_label(shuffled) == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"background": 0, "edema": 1, "tumor": 2, "ET": 3}, "which class 'tumor'"),
        ({"background": 0, "ED/ET": 1, "NCR": 2, "ET": 3}, r"'ED/ET' is \(it reads as ED and ET\)"),
        ({"background": 0, "edema": 1, "ET": 3}, "no value for NCR"),
        ({"background": 0, "ED": 1, "NCR": 1, "ET": 3}, "value 1 is given two classes"),
        ({**REGION_LABELS, "tumor core": [2, 3, 4]}, "value 4 is in TC only"),
        ({k: v for k, v in REGION_LABELS.items() if k != "tumor core"}, "no region TC"),
    ],
)
def test_label_lists_that_cannot_be_mapped_fail_in_one_line(spec, message):
    with pytest.raises(labels.LabelError, match=message) as e:
        labels.dataset_label_map(spec, where="X/dataset.json")
    assert str(e.value).startswith("X/dataset.json labels:") and "\n" not in str(e.value)


# --------------------------------------------------------------------- the slice cache
@pytest.mark.parametrize("form", ["regions", "integers"])
def test_same_slices_and_labels_as_the_brats_layout_of_the_same_files(
    form, tmp_path, write_labelled_case
):
    """Region form (nnU-Net's BraTS conversion: channels T1, T1ce, T2, Flair; ED 1, NCR 2,
    ET 3) and an integer form numbered otherwise give the cache the BraTS folders give."""
    cases = _brats_release(tmp_path / "brats", write_labelled_case)
    if form == "regions":
        ds = _nnunet_dataset(tmp_path / "Dataset137_BraTS2021", cases,
                             extra={"regions_class_order": [1, 2, 3]})  # fmt: skip
    else:
        spec = {"background": 0, "enhancing tumour": 1, "necrosis": 2, "edema": 3}
        ds = _nnunet_dataset(tmp_path / "Dataset001_X", cases, label_spec=spec,
                             values={0: 0, 1: 2, 2: 3, 3: 1})  # fmt: skip
    brats_src = _source(tmp_path / "brats", "nifti", tmp_path / "c1")
    nnunet_src = _source(ds, "nnunet", tmp_path / "c2")
    _assert_same_source(brats_src, nnunet_src)
    assert all(nnunet_src.table.class_counts[:, k].sum() > 0 for k in range(4))  # all classes
    for cid, (_, classes) in cases.items():
        _, label = nnunet_src.load_volume(cid)
        np.testing.assert_array_equal(label, classes)
    (case,) = [c for c in nnunet.find_cases(ds) if c.case_id == "A"]
    a, b = load_case(tmp_path / "brats" / "A"), load_case(case)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)


def test_channel_names_in_another_order_are_mapped_by_name(tmp_path, write_labelled_case):
    """channel_names in an order unlike MODALITIES, in other spellings: each file is read as
    the modality its name says (taken by index, flair would be the T2 file)."""
    cases = _brats_release(tmp_path / "brats", write_labelled_case, ids=("A",))
    channels = {"0": "t2w", "1": "FLAIR", "2": "T1Gd", "3": "t1n"}
    ds = _nnunet_dataset(tmp_path / "Dataset002_Y", cases, channels=channels)
    (case,) = nnunet.find_cases(ds)
    assert {m: p.name for m, p in case.paths.items()} == {
        "flair": "A_0001.nii.gz", "t1": "A_0003.nii.gz", "t1ce": "A_0002.nii.gz",
        "t2": "A_0000.nii.gz",
    }  # fmt: skip
    np.testing.assert_array_equal(load_case(case).image, load_case(tmp_path / "brats/A").image)
    for names in ({"0": "T1w", "1": "contrast", "2": "T2", "3": "t2f"},
                  {"0": "native", "1": "t1-ce", "2": "t2w", "3": "FLAIR"}):  # fmt: skip
        assert [nnunet.modality_of_channel(n) for n in names.values()] == [
            _MEANS[n] for n in names.values()
        ]


def test_an_edited_dataset_json_converts_the_cases_again(tmp_path, write_labelled_case):
    """The cache records dataset.json's channels and label map: a dataset.json renumbered
    after the cache was built (here NCR and ED swapped) is read again, not served stale."""
    cases = _brats_release(tmp_path / "brats", write_labelled_case, ids=("A",))
    spec = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
    ds = _nnunet_dataset(tmp_path / "Dataset003_Z", cases, label_spec=spec)
    out = prepare(ds, tmp_path / "c", progress=False, layout="nnunet")
    _, before = NiftiCacheSource(out).load_volume("A")
    np.testing.assert_array_equal(before, cases["A"][1])
    spec = {"background": 0, "edema": 2, "necrosis": 1, "enhancing": 3}  # the fix of a typo
    (ds / "dataset.json").write_text(json.dumps({**json.loads((ds / "dataset.json").read_text()),
                                                 "labels": spec}))  # fmt: skip
    prepare(ds, out, progress=False, layout="nnunet")
    _, after = NiftiCacheSource(out).load_volume("A")
    swapped = np.choose(cases["A"][1], [0, 2, 1, 3])
    np.testing.assert_array_equal(after, swapped)


# ------------------------------------------------------------- dataset.json mismatches
def _break_missing_file(ds):
    (ds / "imagesTr" / "A_0002.nii.gz").unlink()


def _break_channel_names(ds):
    spec = json.loads((ds / "dataset.json").read_text())
    del spec["channel_names"]["2"]
    (ds / "dataset.json").write_text(json.dumps(spec))


def _break_label_value(ds):
    path = ds / "labelsTr" / "B.nii.gz"
    lab = np.asarray(nib.load(str(path)).dataobj).copy()
    lab[0, 0, 0] = 4  # not in dataset.json's labels (0..3)
    _save(lab, path)


def _break_duplicate_channel(ds):
    spec = json.loads((ds / "dataset.json").read_text())
    spec["channel_names"]["2"] = "T1w"  # T1 named twice, no T2
    (ds / "dataset.json").write_text(json.dumps(spec))


def _break_unknown_channel(ds):
    spec = json.loads((ds / "dataset.json").read_text())
    spec["channel_names"]["3"] = "DWI"
    (ds / "dataset.json").write_text(json.dumps(spec))


def _break_extra_file(ds):
    _save(np.zeros((16, 16, 8), np.int16), ds / "imagesTr" / "A_0004.nii.gz")


@pytest.mark.parametrize(
    "breaks, names",
    [
        (_break_missing_file, ["imagesTr", "A_0002.nii.gz", "channel 2", "dataset.json"]),
        (_break_channel_names, ["dataset.json channel_names", "no t2 channel"]),
        (_break_label_value, ["labelsTr/B.nii.gz", "unknown label values [4]", "dataset.json"]),
        (_break_duplicate_channel, ["dataset.json channel_names", "[0, 2] are all t1"]),
        (_break_unknown_channel, ["dataset.json channel_names", "channel 3 'DWI'"]),
        (_break_extra_file, ["A_0004.nii.gz", "channel 4 is not in", "channel_names"]),
    ],
)
def test_a_dataset_json_unlike_the_files_fails_in_one_line(
    breaks, names, tmp_path, write_labelled_case
):
    cases = _brats_release(tmp_path / "brats", write_labelled_case)
    ds = _nnunet_dataset(tmp_path / "Dataset004_W", cases)
    breaks(ds)
    with pytest.raises(DataError) as e:
        _source(ds, "nnunet", tmp_path / "c")
    message = str(e.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message


def test_data_source_choices_and_layout_hints(tmp_path, write_labelled_case):
    from brats_jax.inference import postprocess_tuning
    from brats_jax.training import config_choices
    from configs import unet
    from experiments import run

    config = unet.get_config("tiny")
    config.data.source = "nnunet"
    assert config_choices.choice_errors(config) == []
    cases = _brats_release(tmp_path / "brats", write_labelled_case, ids=("A",))
    ds = _nnunet_dataset(tmp_path / "Dataset005_V", cases)
    with pytest.raises(DataError, match="data.source=nnunet"):
        _source(ds, "nifti", tmp_path / "c")
    with pytest.raises(DataError, match="not an nnU-Net raw dataset folder"):
        _source(tmp_path / "brats", "nnunet", tmp_path / "c")
    # a root given alone is recognised; tune_postprocessing looks case IDs up in the dataset
    assert run.infer_data_source({"data.root": str(ds)})["data.source"] == "nnunet"
    (case,) = postprocess_tuning.resolve_cases(["A"], str(ds))
    assert case.naming == "nnunet" and case.seg == ds / "labelsTr" / "A.nii.gz"


# ----------------------------------------------------------------------------- predict
class _ScaleModel:
    """Stand-in for a trained run: logits = the input's channels (flair, t1, t1ce, t2), so
    the predicted class is the modality that is largest at a voxel."""

    def apply(self, variables, x, train):
        return x * variables["scale"]


@pytest.fixture
def stand_in_run(tmp_path, monkeypatch):
    config = ml_collections.ConfigDict({
        "data": {"image_size": 16, "source": "nnunet"},
        "eval": {"batch_size": 4},
        "model": {"name": "unet", "base_features": 8},
    })  # fmt: skip
    variables = {"scale": np.float32(1.0)}
    monkeypatch.setattr(
        train_state, "load_trained", lambda w, step=None: (config, _ScaleModel(), variables)
    )
    run = tmp_path / "run"
    run.mkdir()
    return str(run)


@pytest.mark.parametrize(
    "label_spec, values",
    [
        (REGION_LABELS, REGION_VALUES),  # ED 1, NCR 2, ET 3
        ({"background": 0, "ET": 1, "NCR": 2, "ED": 3}, {0: 0, 1: 2, 2: 3, 3: 1}),
    ],
)
def test_predict_on_images_ts_writes_the_datasets_label_values(
    label_spec, values, stand_in_run, tmp_path, write_labelled_case, run_command
):
    """predict --input=imagesTs --output=DIR writes <ID>.nii.gz with dataset.json's values
    for the classes the same run predicts for the BraTS folder of the same files."""
    cases = _brats_release(tmp_path / "brats", write_labelled_case)
    ds = _nnunet_dataset(tmp_path / "Dataset006_U", cases, label_spec=label_spec,
                         values=values, images="imagesTs")  # fmt: skip
    out = tmp_path / "out"
    run_command(
        predict, f"--workdir={stand_in_run}", f"--input={ds / 'imagesTs'}", f"--output={out}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["A.nii.gz", "B.nii.gz"]
    lut = np.array([values[c] for c in range(4)])
    for cid in cases:
        classes = np.argmax(load_case(tmp_path / "brats" / cid).image, -1)  # the stand-in's
        assert set(np.unique(classes)) == {0, 1, 2, 3}
        written = np.asarray(nib.load(str(out / f"{cid}.nii.gz")).dataobj)
        np.testing.assert_array_equal(written, lut[classes])
        brats_out = case_prediction.predict_case(
            stand_in_run, tmp_path / "brats" / cid, tmp_path / f"{cid}_brats.nii.gz"
        )
        np.testing.assert_array_equal(written, lut[np.vectorize(TRAIN_FROM_2018.get)(brats_out)])


def test_an_images_folder_without_dataset_json_fails_in_one_line(tmp_path, write_labelled_case):
    cases = _brats_release(tmp_path / "brats", write_labelled_case, ids=("A",))
    ds = _nnunet_dataset(tmp_path / "Dataset007_T", cases, images="imagesTs")
    (ds / "dataset.json").unlink()
    with pytest.raises(DataError) as e:
        case_lists.cases_from_input(str(ds / "imagesTs"))
    assert "dataset.json" in str(e.value) and "\n" not in str(e.value)
    assert str(ds / "imagesTs") in str(e.value)
