"""Times the U-Net Adam + cross-entropy train step of brats_jax and of its PyTorch twin in one
run, on the same machine and shapes, and prints the ratio as one JSON line.

usage: python benchmarks/compare_cpu.py [--image-size=128] [--batch-size=4] [--steps=6]
           [--base-features=64] [--impls=xla,cpu_fast] [--threads=0] [--xla-flags=fast|none]
           [--processes=0]

By default all variants run in one process and their steps are interleaved (round-robin, one
step of each per round) so that background load hits all of them alike. With
``--processes=N`` each framework instead runs alone in a fresh process, alternating
(PyTorch, JAX, PyTorch, JAX, ... N rounds), so neither sees the other's memory traffic or
allocator state; each process reports the median of its steps and the result is the median
over rounds. The ratio uses medians (``ratio_median`` = JAX step / PyTorch step; < 1 means
JAX is faster) and mins. torch is an optional extra (``pip install -e .[torch]``). Both sides
use every core the process may use (torch.set_num_threads) unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    """Run the comparison; returns (and prints) the result dict."""
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--base-features", type=int, default=64)
    p.add_argument("--impls", default="xla,cpu_fast")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--xla-flags",
        default="fast",
        choices=["fast", "none"],
        help="fast: add brats_jax.ops.flags.CPU_XLA_FLAGS; none: XLA defaults",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help="N > 0: run each framework alone in N fresh processes, alternating",
    )
    p.add_argument("--only", default="", help=argparse.SUPPRESS)  # torch | jax (one process)
    a = p.parse_args(argv)
    if a.processes > 0:
        return _separate_processes(a, argv if argv is not None else sys.argv[1:])
    if a.xla_flags == "fast":
        from brats_jax.ops.flags import set_cpu_xla_flags

        set_cpu_xla_flags()

    import jax
    import numpy as np
    import optax
    import torch

    from benchmarks.torch_unet import UNET_PARAMS, TorchUNet, make_train_step, num_params
    from brats_jax.benchmarking import timing, workload

    threads = a.threads or timing.cpu_count()
    torch.set_num_threads(threads)
    image, label = workload.random_batch(a.batch_size, a.image_size)
    runners = {}
    if a.only != "jax":
        torch.manual_seed(0)
        tmodel = TorchUNet(base_features=a.base_features)
        if a.base_features == 64:
            assert num_params(tmodel) == UNET_PARAMS, num_params(tmodel)
        tstep = make_train_step(tmodel)
        timage = torch.from_numpy(np.array(image))
        tlabel = torch.from_numpy(np.array(label).astype(np.int64))
        runners["torch"] = lambda: float(tstep(timage, tlabel))

    tx = optax.adam(1e-4)
    info = {}
    for impl in [] if a.only == "torch" else a.impls.split(","):
        net = workload.build_model("unet", base_features=a.base_features, conv_impl=impl)
        state = workload.init_train_state(net, a.image_size, tx)
        if a.base_features == 64:
            assert workload.num_params(state["params"]) == UNET_PARAMS
        t0 = time.perf_counter()
        compiled = (
            jax.jit(workload.make_train_step(net, tx), donate_argnums=0)
            .lower(state, image, label)
            .compile()
        )
        info[impl] = {
            "compile_s": round(time.perf_counter() - t0, 2),
            "flops_per_step": timing.cost_flops(compiled),
        }
        box = {"state": state}

        def run(compiled=compiled, box=box):
            box["state"], loss = compiled(box["state"], image, label)
            return float(jax.block_until_ready(loss))

        runners[impl] = run

    times = {k: [] for k in runners}
    for f in runners.values():  # warm-up
        f()
    for _ in range(a.steps):
        for k, f in runners.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    if a.only:
        res = {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}
        flags = os.environ.get("XLA_FLAGS", "")
        print(json.dumps({"only": a.only, "times": res, "info": info, "xla_flags": flags}))
        return res
    res = _summary(
        a,
        {k: statistics.median(v) for k, v in times.items()},
        {k: min(v) for k, v in times.items()},
        info,
        os.environ.get("XLA_FLAGS", ""),
        threads=threads,
        torch=torch.__version__,
    )
    print(json.dumps(res), flush=True)
    return res


def _summary(a, median_s: dict, min_s: dict, info: dict, xla_flags: str, **fields) -> dict:
    """The printed result: the settings and ``fields``, PyTorch's step (s), every JAX variant's
    step (s) and its ratio to PyTorch's, compile info and the machine. ``median_s`` / ``min_s``
    map "torch" and each of ``a.impls`` to seconds."""
    import jax

    from brats_jax.benchmarking import timing

    tm, tmin = median_s["torch"], min_s["torch"]
    res = {
        "bench": "compare_cpu",
        "image_size": a.image_size,
        "batch_size": a.batch_size,
        "base_features": a.base_features,
        "steps": a.steps,
        **fields,
        "torch_step_s_median": round(tm, 4),
        "torch_step_s_min": round(tmin, 4),
    }
    for k in a.impls.split(","):
        res[k] = {
            "step_s_median": round(median_s[k], 4),
            "step_s_min": round(min_s[k], 4),
            "ratio_median": round(median_s[k] / tm, 3),
            "ratio_min": round(min_s[k] / tmin, 3),
            **info[k],
        }
    res.update(
        {kk: v for kk, v in timing.machine_info().items() if kk != "jax"}, jax=jax.__version__
    )
    res["xla_flags"] = xla_flags  # of the process(es) that ran JAX
    return res


def _separate_processes(a, argv: list[str]) -> dict:
    """--processes=N: alternate fresh single-framework processes; same output keys."""
    base = [x for x in argv if not x.startswith("--processes")]
    per = {"torch": [], **{k: [] for k in a.impls.split(",")}}
    mins = {k: [] for k in per}
    info, flags = {}, ""
    for _ in range(a.processes):
        for only in ("torch", "jax"):
            out = (
                subprocess.run(
                    [sys.executable, os.path.abspath(__file__), *base, f"--only={only}"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            info.update(r["info"])
            flags = r["xla_flags"] if only == "jax" else flags
            for k, v in r["times"].items():
                per[k].append(v["median"])
                mins[k].append(v["min"])
    res = _summary(
        a,
        {k: statistics.median(v) for k, v in per.items()},
        {k: min(v) for k, v in mins.items()},
        info,
        flags,
        mode=f"separate processes x{a.processes}",
        torch_round_medians=[round(t, 4) for t in per["torch"]],
    )
    for k in a.impls.split(","):
        res[k]["round_medians"] = [round(t, 4) for t in per[k]]
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
