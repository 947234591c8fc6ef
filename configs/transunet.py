"""TransUNet, R50-ViT-B/16 (105,301,764 parameters at 240x240, 4 channels, 4 classes).

Presets: `configs/transunet.py:paper` (LR 1e-5, the study's best cell), `:demo`, `:tiny`,
`:smoke`.
"""

import ml_collections

from configs import default

# TransUNet's own fields per preset, on top of `default.PRESET_FIELDS`.
MODEL_FIELDS = {
    "demo": {"model.preset": "small", "train.learning_rate": 3e-4},
    "tiny": {"model.preset": "tiny"},
    "smoke": {"model.preset": "tiny"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """TransUNet config; `arg` is a preset name ("", "paper", "demo", "tiny", "smoke")."""
    c = default.base_config()
    c.model.name = "transunet"
    c.model.preset = "r50_vit_b16"
    c.train.learning_rate = 1e-5
    return default.with_preset(c, arg or "", MODEL_FIELDS)
