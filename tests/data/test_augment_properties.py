"""Property tests of the on-device spatial augmentation (brats_jax/data/augment.py) at
angles that are not multiples of 90 degrees, random scales, elastic offsets and mirrors.

At right angles every sampling point is a pixel centre, so a bilinear label, a misplaced
half-pixel border or a wrong scale term can all hide; here the points fall between pixels.
References are numpy/scipy (``scipy.ndimage.map_coordinates``), never the library's
coordinate map: the end-to-end test reads each output pixel's pre-image point off image
channels that hold the row and column index (bilinear interpolation of a linear ramp is
exact), so the label is checked against the very point the image was sampled at.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from hypothesis import given, settings
from hypothesis import strategies as st

from brats_jax.data import augment
from brats_jax.data.augment import AugmentConfig

H, W = 12, 10  # not square: a swapped axis shows
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
TIE = 1e-3  # a coordinate this close to a half-integer has two nearest pixels
BACKGROUND = -100.0

# ------------------------------------------------------------------ strategies


@st.composite
def angles(draw):
    """Radians at k * 90 + delta degrees, delta in [4, 86]: never a right angle."""
    k = draw(st.integers(-2, 1))
    delta = draw(st.floats(4.0, 86.0))
    return np.deg2rad(k * 90.0 + delta)


def _smooth_offsets(seed, amplitude):
    """(du, dv) float64 (H, W): a few low-frequency waves, largest |offset| ~ amplitude."""
    rng = np.random.default_rng(seed)
    uu, vv = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    out = []
    for _ in range(2):
        f = sum(
            rng.normal() * np.sin(rng.uniform(0.1, 0.6) * uu + rng.uniform(0.1, 0.6) * vv + p)
            for p in rng.uniform(0, 2 * np.pi, 3)
        )
        out.append(f / max(np.abs(f).max(), 1e-9) * amplitude)
    return out


def ref_coordinates(angle, scale, mirror, offsets):
    """The documented map, written here: output pixel (i, j) samples the input at
    centre + scale * R(angle) (mirrored (i, j) - centre + offsets), R turning rows towards
    columns (+90 degrees = np.rot90(x, 1, axes=(0, 1)))."""
    cy, cx = (H - 1) / 2, (W - 1) / 2
    uu, vv = np.meshgrid(np.arange(H) - cy, np.arange(W) - cx, indexing="ij")
    uu, vv = (-uu if mirror[0] else uu), (-vv if mirror[1] else vv)
    uu, vv = uu + offsets[0], vv + offsets[1]
    rot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    d = np.einsum("ab,bhw->ahw", scale * rot, np.stack([uu, vv]))
    return cy + d[0], cx + d[1]


def _inside(r, c):
    return (r >= -0.5) & (r <= H - 0.5) & (c >= -0.5) & (c <= W - 0.5)


def _nearest(label, r, c):
    """label at the nearest pixel of (r, c) (clamped to the image)."""
    i = np.clip(np.rint(r), 0, H - 1).astype(int)
    j = np.clip(np.rint(c), 0, W - 1).astype(int)
    return label[i, j]


def _unambiguous(r, c):
    def far(x):
        return np.abs(x - np.floor(x) - 0.5) > TIE

    return far(r) & far(c)


def _neighbour_values(label, r, c):
    """(H, W, 4): label at the 2x2 pixels around each (r, c), clamped to the image."""
    i0, j0 = np.floor(r).astype(int), np.floor(c).astype(int)
    vals = [
        label[np.clip(i0 + di, 0, H - 1), np.clip(j0 + dj, 0, W - 1)]
        for di in (0, 1)
        for dj in (0, 1)
    ]
    return np.stack(vals, -1)


def _source(seed):
    """image (H, W, 4) float32 with no symmetry, label (H, W) int32 in {0..3}."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(H, W, 4)).astype(np.float32)
    label = rng.integers(0, 4, (H, W)).astype(np.int32)
    return image, label


_resample = jax.jit(augment.resample)


# ------------------------------------------------------------------ one resampling


@SETTINGS
@given(
    angles(),
    st.floats(0.7, 1.4),
    st.tuples(st.booleans(), st.booleans()),
    st.sampled_from([0.0, 0.8, 2.5]),
    st.integers(0, 2**32 - 1),
)
def test_resample_labels_are_nearest_and_images_bilinear_between_pixels(
    angle, scale, mirror, amplitude, seed
):
    image, label = _source(seed)
    rows, cols = ref_coordinates(angle, scale, mirror, _smooth_offsets(seed, amplitude))
    rows, cols = rows.astype(np.float32), cols.astype(np.float32)
    out_image, out_label = _resample(
        jnp.asarray(image), jnp.asarray(label), (jnp.asarray(rows), jnp.asarray(cols))
    )
    out_image, out_label = np.asarray(out_image), np.asarray(out_label)
    r, c = rows.astype(np.float64), cols.astype(np.float64)
    inside = _inside(rows, cols)
    assert 0 < inside.sum() and np.mean(np.abs(r - np.rint(r)) > 0.05) > 0.3  # between pixels
    # labels: never a blend, the nearest pixel's where there is one nearest pixel
    assert out_label.dtype == np.int32
    assert np.all(out_label[~inside] == 0)
    near = _neighbour_values(label, r, c)
    assert np.all((out_label[..., None] == near).any(-1)[inside])
    sure = inside & _unambiguous(r, c)
    np.testing.assert_array_equal(out_label[sure], _nearest(label, r, c)[sure])
    # image: bilinear at the same points (edges repeated), the background outside
    for ch in range(image.shape[-1]):
        want = scipy.ndimage.map_coordinates(
            image[..., ch].astype(np.float64), [r, c], order=1, mode="nearest"
        )
        np.testing.assert_allclose(out_image[..., ch][inside], want[inside], atol=2e-5)
        assert np.all(out_image[..., ch][~inside] == image[..., ch].min())


@SETTINGS
@given(
    angles(),
    st.floats(0.7, 1.4),
    st.tuples(st.booleans(), st.booleans()),
    st.sampled_from([0.0, 1.5]),
    st.integers(0, 2**32 - 1),
)
def test_coordinate_map_equals_the_rotation_scale_closed_form(
    angle, scale, mirror, amplitude, seed
):
    offsets = _smooth_offsets(seed, amplitude)
    got = augment.coordinate_map(
        (H, W),
        angle=np.float32(angle),
        scale=np.float32(scale),
        mirror=mirror,
        offsets=[jnp.asarray(o, jnp.float32) for o in offsets] if amplitude else None,
    )
    want = ref_coordinates(angle, scale, mirror, offsets)
    np.testing.assert_allclose(np.asarray(got[0]), want[0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(got[1]), want[1], atol=1e-4)


# ------------------------------------------------------------------ augment_batch end to end

CONFIGS = {
    "rotate": AugmentConfig(rotation_p=1.0, rotation_degrees=180.0),
    "rotate_scale_mirror": AugmentConfig(
        rotation_p=1.0, rotation_degrees=80.0, scale_p=1.0, mirror_p=0.5
    ),
    "elastic_rotate_scale": AugmentConfig(
        rotation_p=1.0,
        rotation_degrees=180.0,
        scale_p=1.0,
        scale_min=0.6,
        scale_max=1.5,
        elastic_p=1.0,
        elastic_sigma=0.2,
        elastic_magnitude=0.15,
    ),
}


@functools.cache
def _augment(name):
    cfg = CONFIGS[name]
    return jax.jit(lambda k, i, l, b: augment.augment_batch(k, i, l, cfg, b))


def _blocky(seed, batch):
    """Images whose channels 0, 1 are the row and column index and channel 2 a field
    constant on 3x2 blocks; labels = channel 2's class by thresholds (image-made labels)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    images, labels = [], []
    for _ in range(batch):
        blocks = rng.uniform(0, 4, (H // 3 + 1, W // 2 + 1))
        field = np.kron(blocks, np.ones((3, 2)))[:H, :W]
        smooth = rng.normal(size=(H, W))
        images.append(np.stack([rows, cols, field, smooth], -1).astype(np.float32))
        labels.append(np.digitize(field, [1.0, 2.0, 3.0]).astype(np.int32))
    return np.stack(images), np.stack(labels)


@settings(SETTINGS, max_examples=12)
@given(st.sampled_from(sorted(CONFIGS)), st.integers(0, 2**32 - 1))
def test_augment_batch_labels_follow_the_image_map_and_are_never_blended(name, seed):
    batch = 3
    image, label = _blocky(seed, batch)
    background = np.full((batch, 4), BACKGROUND, np.float32)
    key = jax.random.PRNGKey(seed % (2**31))
    out_image, out_label = (np.asarray(a) for a in _augment(name)(key, image, label, background))
    assert out_label.dtype == np.int32 and out_label.shape == label.shape
    between = []
    for b in range(batch):
        x, y = out_image[b], out_label[b]
        inside = x[..., 0] != BACKGROUND
        assert np.all(x[~inside] == BACKGROUND) and np.all(y[~inside] == 0)
        r, c = x[..., 0].astype(np.float64), x[..., 1].astype(np.float64)  # pre-image points
        between.append(np.mean(np.abs(r - np.rint(r))[inside] > 0.05))
        # never a blend: a value among the 2x2 source pixels around the pre-image point
        near = _neighbour_values(label[b], r, c)
        assert np.all((y[..., None] == near).any(-1)[inside])
        assert set(np.unique(y)) <= set(np.unique(label[b])) | {0}
        # aligned with the image: the nearest source pixel of the image's sampling point
        sure = inside & _unambiguous(r, c)
        np.testing.assert_array_equal(y[sure], _nearest(label[b], r, c)[sure])
        # every channel sampled at that point (bilinear)
        for ch in (2, 3):
            want = scipy.ndimage.map_coordinates(
                image[b, ..., ch].astype(np.float64), [r, c], order=1, mode="nearest"
            )
            np.testing.assert_allclose(x[..., ch][inside], want[inside], atol=1e-4)
        # where the 2x2 source pixels agree, the label is the image-made label of the image
        agree = inside & (near == near[..., :1]).all(-1)
        np.testing.assert_array_equal(y[agree], np.digitize(x[..., 2], [1.0, 2.0, 3.0])[agree])
    assert max(between) > 0.3  # the maps sample between pixels, not at right angles
