"""The study's U-Net (31,032,516 parameters at the defaults).

Presets: `configs/unet.py:paper` (LR 1e-4, the study's baseline), `:demo`, `:tiny`, `:cpu`.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """U-Net config; `arg` is a preset name ("", "paper", "demo", "tiny")."""
    c = default.base_config()
    c.model.name = "unet"
    c.train.learning_rate = 1e-4
    preset = arg or ""
    default.apply_preset(c, preset)
    if preset == "demo":
        c.model.base_features = 16
        c.train.learning_rate = 1e-3
    elif preset == "cpu":
        c.model.base_features = 16
    elif preset == "tiny":
        c.model.base_features = 4
        c.model.depth = 2
    return c
