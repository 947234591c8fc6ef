"""Label conventions (`brats_jax/labels.py`): release values, a LabelMap's checks and the
errors of files and dataset label lists, against hand-written tables and messages."""

import numpy as np
import pytest

from brats_jax import labels
from brats_jax.labels import LabelError, LabelMap

REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                 "enhancing tumor": [3]}  # fmt: skip


def test_release_conventions_both_ways():
    file_2018 = np.array([[0, 4], [2, 1]], np.int16)
    got = labels.to_train_labels(file_2018, "2018")
    assert got.dtype == np.int32 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, [[0, 3], [2, 1]])
    np.testing.assert_array_equal(labels.to_train_labels(np.array([3, 2]), "2023"), [3, 2])
    back = labels.to_release_labels(np.array([[0, 3], [2, 1]]))  # default: 2018
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, [[0, 4], [2, 1]])
    np.testing.assert_array_equal(labels.to_release_labels(np.array([3, 1]), "2023"), [3, 1])
    # integral floats (NIfTI stores float labels) read like integers
    np.testing.assert_array_equal(labels.to_train_labels(np.array([4.0, 0.0]), "2018"), [3, 0])
    assert labels.label_map("2023") is labels.label_map(labels.label_map("2023"))


def test_unknown_convention_and_values_are_one_line_errors():
    with pytest.raises(LabelError) as err:
        labels.label_map("2020")
    assert str(err.value) == "unknown label convention '2020'; expected one of 2018, 2023"
    with pytest.raises(LabelError) as err:
        labels.to_train_labels(np.array([0, 3, 1]), "2018", where="case7 seg")
    assert str(err.value) == (
        "case7 seg: unknown label values [3] for the BraTS 2018 convention "
        "(expected a subset of [0, 1, 2, 4])"
    )
    with pytest.raises(LabelError) as err:  # no `where`: the message says "label"
        labels.to_train_labels(np.array([7]), "2023")
    assert str(err.value).startswith("label: unknown label values [7] for the BraTS 2023")
    with pytest.raises(LabelError, match="^label: non-finite"):
        labels.label_map("2018").to_train(np.array([np.inf]))
    many = np.arange(5, 20)  # 15 unknown values: the message lists the first 10
    with pytest.raises(LabelError) as err:
        labels.to_train_labels(many, "2023")
    assert f"unknown label values {list(range(5, 15))} " in str(err.value)
    with pytest.raises(LabelError) as err:
        labels.to_train_labels(np.array([0.0, np.nan]), "2023", where="f.nii")
    assert str(err.value) == "f.nii: non-finite label values; expected (0, 1, 2, 3)"
    with pytest.raises(LabelError) as err:
        labels.to_train_labels(np.array([1.0, 2.5], np.float32), "2023", where="f.nii")
    assert str(err.value) == "f.nii: non-integer label values (dtype float32)"
    with pytest.raises(LabelError) as err:
        labels.to_release_labels(np.array([0, 4]))
    assert str(err.value) == "training labels must be in 0..3, got range 0..4"
    with pytest.raises(LabelError, match="got range -1..2"):
        labels.to_release_labels(np.array([-1, 2]))
    assert labels.to_release_labels(np.zeros((0,), np.int32)).shape == (0,)


def test_label_map_checks_its_own_tables():
    with pytest.raises(LabelError) as err:
        LabelMap("x", (0, 1, 2), (0, 1), (0, 1, 2, 2), "my map")
    assert str(err.value) == "my map: values, classes and release do not match"
    with pytest.raises(LabelError, match="values, classes and release do not match"):
        LabelMap("x", (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2), "my map")
    with pytest.raises(LabelError) as err:  # 5 is not a value
        LabelMap("x", (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 5), "my map")
    assert str(err.value) == "my map: the value 5 written for ET is not one of its values"
    with pytest.raises(LabelError, match="the value 1 written for ED"):  # 1 is NCR, not ED
        LabelMap("x", (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 1, 3), "my map")
    lm = LabelMap("x", (0, 2, 7, 8, 9), (0, 1, 2, 3, 3), (0, 2, 7, 9), "my map")
    assert lm.pairs() == [[0, 0], [2, 1], [7, 2], [8, 3], [9, 3]]
    np.testing.assert_array_equal(lm.to_train(np.array([9, 8, 7, 2, 0])), [3, 3, 2, 1, 0])
    np.testing.assert_array_equal(lm.to_release(np.array([3, 2, 1, 0])), [9, 7, 2, 0])
    assert labels.et_label(lm) == 9


def test_several_values_of_one_class_write_the_smallest():
    spec = {"background": 0, "edema": 4, "necrosis": 2, "non-enhancing tumor": 1,
            "enhancing tumor": 3}  # fmt: skip
    lm = labels.dataset_label_map(spec, where="d.json", name="Dataset7")
    assert lm.name == "Dataset7" and lm.description == "labels of d.json"
    assert lm.values == (0, 1, 2, 3, 4) and lm.classes == (0, 1, 1, 3, 2)
    assert lm.release == (0, 1, 4, 3)
    assert labels.dataset_label_map(spec).name == "dataset.json"


@pytest.mark.parametrize(
    "spec, message",
    [
        ([], "d.json: 'labels' must be a non-empty object of name -> value"),
        ({}, "d.json: 'labels' must be a non-empty object of name -> value"),
        (
            {"background": 0, "edema": True, "NCR": 2, "ET": 3},
            "d.json labels: 'edema' has value True; expected an integer",
        ),
        (
            {"background": 0, "edema": 1.0, "NCR": 2, "ET": 3},
            "d.json labels: 'edema' has value 1.0; expected an integer",
        ),
        (
            {"background": 0, "edema": "-1", "NCR": 2, "ET": 3},
            "d.json labels: 'edema' has value '-1'; expected an integer",
        ),
        (
            {
                "background": 0,
                "whole tumor": [1, 2, 3],
                "WT": [1, 2, 3],
                "tumor core": [2, 3],
                "enhancing tumor": [3],
            },
            "d.json labels: two labels name the region WT",
        ),
        (
            {
                "background": [0],
                "whole tumor": [0, 1, 2, 3],
                "tumor core": [2, 3],
                "enhancing tumor": [3],
            },
            "d.json labels: value 0 is background and a region",
        ),
        (
            {
                "background": 0,
                "whole tumor": [1, 2, 3],
                "tumor core": [2, 3],
                "enhancing tumor": [4],
            },
            "d.json labels: value 4 is in ET only; BraTS regions nest (ET inside TC inside WT)",
        ),
        (
            {
                "background": 0,
                "whole tumor": [1, 2, 3],
                "tumor core": [2, 3, 4],
                "enhancing tumor": [3, 4],
            },
            "d.json labels: value 4 is in TC+ET only;",
        ),
    ],
)
def test_label_list_errors_name_the_file_and_label(spec, message):
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map(spec, where="d.json")
    assert str(err.value).startswith(message)


def test_unreadable_names_list_the_labels_and_the_hint():
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map({"background": 0, "blob": 1}, where="d.json")
    assert str(err.value) == (
        "d.json labels: cannot tell which class 'blob' is (no known name); " + labels._NAMES_HINT
    )
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map({"background": 0, "edema": 1, "necrosis": 2}, where="d.json")
    assert str(err.value) == (
        "d.json labels: no value for ET among ['background', 'edema', 'necrosis']; "
        + labels._NAMES_HINT
    )
    with pytest.raises(
        LabelError, match=r"^d.json labels: no value for NCR, ET among \['background', 'edema'\]"
    ):
        labels.dataset_label_map({"background": 0, "edema": 1}, where="d.json")
    region = {"background": 0, "whole tumor": [1, 2, 3], "enhancing tumor": [3]}
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map(region, where="d.json")
    assert str(err.value) == (
        "d.json labels: no region TC among ['background', 'whole tumor', 'enhancing tumor']; "
        + labels._NAMES_HINT
    )


@pytest.mark.parametrize(
    "name, cls",
    [
        ("Tumour oedema", 2), ("peritumoral", 2), ("SNFH", 2), ("ed", 2),
        ("non_enhancing", 1), ("Non Enhancing Tumor", 1), ("necrotic core", 1), ("NEC", 1),
        ("net", 1), ("GD-enhancing tumour", 3), ("et", 3), ("BG", 0),
    ],
)  # fmt: skip
def test_class_names_in_their_spellings(name, cls):
    others = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
    spec = {n: v for v, n in others.items() if v != cls} | {name: cls}
    lm = labels.dataset_label_map(spec)
    assert lm.classes[lm.values.index(cls)] == cls


def test_regions_class_order_must_paint_each_region_with_its_innermost_class():
    ok = labels.dataset_label_map(REGION_LABELS, regions_class_order=(1, 2, 3))
    assert ok.release == (0, 2, 1, 3)
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map(REGION_LABELS, regions_class_order=[2, 1, 3], where="d.json")
    assert str(err.value) == (
        "d.json: regions_class_order paints the WT region with 2, which is not ED in its labels"
    )
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map(REGION_LABELS, regions_class_order=[1, 2], where="d.json")
    assert str(err.value) == "d.json: regions_class_order [1, 2] needs one value per region (3)"
    with pytest.raises(LabelError, match="regions_class_order 3 needs one value"):
        labels.dataset_label_map(REGION_LABELS, regions_class_order=3)
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map(REGION_LABELS, regions_class_order=[1, "two", 3], where="d.json")
    assert str(err.value) == (
        "d.json labels: 'regions_class_order' has value 'two'; expected an integer"
    )
    with pytest.raises(LabelError, match="paints the ET region with 7"):
        labels.dataset_label_map(REGION_LABELS, regions_class_order=[1, 2, 7])
    # the integer form ignores regions_class_order
    ints = {"background": 0, "edema": 1, "NCR": 2, "ET": 3}
    assert labels.dataset_label_map(ints, regions_class_order=[9]).release == (0, 2, 1, 3)


def test_region_form_errors_name_the_label_and_the_regions():
    spec = {**REGION_LABELS, "whole tumor": [1, "x", 3]}
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map(spec, where="d.json")
    assert str(err.value) == "d.json labels: 'whole tumor' has value 'x'; expected an integer"
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map({**REGION_LABELS, "blob": [4]}, where="d.json")
    assert str(err.value) == (
        "d.json labels: cannot tell which region 'blob' is (no known name); " + labels._NAMES_HINT
    )
    with pytest.raises(LabelError) as err:  # a name that reads as two regions
        labels.dataset_label_map({**REGION_LABELS, "whole tumor core": [5]}, where="d.json")
    assert str(err.value).startswith(
        "d.json labels: cannot tell which region 'whole tumor core' is (it reads as WT and TC); "
    )
    with pytest.raises(LabelError) as err:
        labels.dataset_label_map({"background": 0, "whole tumor": [1, 2]}, where="d.json")
    assert str(err.value).startswith("d.json labels: no region TC, ET among ")


def test_values_given_as_digit_strings_are_read_as_numbers():
    spec = {"background": "0", "edema": "1", "NCR": "2", "enhancing": "4"}
    assert labels.dataset_label_map(spec).pairs() == [[0, 0], [1, 2], [2, 1], [4, 3]]
