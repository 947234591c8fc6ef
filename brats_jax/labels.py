"""The BraTS label vocabulary: training classes, evaluation regions, the releases' label
conventions and the conversions between them. Every module that names a class, a region
or a release's label values takes it from here.

* Training classes, the labels of every array inside the library: 0 background, 1 NCR/NET
  (necrotic and non-enhancing tumour core), 2 ED (peritumoral oedema), 3 ET (enhancing
  tumour).
* Regions, BraTS's evaluation: WT = {NCR, ED, ET}, TC = {NCR, ET}, ET = {ET}.
* Release conventions, the label values of the files users read and write: ``"2018"``
  (BraTS 2018-2021: 0, 1, 2, 4; ET = 4) and ``"2023"`` (BraTS 2023: 0, 1, 2, 3; ET = 3). The
  file naming of a release (``_t1ce`` / ``-t1c``) goes with its convention
  (``data.brats.Case.naming``); ``evaluate``'s flags spell them ``brats2018`` /
  ``brats2023`` (:data:`CONVENTION_FLAGS`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

NUM_CLASSES = 4
"""Training classes: 0 background, 1 NCR/NET, 2 ED, 3 ET."""

CLASS_NAMES = ("background", "NCR", "ED", "ET")
"""Names of the training classes, by class number (keys of `class_dice` in results)."""

CLASS_LEGEND = ("background", "NCR/NET", "ED", "ET")
"""The classes as figures' legends name them."""

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
"""BraTS evaluation regions as sets of training classes (nested: ET in TC in WT)."""

RELEASE_LABELS: dict[str, tuple[int, ...]] = {"2018": (0, 1, 2, 4), "2023": (0, 1, 2, 3)}
"""Label values of each release convention, in training-class order (index = class)."""

CONVENTIONS = tuple(RELEASE_LABELS)

CONVENTION_FLAGS = {"brats2018": "2018", "brats2023": "2023"}
"""`evaluate --labels/--pred_labels` spelling -> convention."""


class LabelError(ValueError):
    """Label values outside a convention, an unknown convention, or a dataset's label list
    that cannot be mapped onto the training classes (message names where)."""


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """A label convention: which values its files hold and the training class of each.

    values: every value a file of the convention may hold; classes: the training class of
    each of `values` (same order; several values may share a class); release: the value
    written for each training class (index = class), each one of `values` of that class.
    `name` is the convention ("2018", "2023", or a dataset's name), `description` how an
    error names it ("BraTS 2018 convention", "labels of .../dataset.json").
    """

    name: str
    values: tuple[int, ...]
    classes: tuple[int, ...]
    release: tuple[int, ...]
    description: str

    def __post_init__(self):
        if len(self.values) != len(self.classes) or len(self.release) != NUM_CLASSES:
            raise LabelError(f"{self.description}: values, classes and release do not match")
        for c, v in enumerate(self.release):
            if v not in self.values or self.classes[self.values.index(v)] != c:
                raise LabelError(
                    f"{self.description}: the value {v} written for {CLASS_NAMES[c]} is not "
                    "one of its values"
                )

    def pairs(self) -> list[list[int]]:
        """[[file value, training class], ...]: the map as JSON-able data."""
        return [[v, c] for v, c in zip(self.values, self.classes, strict=True)]

    def to_train(self, label: np.ndarray, *, where: str = "label") -> np.ndarray:
        """File labels (any shape, integer or integral float values) -> training classes,
        int32 of the same shape. Raises LabelError naming `where` for non-finite,
        non-integer or unknown values."""
        allowed = sorted(self.values)
        lab = np.asarray(label)
        if not np.issubdtype(lab.dtype, np.integer):
            if not np.all(np.isfinite(lab)):
                raise LabelError(f"{where}: non-finite label values; expected {tuple(allowed)}")
            if np.any(lab != np.round(lab)):
                raise LabelError(f"{where}: non-integer label values (dtype {lab.dtype})")
        values = np.unique(lab)
        bad = [int(v) for v in values if int(v) not in self.values]
        if bad:
            raise LabelError(
                f"{where}: unknown label values {bad[:10]} for the {self.description} "
                f"(expected a subset of {allowed})"
            )
        lut = np.zeros(max(self.values) + 1, np.int32)
        lut[list(self.values)] = self.classes
        return lut[lab.astype(np.int64)]

    def to_release(self, label_0123: np.ndarray) -> np.ndarray:
        """Training classes {0..3} (any shape) -> this convention's values, uint8 of the
        same shape. Raises LabelError outside 0..3."""
        lab = np.asarray(label_0123)
        if lab.size and (lab.min() < 0 or lab.max() > NUM_CLASSES - 1):
            raise LabelError(f"training labels must be in 0..3, got range {lab.min()}..{lab.max()}")
        return np.asarray(self.release, np.uint8)[lab.astype(np.int64)]


_RELEASE_MAPS = {
    c: LabelMap(c, v, tuple(range(NUM_CLASSES)), v, f"BraTS {c} convention")
    for c, v in RELEASE_LABELS.items()
}


def label_map(convention: str | LabelMap) -> LabelMap:
    """The LabelMap of a release convention ("2018", "2023"), or `convention` itself when
    it is one already (a dataset's, `dataset_label_map`). LabelError for an unknown name."""
    if isinstance(convention, LabelMap):
        return convention
    if convention not in _RELEASE_MAPS:
        raise LabelError(
            f"unknown label convention {convention!r}; expected one of {', '.join(CONVENTIONS)}"
        )
    return _RELEASE_MAPS[convention]


def to_train_labels(
    label: np.ndarray, convention: str | LabelMap, *, where: str = "label"
) -> np.ndarray:
    """Release labels (any shape, integer or integral float values) -> training classes,
    int32 of the same shape: "2018" {0, 1, 2, 4} -> {0, 1, 2, 3}; "2023" unchanged; a
    dataset's LabelMap as it maps its values (`LabelMap.to_train`).

    Raises LabelError naming `where` for non-finite, non-integer or unknown values.
    """
    return label_map(convention).to_train(label, where=where)


def to_release_labels(label_0123: np.ndarray, convention: str | LabelMap = "2018") -> np.ndarray:
    """Training classes {0..3} (any shape) -> the convention's values, uint8 of the same
    shape (ET = 4 for "2018", 3 for "2023"; a LabelMap's `release` values). Raises
    LabelError outside 0..3."""
    return label_map(convention).to_release(label_0123)


def et_label(convention: str | LabelMap) -> int:
    """The enhancing tumour's value in files of this convention (4 or 3)."""
    return label_map(convention).release[NUM_CLASSES - 1]


# --------------------------------------------------------------------------------------------
# a dataset's own label list (nnU-Net's dataset.json `labels`)
def _words(name: str) -> list[str]:
    """Lower-case words of a label name, spellings unified: tumour -> tumor, oedema ->
    edema, non-enhancing / non enhancing -> nonenhancing."""
    n = str(name).lower().replace("tumour", "tumor").replace("oedema", "edema")
    n = re.sub(r"non[\s_-]*enhanc", "nonenhanc", n)
    return re.findall(r"[a-z0-9]+", n)


def _matches(words: list[str], exact: set[str], prefixes: tuple[str, ...] = ()) -> bool:
    return any(w in exact or (prefixes and w.startswith(prefixes)) for w in words)


# Training class -> (words, word prefixes) naming it in a label name: background / bg;
# necrosis, NCR, NET, NETC, non-enhancing (core); edema, ED, SNFH, peritumoral;
# enhancing, ET (GD-enhancing tumor).
_CLASS_WORDS: dict[int, tuple[set[str], tuple[str, ...]]] = {
    0: ({"background", "bg"}, ()),
    1: ({"ncr", "net", "netc", "nec"}, ("necro", "nonenhanc")),
    2: ({"ed", "snfh", "peritumoral"}, ("edem",)),
    3: ({"et"}, ("enhanc",)),
}
# Region -> (words, word prefixes) naming it: whole tumor / WT, tumor core / TC, enhancing
# tumor / ET.
_REGION_WORDS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "WT": ({"whole", "wt", "complete"}, ()),
    "TC": ({"core", "tc"}, ()),
    "ET": ({"et"}, ("enhanc",)),
}
_NAMES_HINT = (
    "expected names like background, edema/ED, necrosis/NCR/NET, enhancing tumor/ET (or the "
    "regions whole tumor, tumor core, enhancing tumor)"
)


def _one_of(name, table: dict, what: str, where: str):
    words = _words(name)
    hits = [k for k, (exact, prefixes) in table.items() if _matches(words, exact, prefixes)]
    if len(hits) != 1:
        shown = [CLASS_NAMES[k] if isinstance(k, int) else k for k in hits]
        why = f"it reads as {' and '.join(shown)}" if hits else "no known name"
        raise LabelError(f"{where} labels: cannot tell which {what} {name!r} is ({why}); "
                         f"{_NAMES_HINT}")  # fmt: skip
    return hits[0]


def _label_value(value, name, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise LabelError(f"{where} labels: {name!r} has value {value!r}; expected an integer")
    return int(value)


def dataset_label_map(
    labels: dict, *, regions_class_order=None, where: str = "dataset.json", name: str = ""
) -> LabelMap:
    """The LabelMap of a dataset's label list (nnU-Net's dataset.json `labels`), mapped onto
    the training classes by what each label is, never by its number.

    Integer form, name -> value in any numbering (nnU-Net v1's value -> name too):
    {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3};
    names are recognised in their common spellings (`_CLASS_WORDS`: edema / ED / oedema /
    peritumoral edema / SNFH, necrosis / NCR / NET / non-enhancing, enhancing / ET).
    Region form (nnU-Net's BraTS conversion; some value is a list): {"background": 0,
    "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}: a file value in
    WT only is ED, in WT and TC but not ET is NCR, in all three is ET; `regions_class_order`,
    when given, must paint each class with a value of that class (what nnU-Net writes).
    Each training class needs a value; several values of one class are all read, the
    smallest is written. Raises LabelError (one line, naming `where` and the label).
    """
    if not isinstance(labels, dict) or not labels:
        raise LabelError(f"{where}: 'labels' must be a non-empty object of name -> value")
    items = list(labels.items())
    if all(str(k).isdigit() and isinstance(v, str) for k, v in items):  # v1: value -> name
        items = [(v, k) for k, v in items]
    regions = any(isinstance(v, list | tuple) for _, v in items)
    found: dict[int, int] = {}  # file value -> class
    if regions:
        members: dict[str, set[int]] = {}
        for label_name, value in items:
            vals = value if isinstance(value, list | tuple) else [value]
            vals = {_label_value(v, label_name, where) for v in vals}
            if _matches(_words(label_name), *_CLASS_WORDS[0]) and len(vals) == 1:
                found[vals.pop()] = 0
                continue
            region = _one_of(label_name, _REGION_WORDS, "region", where)
            if region in members:
                raise LabelError(f"{where} labels: two labels name the region {region}")
            members[region] = vals
        missing = [r for r in _REGION_WORDS if r not in members]
        if missing:
            raise LabelError(f"{where} labels: no region {', '.join(missing)} among "
                             f"{[k for k, _ in items]}; {_NAMES_HINT}")  # fmt: skip
        inside = {(1, 0, 0): 2, (1, 1, 0): 1, (1, 1, 1): 3}  # (in WT, TC, ET) -> class
        for v in sorted(set().union(*members.values())):
            key = tuple(int(v in members[r]) for r in ("WT", "TC", "ET"))
            if key not in inside:
                held = [r for r in ("WT", "TC", "ET") if v in members[r]]
                raise LabelError(
                    f"{where} labels: value {v} is in {'+'.join(held)} only; BraTS regions "
                    "nest (ET inside TC inside WT)"
                )
            if found.get(v, inside[key]) != inside[key]:
                raise LabelError(f"{where} labels: value {v} is background and a region")
            found[v] = inside[key]
    else:
        for label_name, value in items:
            v = _label_value(value, label_name, where)
            c = _one_of(label_name, _CLASS_WORDS, "class", where)
            if found.setdefault(v, c) != c:
                raise LabelError(f"{where} labels: value {v} is given two classes")
    by_class = {c: sorted(v for v, k in found.items() if k == c) for c in range(NUM_CLASSES)}
    if missing := [CLASS_NAMES[c] for c, vs in by_class.items() if not vs]:
        raise LabelError(f"{where} labels: no value for {', '.join(missing)} among "
                         f"{[k for k, _ in items]}; {_NAMES_HINT}")  # fmt: skip
    values = tuple(sorted(found))
    lm = LabelMap(
        name=name or where,
        values=values,
        classes=tuple(found[v] for v in values),
        release=tuple(by_class[c][0] for c in range(NUM_CLASSES)),
        description=f"labels of {where}",
    )
    if regions and regions_class_order is not None:
        _check_regions_class_order(lm, members, regions_class_order, where)
    return lm


def _check_regions_class_order(lm: LabelMap, members: dict, order, where: str) -> None:
    """nnU-Net paints region i (in the labels' order, background left out) with `order[i]`,
    inner regions over outer ones: each value must be of the class a region's innermost
    part is (WT: ED, TC: NCR, ET: ET), else its predictions would be read back wrong."""
    if not isinstance(order, list | tuple) or len(order) != len(members):
        raise LabelError(f"{where}: regions_class_order {order!r} needs one value per region "
                         f"({len(members)})")  # fmt: skip
    innermost = {"WT": 2, "TC": 1, "ET": 3}
    for region, value in zip(members, order, strict=True):
        v = _label_value(value, "regions_class_order", where)
        if v not in lm.values or lm.classes[lm.values.index(v)] != innermost[region]:
            raise LabelError(
                f"{where}: regions_class_order paints the {region} region with {v}, which is "
                f"not {CLASS_NAMES[innermost[region]]} in its labels"
            )
