"""PyTorch twin of brats_jax's default U-Net and of its Adam + cross-entropy train step.

Same architecture as ``brats_jax.models.create_model("unet")`` with default widths: 4 input
channels, 4 classes, encoder widths 64-128-256-512-1024, two 3x3 convs + ReLU per level with
reflection padding, 2x2 max-pool, 2x2 stride-2 transposed conv, concatenated skip (skip first),
1x1 head, no normalisation, biases on: 31,032,516 parameters.

torch is an optional extra (``pip install brats_jax[torch]``); the library never imports this.
Inputs are channels-last like the JAX side: image (B, H, W, 4) float32, labels (B, H, W) int64;
the twin permutes to NCHW internally (the permute is part of the timed step on purpose: it is
what a user feeding NHWC slices would pay; it is negligible next to the convolutions).
"""

from __future__ import annotations

import torch
from torch import nn

UNET_PARAMS = 31_032_516
"""Parameter count of the default U-Net (4 in, 4 classes, 64..1024, biases, no norm)."""


class DoubleConv(nn.Sequential):
    """Two 3x3 convs (reflection padding 1) each followed by ReLU; (B,Cin,H,W) -> (B,Cout,H,W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect"),
            nn.ReLU(inplace=True),
        )


class TorchUNet(nn.Module):
    """U-Net (Ronneberger 2015) with reflection padding; NCHW float32 in, NCHW logits out."""

    def __init__(
        self, in_channels: int = 4, num_classes: int = 4, base_features: int = 64, depth: int = 4
    ):
        super().__init__()
        f = [base_features * 2**i for i in range(depth + 1)]  # depth poolings, as brats_jax
        self.down = nn.ModuleList()
        cin = in_channels
        for c in f:
            self.down.append(DoubleConv(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for c in reversed(f[:-1]):
            self.ups.append(nn.ConvTranspose2d(c * 2, c, 2, stride=2))
            self.up_convs.append(DoubleConv(c * 2, c))
        self.head = nn.Conv2d(f[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, H, W) float32, H and W divisible by 2**depth -> logits (B, classes, H, W)."""
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            x = up(x)
            x = conv(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)


def num_params(model: nn.Module) -> int:
    """Total number of trainable parameters (int)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_train_step(
    model: nn.Module,
    lr: float = 1e-4,
    channels_last: bool = False,
    compile_mode: str | None = None,
):
    """Returns ``step(image (B,H,W,C) float32, labels (B,H,W) int64) -> loss float`` doing one
    Adam + mean cross-entropy update of ``model`` in place (like the JAX trainer's step).
    ``compile_mode`` (e.g. "default", "max-autotune"): run the forward (and, through
    AOTAutograd, the backward) as ``torch.compile(model, mode=compile_mode)`` (inductor);
    ``benchmarks/torch_bench.py`` times both variants with bf16 autocast."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    mf = torch.channels_last if channels_last else torch.contiguous_format
    fwd = model if compile_mode is None else torch.compile(model, mode=compile_mode)

    def step(image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).contiguous(memory_format=mf)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(fwd(x), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


if __name__ == "__main__":
    m = TorchUNet()
    n = num_params(m)
    assert n == UNET_PARAMS, n
    print(n)
