"""A procedural 4-modality brain phantom with BraTS-like tumours: the default, file-free data.

Each case (patient) is a 3-D phantom sampled on `slices_per_case` axial slices:
- brain: a lobulated ellipse that shrinks toward the first/last slices (so the end slices have
  little brain and are pruned when tumour-free), with smooth texture, two CSF ventricles in the
  middle slices and a smooth bias field;
- tumour: a 3-D blob (ellipsoidal along the slice axis, so it grows and shrinks across slices
  and is absent from some) with a lobulated outline whose centre drifts with the slice: an NCR
  core (class 1) inside an ET rim (class 3) inside a fuzzier, larger ED halo (class 2, which
  extends over more slices than the core);
- contrasts like real scans: ED bright on FLAIR/T2, ET bright on T1ce, NCR dark on T1ce and
  bright on T2, CSF bright on T2 and dark elsewhere; per-case contrast jitter, noise level,
  texture and bias field.
Channels (FLAIR, T1, T1ce, T2) are z-scored per slice over brain pixels (affine, background
becomes a constant), like the NIfTI path's brain z-score. Everything is deterministic in
(seed, case, slice) and costs a few ms per 240x240 slice; the table is computed from the
geometry alone (no intensities, no noise).
"""

from __future__ import annotations

import math

import numpy as np

from brats_jax.data.common import DataError, SliceTable

# raw tissue intensities (flair, t1, t1ce, t2)
_BRAIN = np.array([0.45, 0.60, 0.55, 0.40], np.float32)
_CSF = np.array([0.10, 0.15, 0.15, 0.95], np.float32)
_ED = np.array([0.85, 0.45, 0.45, 0.80], np.float32)
_ET = np.array([0.70, 0.50, 0.95, 0.60], np.float32)
_NCR = np.array([0.55, 0.30, 0.20, 0.90], np.float32)


class _CaseParams:
    """Random parameters of one phantom case (deterministic in seed, case)."""

    def __init__(self, seed: int, case: int):
        r = np.random.default_rng([seed, case, 7919])

        def u(lo, hi):  # python floats keep all image math in float32
            return float(r.uniform(lo, hi))

        self.cy, self.cx = 0.5 + u(-0.04, 0.04), 0.5 + u(-0.04, 0.04)
        self.ay, self.ax = u(0.36, 0.44), u(0.29, 0.36)
        self.brain_lobe = (u(0.0, 0.05), u(0, 2 * np.pi))
        self.rot = u(-0.3, 0.3)
        # tumour: position relative to the brain ellipse, size in image fractions
        ang, rad = u(0, 2 * np.pi), u(0.0, 0.55)
        self.ty = self.cy + rad * self.ay * math.sin(ang)
        self.tx = self.cx + rad * self.ax * math.cos(ang)
        self.dty, self.dtx = u(-0.15, 0.15), u(-0.15, 0.15)  # centre drift per unit z
        self.tz, self.rz = u(0.3, 0.7), u(0.18, 0.38)
        self.r0 = u(0.05, 0.15)
        self.rim = u(0.28, 0.5)  # ET rim thickness as a fraction of r0
        self.core_lobes = [(u(0, 0.16), u(0, 2 * np.pi)) for _ in range(3)]
        self.halo = u(1.35, 2.0)
        self.halo_lobes = [(u(0, 0.25), u(0, 2 * np.pi)) for _ in range(3)]
        self.halo_z = u(1.1, 1.45)
        # appearance
        self.contrast = r.uniform(0.85, 1.15, size=(5, 4)).astype(np.float32)
        self.noise = u(0.03, 0.10)
        self.tex = [(u(4, 14), u(4, 14), u(0, 2 * np.pi), u(-3, 3)) for _ in range(3)]
        self.tex_amp = u(0.03, 0.08)
        self.bias = (u(-0.15, 0.15), u(-0.15, 0.15))


def _lobe(theta: np.ndarray, lobes) -> np.ndarray:
    out = np.ones_like(theta)
    for k, (a, ph) in enumerate(lobes, start=2):
        out += a * np.cos(k * theta + ph)
    return out


def _geometry(p: _CaseParams, z: float, size: int):
    """Label int32 (size,size) {0..3}, brain bool, plus helpers for the intensity pass."""
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = g[:, None], g[None, :]
    # brain
    bscale = math.sqrt(max(0.0, 1.0 - ((z - 0.5) / 0.62) ** 2))
    dy, dx = yy - p.cy, xx - p.cx
    c, s = math.cos(p.rot), math.sin(p.rot)
    u_, v_ = c * dy + s * dx, -s * dy + c * dx
    th_b = np.arctan2(u_, v_)
    rb = np.sqrt((u_ / (p.ay * bscale + 1e-6)) ** 2 + (v_ / (p.ax * bscale + 1e-6)) ** 2)
    rb = rb / (1.0 + p.brain_lobe[0] * np.cos(3 * th_b + p.brain_lobe[1]))
    brain = rb < 1.0
    label = np.zeros((size, size), np.int32)
    ed_rho = None
    # tumour
    dz = (z - p.tz) / p.rz
    rz_ed = (z - p.tz) / (p.rz * p.halo_z)
    if abs(rz_ed) < 1.0:
        ty, tx = p.ty + p.dty * (z - p.tz), p.tx + p.dtx * (z - p.tz)
        ty_, tx_ = yy - ty, xx - tx
        dist = np.sqrt(ty_**2 + tx_**2)
        th = np.arctan2(ty_, tx_)
        r_ed = p.halo * p.r0 * math.sqrt(1.0 - rz_ed**2)
        ed_rho = dist / (r_ed * _lobe(th, p.halo_lobes))
        label[(ed_rho < 1.0) & brain] = 2
        if abs(dz) < 1.0:
            r_core = p.r0 * math.sqrt(1.0 - dz**2)
            rho = dist / (r_core * _lobe(th, p.core_lobes))
            ncr_frac = max(0.0, 1.0 - p.rim * p.r0 / r_core)
            label[(rho < 1.0) & brain] = 3
            label[(rho < ncr_frac) & brain] = 1
    return label, brain, (yy, xx, u_, v_, ed_rho)


def _slice_z(s: int, n: int) -> float:
    return (s + 0.5) / n


class SyntheticSource:
    """Deterministic phantom slice source (grain random-access; needs no files).

    num_cases x slices_per_case records, record i = case i // slices_per_case, slice
    i % slices_per_case; case ids `synth_<case:03d>`. image float32 (S,S,4), label int32 (S,S).
    """

    def __init__(
        self, num_cases: int = 24, slices_per_case: int = 24, image_size: int = 240, seed: int = 0
    ):
        for name, v, lo in (
            ("num_cases", num_cases, 1),
            ("slices_per_case", slices_per_case, 1),
            ("image_size", image_size, 8),
        ):
            if int(v) < lo:
                raise DataError(f"SyntheticSource: {name} must be >= {lo}, got {v}")
        self.num_cases, self.slices_per_case = int(num_cases), int(slices_per_case)
        self.image_size, self.seed = int(image_size), int(seed)
        self._params = [_CaseParams(self.seed, c) for c in range(self.num_cases)]
        self._tables = []
        for p in self._params:
            tab = np.zeros((6, 4), np.float32)
            tab[1], tab[2], tab[3], tab[4], tab[5] = _BRAIN, _CSF, _NCR, _ED, _ET
            tab[1:] *= p.contrast
            self._tables.append(tab)
        self._noise_bank = None
        n = len(self)
        counts = np.zeros((n, 4), np.int64)
        frac = np.zeros(n, np.float32)
        for i in range(n):
            c, s = divmod(i, self.slices_per_case)
            label, brain, _ = _geometry(
                self._params[c], _slice_z(s, self.slices_per_case), self.image_size
            )
            counts[i] = np.bincount(label.ravel(), minlength=4)
            frac[i] = brain.mean()
        self.table = SliceTable(
            case_id=np.array([self.case_name(i // self.slices_per_case) for i in range(n)]),
            slice_index=np.arange(n) % self.slices_per_case,
            class_counts=counts,
            brain_fraction=frac,
        )

    def _noise(self, rng: np.random.Generator) -> np.ndarray:
        """Unit Gaussian noise (S,S,4) float32: a random roll of one of 4 fixed bank tiles."""
        if self._noise_bank is None:  # built lazily per process, never pickled
            g = np.random.default_rng([self.seed, 104729])
            shape = (4, self.image_size, self.image_size, 4)
            self._noise_bank = g.standard_normal(shape, dtype=np.float32)
        k, dy, dx = rng.integers(0, [4, self.image_size, self.image_size])
        return np.roll(self._noise_bank[k], (int(dy), int(dx)), axis=(0, 1))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_noise_bank"] = None
        return state

    @staticmethod
    def case_name(case: int) -> str:
        """Case id string of phantom case number `case`."""
        return f"synth_{case:03d}"

    def __len__(self) -> int:
        return self.num_cases * self.slices_per_case

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(num_cases={self.num_cases}, slices_per_case="
            f"{self.slices_per_case}, image_size={self.image_size}, seed={self.seed})"
        )

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        c, s = divmod(i, self.slices_per_case)
        p = self._params[c]
        n = self.image_size
        z = _slice_z(s, self.slices_per_case)
        label, brain, (yy, xx, u_, v_, ed_rho) = _geometry(p, z, n)
        rng = np.random.default_rng([self.seed, c, s])
        y1, x1 = yy[:, 0], xx[0, :]
        tex = np.zeros((n, n), np.float32)
        for fy, fx, ph, fz in p.tex:  # sin(a y + b x + c), separable
            ay, bx = 2 * np.pi * fy * y1, 2 * np.pi * fx * x1 + (ph + fz * z)
            tex += np.outer(np.sin(ay), np.cos(bx)) + np.outer(np.cos(ay), np.sin(bx))
        tex *= np.float32(p.tex_amp / 3) * brain.astype(np.float32)
        # tissue map -> intensities (H, W, 4)
        tissue = brain.astype(np.int8)  # 0 bg, 1 brain, 2 csf, 3.. labels 1..3 + 2
        vent = 0.25 * math.sqrt(max(0.0, 1 - ((z - 0.5) / 0.25) ** 2))
        if vent > 0:
            for side in (-1, 1):
                vv = ((u_ / (0.45 * p.ay)) ** 2 + ((v_ - side * 0.07) / (vent * p.ax)) ** 2) < 1
                tissue[vv & brain] = 2
        tab = self._tables[c]
        tumour = label > 0
        tissue[tumour] = label[tumour] + 2
        img = np.take(tab, tissue, axis=0)
        img += tex[..., None] * np.array([1, 1, 1, -1], np.float32)
        if ed_rho is not None:  # ED fades toward its outer edge (fuzzy boundary)
            fade = 0.45 + 0.55 * np.clip((1.0 - ed_rho) / 0.35, 0.0, 1.0)
            fade = np.where(label == 2, fade, np.float32(1.0))[..., None]
            img = tab[1] + (img - tab[1]) * fade
        bias = (1.0 + p.bias[0] * (y1 - 0.5) * 2)[:, None] + (p.bias[1] * (x1 - 0.5) * 2)[None]
        img *= bias[..., None]
        img += self._noise(rng) * p.noise
        brain_f = brain.astype(np.float32)
        img *= brain_f[..., None]
        # per-slice z-score over brain pixels (affine; background -> -mean/std)
        nb = int(brain.sum())
        if nb:
            flat = img.reshape(-1, 4)
            mean = flat.sum(0) / nb  # background is 0
            var = np.einsum("ij,ij->j", flat, flat) / nb - mean**2
            std = np.sqrt(np.maximum(var, 0))
            std = np.where(std > 0, std, 1.0).astype(np.float32)
            img = (img - mean) / std
        return dict(
            image=img.astype(np.float32), label=label, case_id=self.case_name(c), slice_index=s
        )
