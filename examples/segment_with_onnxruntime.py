"""Segment a BraTS case folder with a model exported by `python -m brats_jax.export`, using only
onnxruntime, numpy and nibabel (scipy for the post-processing: skipped, with a warning, without
it). Reads MODEL.json beside MODEL and does what `python -m brats_jax.predict
--tta=<the run's eval.tta>` does: the four modalities in LPS voxel order, z-scored, 2.5D slice
windows, resized to the model's size, test-time flips, labels decoded, post-processed, written
in the input's label convention (ET = 4 for <ID>_flair naming, 3 for <ID>-t2f) and voxel order.
Not done here: sliding windows, a case missing a modality.

    python examples/segment_with_onnxruntime.py model.onnx CASE_DIR SEG.nii.gz
"""

import json
import pathlib
import sys

import nibabel as nib
import numpy as np
import onnxruntime as ort

NAMINGS = {"2018": ("_flair", "_t1", "_t1ce", "_t2"), "2023": ("-t2f", "-t1n", "-t1c", "-t2w")}
LPS = nib.orientations.axcodes2ornt("LPS")


def read_case(folder):
    """(raw volumes in LPS order, the FLAIR image, naming, its orientation transform to LPS)
    of a BraTS case folder."""
    for naming, suffixes in NAMINGS.items():
        paths = [next(folder.glob(f"{folder.name}{s}.nii*"), None) for s in suffixes]
        if all(paths):
            images = [nib.load(p) for p in paths]
            to_lps = nib.orientations.ornt_transform(nib.io_orientation(images[0].affine), LPS)
            lps = nib.orientations.apply_orientation
            vols = [lps(np.asanyarray(image.dataobj), to_lps) for image in images]
            return vols, images[0], naming, to_lps
    sys.exit(f"{folder}: expected {folder.name}_flair.nii.gz ... or {folder.name}-t2f.nii.gz ...")


def voxel_size(image, to_lps):  # mm per axis of the LPS-ordered arrays, from the header
    return nib.affines.voxel_sizes(
        image.affine @ nib.orientations.inv_ornt_aff(to_lps, image.shape[:3])
    )


def normalise(vols, how):  # "brain": per volume over brain voxels; "slice": per axial slice
    brain, out = np.any([v != 0 for v in vols], axis=0), []
    for x in (v.astype(np.float64) for v in vols):
        if how == "slice":
            m, s = x.mean((0, 1), keepdims=True), x.std((0, 1), keepdims=True)
            out.append(np.where(s > 0, (x - m) / np.where(s > 0, s, 1.0), 0.0))
        else:
            s = x[brain].std() if brain.any() else 0.0
            out.append((x - x[brain].mean()) / (s if s > 0 else 1.0) if brain.any() else 0 * x)
    return np.stack(out, -1).astype(np.float32)  # (H, W, D, 4)


def weights(n_in, n_out):  # (n_out, n_in) bilinear, half-pixel centres, edges clamped
    k = 1 - abs((np.arange(n_out)[:, None] + 0.5) * n_in / n_out - 0.5 - np.arange(n_in))
    return (np.maximum(k, 0) / np.maximum(k, 0).sum(1, keepdims=True)).astype(np.float32)


def resize(x, h, w):  # (B, H, W, C) -> (B, h, w, C), as jax.image.resize "linear", no antialias
    if x.shape[1:3] == (h, w):
        return x
    wh, ww = weights(x.shape[1], h), weights(x.shape[2], w)
    return np.einsum("ih,bhwc,jw->bijc", wh, x, ww, optimize=True)


def run(session, x):
    return session.run(None, {"image": np.ascontiguousarray(x)})[0]


def decode(p, regions):  # (..., C) probabilities -> labels {0..3}: ET in TC in WT, or argmax
    if not regions:
        return p.argmax(-1)
    wt = p[..., 0] > 0.5
    tc = (p[..., 1] > 0.5) & wt
    return np.select([(p[..., 2] > 0.5) & tc, tc, wt], [3, 1, 2], 0)


def main(model_path, case_dir, out_path, batch_size=16):
    meta = json.loads(pathlib.Path(f"{model_path}.json").read_text())
    if meta["sliding_window"]:
        sys.exit("this run predicts through sliding windows; not done here (use predict)")
    session = ort.InferenceSession(model_path, providers=ort.get_available_providers())
    vols, flair, naming, to_lps = read_case(pathlib.Path(case_dir))
    x = normalise(vols, meta["input"]["normalization"])
    (h, w, depth), k, size = x.shape[:3], meta["input"]["context_slices"], meta["input"]["shape"][1]
    flips, probs = [tuple(a) for a in meta["tta"]["flip_axes"]], []
    windows = np.clip(np.arange(depth)[:, None] + np.arange(-k, k + 1), 0, depth - 1)
    for pos in np.array_split(windows, range(batch_size, depth, batch_size)):
        xb = np.moveaxis(x[:, :, pos.ravel()].reshape(h, w, len(pos), -1), 2, 0)  # slice-major
        xb = resize(xb, size, size)
        p = sum(np.flip(run(session, np.flip(xb, a)), a) for a in flips) / len(flips)
        probs.append(resize(p, h, w))
    p = np.moveaxis(np.concatenate(probs), 0, 2)  # (H, W, D, C)
    labels = decode(p, meta["output"]["kind"] == "regions")
    labels = postprocess(labels, meta["postprocessing"], voxel_size(flair, to_lps))
    labels = np.asarray(meta["labels"]["release_labels"][naming], np.int16)[labels]
    back = nib.orientations.ornt_transform(LPS, nib.io_orientation(flair.affine))
    header = flair.header.copy()
    header.set_data_dtype(np.int16)
    header.set_slope_inter(1, 0)
    out = nib.orientations.apply_orientation(labels, back).astype(np.int16)
    nib.save(nib.Nifti1Image(out, flair.affine, header), out_path)
    print(f"wrote {out_path}: labels {np.unique(out).tolist()}")


def postprocess(labels, pp, spacing=(1.0, 1.0, 1.0)):  # pp["rule"]; spacing: voxel size, mm
    components = pp["largest_component_only"] or pp["min_component_voxels"]
    regions = (("tc", (1, 3), 2), ("et", (3,), 1))  # TC -> ED (2) or 0; ET -> NCR (1) or 0
    if not (components or pp["et_min_voxels"] or any(pp.get(f"{r}_min_mm3") for r, *_ in regions)):
        return labels
    try:
        from scipy import ndimage
    except ImportError:
        print(f"warning: scipy is not installed; post-processing {pp} skipped", file=sys.stderr)
        return labels
    structure = ndimage.generate_binary_structure(3, 1 if pp["connectivity"] == 6 else 3)
    if components:
        cc, n = ndimage.label(labels > 0, structure=structure)
        sizes, keep = np.bincount(cc.ravel()), np.zeros(n + 1, bool)
        sizes[0] = 0
        if n:  # the largest always stays; the others only with min_component_voxels or more
            keep[np.argmax(sizes)] = True
            if not pp["largest_component_only"]:
                keep[1:] |= sizes[1:] >= pp["min_component_voxels"]
        labels = np.where(keep[cc], labels, 0)
    for r, classes, relabelled in regions:  # components below {r}_min_mm3 (voxels x mm^3)
        if pp.get(f"{r}_min_mm3"):
            cc, _ = ndimage.label(np.isin(labels, classes), structure=structure)
            small = np.bincount(cc.ravel()) * np.prod(spacing) < pp[f"{r}_min_mm3"]
            small[0] = False
            new = relabelled if pp.get(f"{r}_action", "relabel") == "relabel" else 0
            labels = np.where(small[cc], new, labels)
    et = labels == 3
    if pp["et_min_voxels"] and 0 < et.sum() < pp["et_min_voxels"]:
        labels = np.where(et, 1, labels)
    return labels


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
