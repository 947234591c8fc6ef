"""The entry points of benchmarks/gpu_check.sh run on the CPU at tiny sizes (--smoke), so the
GPU script is checked without a GPU; the script itself parses."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_torch_bench_skips_or_runs_smoke(capsys):
    from benchmarks import torch_bench

    torch_bench.main(["--smoke", "--batches=1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert rows == [{"bench": "torch_train", "skipped": rows[0]["skipped"]}]
        assert "torch unavailable" in rows[0]["skipped"]
        return
    assert [r["variant"] for r in rows] == ["eager", "compile"]
    assert all(r["step_s_median"] > 0 for r in rows)


def test_torch_unet_flops_formula():
    from benchmarks.torch_bench import unet_flops

    # first level alone, by hand: 3x3 convs 4->64 and 64->64 at 240x240, x2 (mul+add) x3
    first = 3 * 2 * 240 * 240 * 9 * (4 * 64 + 64 * 64)
    assert unet_flops(1, 240) > first and unet_flops(2, 240) == 2 * unet_flops(1, 240)


@pytest.mark.slow
def test_grouped_runs_smoke(capsys):
    from benchmarks import grouped_runs

    grouped_runs.main(["--smoke", "--mappings=single,gemm"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mapping"] for r in rows] == ["single", "gemm"] and rows[1]["runs"] == 2


@pytest.mark.slow
def test_transunet_compile_smoke(capsys):
    from benchmarks import transunet_compile

    transunet_compile.main(["--preset=tiny", "--image-size=32"])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["compile_s"] > 0 and row["preset"] == "tiny"


def test_fix_rows_counts_the_scanned_transunet_flops_per_block():
    """XLA's cost analysis counts a scan's body about once; fix_rows replaces the scanned
    model's FLOPs with the per-block model's, which are larger by the missing layers."""
    import io

    import jax
    import optax

    from benchmarks.transunet_compile import fix_rows
    from brats_jax.benchmarking import timing, workload
    from brats_jax.models import TransUNet

    net = TransUNet(preset="tiny", num_classes=4)  # scanned, 2 transformer blocks
    tx = optax.adam(1e-4)
    state = jax.eval_shape(lambda: workload.init_train_state(net, 32, tx))
    image, label = workload.random_batch(1, 32)
    step = workload.make_train_step(net, tx)
    scanned = timing.step_flops(step, jax.jit(step).lower(state, image, label), state, image, label)
    row = {"model": "transunet", "preset": "tiny", "image_size": 32, "batch_size": 1,
           "dtype": "float32", "step_s_median": 2.0, "flops_per_step": scanned}  # fmt: skip
    out = io.StringIO()
    fix_rows([json.dumps(row), "not json"], out)
    fixed, passthrough = out.getvalue().splitlines()
    fixed = json.loads(fixed)
    assert fixed["flops_per_step"] > scanned and passthrough == "not json"
    assert fixed["tflops"] == round(fixed["flops_per_step"] / 2.0 / 1e12, 5)
