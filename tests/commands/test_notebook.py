"""experiments/colab_tpu.ipynb: the kernel never imports JAX, and the cells that need neither
Colab, Drive nor Kaggle run end to end (smoke scale, CPU) in a plain Python subprocess."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"
SKIP_TAG = "colab-only"  # cells needing Colab, Drive or Kaggle


def _cells() -> list[tuple[list[str], str]]:
    nb = json.loads(NOTEBOOK.read_text())
    return [
        (c.get("metadata", {}).get("tags", []), "".join(c["source"]))
        for c in nb["cells"]
        if c["cell_type"] == "code"
    ]


def to_python(source: str) -> str:
    """IPython cell -> plain Python: `!cmd {x}` runs `cmd` through the shell with `{x}`
    expanded from the namespace (as IPython does), `%cd {x}` changes directory."""
    out = []
    for line in source.splitlines():
        m = re.match(r"^(\s*)([!%])(.*)$", line)
        if not m:
            out.append(line)
            continue
        indent, kind, body = m.groups()
        if kind == "%":
            magic, _, arg = body.partition(" ")
            if magic != "cd":
                raise ValueError(f"unsupported magic %{magic} in the notebook")
            out.append(f"{indent}os.chdir(f{arg.strip()!r})")
        else:
            out.append(f"{indent}_shell(f{body.strip()!r})")
    return "\n".join(out) + "\n"


def _imports_jax(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "jax"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jax":
            found.append(node.module)
        elif isinstance(node, ast.Name) and node.id == "jax":
            found.append("jax")
    return found


def test_no_cell_imports_jax_in_the_kernel():
    cells = _cells()
    assert len(cells) >= 6
    for _tags, source in cells:
        tree = ast.parse(to_python(source))
        assert not _imports_jax(tree), f"cell imports or uses jax in the kernel:\n{source}"
    # the device check asks a subprocess, and the sweep prints the backend it uses
    text = "".join(s for _, s in cells)
    assert "device_info()" in text and "sweep backend:" in text


_PRELUDE = """
import os, subprocess, sys
def _shell(cmd):
    print("$", cmd, flush=True)
    subprocess.run(cmd, shell=True, check=True)
"""


@pytest.mark.slow
def test_notebook_runs_at_smoke_scale_without_jax_in_the_kernel(tmp_path):
    """The runnable cells, with the settings cell's values replaced by CI-size ones."""
    out = tmp_path / "out"
    ci = {
        "SCALE": "--scale=smoke",
        "SWEEP": "table1",
        "ONLY": "unet-cb_ce-b0.99-lr1e-4",
        "EXPECT_BACKEND": "cpu",
        "OUT": str(out),
        "DATA_ARGS": "--config.train.num_steps=2 --config.train.eval_every_steps=2",
    }
    script = [_PRELUDE]
    ran = []
    for tags, source in _cells():
        if SKIP_TAG in tags:
            continue
        script.append(to_python(source))
        ran.append(source.splitlines()[0])
        if "settings" in tags:
            script.append("".join(f"{k} = {v!r}\n" for k, v in ci.items()))
    script.append(
        'assert "jax" not in sys.modules, "the kernel imported jax"\nprint("KERNEL OK")\n'
    )
    path = tmp_path / "notebook.py"
    path.write_text("\n".join(script))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=REPO, env=env, capture_output=True, text=True
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "a fresh process sees: cpu" in log
    assert re.search(r"^sweep backend: cpu \(\d+ x ", proc.stdout, re.M), log[-4000:]
    assert "KERNEL OK" in proc.stdout
    results = json.loads((out / "unet-cb_ce-b0.99-lr1e-4" / "results.json").read_text())
    assert results["steps"] == 2
    assert (out / "report" / "report.md").exists()
    assert len(ran) >= 5  # settings, device check, dry run, sweep, report


def test_settings_and_device_check_cells_leave_jax_unimported_in_the_kernel():
    """The cells before the sweep, run as the kernel runs them (repository on the path, as
    after `%cd`): JAX is never imported in the kernel, neither directly nor through
    `brats_jax` or `experiments` (both import JAX), and the device check reports the
    backend a fresh process sees."""
    cells = _cells()
    settings = next(s for t, s in cells if "settings" in t)
    check = next(s for t, s in cells if "DEV = device_info()" in s)
    script = (
        _PRELUDE
        + "sys.path.insert(0, os.getcwd())\n"
        + to_python(settings)
        + "EXPECT_BACKEND = 'cpu'\n"
        + to_python(check)
        + 'jax_mods = sorted(m for m in sys.modules if m.split(".")[0] == "jax")\n'
        + 'print("JAX IN KERNEL:", jax_mods[:3])\n'
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a fresh process sees: cpu" in proc.stdout
    assert "JAX IN KERNEL: []" in proc.stdout, proc.stdout[-2000:]


def test_device_check_stops_with_a_clear_message(tmp_path):
    """A backend other than the expected one ends the notebook with an explanation."""
    cells = _cells()
    settings = next(s for t, s in cells if "settings" in t)
    check = next(s for t, s in cells if "DEV = device_info()" in s)
    script = (
        _PRELUDE
        + to_python(settings)
        + "EXPECT_BACKEND = 'tpu'\n"
        + to_python(check)
        + 'print("NOT REACHED")\n'
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "NOT REACHED" not in proc.stdout
    assert "the sweep would run on 'cpu', not 'tpu'" in proc.stderr
