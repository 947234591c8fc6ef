"""Pictures to review (brats_jax.figures.overlays): label colours at known voxels in the case PNGs,
evaluate's index.html against its per_case.csv, TensorBoard images of fixed validation
slices, and a headless-browser screenshot of the index where Chromium is installed."""

import csv
import html.parser
import pathlib
import shutil
import subprocess
import sys
import types

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats_jax import config_fields
from brats_jax.figures import overlays
from brats_jax.training.metric_writer import MetricWriter

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (40, 48, 30)  # X, Y, D
BLOCK = (slice(10, 14), slice(20, 28), slice(8, 20))  # 4 x 8 x 12 voxels
# The block's bounding box (rows, columns) in each view as displayed (rot90: rows are the
# second array axis, the top is its far end): axial (Y, X), coronal (D, X), sagittal (D, Y).
BLOCK_BOXES = sorted([(8, 4), (12, 4), (12, 8)])


def _colour_masks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of each label's colour over a black image (NCR/NET red, ED green, ET yellow);
    the legend's patches sit on white, so they are paler and not counted."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return {
        "NCR": (r > 100) & (g < 30) & (b < 30),
        "ED": (g > 80) & (r < 30) & (b < 30),
        "ET": (r > 100) & (g > 100) & (b < 30),
    }


def _boxes(mask: np.ndarray) -> list[tuple[int, int]]:
    """Sorted (height, width) of each connected blob of `mask`."""
    lab, _ = ndimage.label(mask)
    objects = ndimage.find_objects(lab)
    return sorted((s[0].stop - s[0].start, s[1].stop - s[1].start) for s in objects)


def _read_png(path) -> np.ndarray:
    return np.round(matplotlib.image.imread(str(path))[..., :3] * 255).astype(np.uint8)


def test_tumour_centre_prediction_then_truth_then_volume_centre():
    pred, label = np.zeros(SHAPE, np.int32), np.zeros(SHAPE, np.int32)
    label[0:2, 0:2, 0:4] = 2  # centre (0.5, 0.5, 1.5) -> rounds half to even: (0, 0, 2)
    assert overlays.tumour_centre(pred, None)[0] == (20, 24, 15)
    assert overlays.tumour_centre(pred, label)[0] == (0, 0, 2)
    pred[BLOCK] = 3  # centre (11.5, 23.5, 13.5) -> (12, 24, 14)
    assert overlays.tumour_centre(pred, label)[0] == (12, 24, 14)


def test_case_png_pixels_carry_the_labels_colours(tmp_path):
    """Prediction ET and ground truth NCR on the same block over black images: 6 yellow and
    6 red blobs (3 views x 2 image rows) of the block's displayed size, nothing green."""
    pred, label = np.zeros(SHAPE, np.int32), np.zeros(SHAPE, np.int32)
    pred[BLOCK], label[BLOCK] = 3, 1
    zeros = {m: np.zeros(SHAPE) for m in ("flair", "t1ce")}
    overlays.save_case_png(tmp_path / "a.png", "a", pred, label, zeros)
    masks = _colour_masks(_read_png(tmp_path / "a.png"))
    assert _boxes(masks["ET"]) == sorted(BLOCK_BOXES * 2)
    assert _boxes(masks["NCR"]) == sorted(BLOCK_BOXES * 2)
    assert not masks["ED"].any()
    # ground truth beside the prediction: each red blob has a yellow one at the same height
    red_rows = {s[0].start for s in ndimage.find_objects(ndimage.label(masks["NCR"])[0])}
    yellow_rows = {s[0].start for s in ndimage.find_objects(ndimage.label(masks["ET"])[0])}
    assert red_rows == yellow_rows
    # labels only (no images), no ground truth: one row of 3 ED blobs
    overlays.save_case_png(tmp_path / "b.png", "b", np.where(pred > 0, 2, 0), None, None)
    masks = _colour_masks(_read_png(tmp_path / "b.png"))
    assert _boxes(masks["ED"]) == BLOCK_BOXES
    assert not masks["ET"].any() and not masks["NCR"].any()


def _save_nifti(path: pathlib.Path, arr, dtype=np.int16):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype), np.eye(4)), str(path))


def _evaluate_folders(tmp_path):
    """GT case folders: A and B with all four images, C with its label only, D without a
    prediction. The GT is the ET block and a 2 x 8 x 12 ED slab beside it; the predictions
    are the block less `cut` of its 8 rows: WT Dice A 0.8 > B > C, TC = ET Dice A 1. The
    images are 0 in the tumour (black under the labels: pure label colours), 50..100
    elsewhere."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    rng = np.random.default_rng(0)
    gt = np.zeros(SHAPE, np.int16)
    gt[BLOCK] = 4  # ET in the 2018 convention
    gt[14:16, 20:28, 8:20] = 2  # ED
    for cid, cut in (("A", 0), ("B", 3), ("C", 6)):
        folder = gt_dir / cid
        _save_nifti(folder / f"{cid}_seg.nii.gz", gt)
        pred = np.where(gt == 4, 4, 0)
        pred[10:14, 20 : 20 + cut, 8:20] = 0  # drop `cut` of the 8 rows of the block
        _save_nifti(pred_dir / f"{cid}.nii.gz", pred)
        if cid != "C":
            for m in ("flair", "t1", "t1ce", "t2"):
                image = 50 + 50 * rng.random(SHAPE)
                image[BLOCK] = 0
                _save_nifti(folder / f"{cid}_{m}.nii.gz", image, np.float32)
    _save_nifti(gt_dir / "D" / "D_seg.nii.gz", gt)
    return gt_dir, pred_dir


class _Index(html.parser.HTMLParser):
    """The index's table rows (cell texts), the links and image sources, any script."""

    def __init__(self):
        super().__init__()
        self.rows, self.links, self.scripts, self._cell = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag in ("a", "img"):
            self.links.append(attrs.get("href") or attrs.get("src"))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluated")
    gt_dir, pred_dir = _evaluate_folders(tmp)
    out, pics = tmp / "per_case.csv", tmp / "pictures"
    r = subprocess.run(
        [sys.executable, "-m", "brats_jax.evaluate", f"--pred={pred_dir}", f"--gt={gt_dir}",
         f"--out={out}", f"--overlays={pics}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    parser = _Index()
    parser.feed((pics / "index.html").read_text())
    return pics, csv_rows, parser, r.stdout + r.stderr


def test_index_lists_every_case_worst_first_with_the_csv_numbers(evaluated):
    pics, csv_rows, index, _ = evaluated
    header, *rows = index.rows
    by_id = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert sorted(by_id) == sorted(r["case_id"] for r in csv_rows) == ["A", "B", "C", "D"]
    for r in csv_rows:
        for col in ("dice_WT", "dice_TC", "dice_ET", "hd95_WT", "hd95_TC", "hd95_ET"):
            assert float(by_id[r["case_id"]][col]) == pytest.approx(float(r[col]), abs=5.1e-5)
    # worst first: D (no prediction, Dice 0), then C, B, A (hand-made: fewer rows cut);
    # 2 |P & G| / (|P| + |G|) with |G| = 384 ET + 192 ED voxels, |P| = 48 per kept row
    rows_by_id = sorted(csv_rows, key=lambda r: r["case_id"])
    assert [r[0] for r in rows] == ["D", "C", "B", "A"]
    assert [float(r["dice_WT"]) for r in rows_by_id] == (
        pytest.approx([768 / 960, 480 / 816, 192 / 672, 0.0], abs=1e-6)
    )
    assert [float(r["dice_ET"]) for r in rows_by_id] == (
        pytest.approx([1.0, 480 / 624, 192 / 480, 0.0], abs=1e-6)
    )
    assert "labels only" in by_id["C"]["note"] and "no picture" in by_id["D"]["note"]


def test_index_links_exist_and_need_no_script(evaluated):
    pics, _, index, log = evaluated
    assert index.scripts == 0
    assert sorted(set(index.links)) == ["A.png", "B.png", "C.png"]
    for link in index.links:
        assert (pics / link).is_file()
    assert "case C: labels only" in log  # the fallback is said, not silent
    # ET blobs: 3 views x (truth, prediction) x image rows: FLAIR and T1ce for A, labels
    # only for C; A's are the block's size (the prediction is the truth)
    blobs = {c: _boxes(_colour_masks(_read_png(pics / f"{c}.png"))["ET"]) for c in "AC"}
    assert blobs["A"] == sorted(BLOCK_BOXES * 4) and len(blobs["C"]) == 6


def test_index_extra_columns_and_html_escaping(tmp_path):
    rows = [{"case_id": "x<1>", "dice_WT": 0.5}, {"case_id": "y", "dice_WT": 0.25}]
    overlays.write_index(tmp_path, rows, ["dice_WT"], extra_columns={"y": {"entropy": 0.125}})
    parser = _Index()
    parser.feed((tmp_path / "index.html").read_text())
    header, *body = parser.rows
    assert header == ["case", "picture", "dice_WT", "entropy", "note"]
    assert [r[0] for r in body] == ["y", "x<1>"]
    assert body[0][3] == "0.1250" and body[1][3] == ""


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-headless-shell")


@pytest.mark.skipif(not _chromium(), reason="no chromium or chromium-headless-shell on PATH")
def test_index_renders_in_a_headless_browser(evaluated, tmp_path):
    pics = evaluated[0]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=900,700", (pics / "index.html").as_uri()],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), "chromium wrote no screenshot"
    rgb = _read_png(shot)
    assert rgb.std() > 10  # text, table and pictures: not one blank colour
    assert _colour_masks(rgb)["ET"].any()  # the case pictures are loaded, not broken links


def _images(events):
    """(step, tag, png bytes) of the image summaries among TensorBoard `Event` protos."""
    return [(e.step, v.tag, v.image.encoded_image_string)
            for e in events for v in e.summary.value if v.HasField("image")]  # fmt: skip


def test_write_images_goes_to_tensorboard_not_jsonl(tmp_path, tensorboard_events):
    w = MetricWriter(tmp_path)
    img = np.zeros((5, 7, 3), np.uint8)
    img[1, 2] = (255, 0, 0)
    w.write_images(3, {"pic": img})
    w.write_scalars(3, {"loss": 1.0})
    w.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 3, "loss": 1.0}']
    ((step, tag, png),) = _images(tensorboard_events(tmp_path / "tensorboard"))
    (tmp_path / "back.png").write_bytes(png)
    assert (step, tag) == (3, "pic")
    np.testing.assert_array_equal(_read_png(tmp_path / "back.png"), img)


TWO_OVERLAYS = {"eval.num_overlay_slices": 2}  # `tiny` with 2 validation pictures


def test_validation_images_are_the_same_slices_every_time(
    tmp_path, tiny_config, tensorboard_events
):
    """Two validations' pictures (the run group's overlay writer at steps 3 and 6, on a
    group of one tiny run whose weights change in between): the 2 validation slices with
    the most tumour pixels (counted here from the labels) both times, as FLAIR | truth |
    prediction, the prediction panel showing each step's own prediction in the BraTS
    colours. (A real group: the slow test below.) Random weights, large enough (0.3)
    for several predicted classes."""
    import jax

    from brats_jax.runs import train_state
    from brats_jax.training import run_group

    config = tiny_config(**TWO_OVERLAYS)
    run = run_group.build_run(config, tmp_path)
    model = train_state.create_model(config)
    shapes = jax.eval_shape(  # model.init itself compiles for a minute on a busy CPU
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 4)), train=False)
    )
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes)
    variables = dict(variables)
    states = [types.SimpleNamespace(params=variables.pop("params"), model_state=variables)]
    writer = MetricWriter(tmp_path)
    group = types.SimpleNamespace(runs=[run], model=model, writers=[writer], overlays={},
                                  view=lambda i: states[-1])  # fmt: skip
    run_group.RunGroup._write_overlays(group, 0, 3)
    states.append(types.SimpleNamespace(  # other weights: the same slices all the same
        params=jax.tree.map(lambda p: -p, states[0].params), model_state=variables
    ))  # fmt: skip
    run_group.RunGroup._write_overlays(group, 0, 6)
    writer.close()

    def labels_at(step, images):  # the model's own argmax with that step's weights
        state = states[{3: 0, 6: 1}[step]]
        variables = {"params": state.params, **state.model_state}
        return np.argmax(np.asarray(model.apply(variables, images, train=False)), -1)

    _check_validation_images(tensorboard_events(tmp_path / "tensorboard"), tmp_path, config,
                             labels_at)  # fmt: skip


@pytest.mark.slow
def test_training_writes_validation_images(tmp_path, tiny_config, tensorboard_events):
    """The same through training: the tiny preset validates at steps 3 and 6."""
    from brats_jax.training import train

    train.train_and_evaluate(tiny_config(**TWO_OVERLAYS), tmp_path)
    events = tensorboard_events(tmp_path / "tensorboard")
    _check_validation_images(events, tmp_path, tiny_config(**TWO_OVERLAYS))


# The label colours (RGB, alpha) as a reader sees them: NCR/NET red, ED green, ET yellow.
_HAND_COLOURS = {1: ((255, 0, 0), 0.6), 2: ((0, 204, 0), 0.5), 3: ((255, 255, 0), 0.7)}


def _blended_by_hand(grey_panel: np.ndarray, label: np.ndarray) -> np.ndarray:
    """int (H, W, 3): the grey panel with each label's colour blended on it by its alpha."""
    out = grey_panel.astype(np.float64)
    for cls, (rgb, alpha) in _HAND_COLOURS.items():
        out[label == cls] = (1 - alpha) * out[label == cls] + alpha * np.array(rgb)
    return np.round(out).astype(int)


def _check_validation_images(events, tmp_path, config, labels_at=None):
    """The pictures among TensorBoard `events` of two validations (steps 3 and 6) are the
    same 2 slices, each FLAIR | truth | prediction; `labels_at(step, images)` -> the
    (B, H, W) prediction of that step, to check the prediction panel pixel by pixel (None:
    not checked)."""
    from brats_jax import data

    events = _images(events)
    steps = {s: sorted(t for s2, t, _ in events if s2 == s) for s, _, _ in events}
    assert sorted(steps) == [3, 6] and steps[3] == steps[6] and len(steps[3]) == 2
    source = data.make_source(config.data)
    val = data.build_splits(source, config.data).val
    batch = next(iter(data.eval_batches(
        source, val, batch_size=len(val), image_size=config.data.image_size
    )))  # fmt: skip
    tumour = (batch["label"] > 0).sum(axis=(1, 2))
    best = np.argsort(-tumour, kind="stable")[:2]  # ties: the first in validation order
    tag_of = {f"val_overlays/{batch['case_id'][i]}_z{int(batch['slice_index'][i]):03d}": i
              for i in best}  # fmt: skip
    assert steps[3] == sorted(tag_of)
    pred_panels = {}
    for step, tag, png in events:
        (tmp_path / "strip.png").write_bytes(png)
        strip = _read_png(tmp_path / "strip.png")
        assert strip.shape == (32, 3 * 32 + 2 * 4, 3)
        i = tag_of[tag]
        label = np.rot90(batch["label"][i])
        flair_panel, truth_panel, pred_panel = strip[:, :32], strip[:, 36:68], strip[:, 72:]
        changed = np.any(truth_panel != flair_panel, axis=-1)
        np.testing.assert_array_equal(changed, label > 0)  # coloured exactly where labelled
        np.testing.assert_allclose(truth_panel, _blended_by_hand(flair_panel, label), atol=1)
        if labels_at is None:
            continue
        pred = np.rot90(labels_at(step, batch["image"][i : i + 1])[0])
        assert len(np.unique(pred)) >= 2 and (pred != label).any()  # not the truth again
        np.testing.assert_allclose(pred_panel, _blended_by_hand(flair_panel, pred), atol=1)
        pred_panels[step, tag] = pred_panel
    if labels_at is not None:  # other weights at step 6: other pictures of the same slices
        assert any((pred_panels[3, t] != pred_panels[6, t]).any() for t in tag_of)


def test_old_runs_get_no_overlays():
    old = {"eval": {"batch_size": 4}}
    assert config_fields.upgrade_legacy(old)["eval"]["num_overlay_slices"] == 0


def test_negative_overlay_count_is_an_error(tmp_path, tiny_config):
    from brats_jax.training import run_group

    config = tiny_config(**{"eval.num_overlay_slices": -1})
    with pytest.raises(ValueError, match="eval.num_overlay_slices=-1"):
        run_group.build_run(config, tmp_path)


def test_predict_overlays_index_with_extra_columns(tmp_path, monkeypatch, tiny_config):
    """case_prediction.predict_cases with a stand-in model (ET where the z-scored FLAIR is
    high): case A has a label file (Dice 1 beside its volume), B none (volume only); the extra
    column (as the uncertainty CSV's helper would give it) is listed."""
    from brats_jax.inference import case_lists, case_prediction, ensembles

    rng = np.random.default_rng(1)
    seg = np.zeros(SHAPE, np.int16)
    seg[BLOCK] = 4
    for cid in ("A", "B"):
        flair = 50 + 10 * rng.random(SHAPE)
        flair[BLOCK] = 500  # z-scored over the brain: far above 1
        for m in ("flair", "t1", "t1ce", "t2"):
            _save_nifti(tmp_path / "in" / cid / f"{cid}_{m}.nii.gz", flair, np.float32)
    _save_nifti(tmp_path / "in" / "A" / "A_seg.nii.gz", seg)

    def fake_predict(variables, images):  # (B, H, W, 4) -> class probabilities
        return np.eye(4, dtype=np.float32)[np.where(np.asarray(images)[..., 0] > 1, 3, 0)]

    config = tiny_config(**TWO_OVERLAYS)
    ensemble = ensembles.Ensemble(("run",), config, (fake_predict,), ({},), (0,))
    monkeypatch.setattr(ensembles, "load_ensemble", lambda *a, **k: ensemble)
    cases = case_lists.cases_from_input(str(tmp_path / "in"))
    case_prediction.predict_cases("run", cases, tmp_path / "out", postprocessing="none",
                          overlays_dir=tmp_path / "pics",
                          extra_columns={"B": {"mean_entropy": 0.5}})  # fmt: skip
    parser = _Index()
    parser.feed((tmp_path / "pics" / "index.html").read_text())
    header, *rows = parser.rows
    by_id = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert [r[0] for r in rows] == ["A", "B"]  # A has a Dice, B none
    assert by_id["A"]["dice_WT"] == "1.0000" and by_id["B"]["dice_WT"] == ""
    assert by_id["A"]["volume_ml_ET"] == by_id["B"]["volume_ml_ET"] == "0.3840"  # 384 mm^3
    assert by_id["B"]["mean_entropy"] == "0.5000" and by_id["A"]["mean_entropy"] == ""
    for cid, n_blobs in (("A", 12), ("B", 6)):  # A: truth and prediction panels; B: prediction
        # the block is white under the labels here, so ET is as pale as the legend's patch:
        # leave out the legend (the bottom 40 pixels)
        rgb = _read_png(tmp_path / "pics" / f"{cid}.png")[:-40].astype(int)
        yellow = (rgb[..., 0] > 150) & (rgb[..., 1] > 150) & (rgb[..., 2] < 100)
        assert len(_boxes(yellow)) == n_blobs
