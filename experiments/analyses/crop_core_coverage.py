"""How much of a slice's tumour core a foreground training crop holds, per sampling rule.

    python -m experiments.analyses.crop_core_coverage --data_root=NIFTI_ROOT [--patch_size=128] \\
        [--crops=500] [--seed=0]

For every case under `--data_root` (native 240 px slices, labels only), `--crops` times: a
slice holding tumour core (TC = necrosis or enhancing, `labels.REGIONS`) is drawn uniformly,
then a foreground crop (`patches.crop_offset` with fraction 1) by each
`data.foreground_sampling` rule; the share of the slice's TC voxels inside the crop is
recorded. Prints, per rule, the mean share, the share of crops holding all of the slice's
core, and the worst case's mean share. It says whether region-first sampling (nnU-Net's) can
show the network more core than voxel sampling at a given patch size.
"""

from __future__ import annotations

import sys

import numpy as np

from brats_jax import cli
from brats_jax.data import brats
from brats_jax.data.patches import FOREGROUND_SAMPLING, crop_offset
from brats_jax.labels import REGIONS, to_train_labels


def core_shares(label: np.ndarray, patch: int, crops: int, rng, sampling: str) -> np.ndarray:
    """(crops,) shares in [0, 1] of a (H, W, D) label's per-slice TC inside foreground crops of
    `patch` px drawn by `sampling`, on slices drawn uniformly among those holding TC."""
    core = np.isin(label, REGIONS["TC"])
    zs = np.flatnonzero(core.any(axis=(0, 1)))
    shares = np.empty(crops)
    for i in range(crops):
        z = zs[rng.integers(zs.size)]
        y, x = crop_offset(label[:, :, z], patch, 1.0, rng, sampling)
        shares[i] = core[y : y + patch, x : x + patch, z].sum() / core[:, :, z].sum()
    return shares


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", required=True, help="folder of the NIfTI case folders")
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--crops", type=int, default=500, help="crops per case and rule")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shares: dict[str, list[np.ndarray]] = {s: [] for s in FOREGROUND_SAMPLING}
    for case in brats.find_cases(args.data_root):
        raw, _, _ = brats.read_nifti(case.seg)
        label = to_train_labels(raw, case.naming, where=str(case.seg))
        for s in FOREGROUND_SAMPLING:
            shares[s].append(core_shares(label, args.patch_size, args.crops, rng, s))
    for s, per_case in shares.items():
        v = np.concatenate(per_case)
        worst = min(float(c.mean()) for c in per_case)
        print(
            f"{s}: {len(per_case)} cases, {v.size} crops of {args.patch_size} px: mean share of "
            f"the slice's TC in the crop {v.mean():.4f}, crops holding all of it "
            f"{np.mean(v == 1):.4f}, worst case's mean share {worst:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
