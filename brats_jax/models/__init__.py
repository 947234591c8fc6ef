"""Segmentation networks: the study's U-Net and TransUNet (R50-ViT-B/16), plus the loader of
Google's ImageNet-21k R50+ViT-B_16 checkpoint.

``create_model("unet" | "transunet", **kwargs)`` builds a flax.linen module; call it as
``variables = model.init({"params": k, "dropout": k2}, x, train=False)`` and
``model.apply(variables, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"])`` with
x (B,H,W,C) float32; logits are (B,H,W,num_classes) float32 (a U-Net with
``deep_supervision`` returns, with ``train=True``, a tuple of them at decreasing resolution).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from brats_jax.models import outputs
from brats_jax.models.pretrained import LoadReport, load_pretrained
from brats_jax.models.transunet import (
    PRESETS,
    TransUNet,
    TransUNetConfig,
    per_block_params,
    upgrade_params,
)
from brats_jax.models.unet import UNet

MODELS = {"unet": UNet, "transunet": TransUNet}

__all__ = [
    "MODELS",
    "PRESETS",
    "LoadReport",
    "TransUNet",
    "TransUNetConfig",
    "UNet",
    "create_model",
    "from_config",
    "load_pretrained",
    "per_block_params",
    "upgrade_params",
]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name ("unet" | "transunet"); kwargs are the module's fields.

    ``create_model("unet")`` and ``create_model("transunet")`` are the study's networks for 4
    input channels and 4 classes; TransUNet takes ``preset`` ("r50_vit_b16", "small", "tiny")
    plus per-field overrides. Sequence-valued fields given as lists are converted to tuples.
    """
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; expected one of {sorted(MODELS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return MODELS[key](**kwargs)
    except TypeError as e:
        raise ValueError(f"create_model({name!r}): bad arguments {sorted(kwargs)}: {e}") from e


def from_config(model_config, *, ops: str = "auto") -> nn.Module:
    """The network of a config's `model` section (`configs/default.py`), with 4 class or 3
    region output channels (`model.output`, `brats_jax.models.outputs`).

    ``model_config``: fields name, dtype, base_features, depth, norm, padding, activation,
    deep_supervision (U-Net), preset, n_skip (TransUNet; deep_supervision must be off).
    ``ops``: the U-Net's ops implementation (``runtime.ops``, best resolved once by
    :func:`brats_jax.runtime.resolve_ops`); "gemm" also makes TransUNet's convolutions im2col
    GEMMs (grouped runs).
    """
    m = model_config
    fields = {
        "unet": lambda: dict(
            features=m.base_features,
            depth=m.depth,
            norm=m.norm,
            padding=m.padding,
            activation=m.activation,
            deep_supervision=m.deep_supervision,
            conv_impl=ops,
        ),
        # TransUNet's convolutions: plain XLA, or im2col GEMMs for grouped runs
        "transunet": lambda: dict(
            preset=m.preset, n_skip=m.n_skip, conv_impl="gemm" if ops == "gemm" else "xla"
        ),
    }
    if m.name not in fields:
        raise ValueError(f"unknown model.name {m.name!r}; expected 'unet' or 'transunet'")
    if m.name == "transunet" and m.deep_supervision:
        raise ValueError("model.deep_supervision=True is for the U-Net; TransUNet has none")
    return create_model(
        m.name,
        num_classes=outputs.num_channels(outputs.of_config(m)),  # 4 classes or 3 regions
        dtype=jnp.dtype(m.dtype),
        **fields[m.name](),
    )
