"""TransUNet, R50-ViT-B/16 (105,301,764 parameters at 240x240, 4 channels, 4 classes).

Presets: `configs/transunet.py:paper` (LR 1e-5, the study's best cell), `:demo`, `:tiny`.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """TransUNet config; `arg` is a preset name ("", "paper", "demo", "tiny")."""
    c = default.base_config()
    c.model.name = "transunet"
    c.model.preset = "r50_vit_b16"
    c.train.learning_rate = 1e-5
    preset = arg or ""
    default.apply_preset(c, preset)
    if preset == "demo":
        c.model.preset = "small"
        c.train.learning_rate = 3e-4
    elif preset == "tiny":
        c.model.preset = "tiny"
    return c
