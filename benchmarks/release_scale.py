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
[--convert=100]`.

With `--layout=kaggle`, BraTS 2020's Kaggle sliced release instead (`data.kaggle`):
1. Lays out WORK/BraTS2020_training_data/content/data/ with --volumes x 155 files
   `volume_<v>_slice_<s>.h5` (v from 1, s 0..154), each a symbolic link to the slice of --src
   (a Kaggle-layout folder with its meta_data.csv: the sample's 20 slices of one volume)
   nearest s, and a meta_data.csv whose rows copy that slice's row (the release's columns;
   `--no_csv` leaves it out: the statistics then come from reading every file).
2. On it: opening the source (first: the structure check of every file, kept in
   `checked.json`; again: from that list), the split with pruning (first: brain fractions
   read from the label-empty slices, one file at a time; again, a new source: from
   `stats.npz`), the class counts, time to the first batch and the peak memory, as above.
Run: `python -m benchmarks.release_scale --layout=kaggle --src=SAMPLE/kaggle_h5 --work=DIR
[--volumes=369]`. Results: BENCHMARKS.md.
"""

import argparse
import csv
import json
import os
import pathlib
import pickle
import resource
import shutil
import time

import numpy as np

_SUFFIXES = ("_flair", "_t1", "_t1ce", "_t2", "_seg")
_KAGGLE_DEPTH = 155  # slices per volume in the Kaggle release


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


def kaggle_layout(sample: pathlib.Path, data_dir: pathlib.Path, volumes: int, *,
                  with_csv: bool = True) -> int:  # fmt: skip
    """`volume_<v>_slice_<s>.h5` links in `data_dir` (v = 1..volumes, s = 0..154) to the
    slice of the Kaggle folder `sample` nearest s (ties: the lower one), and, with_csv, a
    meta_data.csv of the release's columns whose rows copy that slice's row of the sample's
    csv (slice_path, volume and slice renamed). Returns the number of links."""
    with open(sample / "meta_data.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, {int(r["slice"]): r for r in reader}
    have = sorted(rows)
    if not have:
        raise ValueError(f"{sample}/meta_data.csv lists no slices")
    nearest = [have[min(range(len(have)), key=lambda k: abs(have[k] - s))]
               for s in range(_KAGGLE_DEPTH)]  # fmt: skip
    data_dir.mkdir(parents=True)
    out = []
    for v in range(1, volumes + 1):
        for s, src in enumerate(nearest):
            name = f"volume_{v}_slice_{s}.h5"
            target = os.path.basename(rows[src]["slice_path"].replace("\\", "/"))
            os.symlink((sample / target).resolve(), data_dir / name)
            out.append({**rows[src], "slice_path": f"/content/data/{name}", "volume": v,
                        "slice": s})  # fmt: skip
    if with_csv:
        with open(data_dir / "meta_data.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(out)
    return len(out)


def _kaggle_rows(args) -> list:
    """The Kaggle release's rows of the table (see the module docstring)."""
    import configs.unet
    from brats_jax.data import KaggleH5Source, build_splits, class_pixel_counts

    work = pathlib.Path(args.work)
    data_dir = work / "BraTS2020_training_data" / "content" / "data"
    n, dt = _timed(lambda: kaggle_layout(pathlib.Path(args.src), data_dir, args.volumes,
                                         with_csv=not args.no_csv))  # fmt: skip
    rows = [("lay out the release (links)", f"{dt:.1f} s",
             f"{n} files, {args.volumes} volumes, csv: {not args.no_csv}")]  # fmt: skip
    stats = work / "stats"

    def source():
        return KaggleH5Source(work, stats_dir=stats)

    src, dt = _timed(source)
    rows.append(("open the source, first time (structure check of every file)", f"{dt:.1f} s",
                 f"{len(src)} slices; pickled {len(pickle.dumps(src)) / 1e6:.1f} MB"))  # fmt: skip
    _, dt = _timed(source)
    rows.append(("open the source again (checked.json)", f"{dt:.2f} s", ""))
    config = configs.unet.get_config("cpu")
    if args.no_csv:
        _, dt = _timed(lambda: src.table)
        rows.append(("class counts + brain area of every slice (reads every file)",
                     f"{dt:.0f} s", ""))  # fmt: skip
    splits, dt = _timed(lambda: build_splits(src, config.data))
    read = int(np.isfinite(src.table.brain_fraction).sum())
    sizes = ", ".join(f"{k} {len(getattr(splits, k))}" for k in ("train", "val", "test"))
    rows.append(("split + pruning, first time", f"{dt:.1f} s",
                 f"brain area read from {read} files; slices: {sizes}"))  # fmt: skip
    src = source()
    splits, dt = _timed(lambda: build_splits(src, config.data))
    rows.append(("split + pruning again (new source: stats.npz)", f"{dt:.2f} s", ""))
    counts, dt = _timed(lambda: class_pixel_counts(src, splits.train))
    rows.append(("class counts of the training slices", f"{dt * 1e3:.1f} ms", str(counts.tolist())))
    rows += _first_batch_rows(src, splits, config)
    return rows


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _first_batch_rows(src, splits, config) -> list:
    """Time to the first training batch (16, context 1, 0 workers, whole slices) and the
    process's peak memory (ru_maxrss) up to then."""
    from brats_jax.data import make_train_iterator

    data = config.data
    data.update(image_size=0, context_slices=1, num_workers=0, patch_size=0, random_flip=False)

    def first_batch():
        it = make_train_iterator(src, splits.train, data, batch_size=16, seed=0)
        batch = next(it)
        it.close()
        return batch

    batch, dt = _timed(first_batch)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [
        ("time to the first batch (16, context 1)", f"{dt:.2f} s", str(batch["image"].shape)),
        ("peak memory of this process (ru_maxrss)", f"{rss:.0f} MB", ""),
    ]


def _nifti_rows(args) -> list:
    """The NIfTI release's rows of the table (see the module docstring)."""
    import configs.unet
    from brats_jax.data import NiftiCacheSource, build_splits, class_pixel_counts, find_cases

    if not args.cache:
        raise SystemExit("--layout=nifti needs --cache (a slice cache prepared from --src)")
    work = pathlib.Path(args.work)
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
    rows += _first_batch_rows(src, splits, config)
    rows += _conversion_rows(args, ids, work)
    return rows


def _conversion_rows(args, ids, work: pathlib.Path) -> list:
    """Conversion of the first --convert cases (one process), extrapolated to all."""
    from brats_jax.data import prepare

    first = work / "first"
    first.mkdir()
    for cid in ids[: args.convert]:
        os.symlink(work / "release" / cid, first / cid)
    _, dt = _timed(lambda: prepare(first, work / "cache_first", progress=False))
    size = sum(f.stat().st_size for f in (work / "cache_first").rglob("*") if f.is_file())
    per_case, per_bytes = dt / args.convert, size / args.convert
    rows = [(f"convert the first {args.convert} cases (1 process)", f"{dt:.0f} s",
             f"{per_case:.2f} s and {per_bytes / 1e6:.1f} MB per case")]  # fmt: skip
    for cores in (2, 16):  # assumes cases convert independently at the measured rate
        rows.append((f"-> all {args.cases} cases on {cores} cores (extrapolated)",
                     f"{per_case * args.cases / cores / 60:.0f} min",
                     f"cache {per_bytes * args.cases / 1e9:.1f} GB"))  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layout", choices=("nifti", "kaggle"), default="nifti")
    p.add_argument("--src", required=True,
                   help="nifti: folder of real BraTS case folders; kaggle: a Kaggle-layout "
                   "folder of slices with its meta_data.csv")  # fmt: skip
    p.add_argument("--cache", help="nifti: a slice cache prepared from --src")
    p.add_argument("--work", required=True, help="scratch folder (emptied first)")
    p.add_argument("--cases", type=int, default=1251, help="nifti: cases of the release")
    p.add_argument("--convert", type=int, default=100, help="nifti: cases converted")
    p.add_argument("--volumes", type=int, default=369, help="kaggle: volumes of the release")
    p.add_argument("--no_csv", action="store_true", help="kaggle: without meta_data.csv")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    rows = _kaggle_rows(args) if args.layout == "kaggle" else _nifti_rows(args)
    print("| step | time | notes |\n|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
