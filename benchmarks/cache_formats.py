"""Storage formats for the compact slice cache (issue 46): blosc2 against zarr v3 through
tensorstore, on real cases cropped to the brain as `data.slice_store` crops them.

For each format and codec: bytes on disk against the cases' .nii.gz bytes, write time, and
random single-slice reads per second (one thread, arrays opened once; blosc2 also with the
array opened for every read). Each case is stored as (d, 4, h, w) int16 plus a (d, h, w)
uint8 label, one chunk per axial slice.
Run: `python -m benchmarks.cache_formats --src=DIR [--cases=5] [--reads=400] [--out=TMP]`
(DIR: BraTS case folders; every (n // cases)-th case is taken). Results: BENCHMARKS.md.
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from brats_jax.data.brats import find_cases, load_case
from brats_jax.data.slice_store import crop_box


def _cropped(case):
    """(image int16 (d, 4, h, w), label uint8 (d, h, w)) of a case inside its brain box."""
    data = load_case(case, require_label=True, normalization=None)
    box = crop_box(data.brain, data.label)
    region = tuple(slice(a, b) for a, b in box)
    image = np.ascontiguousarray(np.moveaxis(data.image[region].astype(np.int16), (2, 3), (0, 1)))
    label = np.ascontiguousarray(np.moveaxis(data.label[region].astype(np.uint8), 2, 0))
    return image, label


def _du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _reads_per_s(read, vols, n: int) -> float:
    rng = np.random.default_rng(0)
    picks = [(int(k), int(rng.integers(len(vols[k][1])))) for k in rng.integers(len(vols), size=n)]
    read(*picks[0])
    t = time.perf_counter()
    for k, s in picks:
        read(k, s)
    return n / (time.perf_counter() - t)


def _blosc2(vols, folder, codec, clevel, filt, n):
    import blosc2

    cparams = dict(
        codec=getattr(blosc2.Codec, codec), clevel=clevel,
        filters=[getattr(blosc2.Filter, filt)], nthreads=1,
    )  # fmt: skip
    t = time.perf_counter()
    for i, (image, label) in enumerate(vols):
        for name, arr in ((f"{i}_img.b2nd", image), (f"{i}_lab.b2nd", label)):
            blosc2.asarray(arr, urlpath=f"{folder}/{name}", chunks=(1, *arr.shape[1:]),
                           cparams=cparams, mode="w")  # fmt: skip
    write_s = time.perf_counter() - t

    def opened(i):
        return [
            blosc2.open(f"{folder}/{i}_{x}.b2nd", mode="r", mmap_mode="r") for x in ("img", "lab")
        ]

    arrays = [opened(i) for i in range(len(vols))]
    read = lambda k, s: (arrays[k][0][s], arrays[k][1][s])  # noqa: E731
    assert np.array_equal(read(0, 3)[0], vols[0][0][3])
    reopen = lambda k, s: [a[s] for a in opened(k)]  # noqa: E731
    return write_s, _reads_per_s(read, vols, n), _reads_per_s(reopen, vols, n // 2)


def _zarr3(vols, folder, codecs, sharded, n):
    import tensorstore as ts

    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    t = time.perf_counter()
    arrays = []
    for i, (image, label) in enumerate(vols):
        pair = []
        for name, arr in ((f"{i}_img", image), (f"{i}_lab", label)):
            chunk = [1, *arr.shape[1:]]
            cc = [{"name": "bytes", "configuration": {"endian": "little"}}, *codecs(arr)]
            grid = chunk
            if sharded:  # one file per case: the chunks inside one shard
                shard = {"chunk_shape": chunk, "codecs": cc}
                grid, cc = list(arr.shape), [{"name": "sharding_indexed", "configuration": shard}]
            regular = {"name": "regular", "configuration": {"chunk_shape": grid}}
            meta = {"shape": list(arr.shape), "data_type": str(arr.dtype), "codecs": cc}
            meta["chunk_grid"] = regular
            kv = {"driver": "file", "path": f"{folder}/{name}"}
            spec = {"driver": "zarr3", "kvstore": kv, "metadata": meta, "create": True}
            ts.open(spec).result().write(arr).result()
            pair.append(ts.open({"driver": "zarr3", "kvstore": kv}, context=context).result())
        arrays.append(pair)
    write_s = time.perf_counter() - t
    read = lambda k, s: [a[s].read().result() for a in arrays[k]]  # noqa: E731
    assert np.array_equal(read(0, 3)[0], vols[0][0][3])
    return write_s, _reads_per_s(read, vols, n), float("nan")


def _blosc_codec(cname):
    def codecs(arr):
        conf = {"cname": cname, "clevel": 1 if cname == "zstd" else 5, "shuffle": "shuffle",
                "typesize": arr.dtype.itemsize}  # fmt: skip
        return [{"name": "blosc", "configuration": conf}]

    return codecs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--src", required=True, help="folder of BraTS case folders")
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--reads", type=int, default=400)
    p.add_argument("--out", default="", help="scratch folder (default: a temp folder)")
    args = p.parse_args()
    cases = find_cases(args.src)
    cases = cases[:: max(1, len(cases) // args.cases)][: args.cases]
    nii = sum(os.path.getsize(f) for c in cases for f in [*c.paths.values(), c.seg])
    vols = [_cropped(c) for c in cases]
    root = args.out or tempfile.mkdtemp(prefix="cache_formats_")
    n = args.reads
    runs = []
    for c, lv, f in [("ZSTD", 1, "SHUFFLE"), ("ZSTD", 3, "SHUFFLE"), ("ZSTD", 8, "SHUFFLE"),
                     ("LZ4", 5, "SHUFFLE"), ("ZSTD", 3, "BITSHUFFLE")]:  # fmt: skip
        run = lambda d, c=c, lv=lv, f=f: _blosc2(vols, d, c, lv, f, n)  # noqa: E731
        runs.append((f"blosc2 {c.lower()}-{lv} {f.lower()}", run))
    for cname in ("zstd", "lz4"):
        for sharded in (False, True):
            name = f"zarr3 blosc-{cname} {'sharded' if sharded else 'chunk files'}"
            run = lambda d, c=cname, s=sharded: _zarr3(vols, d, _blosc_codec(c), s, n)  # noqa: E731
            runs.append((name, run))
    print(f"# {len(cases)} cases, {nii / 1e6:.1f} MB of .nii.gz")
    print(f"{'format':<32} {'MB':>7} {'x nii.gz':>8} {'write s':>8} {'reads/s':>8} {'reopen/s':>8}")
    for name, run in runs:
        folder = os.path.join(root, name.replace(" ", "_"))
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        write_s, rate, reopen = run(folder)
        size = _du(folder)
        row = f"{size / 1e6:>7.1f} {size / nii:>8.2f} {write_s:>8.2f} {rate:>8.0f} {reopen:>8.0f}"
        print(f"{name:<32} {row}")
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
