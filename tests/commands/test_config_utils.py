"""`brats_jax.config_fields` and the configs' presets: dotted fields, diffs, locked presets."""

import json
import pathlib

import ml_collections
import pytest

from brats_jax import config_fields
from configs import default, transunet, unet

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config():
    return ml_collections.ConfigDict({"train": {"lr": 0.1, "seed": 0}, "name": "x"})


def test_get_and_set_dotted_fields():
    c = _config()
    assert config_fields.get_field(c, "train.lr") == 0.1
    assert config_fields.get_field(c, "train") == {"lr": 0.1, "seed": 0}  # a group as a dict
    config_fields.set_field(c, "train.seed", 3)
    config_fields.apply_overrides(c, {"name": "y", "train.lr": 0.5})
    assert (c.train.seed, c.name, c.train.lr) == (3, "y", 0.5)
    with pytest.raises(KeyError, match="train has no field 'lr2'; known: lr, seed"):
        config_fields.get_field(c, "train.lr2")
    with pytest.raises(KeyError, match="no group 'trian'"):
        config_fields.set_field(c, "trian.lr", 1.0)
    with pytest.raises(KeyError, match="unknown config field 'train.nope'"):
        config_fields.set_field(c, "train.nope", 1.0)


def test_config_diff_lists_changed_added_and_removed_fields():
    old = {"train": {"lr": 0.1, "seed": 0}, "name": "x"}
    new = {"train": {"lr": 0.2, "seed": 0}, "eval": {"bs": 4}}
    diff = config_fields.config_diff(old, new)
    assert diff == [("eval.bs", None, 4), ("name", "x", None), ("train.lr", 0.1, 0.2)]
    assert config_fields.format_diff(diff)[2] == "train.lr: 0.1 -> 0.2"
    assert config_fields.config_diff(old, old) == []


def test_presets_are_field_dicts_on_a_locked_config():
    c = unet.get_config("demo")
    # the default demo preset, then the U-Net's own fields for it (its learning rate wins)
    assert c.train.num_steps == 400 and c.model.base_features == 16
    assert c.train.learning_rate == 1e-3 and c.name == "unet-demo"
    assert transunet.get_config("demo").train.learning_rate == 3e-4
    smoke = unet.get_config("smoke")
    assert smoke.train.num_steps == default.SMOKE_STEPS and smoke.data.image_size == 32
    assert smoke.model.depth == 2 and smoke.name == "unet-smoke"
    with pytest.raises(AttributeError):
        c.train.learning_rat = 1.0  # locked: a misspelt field is an error, not a new field
    with pytest.raises(ValueError, match="unknown preset 'papr'"):
        unet.get_config("papr")


def test_cpu_best_is_the_cpu_budget_plus_the_segmentation_options():
    """`cpu_best` trains on the `cpu` preset's budget (same steps, batch, size, schedule,
    network): it differs from it only in the segmentation options, the generalisation
    recipe's choice (deep supervision, nnU-Net's 2D intensity augmentation probabilities) and
    the post-processing chosen for the lesion-wise score (issue 47)."""
    diff = config_fields.config_diff(
        unet.get_config("cpu").to_dict(), unet.get_config("cpu_best").to_dict()
    )
    assert diff == [
        ("augment.blur_p", 0.0, 0.2),
        ("augment.brightness_p", 0.0, 0.15),
        ("augment.contrast_p", 0.0, 0.15),
        ("augment.gamma_inverted_p", 0.0, 0.1),
        ("augment.gamma_p", 0.0, 0.3),
        ("augment.lowres_p", 0.0, 0.25),
        ("augment.noise_p", 0.0, 0.1),
        ("data.context_slices", 0, 1),
        ("model.deep_supervision", False, True),
        ("model.output", "classes", "regions"),
        ("name", "unet-cpu", "unet-cpu_best"),
        ("postprocess.connectivity", 26, 6),
        ("postprocess.et_min_mm3", 0.0, 200.0),
        ("postprocess.et_min_voxels", 0, 50),
        ("postprocess.min_component_voxels", 0, 5000),
        ("postprocess.tc_min_mm3", 0.0, 200.0),
    ]


def test_cpu_best_inference_is_the_recorded_choice_of_the_41_case_experiment():
    """cpu_best's TTA and post-processing are the fields the declared rule chose, as written
    by `segmentation_ablation final` into experiments/results/ (bug caught: the preset edited
    by hand away from the recorded choice, or the record replaced without the preset)."""
    record = json.loads(
        (REPO / "experiments" / "results" / "lesionwise_41_cases_final_choice.json").read_text()
    )
    assert record["row"] == {"variant": "cpu_best", "tta": "none", "pp": "tuned_lesionwise"}
    config = unet.get_config("cpu_best")
    for field, value in record["fields"].items():
        section, name = field.split(".")
        assert config[section][name] == value, field
