"""The synthetic phantom: determinism, contrasts, 3-D tumour extent, table exactness."""

import pickle

import numpy as np

from brats_jax.data import SyntheticSource


def test_deterministic_and_picklable():
    a, b = SyntheticSource(3, 6, 48, seed=1), SyntheticSource(3, 6, 48, seed=1)
    for i in (0, 7, 17):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c[7]["image"], a[7]["image"])
    assert not np.array_equal(SyntheticSource(3, 6, 48, seed=2)[7]["image"], a[7]["image"])
    r = a[7]
    assert r["image"].shape == (48, 48, 4) and r["image"].dtype == np.float32
    assert r["label"].dtype == np.int32 and r["case_id"] == "synth_001" and r["slice_index"] == 1


def test_table_matches_images_and_has_tumour_free_slices():
    src = SyntheticSource(4, 12, 40, seed=0)
    for i in range(len(src)):
        r = src[i]
        np.testing.assert_array_equal(
            src.table.class_counts[i], np.bincount(r["label"].ravel(), minlength=4)
        )
        brain = np.any(r["image"] != r["image"][0, 0], axis=-1)  # background is a constant
        assert abs(src.table.brain_fraction[i] - brain.mean()) < 0.02
    tumour = src.table.class_counts[:, 1:].sum(1) > 0
    assert tumour.any() and (~tumour).any()
    # per case, tumour slices form one contiguous run (a 3-D blob along the slice axis)
    for c in range(4):
        t = tumour[c * 12 : (c + 1) * 12]
        on = np.nonzero(t)[0]
        assert len(on) and (np.diff(on) == 1).all()
    assert (src.table.class_counts[:, 1:] > 0).any(0).all()  # every class appears


def test_modality_contrasts():
    src = SyntheticSource(6, 8, 96, seed=0)
    means = {k: [] for k in ("brain", "ed", "et", "ncr")}
    for i in range(len(src)):
        r = src[i]
        lab, img = r["label"], r["image"]
        bg = img[0, 0]
        brain = np.any(img != bg, -1) & (lab == 0)
        for name, m in (("brain", brain), ("ncr", lab == 1), ("ed", lab == 2), ("et", lab == 3)):
            if m.sum() > 20:
                means[name].append(img[m].mean(0))
    mean = {k: np.mean(v, 0) for k, v in means.items()}  # channels flair, t1, t1ce, t2
    assert mean["ed"][0] > mean["brain"][0] + 0.5 and mean["ed"][3] > mean["brain"][3] + 0.5
    assert mean["et"][2] > mean["brain"][2] + 0.5 and mean["et"][2] > mean["ed"][2]
    assert mean["ncr"][2] < mean["brain"][2] - 0.5
