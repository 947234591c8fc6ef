"""The CLI boundary: file-system errors end in one line naming the path and the cause."""

import errno
import logging as pylogging
import os
import re
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from brats_jax import cli
from brats_jax.data.common import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOSPACE = "No space left on device (ENOSPC); free some space or write elsewhere"

# shortened from a real run on a full 300 KiB tmpfs: orbax's save fails in tensorstore, then
# the training loop's `finally` closes the TensorBoard writer, whose flush fails too
_TENSORSTORE = (
    "RESOURCE_EXHAUSTED: Error writing local file "
    '"/mnt/full/run/checkpoints/2.orbax-checkpoint-tmp/state/_sharding": Failed to write 19244 '
    "bytes to file 15: No space left on device [os_error_code='28'] "
    '[tensorstore_spec=\'{"context":{"cache_pool":{}}}\']'
)


def test_os_error_names_path_and_cause():
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/mnt/full/run/metrics.jsonl")
    assert cli.describe_failure(e) == f"/mnt/full/run/metrics.jsonl: {NOSPACE}"
    e = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/ro/seg.nii.gz")
    assert cli.describe_failure(e) == (
        "/ro/seg.nii.gz: Permission denied (EACCES); check the folder's permissions or write "
        "elsewhere"
    )


def test_tensorstore_error_and_the_error_raised_while_closing_are_one_line():
    try:
        try:
            raise ValueError(_TENSORSTORE)
        finally:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # tensorboard's flush
    except OSError as e:
        got = cli.describe_failure(e)
    assert got == f"/mnt/full/run/checkpoints/2.orbax-checkpoint-tmp/state/_sharding: {NOSPACE}"
    assert cli.describe_failure(ValueError(_TENSORSTORE)) == got


def test_own_one_line_messages_are_kept():
    for e in (
        DataError("/data/x.h5: 'mask' has shape (2, 2), expected (240, 240, 3)"),
        FileNotFoundError("no checkpoint in /run/checkpoints"),
        FloatingPointError("non-finite training loss (nan) at step 2"),
    ):
        assert cli.describe_failure(e) == str(e)
    try:
        raise DataError("cannot read /d/a.h5: OSError: truncated") from OSError(5, "I/O error")
    except DataError as e:
        assert cli.describe_failure(e) == "cannot read /d/a.h5: OSError: truncated"
    multi = ValueError("first line\n  160 more lines")
    assert cli.describe_failure(multi) == "first line (BRATS_JAX_DEBUG=1 shows the rest)"


_FULL_DISK = textwrap.dedent(
    """
    import errno, os, pathlib, sys
    from brats_jax import cli, fileio

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    pathlib.Path.write_text = no_space  # a full disk, as the writer sees it

    def main(argv):
        fileio.write_text(pathlib.Path(sys.argv[1]) / "results.json", "{}")

    cli.run_app(main)
    """
)


@pytest.mark.parametrize("debug", [False, True])
def test_full_disk_ends_in_one_line_at_the_cli(tmp_path, debug):
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("BRATS_JAX_DEBUG", None)
    if debug:
        env["BRATS_JAX_DEBUG"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 1
    if debug:
        assert "Traceback" in out.stderr
        return
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {tmp_path}/.results.json.")
    assert lines[0].endswith(f": {NOSPACE}")
    assert os.listdir(tmp_path) == []  # the atomic writer left no temporary file


def _record(name, level, message, pathname="x.py"):
    return pylogging.LogRecord(name, level, pathname, 1, message, None, None)


def test_log_filter_drops_routine_library_lines_and_keeps_real_problems():
    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so"
    dropped = [
        _record("jax._src.xla_bridge", pylogging.INFO, tpu),
        _record("absl", pylogging.WARNING, "Given directory is read only=/run/ckpt", orbax),
        _record("absl", pylogging.WARNING, "`tracked_metric`; did not provide metrics.", orbax),
        _record("absl", pylogging.INFO, "Saved checkpoint 2", orbax),
    ]
    kept = [
        _record("jax._src.xla_bridge", pylogging.WARNING, "A Google TPU may be present on this"),
        _record("jax._src.xla_bridge", pylogging.INFO, "Unable to initialize backend 'cuda': x"),
        _record("absl", pylogging.WARNING, "Given directory is read only=/run/ckpt"),  # not orbax
        _record("absl", pylogging.WARNING, "Item 'state' was not found", orbax),
    ]
    assert [cli.keep_log_record(r) for r in dropped] == [False] * len(dropped)
    assert [cli.keep_log_record(r) for r in kept] == [True] * len(kept)


def _quiet_env():
    """The environment a user's shell gives a command: no JAX_PLATFORMS (the tests' `cpu`
    keeps JAX from trying the TPU backend at all), no debug tracebacks."""
    env = {**os.environ, "PYTHONPATH": REPO}
    for name in ("JAX_PLATFORMS", "BRATS_JAX_DEBUG", "TF_CPP_MIN_LOG_LEVEL"):
        env.pop(name, None)
    return env


_TPU_LINE = "Unable to initialize backend 'tpu'"
# an absl warning/error line: W1207 09:21:55.283520 139860765842304 checkpoint_manager.py:849]
_ABSL_WARNING = re.compile(r"^[WEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]")


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """A tiny run trained by the command line (`python -m brats_jax.main`) -> (workdir,
    the command's stdout + stderr)."""
    workdir = tmp_path_factory.mktemp("tiny_cli") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "brats_jax.main", "--config=configs/unet.py:tiny",
         f"--workdir={workdir}", "--config.train.num_steps=2"],
        cwd=REPO, env=_quiet_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout + proc.stderr


def test_training_on_a_machine_without_tpu_logs_no_tpu_backend_line(tiny_trained):
    _, output = tiny_trained
    assert "devices: [" in output  # the INFO lines are shown
    assert _TPU_LINE not in output


def test_predict_on_a_trained_run_logs_no_orbax_warning(tiny_trained, tmp_path, write_nifti_case):
    workdir, _ = tiny_trained
    case = write_nifti_case(tmp_path, "Brats18_A_1", shape=(12, 10, 6))
    proc = subprocess.run(
        [sys.executable, "-m", "brats_jax.predict", f"--workdir={workdir}", f"--input={case}",
         f"--output={tmp_path / 'seg.nii.gz'}"],
        cwd=REPO, env=_quiet_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {tmp_path / 'seg.nii.gz'}")
    warnings = [ln for ln in proc.stderr.splitlines() if _ABSL_WARNING.match(ln)]
    assert warnings == [], proc.stderr
    assert "read only" not in proc.stderr and _TPU_LINE not in proc.stderr, proc.stderr


def test_predict_keeps_a_compile_cache_in_the_user_cache_unless_told_not_to(
    tiny_trained, tmp_path, write_nifti_case
):
    """predict's default `--compile_cache` is $XDG_CACHE_HOME/brats_jax/jax_compile_cache:
    after one predict it holds compiled functions, and a second predict loading them writes
    the same labels; `--compile_cache=` (empty) keeps no cache."""
    workdir, _ = tiny_trained
    case = write_nifti_case(tmp_path, "Brats18_A_1", shape=(12, 10, 6))
    segs = []
    for name, extra in (("cached", []), ("again", []), ("off", ["--compile_cache="])):
        cache_home = tmp_path / ("off_home" if extra else "home")
        segs.append(tmp_path / f"{name}.nii.gz")
        proc = subprocess.run(
            [sys.executable, "-m", "brats_jax.predict", f"--workdir={workdir}",
             f"--input={case}", f"--output={segs[-1]}", *extra],
            cwd=REPO, env={**_quiet_env(), "XDG_CACHE_HOME": str(cache_home)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        if name == "cached":
            entries = list((cache_home / "brats_jax" / "jax_compile_cache").iterdir())
            assert entries, "no compiled function was cached"
    assert not (tmp_path / "off_home" / "brats_jax").exists()
    first, again, off = (np.asarray(nib.load(s).dataobj) for s in segs)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(off, first)
    assert len(list((tmp_path / "home" / "brats_jax" / "jax_compile_cache").iterdir())) == len(
        entries
    )  # the second predict found every function in the cache: nothing new compiled


def test_every_console_script_names_a_function():
    """pyproject.toml's `[project.scripts]` (`brats-train`, ...) point at functions that
    exist (a missing one fails only when the script is run). Read, not imported."""
    import ast
    import importlib.util
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert "brats-train" in scripts
    missing = []
    for name, target in sorted(scripts.items()):
        module, _, function = target.partition(":")
        with open(importlib.util.find_spec(module).origin) as f:
            tree = ast.parse(f.read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if function not in defined:
            missing.append(f"{name} = {target!r}")
    assert missing == []


def test_every_command_imports_beside_every_other_in_one_process():
    """A notebook, a test worker or a user's script may import several commands: a flag two
    commands define (`--out` of evaluate, export and prepare; `--workdir`, `--step`, ...)
    must not raise absl's DuplicateFlagError, in either import order."""
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    modules = sorted({t.partition(":")[0] for t in scripts.values()})
    assert {"brats_jax.evaluate", "brats_jax.export", "brats_jax.prepare"} <= set(modules)
    for order in (modules, modules[::-1]):
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
        proc = subprocess.run(
            [sys.executable, "-c", code + "print('imported')"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.stdout.strip() == "imported", proc.stderr[-2000:]


def test_a_console_scripts_help_lists_its_flags_as_python_m_does():
    # what pip's generated `brats-train` does: __main__ is the script, without flags or doc
    code = "import sys; sys.argv[0] = 'brats-train'; from brats_jax.main import run; run()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--help"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.stdout.startswith("Train and evaluate: `python -m brats_jax.main"), proc.stdout
    assert "--config: Config file" in proc.stdout and "--workdir:" in proc.stdout
