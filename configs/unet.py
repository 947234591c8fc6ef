"""The study's U-Net (31,032,516 parameters at the defaults).

Presets: `configs/unet.py:paper` (LR 1e-4, the study's baseline), `:demo`, `:tiny`, `:cpu`,
`:cpu_best` (`:cpu` with the options chosen by cross-validation on the real cases: 2.5D
input, region outputs, deep supervision, intensity augmentation, the post-processing tuned
for the lesion-wise score; EXPERIMENTS.md), `:cpu_recipe` (`:cpu_best` with nnU-Net's
native-resolution patches: the combination of nnU-Net's parts in EXPERIMENTS.md,
"Generalisation recipe"), `:smoke`.
"""

import ml_collections

from configs import default

# The U-Net's own fields per preset, on top of `default.PRESET_FIELDS`.
MODEL_FIELDS = {
    "demo": {"model.base_features": 16, "train.learning_rate": 1e-3},
    "cpu": {"model.base_features": 16},
    "cpu_best": {"model.base_features": 16},
    "cpu_recipe": {"model.base_features": 16},
    "tiny": {"model.base_features": 4, "model.depth": 2},
    "smoke": {"model.base_features": 4, "model.depth": 2},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """U-Net config; `arg` is a preset name ("", "paper", "demo", "cpu", "cpu_best",
    "cpu_recipe", "tiny", "smoke")."""
    c = default.base_config()
    c.model.name = "unet"
    c.train.learning_rate = 1e-4
    return default.with_preset(c, arg or "", MODEL_FIELDS)
