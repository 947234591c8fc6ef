"""TransUNet (Chen et al. 2021): R50-ViT-B/16 hybrid encoder + cascaded upsampler (CUP).

Follows the official PyTorch code (Beckschen/TransUNet, ``vit_seg_modeling*.py``):

* ResNet-50 v2 hybrid root and stages: 7x7/2 StdConv (no bias) + GroupNorm(32, eps 1e-6) +
  ReLU, 3x3/2 max-pool without padding, stages of (3, 4, 9) bottleneck units (widths 256, 512,
  1024; strides 1, 2, 2; stride on the 3x3 conv). Units are conv1 1x1 -> gn1 -> ReLU ->
  conv2 3x3 -> gn2 -> ReLU -> conv3 1x1 -> gn3, plus a shortcut (1x1 StdConv ``conv_proj`` +
  per-channel GroupNorm ``gn_proj`` with PyTorch's eps 1e-5 in the first unit of a stage),
  ReLU after the sum. All convs are weight-standardised (``(w-mean)/sqrt(var+1e-5)``).
  Stage outputs that come out one or two pixels short (e.g. 59 at 240 input) are zero-padded at
  the bottom/right back to H/4 and H/8 before they are used as skips, as the official code does.
* 1x1 patch embedding (``embedding``, with bias) on the H/16 grid, learned position embedding
  ``Transformer/posembed_input/pos_embedding`` of shape (1, (H/16)*(W/16), hidden) (the grid
  follows the input size given at init), dropout 0.1, 12 pre-LN blocks (LayerNorm eps 1e-6,
  multi-head attention with q/k/v/out biases, MLP with exact (erf) GELU and dropout 0.1),
  final ``encoder_norm``.
* CUP decoder: 3x3 conv hidden -> 512 + BN + ReLU (``conv_more``), then 4 blocks of
  [bilinear x2 (align_corners=True), concat skip, 2x (3x3 conv without bias + BN + ReLU)] with
  output channels (256, 128, 64, 16) and skips (stage 2, stage 1, root) for ``n_skip = 3``;
  ``segmentation_head`` 3x3 conv (with bias) to ``num_classes``.

Module names follow Google's R50+ViT-B_16 checkpoint (see ``pretrained.load_pretrained``):
``conv_root``, ``gn_root``, ``block{b}/unit{u}/{conv1,gn1,...,conv_proj,gn_proj}``,
``embedding``, ``Transformer/{posembed_input,encoderblock_{i},encoder_norm}`` with
``encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_1/{query,key,value,out},
LayerNorm_2,MlpBlock_3/{Dense_0,Dense_1}}``; the decoder lives under ``decoder`` and
``segmentation_head``. With ``scan=True`` (default) the identical layers are one ``nn.scan``
each, which cuts compile time: ``Transformer/encoderblock`` holds the 12 blocks' parameters
stacked on a leading axis, ``block{b}/repeated_units`` the stacked units 2..N of stage b
(``unit1``, with its shortcut projection and stride, stays). :func:`upgrade_params` turns a
per-block tree (``scan=False``, checkpoints written before the scan) into the stacked one,
:func:`per_block_params` back.

With 4 input channels, 4 classes and 240x240 input the default model has 105,301,764
parameters (the official code's count; BatchNorm statistics are in ``batch_stats``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

from brats_jax.models.layers import Conv2D, StdConv, he_normal, upsample2x_bilinear
from brats_jax.ops.impls import IMPLS

lecun = nn.initializers.lecun_normal()
PATCH = 16
"""Total down-sampling of the hybrid encoder: tokens live on the (H/16, W/16) grid."""
ENCODER_BLOCKS = "encoderblock"
"""Name of the scanned transformer blocks (parameters stacked: index i = encoderblock_{i})."""
REPEATED_UNITS = "repeated_units"
"""Name of a stage's scanned units 2..N (parameters stacked: index i = unit{i+2})."""


@dataclasses.dataclass(frozen=True)
class TransUNetConfig:
    """Architecture hyper-parameters of TransUNet (see ``PRESETS``)."""

    resnet_units: tuple[int, int, int] = (3, 4, 9)
    resnet_width: int = 64
    gn_groups: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    head_channels: int = 512
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 16)
    n_skip: int = 3


PRESETS: dict[str, TransUNetConfig] = {
    # The study's / the paper's network (R50-ViT-B/16), 105.3 M parameters at 240.
    "r50_vit_b16": TransUNetConfig(),
    # A CPU-trainable network of the same shape: lighter ResNet, ViT-S-like transformer.
    "small": TransUNetConfig(
        resnet_units=(2, 2, 2),
        resnet_width=32,
        gn_groups=16,
        hidden_size=384,
        num_layers=4,
        num_heads=6,
        mlp_dim=1536,
        head_channels=256,
        decoder_channels=(128, 64, 32, 16),
    ),
    # For tests: one unit per stage, 2 transformer layers of width 32.
    "tiny": TransUNetConfig(
        resnet_units=(1, 1, 1),
        resnet_width=8,
        gn_groups=4,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        head_channels=32,
        decoder_channels=(16, 16, 8, 8),
    ),
}


class Bottleneck(nn.Module):
    """ResNet v2 bottleneck unit of the official TransUNet (post-activation in practice).

    (B,H,W,Cin) -> (B,ceil(H/stride),..,cout); cmid = cout // 4.
    """

    cout: int
    stride: int = 1
    gn_groups: int = 32
    dtype: Any = None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cmid = self.cout // 4
        conv = functools.partial(StdConv, dtype=self.dtype, impl=self.conv_impl)
        gn = lambda name: nn.GroupNorm(
            num_groups=self.gn_groups, epsilon=1e-6, dtype=self.dtype, name=name
        )
        residual = x
        if self.stride != 1 or x.shape[-1] != self.cout:
            residual = conv(self.cout, 1, strides=self.stride, name="conv_proj")(x)
            # The official code uses nn.GroupNorm(cout, cout): one group per channel, eps 1e-5.
            residual = nn.GroupNorm(
                num_groups=self.cout, epsilon=1e-5, dtype=self.dtype, name="gn_proj"
            )(residual)
        y = nn.relu(gn("gn1")(conv(cmid, 1, name="conv1")(x)))
        y = conv(cmid, 3, strides=self.stride, pad=1, name="conv2")(y)
        y = nn.relu(gn("gn2")(y))
        y = gn("gn3")(conv(self.cout, 1, name="conv3")(y))
        return nn.relu(residual + y)


def _scan_layers(module: nn.Module, x: jax.Array, length: int, *args) -> jax.Array:
    """Apply ``length`` copies of ``module`` (same fields, own parameters) in sequence as one
    ``nn.scan``: ``x -> module(module(...module(x, *args)..., *args), *args)``.

    Every parameter of ``module`` gets a leading axis of size ``length`` (copy i at index i);
    ``params`` and ``dropout`` RNGs are split per copy; ``args`` (e.g. ``train``) are
    broadcast. ``module`` must map x to an array of x's shape and dtype.
    """
    scanned = nn.scan(
        lambda mdl, carry, *a: (mdl(carry, *a), None),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=length,
    )
    return scanned(module, x, *args)[0]


class ResNetStage(nn.Module):
    """``units`` bottlenecks; the first one (``unit1``) has stride ``stride`` and the shortcut
    projection. With ``scan`` the identical units 2..N are one ``nn.scan`` named
    ``repeated_units`` (parameters stacked: index i = unit i+2), else ``unit2``..``unitN``."""

    units: int
    cout: int
    stride: int
    gn_groups: int
    dtype: Any = None
    scan: bool = True
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        unit = functools.partial(
            Bottleneck, gn_groups=self.gn_groups, dtype=self.dtype, conv_impl=self.conv_impl
        )
        x = unit(self.cout, self.stride, name="unit1")(x)
        if self.scan and self.units > 1:
            return _scan_layers(unit(self.cout, 1, name=REPEATED_UNITS), x, self.units - 1)
        for u in range(2, self.units + 1):
            x = unit(self.cout, 1, name=f"unit{u}")(x)
        return x


class PositionEmbedding(nn.Module):
    """Adds the learned ``pos_embedding`` (1, N, D) to tokens (B, N, D)."""

    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pe = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1, x.shape[1], x.shape[2]),
            jnp.float32,
        )
        return x + pe.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with the checkpoint's layout: query/key/value kernels
    (D, heads, D/heads) with biases (heads, D/heads); out kernel (heads, D/heads, D).
    (B,N,D) -> (B,N,D); softmax in float32."""

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d = x.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_heads {self.num_heads}")
        hd = d // self.num_heads
        dense = lambda name: nn.DenseGeneral(
            (self.num_heads, hd),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name=name,
        )
        q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(q.dtype)
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        if self.dropout_rate > 0:
            w = nn.Dropout(self.dropout_rate)(w, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(
            d,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(y)


class MlpBlock(nn.Module):
    """Dense_0 -> exact GELU -> dropout -> Dense_1 -> dropout: (B,N,D) -> (B,N,D)."""

    mlp_dim: int
    dropout_rate: float = 0.1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dense = lambda f, name: nn.Dense(
            f,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(1e-6),
            name=name,
        )
        y = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=False)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = dense(x.shape[-1], "Dense_1")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
        y = Attention(
            self.num_heads,
            self.attention_dropout_rate,
            self.dtype,
            name="MultiHeadDotProductAttention_1",
        )(y, train)
        # Official TransUNet: proj_dropout uses attention_dropout_rate (0.0).
        x = x + y
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
        return x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="MlpBlock_3")(
            y, train
        )


class Encoder(nn.Module):
    """Position embedding + dropout + blocks + final LayerNorm: (B,N,D) -> (B,N,D).

    With ``scan`` the blocks are one ``nn.scan`` named ``encoderblock`` (parameters stacked
    along a leading layer axis, as big_vision's scanned ViT), else ``encoderblock_{i}``.
    """

    cfg: TransUNetConfig
    dtype: Any = None
    scan: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = self.cfg
        x = PositionEmbedding(self.dtype, name="posembed_input")(x)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=not train)
        block = lambda name: EncoderBlock(
            c.num_heads,
            c.mlp_dim,
            c.dropout_rate,
            c.attention_dropout_rate,
            self.dtype,
            name=name,
        )
        if self.scan:
            x = _scan_layers(block(ENCODER_BLOCKS), x, c.num_layers, train)
        else:
            for i in range(c.num_layers):
                x = block(f"encoderblock_{i}")(x, train)
        return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias, zero padding 1) + BatchNorm + ReLU: (B,H,W,Cin) -> (B,H,W,features)."""

    features: int
    dtype: Any = None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv2D(
            self.features,
            3,
            padding="zero",
            use_bias=False,
            impl=self.conv_impl,
            kernel_init=he_normal,
            dtype=self.dtype,
            name="conv",
        )(x)
        # Flax momentum 0.9 == PyTorch momentum 0.1; eps 1e-5 as PyTorch's BatchNorm2d.
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
        )(x)
        return nn.relu(x)


class DecoderBlock(nn.Module):
    """Bilinear x2 (align_corners=True), concat skip (if any), 2x ConvBNReLU."""

    features: int
    dtype: Any = None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool) -> jax.Array:
        x = upsample2x_bilinear(x)
        if skip is not None:
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        x = ConvBNReLU(self.features, self.dtype, self.conv_impl, name="conv1")(x, train)
        return ConvBNReLU(self.features, self.dtype, self.conv_impl, name="conv2")(x, train)


class DecoderCup(nn.Module):
    """Cascaded upsampler (CUP).

    (B,H/16,W/16,D) + skips [H/8, H/4, H/2] -> (B,H,W,decoder_channels[-1]).
    """

    cfg: TransUNetConfig
    dtype: Any = None
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, skips: list[jax.Array], train: bool) -> jax.Array:
        impl = self.conv_impl
        x = ConvBNReLU(self.cfg.head_channels, self.dtype, impl, name="conv_more")(x, train)
        for i, ch in enumerate(self.cfg.decoder_channels):
            skip = skips[i] if i < self.cfg.n_skip else None
            x = DecoderBlock(ch, self.dtype, impl, name=f"block_{i}")(x, skip, train)
        return x


def _pad_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Zero-pad (B,h,w,C) at the bottom/right to (B,size,size',C) like the official code."""
    ph, pw = size[0] - x.shape[1], size[1] - x.shape[2]
    if ph == 0 and pw == 0:
        return x
    if not (0 <= ph < 3 and 0 <= pw < 3):
        raise AssertionError(f"feature {x.shape} cannot be padded to {size}")
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))


class TransUNet(nn.Module):
    """TransUNet. ``__call__(x (B,H,W,Cin) float32, train) -> logits (B,H,W,num_classes) float32``.

    ``preset`` selects a :data:`PRESETS` entry ("r50_vit_b16" = the study's network, "small",
    "tiny"); any architecture field left ``None`` takes the preset's value. ``dtype`` is the
    compute dtype (e.g. jnp.bfloat16; parameters stay float32). H and W must be multiples of 16;
    the position embedding is created for the (H/16, W/16) grid of the input given at init.
    ``conv_impl`` (default "xla"): the convolutions' implementation
    (:mod:`brats_jax.ops.impls`; "gemm" = im2col GEMMs, for K stacked runs under vmap).
    ``scan`` (default True): transformer blocks and repeated ResNet units as ``nn.scan``
    (stacked parameters, see the module docstring); False gives the per-block layout. Both
    compute the same function (to float32 rounding) on the same weights.
    """

    num_classes: int = 4
    preset: str = "r50_vit_b16"
    resnet_units: tuple[int, int, int] | None = None
    resnet_width: int | None = None
    gn_groups: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    dropout_rate: float | None = None
    attention_dropout_rate: float | None = None
    head_channels: int | None = None
    decoder_channels: tuple[int, int, int, int] | None = None
    n_skip: int | None = None
    dtype: Any = None
    scan: bool = True
    conv_impl: str = "xla"

    @property
    def config(self) -> TransUNetConfig:
        """The preset with this module's non-None overrides applied."""
        if self.preset not in PRESETS:
            raise ValueError(f"TransUNet preset={self.preset!r}; expected one of {sorted(PRESETS)}")
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(TransUNetConfig)
            if getattr(self, f.name) is not None
        }
        for k in ("resnet_units", "decoder_channels"):
            if k in overrides:
                overrides[k] = tuple(overrides[k])
        cfg = dataclasses.replace(PRESETS[self.preset], **overrides)
        if len(cfg.resnet_units) != 3 or len(cfg.decoder_channels) != 4:
            raise ValueError(f"TransUNet needs 3 resnet stages and 4 decoder channels; got {cfg}")
        if not 0 <= cfg.n_skip <= 3:
            raise ValueError(f"TransUNet n_skip={cfg.n_skip}; expected 0..3")
        return cfg

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"TransUNet input must be (B,H,W,C); got shape {x.shape}")
        _, h, w, _ = x.shape
        if h % PATCH or w % PATCH:
            raise ValueError(
                f"TransUNet input size {h}x{w} is not a multiple of {PATCH} (the hybrid encoder "
                f"works on the H/16 x W/16 grid); resize or pad the input to e.g. "
                f"{-(-h // PATCH) * PATCH}x{-(-w // PATCH) * PATCH}"
            )
        dt = self.dtype
        if dt is not None:
            x = x.astype(dt)
        width = cfg.resnet_width
        # ResNet v2 root.
        impl = self.conv_impl
        if impl not in IMPLS:
            raise ValueError(f"TransUNet conv_impl={impl!r}; expected one of {IMPLS}")
        y = StdConv(width, 7, strides=2, pad=3, dtype=dt, impl=impl, name="conv_root")(x)
        y = nn.relu(
            nn.GroupNorm(num_groups=cfg.gn_groups, epsilon=1e-6, dtype=dt, name="gn_root")(y)
        )
        features = [y]  # H/2, width
        # window_shape by keyword, as the ONNX export's max_pool takes it (ops/pool.py)
        y = nn.max_pool(y, window_shape=(3, 3), strides=(2, 2), padding="VALID")
        for b in range(3):
            y = ResNetStage(
                cfg.resnet_units[b],
                width * 4 * 2**b,
                1 if b == 0 else 2,
                cfg.gn_groups,
                dt,
                self.scan,
                impl,
                name=f"block{b + 1}",
            )(y)
            if b < 2:  # H/4 (block1), H/8 (block2), zero-padded like the official code
                features.append(_pad_to(y, (h // (4 * 2**b), w // (4 * 2**b))))
        gh, gw = h // PATCH, w // PATCH
        if y.shape[1:3] != (gh, gw):
            raise AssertionError(f"ResNet output {y.shape} is not on the {gh}x{gw} grid")
        y = Conv2D(
            cfg.hidden_size, 1, padding="valid", impl=impl, kernel_init=lecun, dtype=dt,
            name="embedding",
        )(y)  # fmt: skip
        b_ = y.shape[0]
        tokens = y.reshape(b_, gh * gw, cfg.hidden_size)
        tokens = Encoder(cfg, dt, self.scan, name="Transformer")(tokens, train)
        y = tokens.reshape(b_, gh, gw, cfg.hidden_size)
        y = DecoderCup(cfg, dt, impl, name="decoder")(y, features[::-1], train)
        logits = Conv2D(
            self.num_classes, 3, padding="zero", impl=impl, kernel_init=lecun, dtype=dt,
            name="segmentation_head",
        )(y)  # fmt: skip
        return logits.astype(jnp.float32)


# ------------------------------------------------------ per-block <-> stacked parameter layouts

_PER_BLOCK = {
    # stacked name: (regex of a per-block name, index of the first copy)
    ENCODER_BLOCKS: (re.compile(r"encoderblock_(\d+)"), 0),
    REPEATED_UNITS: (re.compile(r"unit(\d+)"), 2),
}


def _stack(trees: list) -> Any:
    """Stack equal-structured trees along a new leading axis (numpy stays numpy)."""
    both = lambda *xs: np.stack(xs) if all(isinstance(v, np.ndarray) for v in xs) else jnp.stack(xs)
    return jax.tree.map(both, *trees)


def _stack_mapping(node: Mapping) -> dict:
    """One dict level: per-block children (``encoderblock_{i}``, ``unit{u}`` u >= 2) -> one
    stacked child; everything else recursed into with :func:`upgrade_params`."""
    out = {k: upgrade_params(v) for k, v in node.items()}
    for stacked, (pattern, first) in _PER_BLOCK.items():
        found = {}
        for k in out:
            m = pattern.fullmatch(str(k))
            if m and int(m.group(1)) >= first:
                found[int(m.group(1))] = k
        if not found:
            continue
        if stacked in out:
            raise ValueError(f"upgrade_params: both {stacked!r} and {sorted(found.values())}")
        idx = sorted(found)
        if idx != list(range(first, first + len(idx))):
            raise ValueError(f"upgrade_params: {sorted(found.values())} are not consecutive")
        out[stacked] = _stack([out.pop(found[i]) for i in idx])
    return out


def _map_dicts(fn, tree: Any) -> Any:
    """``fn`` applied to every outermost Mapping inside the pytree ``tree`` (a FrozenDict
    result is returned as FrozenDict); the structure around them is kept."""
    wrap = lambda x: FrozenDict(fn(x)) if isinstance(x, FrozenDict) else fn(x)
    is_map = lambda x: isinstance(x, Mapping)
    return jax.tree.map(lambda x: wrap(x) if is_map(x) else x, tree, is_leaf=is_map)


def upgrade_params(tree: Any) -> Any:
    """Per-block (unscanned, ``scan=False``) TransUNet parameters -> the stacked layout of the
    default ``scan=True`` model; the identity on trees that are already stacked.

    Works on any pytree that contains parameter dicts at any depth (``params``, a full
    ``variables`` dict, Adam's ``mu``/``nu`` inside an optax state, a restored checkpoint):
    in every dict, children ``encoderblock_0..encoderblock_{L-1}`` become one child
    ``encoderblock`` whose arrays have a leading axis L (index i = block i), and children
    ``unit2..unitN`` become ``repeated_units`` (index i = unit i+2); ``unit1`` stays. Arrays
    keep their dtype (numpy arrays stay numpy). Pure: the input is not modified.
    """
    return _map_dicts(_stack_mapping, tree)


def _unstack_mapping(node: Mapping) -> dict:
    out = {}
    for k, v in node.items():
        v = per_block_params(v)
        if k not in _PER_BLOCK:
            out[k] = v
            continue
        first = _PER_BLOCK[k][1]
        name = "encoderblock_{}" if k == ENCODER_BLOCKS else "unit{}"
        for i in range(jax.tree.leaves(v)[0].shape[0]):
            out[name.format(first + i)] = jax.tree.map(lambda a, i=i: a[i], v)
    return out


def per_block_params(tree: Any) -> Any:
    """Inverse of :func:`upgrade_params`: stacked ``encoderblock`` / ``repeated_units``
    children -> ``encoderblock_{i}`` / ``unit{i+2}`` (the ``scan=False`` layout and the key
    names of Google's checkpoint). The identity on per-block trees. Pure."""
    return _map_dicts(_unstack_mapping, tree)


def is_stacked(tree: Any) -> bool:
    """Whether any dict in ``tree`` has a stacked ``encoderblock`` / ``repeated_units`` child."""
    found = []
    _map_dicts(
        lambda d: found.append(any(k in _PER_BLOCK or is_stacked(v) for k, v in d.items())) or d,
        tree,
    )
    return any(found)
