"""Benchmarks of the train step, whole-volume evaluation and the input pipeline.

usage:
  python -m brats_jax.bench train --model=unet|transunet --image-size=N --batch-size=B --steps=S
      [--base-features=F] [--preset=r50_vit_b16|small|tiny] [--dtype=float32|bfloat16]
      [--conv-impl=auto|cpu_fast|gpu_fast|xla]
  python -m brats_jax.bench eval  --model=unet --batch-size=B [--volumes=2] [--depth=155]
  python -m brats_jax.bench data  [flags of brats_jax.benchmarking.data_pipeline]
  (any subcommand: --no-cpu-flags keeps XLA_FLAGS as they are; by default the fast XLA:CPU
  convolution flags of ``brats_jax.ops.flags.CPU_XLA_FLAGS`` are added, see BENCHMARKS.md)

Each subcommand prints one JSON line per measurement (``data`` prints one per source/workers).
``train`` times a jitted Adam (lr 1e-4) + mean softmax cross-entropy step with the train state
donated, on random inputs (B,N,N,4) float32 and labels (B,N,N) int32 in {0..3}. FLOPs per
step come from XLA's cost analysis of the lowered step (a multiply-add counts 2); achieved
TFLOP/s = FLOPs per step / median step seconds (each step waited for), and
``tflops_pipelined`` the same for steps queued back to back (``step_s_pipelined``).
``eval`` predicts whole 240x240xD volumes (D = 155 by default) in fixed-size slice batches
with one compiled function and reports whether a second volume triggered a recompilation.
The benchmarks themselves live in `brats_jax.benchmarking` (`workload`, `timing`, `train`,
`evaluation`, `data_pipeline`).
"""

from __future__ import annotations

import argparse
import json
import sys

from brats_jax import cli, runtime
from brats_jax.benchmarking.data_pipeline import run_data_bench
from brats_jax.benchmarking.evaluation import bench_eval
from brats_jax.benchmarking.train import bench_multirun, bench_train
from brats_jax.benchmarking.workload import DTYPES
from brats_jax.ops.impls import IMPLS


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="unet", choices=["unet", "transunet"])
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--base-features", type=int, default=None, help="U-Net first-level width")
    p.add_argument("--depth", type=int, default=None, help="U-Net poolings")
    p.add_argument("--preset", default=None, help="TransUNet preset")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument(
        "--deep-supervision", action="store_true", help="U-Net with deep supervision heads"
    )
    p.add_argument(
        "--conv-impl",
        default="auto",
        choices=IMPLS,
        help="U-Net ops implementation, brats_jax.ops.impls (auto: cpu_fast on CPU, "
        "gpu_fast on GPU)",
    )


def _parser() -> argparse.ArgumentParser:
    """The train / eval / multirun subcommands (``data`` has its own parser)."""
    parser = cli.ArgumentParser(prog="python -m brats_jax.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("train", help="time the train step")
    _add_model_flags(pt)
    pt.add_argument("--steps", type=int, default=5)
    pe = sub.add_parser("eval", help="time whole-volume prediction")
    _add_model_flags(pe)
    pe.add_argument("--volumes", type=int, default=2)
    pe.add_argument("--slices", type=int, default=155, help="axial slices per volume")
    pe.add_argument("--volume-size", type=int, default=240)
    pm = sub.add_parser("multirun", help="K stacked runs in one program vs one run")
    _add_model_flags(pm)
    pm.add_argument("--runs", type=int, default=8)
    pm.add_argument("--steps", type=int, default=5)
    pm.add_argument("--mapping", default="auto", choices=["auto", "vmap", "map"])
    sub.add_parser(
        "data", help="input-pipeline benchmark (brats_jax.benchmarking.data_pipeline flags)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_flags = "--no-cpu-flags" not in argv
    argv = [a for a in argv if a != "--no-cpu-flags"]
    runtime.setup(cpu_flags=cpu_flags)  # before the first JAX computation
    if argv and argv[0] == "data":
        run_data_bench(argv[1:])
        return
    a = _parser().parse_args(argv)
    common = dict(
        model=a.model,
        base_features=a.base_features,
        depth=a.depth,
        preset=a.preset,
        dtype=a.dtype,
        conv_impl=a.conv_impl,
        deep_supervision=a.deep_supervision,
    )
    if a.cmd == "multirun":
        res = bench_multirun(
            image_size=a.image_size or 64, batch_size=a.batch_size or 8, runs=a.runs,
            steps=a.steps, mapping=a.mapping, **common,
        )  # fmt: skip
    elif a.cmd == "train":
        res = bench_train(
            image_size=a.image_size or 128, batch_size=a.batch_size or 4, steps=a.steps, **common
        )
    else:
        res = bench_eval(
            batch_size=a.batch_size or 16,
            volumes=a.volumes,
            depth_slices=a.slices,
            volume_size=a.volume_size,
            image_size=a.image_size or 240,
            **common,
        )
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
