"""K batch-1 runs in one program vs K single-run steps, per mapping (issue 20).

The library's own train step (``brats_jax.training.steps.make_train_step``: the study's losses, Adam
with a per-run learning rate) for K runs with different learning rates, losses and seeds:

* ``single``: one run's step (the baseline: K single steps take K times its median);
* ``vmap``: ``jax.vmap`` over runs with the default ops (convolutions become grouped ones);
* ``map``: ``lax.map`` over runs (one program, runs in sequence);
* ``gemm``: ``jax.vmap`` over runs with ``conv_impl="gemm"`` (every convolution an im2col
  GEMM, so the K runs' layers are batched GEMMs, :mod:`brats_jax.ops.gemm`).

Prints one JSON line per mapping with the median step seconds, ``speedup`` = K * single /
grouped (> 1: grouping pays off), compile seconds and achieved TFLOP/s (for ``map`` the cost
analysis counts the loop body once: one run's FLOPs).

    PYTHONPATH=$PWD python -m benchmarks.grouped_runs --model=unet --runs=16 --dtype=bfloat16
    PYTHONPATH=$PWD python -m benchmarks.grouped_runs --smoke   # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json

MAPPINGS = ("single", "vmap", "map", "gemm")


def build(model: str, conv_impl: str, dtype: str, smoke: bool, unet_kw: dict | None = None):
    """The benchmarked module (study sizes, tiny ones with ``smoke``; ``unet_kw`` overrides
    the U-Net's fields, e.g. features/depth)."""
    from brats_jax.benchmarking import workload
    from brats_jax.models import create_model

    kw = {"num_classes": 4, "dtype": workload.DTYPES[dtype], "conv_impl": conv_impl}
    if model == "unet":
        kw.update({"features": 4, "depth": 2} if smoke else (unet_kw or {}))
    elif model == "transunet":
        kw["preset"] = "tiny" if smoke else "r50_vit_b16"
        kw["conv_impl"] = "xla" if conv_impl == "auto" else conv_impl
    else:
        raise ValueError(f"--model={model!r}; expected unet or transunet")
    return create_model(model, **kw)


def run(model: str, runs: int, image_size: int, batch_size: int, steps: int, dtype: str,
        mappings: list[str], smoke: bool, unet_kw: dict | None = None) -> list[dict]:  # fmt: skip
    """One result dict per mapping (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from brats_jax import losses
    from brats_jax.benchmarking import timing, workload
    from brats_jax.runs import train_state
    from brats_jax.training import steps as train_steps
    from configs import default as default_config

    cfg = default_config.base_config().train
    tx = train_state.create_optimizer(cfg, 1000)
    names = ["ce", "focal", "dice_ce", "dice"]
    lps = [losses.loss_params(names[k % len(names)]) for k in range(runs)]
    image, label = workload.random_batch(batch_size, image_size)
    batch = {"image": image, "label": label}
    kbatch = jax.tree.map(lambda x: jnp.broadcast_to(x, (runs, *x.shape)), batch)
    out, single_s = [], None
    for mapping in mappings:
        net = build(model, "gemm" if mapping == "gemm" else "auto", dtype, smoke, unet_kw)
        init = jax.jit(
            lambda seed, net=net: train_state.init_state(net, tx, seed, image_size=image_size)
        )
        step = train_steps.make_train_step(net, tx)
        if mapping == "single":
            t = timing.time_steps(step, init(0), (batch, lps[0]), steps)
        else:
            state = jax.tree.map(lambda *xs: jnp.stack(xs), *[init(k) for k in range(runs)])
            state = state.replace(
                opt_state=train_state.set_learning_rate(state.opt_state, jnp.logspace(-5, -3, runs))
            )
            fn = train_steps.map_over_runs(step, "map" if mapping == "map" else "vmap")
            t = timing.time_steps(fn, state, (kbatch, losses.stack_loss_params(lps)), steps)
        k = 1 if mapping == "single" else runs
        single_s = t.median_s if mapping == "single" else single_s
        out.append({
            "bench": "grouped_runs", "model": model, "mapping": mapping, "runs": k,
            "image_size": image_size, "batch_size": batch_size, "dtype": dtype, **(unet_kw or {}),
            "compile_s": round(t.compile_s, 3), "step_s_median": round(t.median_s, 5),
            "step_s_per_run": round(t.median_s / k, 5),
            "speedup": None if single_s is None else round(k * single_s / t.median_s, 3),
            "flops_per_step": t.flops, "tflops": round(t.flops / t.median_s / 1e12, 5),
            "backend": jax.default_backend(),
        })  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.grouped_runs")
    p.add_argument("--model", default="unet", choices=["unet", "transunet"])
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mappings", default=",".join(MAPPINGS), help=f"subset of {MAPPINGS}")
    p.add_argument("--features", type=int, default=None, help="U-Net first-level width")
    p.add_argument("--depth", type=int, default=None, help="U-Net poolings")
    p.add_argument("--smoke", action="store_true", help="tiny models, 32 px, 2 runs, 1 step")
    a = p.parse_args(argv)
    mappings = a.mappings.split(",")
    bad = [m for m in mappings if m not in MAPPINGS]
    if bad:
        raise SystemExit(f"error: --mappings {bad}; expected a subset of {MAPPINGS}")
    if a.smoke:
        a.runs, a.image_size, a.steps = 2, 32, 1
    from brats_jax.ops.flags import set_cpu_xla_flags

    set_cpu_xla_flags()
    unet_kw = {k: v for k, v in (("features", a.features), ("depth", a.depth)) if v is not None}
    run(a.model, a.runs, a.image_size, a.batch_size, a.steps, a.dtype, mappings, a.smoke, unet_kw)


if __name__ == "__main__":
    main()
