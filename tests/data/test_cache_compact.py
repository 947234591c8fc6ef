"""The compact slice cache (format version 2, `data.slice_store`): what it reads back equals
what `load_case` gives (the values today's version-1 cache stored) on the full grid, for
whole slices, 2.5D windows, patches, labels and the table; a version-1 cache's error."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from brats_jax.data import (
    DataError,
    NiftiCacheSource,
    SliceTable,
    TrainIterator,
    eval_batches,
    load_case,
    load_volume,
    prepare,
)

BOX = ((5, 13), (3, 11), (2, 6))  # the hand-placed brain of case "inner"
SHAPE = (16, 16, 8)


def _inner_case(root, write_labelled_case):
    """Case "inner": integer modalities non-zero only inside BOX (one voxel of t2 alone at
    its far corner), a label inside it; returns (folder, raws by modality, label)."""
    rng = np.random.default_rng(7)
    over = {}
    for k, m in enumerate(("flair", "t1", "t1ce", "t2")):
        x = np.zeros(SHAPE, np.int16)
        x[5:12, 3:10, 2:5] = rng.integers(1, 3000, (7, 7, 3)) * (k + 1)
        over[m] = x
    over["t2"][12, 10, 5] = 17  # the box's last voxel on every axis: stop = 13, 11, 6
    seg = np.zeros(SHAPE, np.uint8)
    seg[6:9, 4:6, 3] = 1
    seg[9:11, 7:9, 3:5] = 2
    seg[7, 8, 4] = 4
    return write_labelled_case(root, "inner", "2018", ".nii.gz", seg=seg, **over)


def _zscore(raw, brain):
    """Independent reference: z-score over the brain in float64, cast once to float32."""
    x = raw.astype(np.float64)
    vals = x[brain]
    std = vals.std() if vals.size and vals.std() > 0 else 1.0
    mean = vals.mean() if vals.size else 0.0
    return ((x - mean) / std).astype(np.float32)


class _Today:
    """Today's reader in memory: the cases' `load_case` slices (what the version-1 cache
    stored as float32 and read back), same table as `like`."""

    def __init__(self, root, like: NiftiCacheSource):
        self.table = like.table
        self.cases = {c: load_case(root / c) for c in like.case_ids}

    def __len__(self):
        return len(self.table.case_id)

    def __getitem__(self, i):
        cid, s = str(self.table.case_id[i]), int(self.table.slice_index[i])
        data = self.cases[cid]
        return dict(
            image=data.image[:, :, s], label=data.label[:, :, s], case_id=cid, slice_index=s
        )


@pytest.fixture
def release(tmp_path, write_labelled_case):
    _inner_case(tmp_path / "src", write_labelled_case)
    write_labelled_case(tmp_path / "src", "A", "2018", ".nii.gz")
    return tmp_path / "src"


def test_slices_volumes_and_table_equal_load_case(release, tmp_path):
    """Bugs caught: a box one voxel short (the last voxel's row lost), background written as
    0 instead of each modality's z-score of 0, normalisation in float32 (off by an ulp),
    class counts or brain fraction of the cropped grid instead of the full one."""
    src = NiftiCacheSource(prepare(release, tmp_path / "c", progress=False))
    assert src.case_ids == ["A", "inner"]
    meta = src.case_meta("inner")
    assert meta["norm"]["box"] == [list(b) for b in BOX] and meta["stored_dtype"] == "int16"
    data = load_case(release / "inner")
    raws = [np.asarray(nib.load(str(p)).dataobj) for p in sorted((release / "inner").glob("*"))]
    raws = dict(zip(("flair", "seg", "t1", "t1ce", "t2"), raws, strict=True))
    brain = np.any([raws[m] != 0 for m in ("flair", "t1", "t1ce", "t2")], axis=0)
    expected = np.stack([_zscore(raws[m], brain) for m in ("flair", "t1", "t1ce", "t2")], -1)
    np.testing.assert_array_equal(data.image, expected)  # load_case is the reference too
    for s in range(SHAPE[2]):
        rec = src[SHAPE[2] + s]
        assert rec["case_id"] == "inner" and rec["slice_index"] == s
        assert rec["image"].dtype == np.float32 and rec["image"].shape == (16, 16, 4)
        np.testing.assert_array_equal(rec["image"], expected[:, :, s])
        np.testing.assert_array_equal(rec["label"], data.label[:, :, s])
        counts = np.bincount(data.label[:, :, s].ravel(), minlength=4)
        np.testing.assert_array_equal(src.table.class_counts[SHAPE[2] + s], counts)
        assert src.table.brain_fraction[SHAPE[2] + s] == pytest.approx(brain[..., s].mean())
    assert src.table.brain_fraction[SHAPE[2] + 2] == pytest.approx(49 / 256)  # 7 x 7 brain
    assert src.table.class_counts[SHAPE[2] + 3].tolist() == [256 - 10, 6, 4, 0]
    # outside the box: each modality's z-score of 0, exactly
    assert (src[SHAPE[2] + 0]["image"] == expected[0, 0, 0]).all(axis=(0, 1)).all()
    image, label = load_volume(src, "inner")
    np.testing.assert_array_equal(image, data.image)
    np.testing.assert_array_equal(label, data.label)
    image, label = load_volume(src, "A")  # box touching 3 faces: x starts at 4
    np.testing.assert_array_equal(image, load_case(release / "A").image)


def test_windows_and_patches_equal_todays_reader(release, tmp_path):
    """2.5D windows (clamped at the case's ends) and random patches read from the compact
    cache are today's. Bugs caught: a slice outside the box read as zeros (the window's
    first/last slices), a patch crop drawn from a different label (class counts / label of
    the cropped grid)."""
    src = NiftiCacheSource(prepare(release, tmp_path / "c", progress=False))
    today = _Today(release, src)
    idx = np.arange(len(src))
    got = list(eval_batches(src, idx, batch_size=6, context_slices=1))
    want = list(eval_batches(today, idx, batch_size=6, context_slices=1))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        for key in ("image", "label", "slice_index", "valid"):
            np.testing.assert_array_equal(g[key], w[key])
    # window of inner's slice 0 = slices 0, 0, 1 (clamped), computed here by hand
    inner = load_case(release / "inner").image
    window = np.concatenate([inner[:, :, 0], inner[:, :, 0], inner[:, :, 1]], axis=-1)
    np.testing.assert_array_equal(got[1]["image"][2], window)  # record 8 = inner, slice 0
    options = dict(batch_size=4, seed=3, patch_size=8, foreground_fraction=0.5, context_slices=1)
    a, b = TrainIterator(src, idx, **options), TrainIterator(today, idx, **options)
    for _ in range(6):
        x, y = next(a), next(b)
        for key in ("image", "label", "slice_index", "background"):
            np.testing.assert_array_equal(x[key], y[key])
    a.close(), b.close()


def test_brain_on_the_border_float_intensities_and_empty_modality(
    tmp_path, write_nifti_case, write_labelled_case
):
    """A case whose brain fills the grid (box = whole grid) with non-integer float32
    intensities (stored as float32), and a case whose FLAIR is all zero (its channel all 0).
    Bugs caught: float intensities rounded to int16; a box cut short at the grid's border;
    an empty modality's std 0 dividing into NaN."""
    rng = np.random.default_rng(1)
    seg = (rng.random((12, 10, 6)) < 0.2).astype(np.uint8) * 2
    write_nifti_case(tmp_path / "src", "full", seed=4, seg=seg)
    write_labelled_case(tmp_path / "src", "noflair", flair=np.zeros(SHAPE, np.int16))
    src = NiftiCacheSource(prepare(tmp_path / "src", tmp_path / "c", progress=False))
    meta = src.case_meta("full")
    assert meta["norm"]["box"] == [[0, 12], [0, 10], [0, 6]] and meta["stored_dtype"] == "float32"
    assert src.case_meta("noflair")["stored_dtype"] == "int16"
    for cid in ("full", "noflair"):
        data = load_case(tmp_path / "src" / cid)
        image, label = load_volume(src, cid)
        np.testing.assert_array_equal(image, data.image)
        np.testing.assert_array_equal(label, data.label)
        k = src.case_ids.index(cid)
        for s in range(data.label.shape[2]):
            rec = src[int(src._offsets[k]) + s]
            np.testing.assert_array_equal(rec["image"], data.image[:, :, s])
    flair, _ = load_volume(src, "noflair")
    assert not flair[..., 0].any()  # zscore_brain of an all-zero modality: std 1, mean 0


def test_float16_cache_rounds_as_before(release, tmp_path):
    """`dtype="float16"` stores the z-scores in float16, as version 1 did: reads are
    float32(float16(load_case's values)), background included. Bug caught: the background
    (outside the box) left unrounded."""
    src = NiftiCacheSource(prepare(release, tmp_path / "c", dtype="float16", progress=False))
    assert src.case_meta("inner")["stored_dtype"] == "float16"
    for cid in src.case_ids:
        image, _ = load_volume(src, cid)
        want = load_case(release / cid).image.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(image, want)
        assert image.dtype == np.float32


def _version_1_cache(release, out):
    """A cache laid out as version 1 wrote it (cache.json v1; case folders with image.npy,
    label.npy, stats.npz, meta.json with stamps, COMPLETE)."""
    from brats_jax.data.brats import find_cases
    from brats_jax.data.cache import _source_stamps

    for case in find_cases(release):
        d = out / "cases" / case.case_id
        d.mkdir(parents=True)
        data = load_case(case)
        np.save(d / "image.npy", np.moveaxis(data.image, 2, 0))
        np.save(d / "label.npy", np.moveaxis(data.label, 2, 0).astype(np.uint8))
        np.savez(d / "stats.npz", class_counts=np.zeros((8, 4)), brain_fraction=np.zeros(8))
        meta = dict(case_id=case.case_id, shape=list(SHAPE), stamps=_source_stamps(case))
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "COMPLETE").write_text("ok\n")
    info = dict(format="brats_jax.slice_cache", version=1, src=str(release), dtype="float32",
                cases=["A", "inner"])  # fmt: skip
    (out / "cache.json").write_text(json.dumps(info))


def test_version_1_cache_says_how_to_convert_it_and_prepare_does(release, tmp_path):
    """A version-1 cache: one line naming the command that converts it; that command (here
    `prepare` on the same folders) converts every case again in place. Bug caught: a case
    of version 1 counted as current (its folder kept: no image.b2nd, no norm)."""
    out = tmp_path / "old"
    _version_1_cache(release, out)
    with pytest.raises(DataError) as e:
        NiftiCacheSource(out)
    msg = str(e.value)
    assert "\n" not in msg and "version 1" in msg
    assert f"`python -m brats_jax.prepare --src={release} --out={out}`" in msg
    src = NiftiCacheSource(prepare(release, out, progress=False))
    for cid in ("A", "inner"):
        assert sorted(os.listdir(out / "cases" / cid)) == [
            "COMPLETE", "image.b2nd", "label.b2nd", "meta.json", "stats.npz"
        ]  # fmt: skip
        np.testing.assert_array_equal(load_volume(src, cid)[0], load_case(release / cid).image)


def test_pickled_source_reads_the_same(release, tmp_path):
    """grain's worker processes get the source pickled: same records. Bug caught: an open
    blosc2 array or the norms lost in pickling."""
    import pickle

    src = NiftiCacheSource(prepare(release, tmp_path / "c", progress=False))
    src[10]  # opens this thread's array before pickling
    clone = pickle.loads(pickle.dumps(src))
    for i in (0, 10, 15):
        np.testing.assert_array_equal(clone[i]["image"], src[i]["image"])
    assert isinstance(clone.table, SliceTable)


def test_real_case_equals_load_case(brats_sample, tmp_path):
    """One real case (int16 NIfTI): the compact cache's every slice is load_case's, and it
    is cropped (box inside the 240 x 240 x 155 grid) at under 1.5x its .nii.gz bytes."""
    case = brats_sample / "nifti" / "Brats18_2013_2_1"
    (tmp_path / "src").mkdir()
    os.symlink(case, tmp_path / "src" / case.name)
    src = NiftiCacheSource(prepare(tmp_path / "src", tmp_path / "c", progress=False))
    data = load_case(case)
    image, label = load_volume(src, case.name)
    np.testing.assert_array_equal(image, data.image)
    np.testing.assert_array_equal(label, data.label)
    for s in (0, 40, 80, 154):
        np.testing.assert_array_equal(src[s]["image"], data.image[:, :, s])
    box = np.asarray(src.case_meta(case.name)["norm"]["box"])
    assert (box[:, 1] - box[:, 0] < (240, 240, 155)).all()
    assert src.case_meta(case.name)["stored_dtype"] == "int16"
    stored = sum(p.stat().st_size for p in (tmp_path / "c" / "cases" / case.name).glob("*.b2nd"))
    assert stored < 1.5 * sum(os.path.getsize(p) for p in case.glob("*.nii*"))


def test_full_disk_during_prepare_is_an_oserror_naming_the_file(tmp_path):
    """`prepare` onto a full disk raises OSError ENOSPC naming the file being written, which
    the command prints as its one-line error (`cli`). Bug caught: the arrays written by
    blosc2 itself, whose failure is a bare RuntimeError ("Error while creating the
    NDArray") and a traceback."""
    import errno
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:  # random intensities: they compress too little for the 64 KiB disk
        big = np.random.default_rng(0).integers(1, 30000, (64, 64, 40)).astype(np.int16)
        folder = tmp_path / "big" / "Z"
        folder.mkdir(parents=True)
        affine = np.diag([-1.0, -1, 1, 1])
        for suffix in ("_flair", "_t1", "_t1ce", "_t2"):
            nib.save(nib.Nifti1Image(big, affine), folder / f"Z{suffix}.nii")
        nib.save(nib.Nifti1Image(np.zeros(big.shape, np.uint8), affine), folder / "Z_seg.nii")
        with pytest.raises(OSError) as e:
            prepare(tmp_path / "big", disk / "cache", progress=False)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # lazy: never left behind
    assert e.value.errno == errno.ENOSPC
    assert str(e.value.filename).startswith(str(disk / "cache" / "cases" / ".Z.tmp-"))
