"""Data augmentation on the device, per sample, inside the jitted train step.

`augment_batch(key, image, label, cfg)` draws every transform from `key`: one spatial
resampling per sample (mirror on each in-plane axis, in-plane rotation, scaling and an
optional elastic deformation composed into one coordinate map), then intensity transforms
in nnU-Net's order (Gaussian noise, Gaussian blur, multiplicative brightness, contrast,
low-resolution simulation, inverted gamma, gamma), then modality dropout. Each transform
has a per-sample probability (the config's `augment.*_p`); a transform with probability 0
is left out of the traced program, so `AugmentConfig()` (all 0) is the identity, bit for bit.

Layout: image float32 (B, H, W, C), C = 4 (2k+1), slice-major (`data/context.py`: channel
4j + m is context slice j's modality m); label int32 (B, H, W) in {0..3}. All channels and
the label get the same spatial map (image bilinear, label nearest). Intensity parameters
are drawn per modality and shared by that modality's 2k+1 context slices; the statistics
the transforms use (mean, min, max, std) are over the modality's whole (H, W, 2k+1) stack.
Pixels mapped from outside the image become background: label 0 and, per channel, the
normalised background (z-scored data maps raw 0 to -mean/std, the channel minimum since raw
MRI intensities are >= 0; see `data/brats.py`): the batch's `background` when given (random
crops carry their whole slice's minimum, since a crop inside the brain has no background
pixel), else the sample's minimum.

Rotation convention: a positive angle turns the content from the first (row) axis towards
the second (column) axis, like `np.rot90` (counter-clockwise on screen with row 0 on top):
+90 degrees on a square image gives `np.rot90(image, 1, axes=(0, 1))`. Scaling follows
nnU-Net: the sampling coordinates are multiplied by the factor, so a factor > 1 shows more
of the image (content shrinks).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from brats_jax import MODALITIES

NUM_MODALITIES = len(MODALITIES)  # channels per context slice (data/context.py)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The `augment.*` config fields (hashable: a static argument of the jitted step).

    Every `*_p` is a per-sample probability (0 = off, the default); ranges default to
    nnU-Net's 2D values (`NNUNET_2D`). Ranges are [min, max], drawn uniformly, except
    brightness, contrast and gamma factors: with min < 1 < max a coin picks [min, 1) or
    [1, max] (nnU-Net's `BGContrast`).
    """

    mirror_p: float = 0.0  # per in-plane axis
    rotation_p: float = 0.0
    rotation_degrees: float = 180.0  # angle uniform in [-rotation_degrees, rotation_degrees]
    scale_p: float = 0.0
    scale_min: float = 0.7
    scale_max: float = 1.4
    elastic_p: float = 0.0
    elastic_sigma: float = 0.1  # smoothing of the displacement field, fraction of the size
    elastic_magnitude: float = 0.05  # largest displacement, uniform in [0, this] x size
    noise_p: float = 0.0
    noise_std_min: float = 0.0  # additive Gaussian noise std (one per sample)
    noise_std_max: float = 0.1
    blur_p: float = 0.0
    blur_p_per_modality: float = 0.5
    blur_sigma_min: float = 0.5  # pixels
    blur_sigma_max: float = 1.0
    brightness_p: float = 0.0
    brightness_min: float = 0.75  # x * factor
    brightness_max: float = 1.25
    contrast_p: float = 0.0
    contrast_min: float = 0.75  # (x - mean) * factor + mean, clipped to [min, max]
    contrast_max: float = 1.25
    lowres_p: float = 0.0
    lowres_p_per_modality: float = 0.5
    lowres_scale_min: float = 0.5  # nearest down to scale x size, bilinear back up
    lowres_scale_max: float = 1.0
    gamma_inverted_p: float = 0.0  # gamma of the negated image
    gamma_p: float = 0.0
    gamma_min: float = 0.7
    gamma_max: float = 1.5
    modality_dropout_p: float = 0.0  # one random modality set to 0 (all context slices)

    @property
    def enabled(self) -> bool:
        """True when any transform has a probability above 0."""
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self) if _is_p(f.name))


def _is_p(name: str) -> bool:
    """A per-sample probability field (turns a transform on)."""
    return name.endswith("_p")


OFF_FIELDS = dataclasses.asdict(AugmentConfig())
"""The `augment` section of a run made before it existed (no augmentation)."""

# nnU-Net v2's 2D training augmentation (github.com/MIC-DKFZ/nnUNet, commit 0e49508,
# nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py): configure_rotation_dummyDA_mirroring_
# and_inital_patch_size gives 2D rotation (-180, 180) degrees (square patches) and mirror
# axes (0, 1); get_training_transforms: SpatialTransform p_rotation=0.2, p_scaling=0.2,
# scaling=(0.7, 1.4), p_elastic_deform=0; GaussianNoiseTransform noise_variance=(0, 0.1)
# with p 0.1 (batchgeneratorsv2 uses the drawn value as the std); GaussianBlurTransform
# blur_sigma=(0.5, 1.0), p_per_channel=0.5, p 0.2; MultiplicativeBrightnessTransform
# BGContrast((0.75, 1.25)) p 0.15; ContrastTransform BGContrast((0.75, 1.25)),
# preserve_range, p 0.15; SimulateLowResolutionTransform scale=(0.5, 1), p_per_channel=0.5,
# p 0.25; GammaTransform BGContrast((0.7, 1.5)), retain stats, p_invert_image=1 with p 0.1,
# then p_invert_image=0 with p 0.3; MirrorTransform (each axis with p 0.5). nnU-Net has no
# modality dropout. Put these into a preset as {f"augment.{k}": v for k, v in NNUNET_2D.items()};
# the spatial and the intensity parts alone are NNUNET_2D_SPATIAL and NNUNET_2D_INTENSITY.
NNUNET_2D_SPATIAL = {"mirror_p": 0.5, "rotation_p": 0.2, "rotation_degrees": 180.0, "scale_p": 0.2}
NNUNET_2D_INTENSITY = {
    "noise_p": 0.1,
    "blur_p": 0.2,
    "brightness_p": 0.15,
    "contrast_p": 0.15,
    "lowres_p": 0.25,
    "gamma_inverted_p": 0.1,
    "gamma_p": 0.3,
}
NNUNET_2D = {**OFF_FIELDS, **NNUNET_2D_SPATIAL, **NNUNET_2D_INTENSITY}


def from_config(config) -> AugmentConfig:
    """The `AugmentConfig` of a run config (all off when it has no `augment` section).

    ValueError (one line, naming the field) on an unknown field, a probability outside
    [0, 1] or an empty or invalid range.
    """
    section = config.get("augment") if hasattr(config, "get") else None
    values = dict(section or {})
    unknown = sorted(set(values) - set(OFF_FIELDS))
    if unknown:
        raise ValueError(f"augment.{unknown[0]}: unknown field; expected one of {list(OFF_FIELDS)}")
    cfg = AugmentConfig(**{k: float(v) for k, v in values.items()})
    _check(cfg)
    return cfg


def _check(cfg: AugmentConfig) -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.endswith(("_p", "_per_modality")) and not 0 <= v <= 1:
            raise ValueError(f"augment.{f.name}={v}; expected a probability in [0, 1]")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"augment.{f.name}={v}; expected a finite value >= 0")
    for lo, hi in (
        ("scale_min", "scale_max"),
        ("noise_std_min", "noise_std_max"),
        ("blur_sigma_min", "blur_sigma_max"),
        ("brightness_min", "brightness_max"),
        ("contrast_min", "contrast_max"),
        ("lowres_scale_min", "lowres_scale_max"),
        ("gamma_min", "gamma_max"),
    ):
        if getattr(cfg, lo) > getattr(cfg, hi):
            raise ValueError(f"augment.{lo}={getattr(cfg, lo)} > augment.{hi}={getattr(cfg, hi)}")
    for name in ("scale_min", "lowres_scale_min", "gamma_min"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"augment.{name}={getattr(cfg, name)}; expected > 0")
    if cfg.lowres_scale_max > 1:
        raise ValueError(f"augment.lowres_scale_max={cfg.lowres_scale_max}; expected <= 1")
    if cfg.elastic_p > 0 and cfg.elastic_sigma <= 0:
        raise ValueError(f"augment.elastic_sigma={cfg.elastic_sigma}; expected > 0")


def augment_batch(key, image, label, cfg: AugmentConfig, background=None):
    """`(image, label)` of a batch, each sample augmented with its own key from `key`.

    image float32 (B, H, W, 4(2k+1)), label int32 (B, H, W); returned with the same shapes
    and dtypes (labels stay in the input's label set plus 0). `background` (B, 4(2k+1)):
    per-channel value for pixels mapped from outside the image (None: each sample's
    minimum). Jit- and vmap-able.
    """
    if not cfg.enabled:
        return image, label
    keys = jax.random.split(key, image.shape[0])
    return jax.vmap(functools.partial(augment_sample, cfg=cfg))(keys, image, label, background)


def augment_sample(key, image, label, background, cfg: AugmentConfig):
    """One sample: image (H, W, 4(2k+1)), label (H, W), background (4(2k+1),) or None (the
    sample's minimum, see `resample`) -> image and label augmented."""
    k_spatial, k_intensity, k_drop = jax.random.split(key, 3)
    image, label = spatial_transform(k_spatial, image, label, cfg, background)
    image = intensity_transform(k_intensity, image, cfg)
    return modality_dropout(k_drop, image, cfg.modality_dropout_p), label


def _coin(key, p: float):
    return jax.random.uniform(key) < p


def _factor(key, lo: float, hi: float, shape=()):
    """Uniform in [lo, hi]; with lo < 1 < hi a coin picks [lo, 1) or [1, hi] (BGContrast)."""
    if not lo < 1 < hi:
        return jax.random.uniform(key, shape, minval=lo, maxval=hi)
    k_side, k_value = jax.random.split(key)
    below = jax.random.uniform(k_side, shape) < 0.5
    return jax.random.uniform(
        k_value, shape, minval=jnp.where(below, lo, 1.0), maxval=jnp.where(below, 1.0, hi)
    )


# ---------------------------------------------------------------------------------------
# Spatial: one coordinate map, one resampling


def _has_spatial(cfg: AugmentConfig) -> bool:
    return max(cfg.mirror_p, cfg.rotation_p, cfg.scale_p, cfg.elastic_p) > 0


def coordinate_map(shape, *, angle=0.0, scale=1.0, mirror=(False, False), offsets=None):
    """(rows, cols), each float32 (H, W): the input position each output pixel samples.

    Output axes mirrored where `mirror` (bools, may be traced), plus `offsets` ((du, dv) or
    None), then rotated by `angle` (radians; positive: `np.rot90`'s sense) and scaled by
    `scale` about the image centre ((H-1)/2, (W-1)/2): nnU-Net's order (deform, rotate).
    """
    h, w = shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    u = jnp.arange(h, dtype=jnp.float32) - cy
    v = jnp.arange(w, dtype=jnp.float32) - cx
    u, v = jnp.where(mirror[0], -u, u), jnp.where(mirror[1], -v, v)
    uu, vv = jnp.meshgrid(u, v, indexing="ij")
    if offsets is not None:
        uu, vv = uu + offsets[0], vv + offsets[1]
    c, s = jnp.cos(angle) * scale, jnp.sin(angle) * scale
    return cy + (c * uu + s * vv), cx + (c * vv - s * uu)


def sampling_coordinates(key, shape: tuple[int, int], cfg: AugmentConfig):
    """`coordinate_map` of one sample's draws: mirror per axis, elastic offsets, rotation
    angle and scale, each with its probability (off: the identity part)."""
    k_mu, k_mv, k_el, k_elp, k_rot, k_rotp, k_sc, k_scp = jax.random.split(key, 8)
    mirror = (_coin(k_mu, cfg.mirror_p), _coin(k_mv, cfg.mirror_p))
    offsets = None
    if cfg.elastic_p > 0:
        on = _coin(k_elp, cfg.elastic_p)
        offsets = [jnp.where(on, d, 0.0) for d in _elastic_offsets(k_el, shape, cfg)]
    angle = jnp.float32(0)
    if cfg.rotation_p > 0:
        limit = math.radians(cfg.rotation_degrees)
        drawn = jax.random.uniform(k_rot, minval=-limit, maxval=limit)
        angle = jnp.where(_coin(k_rotp, cfg.rotation_p), drawn, 0.0)
    scale = jnp.float32(1)
    if cfg.scale_p > 0:
        drawn = jax.random.uniform(k_sc, minval=cfg.scale_min, maxval=cfg.scale_max)
        scale = jnp.where(_coin(k_scp, cfg.scale_p), drawn, 1.0)
    return coordinate_map(shape, angle=angle, scale=scale, mirror=mirror, offsets=offsets)


def _elastic_offsets(key, shape, cfg: AugmentConfig):
    """(du, dv) float32 (H, W): white noise smoothed by a Gaussian (sigma = elastic_sigma x
    size, in the Fourier domain), scaled so the largest |offset| is a draw in
    [0, elastic_magnitude] x size."""
    h, w = shape
    k_noise, k_mag = jax.random.split(key)
    noise = jax.random.normal(k_noise, (2, h, w))
    fy = jnp.fft.fftfreq(h)[:, None]
    fx = jnp.fft.rfftfreq(w)[None, :]
    sy, sx = cfg.elastic_sigma * h, cfg.elastic_sigma * w
    gauss = jnp.exp(-2 * jnp.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    smooth = jnp.fft.irfft2(jnp.fft.rfft2(noise) * gauss, s=(h, w))
    peak = jnp.maximum(jnp.abs(smooth).max(axis=(1, 2), keepdims=True), 1e-8)
    magnitude = jax.random.uniform(k_mag, maxval=cfg.elastic_magnitude)
    size = jnp.asarray([h, w], jnp.float32)[:, None, None]
    offsets = (smooth / peak * magnitude * size).astype(jnp.float32)
    return offsets[0], offsets[1]


def spatial_transform(key, image, label, cfg: AugmentConfig, background=None):
    """image (H, W, C), label (H, W) through one `sampling_coordinates` map (`resample`)."""
    if not _has_spatial(cfg):
        return image, label
    return resample(image, label, sampling_coordinates(key, label.shape, cfg), background)


def resample(image, label, coords, background=None):
    """image (H, W, C) bilinear, label (H, W) nearest at `coords` ((rows, cols), (H, W)
    each); pixels from outside the image (beyond its half-pixel border) get label 0 and
    `background` (C,) (None: each channel's minimum, the normalised background)."""
    h, w = label.shape
    rows, cols = coords
    inside = (rows >= -0.5) & (rows <= h - 0.5) & (cols >= -0.5) & (cols <= w - 0.5)
    coords = [rows, cols]
    sample = lambda ch: ndimage.map_coordinates(ch, coords, order=1, mode="nearest")  # noqa: E731
    warped = jax.vmap(sample, in_axes=2, out_axes=2)(image)
    fill = image.min(axis=(0, 1)) if background is None else background
    warped = jnp.where(inside[..., None], warped, fill)
    new_label = ndimage.map_coordinates(label, coords, order=0, mode="nearest")
    return warped, jnp.where(inside, new_label, 0).astype(label.dtype)


# ---------------------------------------------------------------------------------------
# Intensity: parameters per modality, shared by its context slices


def _by_modality(image):
    """(H, W, 4S) slice-major channels -> (H, W, S, 4): [..., j, m] = slice j, modality m."""
    h, w, c = image.shape
    return image.reshape(h, w, c // NUM_MODALITIES, NUM_MODALITIES)


_STATS_AXES = (0, 1, 2)  # a modality's whole (H, W, S) stack


def intensity_transform(key, image, cfg: AugmentConfig):
    """image (H, W, 4S) -> the same after noise, blur, brightness, contrast, low resolution,
    inverted gamma and gamma (each with its probability, nnU-Net's order)."""
    x = _by_modality(image)
    m = NUM_MODALITIES
    # a fixed key per transform: turning one on or off leaves the others' draws unchanged
    k_noise, k_blur, k_bright, k_contrast, k_lowres, *k_gammas = (
        jax.random.split(k, 3) for k in jax.random.split(key, 7)
    )
    if cfg.noise_p > 0:
        std = jax.random.uniform(k_noise[0], minval=cfg.noise_std_min, maxval=cfg.noise_std_max)
        noisy = x + std * jax.random.normal(k_noise[1], x.shape)
        x = jnp.where(_coin(k_noise[2], cfg.noise_p), noisy, x)
    if cfg.blur_p > 0:
        sigma = jax.random.uniform(
            k_blur[0], (m,), minval=cfg.blur_sigma_min, maxval=cfg.blur_sigma_max
        )
        on = _coin(k_blur[1], cfg.blur_p) & (
            jax.random.uniform(k_blur[2], (m,)) < cfg.blur_p_per_modality
        )
        x = jnp.where(on, gaussian_blur(x, sigma, _blur_radius(cfg.blur_sigma_max)), x)
    if cfg.brightness_p > 0:
        factor = _factor(k_bright[0], cfg.brightness_min, cfg.brightness_max, (m,))
        x = jnp.where(_coin(k_bright[1], cfg.brightness_p), x * factor, x)
    if cfg.contrast_p > 0:
        factor = _factor(k_contrast[0], cfg.contrast_min, cfg.contrast_max, (m,))
        x = jnp.where(_coin(k_contrast[1], cfg.contrast_p), contrast(x, factor), x)
    if cfg.lowres_p > 0:
        scale = jax.random.uniform(
            k_lowres[0], (m,), minval=cfg.lowres_scale_min, maxval=cfg.lowres_scale_max
        )
        on = _coin(k_lowres[1], cfg.lowres_p) & (
            jax.random.uniform(k_lowres[2], (m,)) < cfg.lowres_p_per_modality
        )
        x = jnp.where(on, low_resolution(x, scale), x)
    for k, p, invert in zip(
        k_gammas, (cfg.gamma_inverted_p, cfg.gamma_p), (True, False), strict=True
    ):
        if p > 0:
            g = _factor(k[0], cfg.gamma_min, cfg.gamma_max, (m,))
            x = jnp.where(_coin(k[1], p), gamma(x, g, invert=invert), x)
    return x.reshape(image.shape)


def contrast(x, factor):
    """x (H, W, S, 4): (x - mean) * factor + mean per modality, clipped to its [min, max]
    (nnU-Net's ContrastTransform with preserve_range); factor (4,)."""
    mean = x.mean(axis=_STATS_AXES)
    out = (x - mean) * factor + mean
    return jnp.clip(out, x.min(axis=_STATS_AXES), x.max(axis=_STATS_AXES))


def gamma(x, g, *, invert: bool = False, eps: float = 1e-7):
    """x (H, W, S, 4), g (4,): nnU-Net's GammaTransform with retained statistics: per
    modality ((x - min) / range) ** g * range + min, then shifted and scaled back to the
    input's mean and std; `invert` applies it to -x and negates the result."""
    x = -x if invert else x
    mean, std = x.mean(axis=_STATS_AXES), x.std(axis=_STATS_AXES)
    lo = x.min(axis=_STATS_AXES)
    span = x.max(axis=_STATS_AXES) - lo
    y = ((x - lo) / jnp.maximum(span, eps)) ** g * span + lo
    y = (y - y.mean(axis=_STATS_AXES)) * (std / jnp.maximum(y.std(axis=_STATS_AXES), eps)) + mean
    return -y if invert else y


def _blur_radius(sigma_max: float) -> int:
    return max(1, math.ceil(3 * sigma_max))


def gaussian_blur(x, sigma, radius: int):
    """x (H, W, S, 4) blurred in-plane by a separable Gaussian of std `sigma` (4,) pixels
    per modality, truncated at `radius` (static) pixels, edges repeated."""
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)[:, None]
    kernel = jnp.exp(-0.5 * (t / jnp.maximum(sigma, 1e-6)) ** 2)
    kernel = kernel / kernel.sum(axis=0)  # (2r+1, 4)
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(
            kernel[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
            for i in range(2 * radius + 1)
        )
    return x


def _lowres_axis(x, scale, axis: int):
    """Nearest-exact down to round(scale x L) then bilinear (half-pixel centres) back to L
    along `axis` of x (H, W, S, 4), scale (4,): torch's interpolate, with static shapes."""
    size = x.shape[axis]
    n = jnp.maximum(jnp.round(scale * size), 1.0)  # (4,) down-sampled length
    j = jnp.arange(size, dtype=jnp.float32)[:, None]  # (L, 1)
    u = jnp.clip((j + 0.5) * n / size - 0.5, 0.0, n - 1)
    i0 = jnp.floor(u)
    i1 = jnp.minimum(i0 + 1, n - 1)
    weight = u - i0
    source = lambda i: jnp.minimum(jnp.floor((i + 0.5) * size / n), size - 1).astype(jnp.int32)  # noqa: E731
    xm = jnp.moveaxis(x, axis, 0)  # (L, ..., 4)
    shape = (size,) + (1,) * (xm.ndim - 2) + (NUM_MODALITIES,)

    def take(i):
        return jnp.take_along_axis(xm, source(i).reshape(shape), axis=0)

    w = weight.reshape(shape)
    return jnp.moveaxis((1 - w) * take(i0) + w * take(i1), 0, axis)


def low_resolution(x, scale):
    """x (H, W, S, 4) down-sampled by `scale` (4,) per modality on both in-plane axes
    (nearest) and up-sampled back (bilinear): nnU-Net's SimulateLowResolutionTransform."""
    return _lowres_axis(_lowres_axis(x, scale, 0), scale, 1)


def modality_dropout(key, image, p: float):
    """image (H, W, 4S): with probability `p` one uniformly drawn modality set to 0 in
    every context slice."""
    if p <= 0:
        return image
    k_on, k_which = jax.random.split(key)
    which = jax.random.randint(k_which, (), 0, NUM_MODALITIES)
    drop = _coin(k_on, p) & (jnp.arange(NUM_MODALITIES) == which)
    x = _by_modality(image)
    return jnp.where(drop, 0.0, x).reshape(image.shape).astype(image.dtype)
