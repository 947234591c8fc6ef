"""Pictures to review: label overlays on FLAIR / T1ce, as slice strips for TensorBoard (fixed
validation slices at every validation: `training.validation_overlays`) and per-case PNGs with
a static `index.html` for `predict` and `evaluate`.

Colours are `plots.LABEL_CMAP` (NCR/NET red, ED green, ET yellow), blended over the grey
image with each colour's alpha. Panels are drawn at the volume's native resolution (one
voxel, one pixel), in NIfTI voxel order rotated as `plots.overlay_grid` shows slices.
"""

from __future__ import annotations

import html
import pathlib
import urllib.parse
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from brats_jax import MODALITIES, NUM_CLASSES, fileio, metrics
from brats_jax.data import DataError, brats
from brats_jax.figures import plots
from brats_jax.figures.plots import plt
from brats_jax.labels import CLASS_LEGEND, REGIONS

_RGBA = np.asarray(plots.LABEL_CMAP.colors, np.float64)  # (4, 4): one definition, plots'
VIEWS = ("axial", "coronal", "sagittal")
# The modalities drawn under the labels (rows of a case picture), as channels of MODALITIES.
SHOWN_MODALITIES = ("flair", "t1ce")
_DISPLAY_NAMES = {"flair": "FLAIR", "t1ce": "T1ce"}
_GAP = 4  # pixels between panels


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """(lo, hi): the 1st and 99th percentiles of the volume's foreground, for display.

    Foreground = voxels that differ from the corner voxel (the background of raw scans is 0,
    of z-scored ones a constant); all voxels when none differ. hi > lo always.
    """
    v = np.asarray(volume, np.float64)
    fg = v[v != v.flat[0]]
    vals = fg if fg.size else v.ravel()
    lo, hi = np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def blend(gray: np.ndarray | None, label: np.ndarray | None, shape=None) -> np.ndarray:
    """uint8 (H, W, 3) RGB: `gray` (H, W) in [0, 1] (None: black) with `label` (H, W) {0..3}
    (None: no overlay) blended on it: (1 - alpha) grey + alpha colour of the label."""
    shape = np.shape(gray if gray is not None else label) if shape is None else shape
    g = np.zeros(shape) if gray is None else np.clip(np.asarray(gray, np.float64), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if label is not None:
        lab = np.clip(np.asarray(label, np.int64), 0, NUM_CLASSES - 1)
        alpha = _RGBA[lab, 3][..., None]
        rgb = (1 - alpha) * rgb + alpha * _RGBA[lab, :3]
    return np.round(rgb * 255).astype(np.uint8)


def tumour_centre(pred: np.ndarray, label: np.ndarray | None = None) -> tuple[tuple, str]:
    """((x, y, z) voxel, what): the rounded centre of mass of the predicted tumour (labels
    > 0), else of the ground truth's, else the volume centre; `what` says which."""
    for mask, what in ((pred, "prediction"), (label, "ground truth")):
        if mask is not None and np.any(mask > 0):
            com = ndimage.center_of_mass(np.asarray(mask) > 0)
            return tuple(int(round(c)) for c in com), f"centre of the {what}'s tumour"
    return tuple(s // 2 for s in np.shape(pred)), "volume centre (no tumour)"


def orthogonal_views(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """The axial (z), coronal (y) and sagittal (x) slices of a (X, Y, D, ...) volume through
    `centre`, rotated for display: (Y, X), (D, X), (D, Y) with the head's top up."""
    x, y, z = centre
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def case_mosaic(
    images: Mapping[str, np.ndarray], pred: np.ndarray, label: np.ndarray | None, centre
) -> tuple[np.ndarray, list[tuple[str, int]], list[tuple[str, int]]]:
    """uint8 (H, W, 3) mosaic of one case: a row per image in `images` (name -> (X, Y, D)
    volume; empty: one black "labels only" row), for each of VIEWS the ground truth's panel
    (when `label` is given) then the prediction's. Returns (mosaic, [(row name, top pixel)],
    [(column title, left pixel)])."""
    rows = dict(images) or {"labels only": None}
    sources = ([("truth", label)] if label is not None else []) + [("prediction", pred)]
    label_views = {name: orthogonal_views(lab, centre) for name, lab in sources}
    cols = [(f"{view}: {name}", i, name) for i, view in enumerate(VIEWS) for name, _ in sources]
    widths = [label_views[name][i].shape[1] for _, i, name in cols]
    height = max(v.shape[0] for views in label_views.values() for v in views)
    lefts = np.concatenate([[0], np.cumsum(np.add(widths, _GAP))])[:-1].astype(int)
    out = np.zeros((len(rows) * (height + _GAP) - _GAP, lefts[-1] + widths[-1], 3), np.uint8)
    row_tops = []
    for r, (row_name, volume) in enumerate(rows.items()):
        top = r * (height + _GAP)
        row_tops.append((row_name, top))
        grays = None
        if volume is not None:
            lo, hi = intensity_window(volume)
            grays = orthogonal_views((np.asarray(volume, np.float64) - lo) / (hi - lo), centre)
        for (_, i, name), left in zip(cols, lefts, strict=True):
            lab = label_views[name][i]
            panel = blend(None if grays is None else grays[i], lab, lab.shape)
            out[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
    col_lefts = [(title, int(left)) for (title, _, _), left in zip(cols, lefts, strict=True)]
    return out, row_tops, col_lefts


def save_case_png(
    path, case_id: str, pred: np.ndarray, label=None, images=None, *, note: str = ""
) -> None:
    """Write the case's picture (`case_mosaic` through its tumour's centre, `tumour_centre`)
    as a PNG at `path` (atomically), with panel titles, the case ID, `note` and a legend.

    pred, label: (X, Y, D) training classes {0..3}; images: name -> (X, Y, D) volume.
    """
    from matplotlib.patches import Patch

    centre, where = tumour_centre(pred, label)
    mosaic, row_tops, col_lefts = case_mosaic(images or {}, pred, label, centre)
    left, top, bottom, dpi = 90, 44, 40, 100
    h, w = mosaic.shape[:2]
    fig_size = (max(w + left + 10, 640) / dpi, (h + top + bottom) / dpi)
    fig = plt.figure(figsize=fig_size, dpi=dpi)
    fig_w, fig_h = fig.bbox.width, fig.bbox.height
    fig.figimage(mosaic, xo=left, yo=bottom, origin="upper")
    heading = f"{case_id}: slices through voxel {centre} ({where}). {note}"
    fig.text(4 / fig_w, 1 - 4 / fig_h, heading, fontsize=9, va="top")
    for title, x in col_lefts:
        fig.text((left + x) / fig_w, 1 - (top - 4) / fig_h, title, fontsize=8, va="bottom")
    for name, y in row_tops:
        name = _DISPLAY_NAMES.get(name, name)
        fig.text(4 / fig_w, 1 - (top + y + 10) / fig_h, name, fontsize=9, va="top")
    handles = [Patch(color=_RGBA[c], label=CLASS_LEGEND[c]) for c in range(1, NUM_CLASSES)]
    fig.legend(handles=handles, loc="lower left", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(left / fig_w, 0))  # fmt: skip
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")  # no tight bbox: panels stay pixel-exact
    plt.close(fig)


def write_index(
    out_dir,
    rows: Sequence[Mapping],
    columns: Sequence[str],
    *,
    extra_columns: Mapping[str, Mapping] | None = None,
    title: str = "brats_jax cases",
    name: str = "index.html",
) -> pathlib.Path:
    """Write `out_dir/<name>` (atomically): a static table, worst first by `dice_WT`
    where a row has it (then by case ID), of each row's `case_id`, its picture
    (`<case_id>.png` beside it, linked when the file exists), its `columns` (floats to 4
    decimals) and `extra_columns[case_id]` (column -> value, e.g. uncertainties), then the
    row's `note`. No JavaScript, relative links only. Returns the path."""
    out_dir = pathlib.Path(out_dir)
    extra_columns = extra_columns or {}
    extra = list(dict.fromkeys(k for e in extra_columns.values() for k in e))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["case", "picture", *columns, *extra])
    lines = [f"<tr>{head}<th>note</th></tr>"]
    for row in sorted(rows, key=_worst_first):
        cid = str(row["case_id"])
        png = f"{cid}.png"
        pic = "no picture"
        if (out_dir / png).is_file():
            href = html.escape(urllib.parse.quote(png))
            pic = f'<a href="{href}"><img src="{href}" height="120" alt="{html.escape(cid)}"></a>'
        values = [row.get(c) for c in columns] + [extra_columns.get(cid, {}).get(c) for c in extra]
        cells = "".join(f"<td>{c}</td>" for c in [html.escape(cid), pic] + [
            _cell(v) for v in [*values, row.get("note", "")]
        ])  # fmt: skip
        lines.append(f"<tr>{cells}</tr>")
    page = _PAGE.format(title=html.escape(title), n=len(rows), table="\n".join(lines))
    fileio.write_text(out_dir / name, page)
    return out_dir / name


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:2px 6px}}
table{{border-collapse:collapse}} .legend span{{padding:0 8px}}</style></head>
<body><h1>{title}</h1><p>{n} case(s), worst whole-tumour Dice first where ground truth
exists. Labels: <span class="legend"><span style="background:#f66">NCR/NET</span>
<span style="background:#6c6">ED</span> <span style="background:#ff6">ET</span></span></p>
<table>
{table}
</table></body></html>
"""


def _worst_first(row: Mapping):
    d = row.get("dice_WT")
    has = d is not None and np.isfinite(d)
    return (not has, float(d) if has else 0.0, str(row["case_id"]))


def _cell(v) -> str:
    """A table cell's HTML: floats to 4 decimals, None empty, anything else escaped text."""
    if isinstance(v, float | np.floating):
        return f"{float(v):.4f}"
    return "" if v is None else html.escape(str(v))


class CasePictures:
    """One folder of case pictures (`<case_id>.png`, `save_case_png`) and its `index.html`
    (`write_index`), for `predict --overlays` and `evaluate --overlays`."""

    def __init__(self, out_dir, *, log=print):
        self.out_dir, self.log = pathlib.Path(out_dir), log
        self.notes: dict[str, str] = {}
        fileio.check_writable(self.out_dir / "index.html")  # fail before the long part

    def add(self, case_id: str, pred, label=None, images=None, *, note: str = "") -> None:
        """Draw one case (arguments as `save_case_png`); `note` also goes to the index."""
        save_case_png(self.out_dir / f"{case_id}.png", case_id, pred, label, images, note=note)
        self.notes[str(case_id)] = note

    def add_evaluated(self, case_id: str, pred, label, label_path) -> None:
        """Draw a case of `evaluate` (prediction, ground truth and the ground truth's file):
        FLAIR and T1ce from the ground truth's case folder, else labels only (logged)."""
        images, note = images_beside(label_path, case_id, np.shape(label))
        if note:
            self.log(f"warning: case {case_id}: {note}")
        self.add(case_id, pred, label, images, note=note)

    def write_index(
        self, rows, columns, *, extra_columns=None, title="", name="index.html"
    ) -> pathlib.Path:
        """`write_index` of `rows` (one dict per case) as `name`, each with the note its
        picture got ("no picture" for a row without one, e.g. a case without prediction)."""
        rows = [{**r, "note": self.notes.get(str(r["case_id"]), "no picture")} for r in rows]
        path = write_index(self.out_dir, rows, columns, extra_columns=extra_columns,
                           title=title or f"brats_jax: {self.out_dir.name}", name=name)  # fmt: skip
        self.log(f"wrote {len(rows)} case(s) to {path}")
        return path


def images_beside(label_path, case_id: str, shape) -> tuple[dict[str, np.ndarray], str]:
    """({name: (X, Y, D) raw volume} of SHOWN_MODALITIES, note): read from the BraTS case
    folder holding `label_path` (`data.brats` file names, both namings); `({}, why)` when
    the folder is not case `case_id`'s, a file is missing or unreadable, or a shape differs
    from the label's `shape`."""
    folder = pathlib.Path(label_path).parent
    if folder.name != case_id:
        return {}, f"labels only: {label_path} is not in a case folder {case_id}/ with images"
    try:
        (case,) = brats.find_cases(folder)
        images = {m: _as_3d(brats.read_nifti(case.paths[m])[0]) for m in SHOWN_MODALITIES}
    except (DataError, ValueError) as e:
        return {}, f"labels only: no FLAIR/T1ce read from {folder} ({e})"
    bad = {m: v.shape for m, v in images.items() if v.shape != tuple(shape)}
    if bad:
        return {}, f"labels only: image shape(s) {bad} differ from the label's {tuple(shape)}"
    return images, ""


def _as_3d(volume: np.ndarray) -> np.ndarray:
    return volume[..., 0] if volume.ndim == 4 and volume.shape[-1] == 1 else volume


def region_summary(pred: np.ndarray, label=None, spacing=(1.0, 1.0, 1.0)) -> dict[str, float]:
    """Per-region predicted volume in mL (`volume_ml_WT` ...) and, with a ground truth,
    region Dice (`dice_WT` ..., 1.0 where the region is empty in both): `predict`'s columns."""
    ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for name, classes in REGIONS.items():
        out[f"volume_ml_{name}"] = float(np.isin(pred, classes).sum() * ml)
    if label is not None:
        for name, (tp, fp, fn, _) in metrics.region_confusion(pred, label).items():
            out[f"dice_{name}"] = 2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return out


def modality_images(image: np.ndarray) -> dict[str, np.ndarray]:
    """{name: (X, Y, D)} of SHOWN_MODALITIES from a (X, Y, D, 4) image in MODALITIES order."""
    return {m: image[..., MODALITIES.index(m)] for m in SHOWN_MODALITIES}


def slice_strip(flair: np.ndarray, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """uint8 (W, 3H + 2 gap, 3) of one (H, W) slice: FLAIR, FLAIR + ground truth, FLAIR +
    prediction side by side (rotated as the case pictures)."""
    lo, hi = intensity_window(flair)
    gray = np.rot90((np.asarray(flair, np.float64) - lo) / (hi - lo))
    panels = [blend(gray, None), blend(gray, np.rot90(label)), blend(gray, np.rot90(pred))]
    gap = np.zeros((gray.shape[0], _GAP, 3), np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
