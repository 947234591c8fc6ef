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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from brats_jax import NUM_CLASSES, losses, runtime
from brats_jax.ops.impls import IMPLS, resolve_impl

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(
    model: str,
    *,
    dtype: str = "float32",
    base_features: int | None = None,
    depth: int | None = None,
    preset: str | None = None,
    conv_impl: str = "auto",
    deep_supervision: bool = False,
):
    """The benchmarked flax module: ``models.from_config`` of the default model config with
    these fields (None: the config's default), 4 classes.

    ``base_features``/``depth``/``conv_impl``/``deep_supervision`` apply to the U-Net,
    ``preset`` to TransUNet;
    ``dtype`` is the compute dtype name ("float32" | "bfloat16"; parameters stay float32).
    """
    from brats_jax import models
    from configs import default as default_config

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    if model == "transunet" and (
        base_features is not None or depth is not None or deep_supervision
    ):
        raise ValueError("--base-features/--depth/--deep-supervision apply to --model=unet only")
    if model not in ("unet", "transunet"):
        raise ValueError(f"model={model!r}; expected 'unet' or 'transunet'")
    m = default_config.base_config().model
    fields = dict(name=model, dtype=dtype, base_features=base_features, depth=depth, preset=preset)
    m.update({k: v for k, v in fields.items() if v is not None})
    m.deep_supervision = deep_supervision
    return models.from_config(m, ops=resolve_impl(conv_impl))  # "auto" resolved once, here


MODEL_CHOICE = dict(
    model="unet", dtype="float32", base_features=None, depth=None, preset=None, conv_impl="auto",
    deep_supervision=False,
)  # fmt: skip
"""The benchmarks' model keywords (`**model_fields` of each `bench_*`) and their defaults."""


def model_choice(**fields) -> dict:
    """`MODEL_CHOICE` updated with `fields`: the keywords of :func:`build_model`."""
    unknown = sorted(set(fields) - set(MODEL_CHOICE))
    if unknown:
        raise TypeError(f"unknown model keywords {unknown}; expected some of {list(MODEL_CHOICE)}")
    return {**MODEL_CHOICE, **fields}


def init_variables(model, image_size: int, in_channels: int = 4, seed: int = 0) -> dict:
    """Variables of ``model`` for (1, image_size, image_size, in_channels) inputs (jitted init)."""
    k = jax.random.PRNGKey(seed)
    x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
    return jax.jit(lambda: model.init({"params": k, "dropout": k}, x, train=False))()


def mean_ce(logits, labels, params=None) -> jax.Array:
    """Mean softmax cross-entropy of logits (B,H,W,C) against int labels (B,H,W), float32
    scalar (the loss of the benchmark steps; `params` unused, for `deep_supervision_loss`)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(ce)


def make_train_step(model, tx: optax.GradientTransformation):
    """``step(state, image (B,H,W,4) f32, label (B,H,W) int32) -> (state, loss f32 scalar)``.

    A plain Adam + mean-CE step, the exact twin of `benchmarks/torch_unet.py`'s, so the
    framework comparison times the same arithmetic; `bench multirun` times the library's own
    `brats_jax.training.steps.make_train_step`.

    ``state`` is a dict ``{"params", "rest" (non-param collections), "opt_state", "rng"}``;
    loss is the mean softmax cross-entropy over pixels (a deep-supervised U-Net: its weighted
    sum over the decoder levels, `losses.deep_supervision_loss`). Not jitted (callers jit).
    """

    def step(state, image, label):
        rng, drop = jax.random.split(state["rng"])

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, **state["rest"]},
                image,
                train=True,
                rngs={"dropout": drop},
                mutable=["batch_stats"],
            )
            return losses.output_loss(mean_ce, logits, label, None), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        upd, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], upd)
        rest = {**state["rest"], **updates}
        return {"params": params, "rest": rest, "opt_state": opt_state, "rng": rng}, loss

    return step


def init_train_state(model, image_size: int, tx: optax.GradientTransformation, seed: int = 0):
    """The ``state`` dict of :func:`make_train_step` for ``model`` at ``image_size``."""
    variables = init_variables(model, image_size, seed=seed)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    return {
        "params": params,
        "rest": rest,
        "opt_state": jax.jit(tx.init)(params),
        "rng": jax.random.PRNGKey(seed + 1),
    }


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Random image (B,S,S,4) float32 N(0,1) and label (B,S,S) int32 uniform in {0..3}."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch_size, image_size, image_size, 4), dtype=np.float32)
    label = rng.integers(0, NUM_CLASSES, (batch_size, image_size, image_size), dtype=np.int32)
    return jnp.asarray(image), jnp.asarray(label)


def cpu_preset_step_setup(image_size: int = 128, batch_size: int = 8):
    """What the step-cost benchmarks time: ``(model, tx, init, batch)`` for the library's own
    train step (`steps.make_train_step`) with `configs/unet.py:cpu`'s U-Net and optimizer;
    ``init(seed)`` is a fresh jitted `TrainState` at ``image_size``; ``batch`` is
    ``{"image": (B,S,S,4) f32, "label": (B,S,S) int32}`` from :func:`random_batch`."""
    from brats_jax.runs import train_state
    from configs import unet

    config = unet.get_config("cpu")
    model = train_state.create_model(config)
    tx = train_state.create_optimizer(config.train, 1000)
    init = jax.jit(lambda seed: train_state.init_state(model, tx, seed, image_size=image_size))
    image, label = random_batch(batch_size, image_size)
    return model, tx, init, {"image": image, "label": label}


def cost_flops(compiled) -> float:
    """FLOPs from XLA's cost analysis of a `Lowered` or `Compiled` step (nan if unavailable).

    Pass the `Lowered` (pre-optimisation HLO) form: on GPUs the compiled executable's
    analysis misses convolutions that became cuDNN custom calls (it reported 9.4 of the
    U-Net step's ~255 GFLOPs on an H200), while the lowered HLO still has them as
    convolutions and gives the same count on every backend.
    """
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def step_flops(fn, lowered, *args) -> float:
    """FLOPs of one call of ``fn(*args)``: XLA's cost analysis of ``lowered`` (its
    pre-optimisation HLO), or, where the backend gives none (XLA:GPU in jax 0.11), of the same
    function lowered for the CPU (the count does not depend on the backend)."""
    flops = cost_flops(lowered)
    if flops != flops:  # nan
        flops = cost_flops(jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)))
    return flops


def num_params(params) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def machine_info() -> dict:
    """Backend, device kind/count, host CPU name and count, jax version, UTC date, XLA_FLAGS."""
    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": len(devs),
        "device_kind": devs[0].device_kind,
        "host": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def bench_train(
    image_size: int = 128,
    batch_size: int = 4,
    steps: int = 5,
    **model_fields,
) -> dict:
    """Times ``steps`` train steps (after one warm-up step) and returns the result dict
    (keys: model, image_size, batch_size, dtype, conv_impl, devices, params, flops_per_step,
    compile_s, step_s_median, step_s_min, step_s_pipelined, slices_per_s, tflops,
    tflops_pipelined, plus :func:`machine_info`). ``model_fields``: :data:`MODEL_CHOICE`."""
    if steps < 1 or batch_size < 1 or image_size < 1:
        raise ValueError(
            f"steps={steps}, batch_size={batch_size}, image_size={image_size} must all be >= 1"
        )
    fields = model_choice(**model_fields)
    net = build_model(**fields)
    tx = optax.adam(1e-4)
    state = init_train_state(net, image_size, tx)
    image, label = random_batch(batch_size, image_size)
    params = num_params(state["params"])
    timing = time_steps(make_train_step(net, tx), state, (image, label), steps)
    med, times, loss, flops = timing.median_s, timing.times, timing.out, timing.flops
    compile_s = timing.compile_s
    piped = timing.pipelined_s
    return {
        "bench": "train",
        "model": fields["model"],
        "image_size": image_size,
        "batch_size": batch_size,
        "dtype": fields["dtype"],
        "conv_impl": fields["conv_impl"] if fields["model"] == "unet" else "xla",
        "params": params,
        "flops_per_step": flops,
        "compile_s": round(compile_s, 3),
        "step_s_median": round(med, 5),
        "step_s_min": round(min(times), 5),
        "step_s_pipelined": round(piped, 5),
        "steps": steps,
        "slices_per_s": round(batch_size / med, 3),
        "tflops": round(flops / med / 1e12, 5),
        "tflops_pipelined": round(flops / piped / 1e12, 5),
        "loss": float(loss),
        **machine_info(),
    }


@dataclasses.dataclass
class StepTiming:
    """Result of :func:`time_steps`: compile seconds, each waited-for step's seconds, seconds
    per step when ``steps`` steps are queued back to back, FLOPs per step (:func:`step_flops`),
    the last step's second output, and the compiled step with the state after the last step
    (to run it further, e.g. under a profiler)."""

    compile_s: float
    times: list[float]
    pipelined_s: float
    flops: float
    out: Any
    compiled: Any
    state: Any

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


STATE_LAYOUTS = ("default", "auto")


def time_steps(
    fn, state, args, steps: int, state_layouts: str = "default", count_flops: bool = True
) -> StepTiming:
    """Compile `fn(state, *args) -> (state, out)` with the state donated, run one warm-up
    step, time `steps` steps each waited for (host dispatch included, as a loop that reads
    every loss sees it), then `steps` steps queued back to back (as a training loop that
    does not wait sees them: on a GPU the device stays busy).

    ``state_layouts="auto"`` lets XLA choose the device layout of every state array
    (``Layout.AUTO``: e.g. conv kernels stored as the convolutions read them, so that no
    transpose runs between them and the optimizer), then compiles the step with the state read
    and written in those layouts and moves the state into them; compile_s covers both compiles.
    ``count_flops=False`` skips :func:`step_flops` (``flops`` is then nan): for callers that
    score every variant on one count, where the CPU lowering it may need takes seconds.
    """
    if state_layouts not in STATE_LAYOUTS:
        raise ValueError(f"state_layouts={state_layouts!r}; expected one of {STATE_LAYOUTS}")
    t0 = time.perf_counter()
    jit_kw: dict[str, Any] = {}
    if state_layouts == "auto":
        from jax.experimental.layout import Format, Layout

        auto = jax.tree.map(lambda _: Format(Layout.AUTO), state)
        free = (None,) * len(args)
        chosen = (
            jax.jit(fn, in_shardings=(auto, *free), out_shardings=(auto, None), donate_argnums=0)
            .lower(state, *args)
            .compile()
            .input_formats[0][0]
        )
        jit_kw = {"in_shardings": (chosen, *free), "out_shardings": (chosen, None)}
        state = jax.device_put(state, chosen)
    lowered = jax.jit(fn, donate_argnums=0, **jit_kw).lower(state, *args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(fn, lowered, state, *args) if count_flops else float("nan")
    state, out = compiled(state, *args)  # warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, out = compiled(state, *args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        state, out = compiled(state, *args)
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t) / steps
    return StepTiming(compile_s, times, pipelined, flops, out, compiled, state)


def bench_multirun(
    image_size: int = 64,
    batch_size: int = 8,
    runs: int = 8,
    steps: int = 5,
    mapping: str = "auto",
    **model_fields,
) -> dict:
    """Times the library's own multi-run train step (`brats_jax.training.train.train_runs`' program):
    K = `runs` stacked runs with different learning rates and losses in one compiled step,
    against one run's step, on identical random batches. Returns a dict with both median
    step times and `speedup` = K * single / stacked (> 1: stacking pays off)."""
    from brats_jax import losses
    from brats_jax.runs import train_state
    from brats_jax.training import steps as step_fns  # `steps` is the step count here

    mapping = step_fns.default_mapping() if mapping == "auto" else mapping
    fields = model_choice(**model_fields)
    net = build_model(**fields)
    from configs import default as default_config

    cfg = default_config.base_config().train
    tx = train_state.create_optimizer(cfg, 1000)
    init = jax.jit(lambda seed: train_state.init_state(net, tx, seed, image_size=image_size))
    names = ["ce", "focal", "dice_ce", "dice"]
    lps = [losses.loss_params(names[k % len(names)]) for k in range(runs)]
    image, label = random_batch(batch_size, image_size)
    step = step_fns.make_train_step(net, tx)
    batch = {"image": image, "label": label}

    single = init(0)
    one = time_steps(step, single, (batch, lps[0]), steps)
    del single
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[init(k) for k in range(runs)])
    stacked = stacked.replace(
        opt_state=train_state.set_learning_rate(stacked.opt_state, jnp.logspace(-5, -3, runs))
    )
    kbatch = jax.tree.map(lambda x: jnp.broadcast_to(x, (runs, *x.shape)), batch)
    stacked_step = step_fns.map_over_runs(step, mapping)
    many = time_steps(stacked_step, stacked, (kbatch, losses.stack_loss_params(lps)), steps)
    mem = None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        mem = stats["peak_bytes_in_use"]
    return {
        "bench": "multirun",
        "model": fields["model"],
        "image_size": image_size,
        "batch_size": batch_size,
        "runs": runs,
        "mapping": mapping,
        "dtype": fields["dtype"],
        "params_per_run": num_params(init(0).params),
        "compile_s_single": round(one.compile_s, 3),
        "compile_s_stacked": round(many.compile_s, 3),
        "step_s_single": round(one.median_s, 5),
        "step_s_stacked": round(many.median_s, 5),
        "speedup": round(runs * one.median_s / many.median_s, 3),
        "flops_per_stacked_step": many.flops,
        "peak_device_bytes": mem,
        **machine_info(),
    }


def bench_eval(
    batch_size: int = 16,
    volumes: int = 2,
    depth_slices: int = 155,
    volume_size: int = 240,
    image_size: int = 240,
    **model_fields,
) -> dict:
    """Predicts ``volumes`` random (volume_size, volume_size, depth_slices, 4) volumes with
    ``whole_volume.predict_volume`` (one compiled function, fixed slice batches). Returns a dict
    with compile_s (first call of one batch minus a second call), volume_s (median seconds per
    volume, all volumes after compilation), slices_per_s, compilations (jit cache entries after
    all volumes; 1 = no recompilation) and recompiled (bool: a volume added a cache entry)."""
    from brats_jax.inference import whole_volume

    if volumes < 2:
        raise ValueError(f"volumes={volumes}; need >= 2 to check for recompilation")
    fields = model_choice(**model_fields)
    net = build_model(**fields)
    variables = init_variables(net, image_size)
    predict = whole_volume.make_slice_predictor(net, image_size=image_size)
    batch = jnp.zeros((batch_size, volume_size, volume_size, 4), jnp.float32)
    t = time.perf_counter()
    jax.block_until_ready(predict(variables, batch))  # compile + one batch
    first = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(predict(variables, batch))
    compile_s = first - (time.perf_counter() - t)
    sizes = [predict._cache_size()]
    rng = np.random.default_rng(0)
    times = []
    for _ in range(volumes):
        vol = rng.standard_normal((volume_size, volume_size, depth_slices, 4), dtype=np.float32)
        t = time.perf_counter()
        probs = whole_volume.predict_volume(predict, variables, vol, batch_size=batch_size)
        times.append(time.perf_counter() - t)
        sizes.append(predict._cache_size())
    if probs.shape != (volume_size, volume_size, depth_slices, NUM_CLASSES):
        raise RuntimeError(f"predict_volume returned shape {probs.shape}")
    vol_s = statistics.median(times)
    return {
        "bench": "eval",
        "model": fields["model"],
        "volume": [volume_size, volume_size, depth_slices],
        "image_size": image_size,
        "batch_size": batch_size,
        "dtype": fields["dtype"],
        "volumes": volumes,
        "params": num_params(variables["params"]),
        "compile_s": round(compile_s, 3),
        "volume_s": round(vol_s, 3),
        "volume_s_all": [round(x, 3) for x in times],
        "slices_per_s": round(depth_slices / vol_s, 3),
        "compilations": sizes[-1],
        "recompiled": sizes[-1] != sizes[0],
        **machine_info(),
    }


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


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_flags = "--no-cpu-flags" not in argv
    argv = [a for a in argv if a != "--no-cpu-flags"]
    runtime.setup(cpu_flags=cpu_flags)  # before the first JAX computation
    if argv and argv[0] == "data":
        from brats_jax.benchmarking.data_pipeline import (
            run_data_bench,  # lazy: data developer's module
        )

        run_data_bench(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m brats_jax.bench")
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
    a = parser.parse_args(argv)
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
