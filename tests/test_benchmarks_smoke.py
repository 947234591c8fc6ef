"""The entry points of benchmarks/gpu_check.sh run on the CPU at tiny sizes (--smoke), so the
GPU script is checked without a GPU; the script itself parses."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
