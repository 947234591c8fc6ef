"""Benchmark of whole-volume prediction (``bench eval``): fixed-size slice batches through one
compiled function, and whether a second volume recompiles it (:func:`bench_eval`)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from brats_jax import NUM_CLASSES
from brats_jax.benchmarking.timing import machine_info
from brats_jax.benchmarking.workload import build_model, init_variables, model_choice, num_params
from brats_jax.inference import whole_volume


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
