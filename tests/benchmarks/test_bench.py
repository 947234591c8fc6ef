"""brats_jax.bench: the CLI prints one JSON line with the documented fields (tiny configs)."""

import json

import pytest

from brats_jax import bench
from brats_jax.benchmarking import timing, train, workload

TRAIN_FIELDS = {
    "model",
    "image_size",
    "batch_size",
    "dtype",
    "devices",
    "params",
    "flops_per_step",
    "compile_s",
    "step_s_median",
    "step_s_pipelined",
    "slices_per_s",
    "tflops",
    "tflops_pipelined",
}


def test_bench_train_cli_prints_json(capsys):
    bench.main(
        [
            "train",
            "--model=unet",
            "--base-features=4",
            "--depth=2",
            "--image-size=32",
            "--batch-size=2",
            "--steps=2",
            "--no-cpu-flags",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert TRAIN_FIELDS <= set(r)
    assert (r["model"], r["image_size"], r["batch_size"], r["dtype"]) == ("unet", 32, 2, "float32")
    # U-Net(4 in, 4 classes, widths 4-8-16, depth 2): params by hand:
    # down_0: 3*3*4*4+4 + 3*3*4*4+4 = 296; down_1: 3*3*4*8+8 + 3*3*8*8+8 = 880;
    # bottleneck: 3*3*8*16+16 + 3*3*16*16+16 = 3488; upconv_1: 2*2*16*8+8 = 520;
    # up_1: 3*3*16*8+8 + 3*3*8*8+8 = 1744; upconv_0: 2*2*8*4+4 = 132;
    # up_0: 3*3*8*4+4 + 3*3*4*4+4 = 440; head: 4*4+4 = 20  -> 7520
    assert r["params"] == 7520
    assert r["flops_per_step"] > 0 and r["step_s_median"] > 0
    # tflops is printed with 5 decimals: compare within that rounding.
    want = r["flops_per_step"] / r["step_s_median"] / 1e12
    assert r["tflops"] == pytest.approx(want, rel=1e-2, abs=1e-5)
    want = r["flops_per_step"] / r["step_s_pipelined"] / 1e12
    assert r["tflops_pipelined"] == pytest.approx(want, rel=1e-2, abs=1e-5)


def test_step_flops_falls_back_to_the_cpu_lowering(monkeypatch):
    """Where the backend's lowered step has no cost analysis (XLA:GPU), the FLOPs come from
    the same function lowered for the CPU: here a (8,16) @ (16,4) product = 2*8*16*4 FLOPs."""
    import jax
    import jax.numpy as jnp

    def f(a, b):
        return a @ b

    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    lowered = jax.jit(f).lower(a, b)
    assert timing.step_flops(f, lowered, a, b) == 2 * 8 * 16 * 4
    real = timing.cost_flops
    calls = []

    def nan_first(x):
        calls.append(x)
        return float("nan") if len(calls) == 1 else real(x)

    monkeypatch.setattr(timing, "cost_flops", nan_first)
    assert timing.step_flops(f, lowered, a, b) == 2 * 8 * 16 * 4
    assert len(calls) == 2 and calls[1] is not lowered


def test_bench_eval_no_recompilation(capsys):
    bench.main(
        [
            "eval",
            "--model=unet",
            "--base-features=4",
            "--depth=2",
            "--image-size=32",
            "--volume-size=32",
            "--slices=10",
            "--batch-size=4",
            "--volumes=2",
            "--no-cpu-flags",
        ]
    )
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["volume"] == [32, 32, 10]
    assert r["compilations"] == 1 and r["recompiled"] is False


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unet only"):
        workload.build_model("transunet", base_features=8)
    with pytest.raises(ValueError, match="dtype"):
        workload.build_model("unet", dtype="float16")


@pytest.mark.slow  # ~50 s of CPU compiles: benchmark harness, run with -m slow
def test_bench_multirun_reports_both_step_times():
    r = train.bench_multirun(
        image_size=32, batch_size=2, runs=2, steps=1, base_features=4, depth=2, mapping="map"
    )
    assert r["runs"] == 2 and r["mapping"] == "map" and r["params_per_run"] > 0
    assert r["step_s_single"] > 0 and r["step_s_stacked"] > 0
    assert r["speedup"] == pytest.approx(2 * r["step_s_single"] / r["step_s_stacked"], rel=0.01)
    assert r["flops_per_stacked_step"] > 0


@pytest.mark.slow  # ~50 s of CPU compiles: benchmark harness, run with -m slow
def test_time_steps_with_auto_state_layouts_computes_the_same_steps():
    """state_layouts="auto" (XLA-chosen layouts for the donated state) changes where arrays
    live, not what the step computes: same loss and parameters after the same steps."""
    import jax
    import numpy as np
    import optax

    net = workload.build_model("unet", base_features=2, depth=1, conv_impl="xla")
    tx = optax.adam(1e-3)
    image, label = workload.random_batch(2, 16)
    step = workload.make_train_step(net, tx)
    runs = {
        lay: timing.time_steps(step, workload.init_train_state(net, 16, tx), (image, label), 2, lay)
        for lay in timing.STATE_LAYOUTS
    }
    assert float(runs["auto"].out) == pytest.approx(float(runs["default"].out), rel=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
        runs["auto"].state["params"],
        runs["default"].state["params"],
    )
    with pytest.raises(ValueError, match="state_layouts='tiled'"):
        timing.time_steps(step, workload.init_train_state(net, 16, tx), (image, label), 1, "tiled")
    assert runs["default"].flops > 0
    unscored = timing.time_steps(
        step, workload.init_train_state(net, 16, tx), (image, label), 1, count_flops=False
    )
    assert unscored.flops != unscored.flops  # nan: not counted


@pytest.mark.slow  # ~80 s: compiles the full-width U-Net step once per variant
def test_gpu_explore_times_each_variant_and_the_pads(tmp_path):
    """benchmarks/gpu_explore.py on the CPU at a tiny size: one JSON line per variant with
    MFU = FLOPs / best time / peak, all scored on the baseline's FLOPs; the pad micro-benchmark
    times every pad version."""
    from benchmarks import gpu_explore

    rows = gpu_explore.pad_micro(shapes=((1, 6, 5, 2),), steps=1)
    assert [r["pad"] for r in rows] == ["jnp.pad", "cpu_fast", "dus", "zero_pad (bound)"]
    assert all(r["fwd_bwd_ms"] > 0 for r in rows)
    gpu_explore.main(
        [f"--out={tmp_path}", "--batch-size=1", "--image-size=32", "--steps=1",
         "--swaps=reflect_pad", "--impls=gpu_fast", "--other-batches=", "--peak=1e-3"]
    )  # fmt: skip
    lines = (tmp_path / "gpu_explore.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [(r["variant"], r["impl"], r["swaps"], r["state_layouts"]) for r in rows[:3]] == [
        ("xla", "xla", [], "default"),
        ("reflect_pad", "xla", ["reflect_pad"], "default"),
        ("gpu_fast", "gpu_fast", [], "default"),
    ]
    # then the fastest of those again with XLA-chosen state layouts: same numbers.
    assert len(rows) == 4 and rows[3]["state_layouts"] == "auto"
    (twin,) = [r for r in rows[:3] if rows[3]["variant"] == r["variant"] + "+auto_layouts"]
    assert (rows[3]["impl"], rows[3]["swaps"]) == (twin["impl"], twin["swaps"])
    assert rows[3]["loss"] == pytest.approx(twin["loss"], rel=1e-5)
    flops = rows[0]["flops_per_step"]
    assert flops > 0 and all(r["flops_per_step"] == flops for r in rows)
    for r in rows:
        best_s = min(r["step_ms_sync"], r["step_ms_pipelined"]) / 1e3
        assert r["mfu"] == pytest.approx(flops / best_s / 1e12 / 1e-3, rel=2e-2)


def test_input_grad_cpu_covers_every_3x3_layer_of_the_unet():
    """benchmarks/input_grad_cpu.py: its layer list is the U-Net's own 3x3 kernels (names and
    Cin/Cout read from an initialised model), one timed row per layer with the 'auto' pick."""
    import jax
    import jax.numpy as jnp

    from benchmarks import input_grad_cpu
    from brats_jax.models import create_model
    from brats_jax.ops import pick_input_grad_method

    model = create_model("unet", num_classes=4, features=2, depth=2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 4)))["params"]
    want = sorted(
        (f"{block}/{conv}", k["kernel"].shape[2], k["kernel"].shape[3])
        for block, convs in params.items()
        for conv, k in convs.items()
        if isinstance(k, dict) and k["kernel"].shape[:2] == (3, 3)
    )
    layers = input_grad_cpu.unet_conv3x3_layers(16, base_features=2, depth=2)
    assert sorted((n, cin, cout) for n, _, cin, cout in layers) == want
    assert {n: side for n, side, _, _ in layers}["bottleneck/conv1"] == 4

    rows = input_grad_cpu.main(
        ["--image-size=16", "--base-features=2", "--depth=2", "--repeats=1", "--batch-size=1"]
    )
    assert [r["layer"] for r in rows] == [n for n, *_ in layers]
    for r in rows:
        assert all(r[f"{m}_ms"] > 0 for m in ("conv", "flip", "gemm"))
        dy, k = (1, r["side"], r["side"], r["cout"]), (3, 3, r["cin"], r["cout"])
        assert r["auto"] == pick_input_grad_method(dy, k)
