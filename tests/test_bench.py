"""brats_jax.bench: the CLI prints one JSON line with the documented fields (tiny configs)."""

import json

import pytest

from brats_jax import bench

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
    "slices_per_s",
    "tflops",
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
        bench.build_model("transunet", base_features=8)
    with pytest.raises(ValueError, match="dtype"):
        bench.build_model("unet", dtype="float16")


def test_bench_multirun_reports_both_step_times():
    from brats_jax import bench

    r = bench.bench_multirun(
        image_size=32, batch_size=2, runs=2, steps=1, base_features=4, depth=2, mapping="map"
    )
    assert r["runs"] == 2 and r["mapping"] == "map" and r["params_per_run"] > 0
    assert r["step_s_single"] > 0 and r["step_s_stacked"] > 0
    assert r["speedup"] == pytest.approx(2 * r["step_s_single"] / r["step_s_stacked"], rel=0.01)
    assert r["flops_per_stacked_step"] > 0
