"""Data-loading benchmark: slices/s of each source through the grain training pipeline.

    python -m brats_jax.benchmarking.data_pipeline [--root=../shared/data/brats_sample]
        [--seconds=5] [--workers=2] [--batch_size=8] [--cache_dir=DIR] [--cases=2]
        [--nifti_src=DIR] [--context_slices=K] [--patch_size=P] [--sources=...]

Sources: synthetic (240 px), kaggle_h5 (the sample's 20 slices), nifti cache (a slice cache
of the first `--cases` sample cases, or of all cases under `--nifti_src`, prepared into
--cache_dir or a temp folder; an existing cache there is completed, not rebuilt), and "nifti
decoded per read" (decodes the 4 gzip'd volumes + label for every slice; the baseline), each
with 0 and N grain workers; with 0 workers also slices per CPU second (all threads of the
process: the reading cost, less disturbed by other jobs than slices/s). `--context_slices`
and `--patch_size` set the data fields of the same names (2.5D windows, random crops with
data.foreground_fraction 0.33). The first batch (worker start-up) is not timed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

import ml_collections
import numpy as np
from absl import logging

from brats_jax import cli
from brats_jax.data import (
    KaggleH5Source,
    NiftiCacheSource,
    NiftiDecodedSource,
    SyntheticSource,
    make_train_iterator,
    prepare,
)

DEFAULT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "brats_sample"


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m brats_jax.benchmarking.data_pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--root", default=str(DEFAULT_ROOT), help="brats_sample folder (nifti/, kaggle_h5/)"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    p.add_argument("--workers", type=int, default=2, help="N for the multi-worker runs")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--cache_dir", default="", help="slice cache folder (default: a temp folder)")
    p.add_argument("--cases", type=int, default=2, help="sample cases put in the nifti cache")
    p.add_argument("--nifti_src", default="", help="case folders to cache (default: sample's)")
    p.add_argument("--context_slices", type=int, default=0, help="data.context_slices")
    p.add_argument("--patch_size", type=int, default=0, help="data.patch_size (0: whole)")
    p.add_argument("--sources", default="synthetic,kaggle_h5,nifti_cache,nifti_decoded")
    return p


def _throughput(
    source, *, workers: int, batch_size: int, seconds: float, context_slices=0, patch_size=0
) -> tuple[float, float]:
    """(slices/s, slices per CPU second of this process's threads: a rate that other jobs
    on the machine disturb less; NaN with worker processes, whose CPU time is not seen)."""
    cfg = ml_collections.ConfigDict(dict(image_size=0, random_flip=False, num_workers=workers))
    cfg.context_slices, cfg.patch_size = context_slices, patch_size
    it = make_train_iterator(source, np.arange(len(source)), cfg, batch_size=batch_size, seed=0)
    try:
        next(it)  # start-up (worker spawn, first reads) not timed
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            b = next(it)
            n += len(b["label"])
            dt = time.perf_counter() - t0
            if dt >= seconds:
                cpu = time.process_time() - c0
                return n / dt, (n / cpu if workers == 0 and cpu > 0 else float("nan"))
    finally:
        it.close()


def run_data_bench(argv_or_args=None) -> list[dict]:
    """Runs the data benchmark; argv list (flags as in the module docstring) or a Namespace.

    Prints one line per (source, workers) and returns a list of dicts with keys source,
    workers, batch_size, slices_per_s.
    """
    logging.set_verbosity(logging.WARNING)
    if isinstance(argv_or_args, argparse.Namespace):
        args = argv_or_args
    else:
        args = _parser().parse_args(list(argv_or_args or []))
    root = pathlib.Path(args.root)
    wanted = [s.strip() for s in args.sources.split(",") if s.strip()]
    tmp = None
    sub = None
    if {"nifti_cache", "nifti_decoded"} & set(wanted):
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        if args.nifti_src:
            sub = pathlib.Path(args.nifti_src)
        else:
            cases = sorted(p for p in (root / "nifti").iterdir() if p.is_dir())[: args.cases]
            sub = pathlib.Path(tmp.name) / "src"
            sub.mkdir()
            for c in cases:
                os.symlink(c, sub / c.name)
    results = []
    print(
        f"# data loading benchmark: {platform.node()} {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} CPUs, python {sys.version.split()[0]}"
    )
    print(f"# context_slices={args.context_slices} patch_size={args.patch_size}")
    print(f"{'source':<24} {'workers':>7} {'batch':>5} {'slices/s':>10} {'slices/cpu-s':>12}")
    for name in wanted:
        bs = args.batch_size
        seconds = args.seconds
        if name == "synthetic":
            src = SyntheticSource(24, 24, 240, seed=0)
        elif name == "kaggle_h5":
            src = KaggleH5Source(
                root / "kaggle_h5",
                stats_dir=pathlib.Path(tempfile.gettempdir()) / "bench_data_kstats",
            )
        elif name == "nifti_cache":
            cache = (
                pathlib.Path(args.cache_dir) if args.cache_dir else pathlib.Path(tmp.name) / "cache"
            )
            src = NiftiCacheSource(prepare(sub, cache, progress=False))
        elif name == "nifti_decoded":
            src = NiftiDecodedSource(sub)
            bs, seconds = 1, max(seconds, 8.0)
        else:
            raise SystemExit(f"unknown source {name!r}")
        for w in (0, args.workers):
            rate, per_cpu = _throughput(
                src, workers=w, batch_size=bs, seconds=seconds,
                context_slices=args.context_slices, patch_size=args.patch_size,
            )  # fmt: skip
            results.append(
                dict(source=name, workers=w, batch_size=bs, slices_per_s=rate,
                     slices_per_cpu_s=per_cpu)
            )  # fmt: skip
            print(f"{name:<24} {w:>7} {bs:>5} {rate:>10.1f} {per_cpu:>12.1f}", flush=True)
    by = {(r["source"], r["workers"]): r["slices_per_s"] for r in results}
    for w in (0, args.workers):
        if ("nifti_cache", w) in by and ("nifti_decoded", w) in by:
            print(
                f"nifti cache / decoded-per-read speed-up, {w} workers: "
                f"{by[('nifti_cache', w)] / by[('nifti_decoded', w)]:.0f}x"
            )
    if tmp is not None:
        tmp.cleanup()
    return results


def main(argv=None) -> None:
    """CLI entry point."""
    run_data_bench(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
