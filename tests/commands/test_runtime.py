"""`brats_jax.runtime`: every command line calls `setup` before JAX starts a backend."""

import os
import subprocess
import sys
import textwrap

import pytest

from brats_jax import runtime
from brats_jax.ops.flags import CPU_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Replaces runtime.setup, then runs MODULE as `python -m MODULE ARGS`: the fake setup prints
# how many JAX backends exist when it is called and ends the process (so nothing else runs).
_PROBE = textwrap.dedent(
    """
    import os, runpy, sys
    from brats_jax import runtime

    def fake_setup(**kwargs):
        xb = sys.modules.get("jax._src.xla_bridge")
        started = len(getattr(xb, "_backends", {}) or {}) if xb else 0
        print(f"SETUP backends={started}", flush=True)
        os._exit(0)

    runtime.setup = fake_setup
    module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    print("RETURNED WITHOUT SETUP", flush=True)
    """
)

CLIS = {
    "brats_jax.main": ["--config=configs/unet.py:tiny", "--workdir=WORK"],
    "brats_jax.predict": ["--workdir=WORK", "--input=WORK", "--output=WORK/seg.nii.gz"],
    "brats_jax.evaluate": ["--pred=WORK", "--gt=WORK", "--out=WORK/x.csv"],
    "brats_jax.export": ["--workdir=WORK", "--out=WORK/model.onnx"],
    "brats_jax.bench": ["train", "--steps=1"],
    "brats_jax.prepare": ["--src=WORK", "--out=WORK/cache"],
    "experiments.run": ["table1", "--out=WORK", "--dry-run"],
    "brats_jax.tune_postprocessing": ["--workdir=WORK", "--cases=WORK"],
    "brats_jax.calibrate": ["--workdir=WORK", "--cases=WORK"],
    "experiments.analyses.calibration_oof": ["--workdir=WORK", "--out=WORK/c.json"],
    "experiments.analyses.segmentation_ablation": ["score", "--data_root=WORK", "--out=WORK/abl"],
    "experiments.analyses.postprocessing_ablation": [
        "--workdir=WORK",
        "--data_root=WORK",
        "--tune_cases=A",
        "--out=WORK/abl",
    ],
}


@pytest.mark.parametrize("module", sorted(CLIS))
def test_cli_calls_runtime_setup_before_jax_starts(module, tmp_path):
    args = [a.replace("WORK", str(tmp_path)) for a in CLIS[module]]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "SETUP backends=0" in proc.stdout, (proc.stdout, proc.stderr[-2000:])


def test_setup_sets_fast_cpu_flags_and_keeps_users_choice():
    # A fresh process: the flags are read when the backend starts, and must be in XLA_FLAGS.
    code = textwrap.dedent(
        """
        import os
        from brats_jax import runtime
        runtime.setup(quiet_logs=False)
        print(os.environ["XLA_FLAGS"])
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "--xla_cpu_use_onednn=false"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    ).stdout.split()
    # the user's own onednn choice stays, the YNN flag is added once
    assert out == ["--xla_cpu_use_onednn=false", CPU_XLA_FLAGS[0]]


def test_setup_options_off_their_defaults(tmp_path, monkeypatch):
    """cpu_flags=False leaves XLA_FLAGS alone; compile_cache=DIR creates DIR (parents too)
    and points JAX's persistent cache at it (a fresh process: both act before JAX starts);
    distributed=True calls jax.distributed.initialize once (replaced here)."""
    import jax

    cache = tmp_path / "a" / "cache"
    code = textwrap.dedent(
        f"""
        import os
        from brats_jax import runtime
        runtime.setup(cpu_flags=False, compile_cache={str(cache)!r}, quiet_logs=False)
        import jax
        print(repr(os.environ.get("XLA_FLAGS")))
        print(jax.config.jax_compilation_cache_dir)
        print(jax.config.jax_persistent_cache_min_compile_time_secs)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.stdout.split() == ["None", str(cache), "0.5"], proc.stderr[-2000:]
    assert cache.is_dir()
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    runtime.setup(distributed=True, quiet_logs=False)
    assert calls == [((), {})]


def test_resolve_ops_and_the_legacy_conv_impl_field():
    import ml_collections

    from brats_jax import config_fields
    from brats_jax.data import augment

    new = ml_collections.ConfigDict({"runtime": {"ops": "xla"}, "model": {}})
    assert runtime.resolve_ops(new) == "xla"
    assert runtime.resolve_ops(ml_collections.ConfigDict({"model": {}})) == "cpu_fast"  # auto
    with pytest.raises(ValueError, match="nope"):
        runtime.resolve_ops(ml_collections.ConfigDict({"runtime": {"ops": "nope"}}))
    old = {
        "model": {"name": "unet", "conv_impl": "gpu_fast"},
        "data": {"image_size": 32},
        "train": {"seed": 1},
    }
    assert config_fields.upgrade_legacy(old) == {
        "model": {
            "name": "unet",
            "output": "classes",
            "activation": "relu",
            "deep_supervision": False,
        },
        "data": {
            "image_size": 32,
            "context_slices": 0,
            "patch_size": 0,
            "foreground_fraction": 0.33,
            "foreground_sampling": "voxels",
        },
        "train": {"seed": 1},
        "runtime": {"ops": "gpu_fast"},
        "postprocess": {
            "largest_component_only": False,
            "min_component_voxels": 0,
            "connectivity": 26,
            "et_min_voxels": 0,
            "tc_min_mm3": 0.0,
            "tc_action": "relabel",
            "et_min_mm3": 0.0,
            "et_action": "relabel",
        },
        "augment": augment.OFF_FIELDS,  # no augmentation
    }  # fmt: skip  (fields added later get the values old runs trained with)
    assert old["model"]["conv_impl"] == "gpu_fast"  # the input is not changed


def test_setup_again_in_a_running_process_is_quiet(monkeypatch, capsys, caplog):
    """An in-process call (a test calling a CLI's main) once JAX runs, the flags already in
    XLA_FLAGS: no warning, no log record, nothing printed, XLA_FLAGS and a user's own
    TF_CPP_MIN_LOG_LEVEL unchanged; twice with quiet_logs: one log filter, one hook. The
    flags missing once a backend runs is not quiet: the warning, XLA_FLAGS untouched."""
    import logging
    import warnings

    import jax.numpy as jnp
    from absl import logging as absl_logging

    from brats_jax import cli

    jnp.zeros(1).block_until_ready()  # a backend exists
    flags = os.environ["XLA_FLAGS"]
    assert all(f in flags.split() for f in CPU_XLA_FLAGS)  # conftest's setup set them
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # a user's own level
    handler = absl_logging.get_absl_handler()
    had_filter = cli.keep_log_record in handler.filters
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored afterwards
    capsys.readouterr()
    try:
        with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            runtime.setup(quiet_logs=False)
            runtime.setup(quiet_logs=True)
            hook = sys.unraisablehook
            runtime.setup(quiet_logs=True)
        assert [str(w.message) for w in seen] == [] and caplog.records == []
        assert capsys.readouterr() == ("", "")
        assert os.environ["XLA_FLAGS"] == flags and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
        assert handler.filters.count(cli.keep_log_record) == 1
        assert sys.unraisablehook is hook  # not wrapped again
    finally:
        if not had_filter:
            handler.removeFilter(cli.keep_log_record)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    with pytest.warns(UserWarning, match="backend is already initialised"):
        runtime.setup(quiet_logs=False)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=false"


def test_an_old_run_config_json_resumes_with_an_empty_config_diff(tmp_path):
    """A config.json written before the ADDED_FIELDS existed (and before `runtime.ops`),
    resumed with today's config of the same run (the fields at their defaults): no change
    is reported, so an old run resumes as itself."""
    import json

    from brats_jax.training import run_group
    from configs import unet

    new = json.loads(unet.get_config("tiny").to_json_best_effort())
    old = json.loads(json.dumps(new))
    del old["model"]["output"], old["data"]["context_slices"], old["postprocess"]
    old["model"]["conv_impl"] = old.pop("runtime")["ops"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert run_group._warn_config_changes(tmp_path / "config.json", new) == []
    new["data"]["context_slices"] = 1  # a real change is still named
    assert run_group._warn_config_changes(tmp_path / "config.json", new) == ["data.context_slices"]
