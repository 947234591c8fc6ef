"""Bad command lines as a new user types them: a misspelt config field, preset or name-valued
field ends in ONE error line naming it and the closest valid name, before any data is read."""

import os
import subprocess
import sys

import pytest

from brats_jax import losses
from brats_jax.runs import train_state
from brats_jax.training import config_choices
from configs import default, transunet, unet

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(module: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    env.pop("BRATS_JAX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _one_line(proc: subprocess.CompletedProcess) -> str:
    """The single non-empty stderr line of a failed CLI run (asserted)."""
    assert proc.returncode != 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_main_misspelt_field_is_one_line_with_suggestion():
    line = _one_line(
        _cli("brats_jax.main", "--config=configs/unet.py:tiny", "--config.train.lerning_rate=1e-3")
    )
    assert line.startswith("error: unknown config field --config.train.lerning_rate:")
    assert line.endswith("did you mean 'learning_rate'?")


def test_main_misspelt_preset_is_one_line_with_suggestion():
    line = _one_line(_cli("brats_jax.main", "--config=configs/unet.py:cpu_bets"))
    assert "--config=configs/unet.py:cpu_bets" in line
    assert "unknown preset 'cpu_bets'; did you mean 'cpu_best'?" in line


def test_main_bad_loss_fails_before_the_data_is_read(tmp_path):
    missing = tmp_path / "no_such_dataset"
    workdir = tmp_path / "run"
    line = _one_line(
        _cli(
            "brats_jax.main", "--config=configs/unet.py:tiny", f"--workdir={workdir}",
            "--config.train.loss=dice_cee", "--config.data.source=nifti",
            f"--config.data.root={missing}",
        )
    )  # fmt: skip
    # the loss error wins over the missing data folder, and nothing was written
    assert line == (
        "error: train.loss='dice_cee' is not one of ce, cb_ce, focal, cb_focal, dice, dice_ce; "
        "did you mean 'dice_ce'?"
    )
    assert not workdir.exists()


def test_sweep_misspelt_field_and_bad_choice_are_one_line(tmp_path):
    line = _one_line(
        _cli(
            "experiments.run", "table1", f"--out={tmp_path}", "--dry-run",
            "--config.model.norm=grop", "--config.eval.tta=flip",
        )
    )  # fmt: skip
    assert line.startswith("error: unet-")  # the first run's name
    assert (
        "model.norm='grop' is not one of none, batch, group, instance; did you mean 'group'?"
        in line
    )
    assert "eval.tta='flip' is not one of none, flips, flips_ud; did you mean 'flips'?" in line
    line = _one_line(
        _cli("experiments.run", "table1", f"--out={tmp_path}", "--config.train.lerning_rate=1")
    )
    assert "--config.train.lerning_rate" in line and "did you mean 'learning_rate'?" in line
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the table, in-process


@pytest.mark.parametrize("preset", default.PRESETS)
def test_every_shipped_config_passes(preset):
    for module in (unet, transunet):
        assert config_choices.choice_errors(module.get_config(preset)) == []


def _with(field: str, value):
    c = unet.get_config("tiny")
    section, name = field.split(".")
    c.unlock()
    c[section][name] = value
    return c


@pytest.mark.parametrize("field", sorted(config_choices.CHOICES))
def test_each_field_refuses_a_value_outside_its_choices(field):
    with pytest.raises(ValueError, match=f"^{field}='no_such_value' is not one of "):
        config_choices.check_choices(_with(field, "no_such_value"))


def test_region_outputs_allow_only_the_region_losses():
    c = _with("model.output", "regions")
    c.train.loss = "focal"
    assert config_choices.choice_errors(c) == ["train.loss='focal' is not one of ce, dice, dice_ce"]


def test_a_field_the_config_lacks_is_not_checked():
    c = unet.get_config("tiny")
    c.unlock()
    del c.eval["tta"]  # an old run's config
    assert config_choices.choice_errors(c) == []


def test_the_choices_are_what_the_code_accepts():
    """The table's values for the training fields are accepted by the functions that use
    them, and a value outside is refused there too (the table is not a stale copy)."""
    t = unet.get_config("tiny").train
    counts = [[10, 5, 3, 2]]
    for name in config_choices.CHOICES["train.loss"](unet.get_config("tiny")):
        t.loss = name
        train_state.create_loss_params(t, counts)
    t.loss = "cb_ce"
    for mode in config_choices.CHOICES["train.class_counts"]:
        t.class_counts = mode
        train_state.create_loss_params(t, counts)
    for opt in config_choices.CHOICES["train.optimizer"]:
        t.optimizer = opt
        train_state.create_optimizer(t, 10)
    for schedule in config_choices.CHOICES["train.schedule"]:
        t.schedule = schedule
        train_state.create_optimizer(t, 10)
    assert set(losses.CLASS_COUNTS) == {"batch_pixels", "split_pixels", "split_slices"}
    t.class_counts = "split_voxels"
    with pytest.raises(ValueError, match="train.class_counts"):
        train_state.create_loss_params(t, counts)
    t.optimizer = "sgd"
    with pytest.raises(ValueError, match="train.optimizer"):
        train_state.create_optimizer(t, 10)
