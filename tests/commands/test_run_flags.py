"""The flags that the commands using trained runs share (`brats_jax.cli.define_run_flags`): one
definition, each command's own key flags (its --help lists them), --workdir an ensemble only
where the command averages runs, and a light `import brats_jax.predict`."""

import os
import re
import subprocess
import sys

import pytest

from brats_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = {"workdir", "tta", "step", "batch_size", "sliding_window", "data_root"}


def _run(args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return proc.stdout + proc.stderr


def _own_flags(command: str) -> dict[str, str]:
    """{flag: its help text} of the flags `python -m brats_jax.COMMAND --helpshort` lists as
    the command's own (absl's key flags of the main module), in a fresh process: a process
    that imports several commands keeps a shared flag with the command defining it last."""
    text = _run(["-m", f"brats_jax.{command}", "--helpshort"]).split("\nflags:\n", 1)[-1]
    blocks = re.split(r"\n  --", "\n" + text)[1:]
    return {b.split(":", 1)[0]: " ".join(b.split()) for b in blocks}


def test_each_command_owns_the_shared_flags_it_asked_for_and_workdir_says_which_kind():
    asked = {  # command: (its shared flags, --workdir takes an ensemble)
        "predict": ({"workdir", "tta", "step", "batch_size", "sliding_window"}, True),
        "tune_postprocessing": ({"workdir", "tta", "step", "batch_size", "data_root"}, True),
        "calibrate": ({"workdir", "tta", "step", "batch_size", "data_root"}, False),
        "export": ({"workdir", "step", "sliding_window"}, False),
    }
    for command, (names, ensemble) in asked.items():
        own = _own_flags(command)
        assert set(own) & SHARED == names, (command, sorted(own))
        assert ("comma-separated" in own["workdir"]) is ensemble, (command, own["workdir"])


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match=r"unknown run flag\(s\) \['tta_mode'\]"):
        cli.define_run_flags("tta", "tta_mode", workdir="one")
    with pytest.raises(ValueError, match="workdir='many': expected one of"):
        cli.define_run_flags("tta", workdir="many")


# what prediction does not need: training, plotting, the exporters and the peers' libraries
NOT_FOR_PREDICTION = ("matplotlib", "grain", "tensorboardX", "tensorflow", "torch", "jax2onnx",
                      "onnx", "onnxruntime", "h5py", "blosc2")  # fmt: skip


def test_importing_predict_leaves_training_and_plotting_libraries_out():
    code = (
        "import sys, brats_jax.predict\n"
        f"print(sorted(m for m in {NOT_FOR_PREDICTION!r} if m in sys.modules))"
    )
    out = _run(["-c", code])
    assert out.strip() == "[]", out[-2000:]
