"""Benchmarks of the train step: one run's plain Adam + mean-CE step (:func:`bench_train`,
``bench train``) and K stacked runs of the library's own step against one run's
(:func:`bench_multirun`, ``bench multirun``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from brats_jax import losses
from brats_jax.benchmarking.timing import machine_info, time_steps
from brats_jax.benchmarking.workload import (
    build_model,
    init_train_state,
    make_train_step,
    model_choice,
    num_params,
    random_batch,
)
from brats_jax.runs import train_state
from brats_jax.training import steps as step_fns  # `steps` is the step count here
from configs import default as default_config


def bench_train(
    image_size: int = 128,
    batch_size: int = 4,
    steps: int = 5,
    **model_fields,
) -> dict:
    """Times ``steps`` train steps (after one warm-up step) and returns the result dict
    (keys: model, image_size, batch_size, dtype, conv_impl, devices, params, flops_per_step,
    compile_s, step_s_median, step_s_min, step_s_pipelined, slices_per_s, tflops,
    tflops_pipelined, plus :func:`machine_info`). ``model_fields``: `workload.MODEL_CHOICE`."""
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


def bench_multirun(
    image_size: int = 64,
    batch_size: int = 8,
    runs: int = 8,
    steps: int = 5,
    mapping: str = "auto",
    **model_fields,
) -> dict:
    """Times the library's own multi-run train step (`brats_jax.training.train.train_runs`'
    program): K = `runs` stacked runs with different learning rates and losses in one compiled
    step, against one run's step, on identical random batches. Returns a dict with both median
    step times and `speedup` = K * single / stacked (> 1: stacking pays off)."""
    mapping = step_fns.default_mapping() if mapping == "auto" else mapping
    fields = model_choice(**model_fields)
    net = build_model(**fields)
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
