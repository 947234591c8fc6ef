"""A BraTS 2021-sized release simulated on this machine (issue 46): 1,251 case folders of
symbolic links to the real cases under distinct BraTS 2021 IDs, and what the data path costs
at that scale.

1. Lays out WORK/release/BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz, links
   to the files of real case NNNNN mod n (the real cases under --src, sorted).
2. Index: `find_cases` over the release (the os.walk of every folder).
3. A full-size cache without converting everything: WORK/cache_full/cases/<ID> links to the
   entry of its real case in --cache (a prepared cache of --src) and a cache.json listing
   all IDs. On it: opening the source (every case's meta.json and stats.npz), the split
   with pruning (`build_splits`, the `cpu` preset's fractions), the class counts of the
   training slices (`class_pixel_counts`), time to the first training batch (batch 16,
   context_slices 1, 0 workers) and the process's peak memory (ru_maxrss) up to here.
4. Conversion: `prepare` of the first --convert cases into WORK/cache_first (one process):
   seconds per case, bytes per case, extrapolated to all cases on 2 and 16 cores (cases
   convert independently: `prepare --workers=N`).
Run: `python -m benchmarks.release_scale --src=SRC --cache=CACHE --work=DIR [--cases=1251]
[--convert=100]`. Results: BENCHMARKS.md.
"""

import argparse
import json
import os
import pathlib
import pickle
import resource
import shutil
import time

_SUFFIXES = ("_flair", "_t1", "_t1ce", "_t2", "_seg")


def _layout(real, release: pathlib.Path, n: int) -> list[str]:
    """Case folders of links under BraTS 2021 IDs; returns the IDs."""
    ids = [f"BraTS2021_{i:05d}" for i in range(n)]
    for i, cid in enumerate(ids):
        case = real[i % len(real)]
        folder = release / cid
        folder.mkdir(parents=True)
        files = {m: case.paths[m] for m in ("flair", "t1", "t1ce", "t2")} | {"seg": case.seg}
        for suffix, path in zip(_SUFFIXES, files.values(), strict=True):
            ext = ".nii.gz" if str(path).endswith(".gz") else ".nii"
            os.symlink(os.path.realpath(path), folder / f"{cid}{suffix}{ext}")
    return ids


def _full_cache(ids, real_ids, cache: pathlib.Path, out: pathlib.Path) -> None:
    """A cache of every ID whose entries link to the real cases' entries in `cache`."""
    (out / "cases").mkdir(parents=True)
    for i, cid in enumerate(ids):
        os.symlink((cache / "cases" / real_ids[i % len(real_ids)]).resolve(), out / "cases" / cid)
    info = json.loads((cache / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**info, "cases": ids}))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--src", required=True, help="folder of real BraTS case folders")
    p.add_argument("--cache", required=True, help="a slice cache prepared from --src")
    p.add_argument("--work", required=True, help="scratch folder (emptied first)")
    p.add_argument("--cases", type=int, default=1251)
    p.add_argument("--convert", type=int, default=100)
    args = p.parse_args()

    import configs.unet
    from brats_jax.data import (
        NiftiCacheSource,
        build_splits,
        class_pixel_counts,
        find_cases,
        make_train_iterator,
        prepare,
    )

    work = pathlib.Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    real = find_cases(args.src)
    rows = []
    ids, dt = _timed(lambda: _layout(real, work / "release", args.cases))
    rows.append(("lay out the release (links)", f"{dt:.1f} s", f"{len(ids)} cases"))
    cases, dt = _timed(lambda: find_cases(work / "release"))
    rows.append(("index: find_cases", f"{dt:.2f} s", f"{len(cases)} cases"))

    _full_cache(ids, [c.case_id for c in real], pathlib.Path(args.cache), work / "cache_full")
    src, dt = _timed(lambda: NiftiCacheSource(work / "cache_full"))
    rows.append(("open the source (meta + stats of every case)", f"{dt:.2f} s",
                 f"{len(src)} slices; pickled {len(pickle.dumps(src)) / 1e6:.1f} MB"))  # fmt: skip
    config = configs.unet.get_config("cpu")
    splits, dt = _timed(lambda: build_splits(src, config.data))
    sizes = ", ".join(f"{k} {len(getattr(splits, k))}" for k in ("train", "val", "test"))
    rows.append(("split + pruning (build_splits)", f"{dt:.2f} s", f"slices: {sizes}"))
    counts, dt = _timed(lambda: class_pixel_counts(src, splits.train))
    rows.append(("class counts of the training slices", f"{dt * 1e3:.1f} ms", str(counts.tolist())))
    data = config.data
    data.update(image_size=0, context_slices=1, num_workers=0, patch_size=0, random_flip=False)

    def first_batch():
        it = make_train_iterator(src, splits.train, data, batch_size=16, seed=0)
        batch = next(it)
        it.close()
        return batch

    batch, dt = _timed(first_batch)
    rows.append(
        ("time to the first batch (16, context 1)", f"{dt:.2f} s", str(batch["image"].shape))
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak memory of this process (ru_maxrss)", f"{rss:.0f} MB", ""))

    first = work / "first"
    first.mkdir()
    for cid in ids[: args.convert]:
        os.symlink(work / "release" / cid, first / cid)
    _, dt = _timed(lambda: prepare(first, work / "cache_first", progress=False))
    size = sum(f.stat().st_size for f in (work / "cache_first").rglob("*") if f.is_file())
    per_case, per_bytes = dt / args.convert, size / args.convert
    rows.append((f"convert the first {args.convert} cases (1 process)", f"{dt:.0f} s",
                 f"{per_case:.2f} s and {per_bytes / 1e6:.1f} MB per case"))  # fmt: skip
    for cores in (2, 16):
        rows.append((f"-> all {args.cases} cases on {cores} cores (extrapolated)",
                     f"{per_case * args.cases / cores / 60:.0f} min",
                     f"cache {per_bytes * args.cases / 1e9:.1f} GB"))  # fmt: skip

    print("| step | time | notes |\n|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
