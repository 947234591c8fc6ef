"""Time the PyTorch U-Net twin's train step: eager and ``torch.compile`` (issue 20's anchor).

Both variants use channels_last activations and weights, bf16 autocast (float32 weights and
loss), cuDNN benchmark mode, TF32 and Adam (fused on CUDA), the step of
:mod:`benchmarks.torch_unet` (Adam + mean cross-entropy at 240x240). ``compile`` wraps the
model in ``torch.compile(mode=--compile-mode)`` (inductor; "max-autotune" autotunes GEMM and
convolution kernels and uses CUDA graphs); its first step's seconds are reported as
``compile_s``. One JSON line per (variant, batch) with median step seconds, analytic FLOPs
(3x the forward convolutions) and MFU against ``--peak``.

Prints ``{"bench": "torch_train", "skipped": ...}`` and exits 0 when torch is missing, or
when CUDA is unavailable without ``--smoke``. ``--smoke`` runs a 32 px, width-8 twin for 2
steps on whatever device there is (the CPU here): it checks the script, not the speed.

    python -m benchmarks.torch_bench --variants=eager,compile --batches=1,16 --peak=989
    python -m benchmarks.torch_bench --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

VARIANTS = ("eager", "compile")


def unet_flops(batch: int, size: int, base: int = 64, cin: int = 4, classes: int = 4) -> int:
    """Train-step FLOPs of the U-Net twin: 3x the forward convolutions' multiply-adds x 2
    (forward + input gradient + weight gradient); pools, ReLUs and the loss are not counted."""
    f = [base * 2**i for i in range(5)]
    flops, c_in = 0, cin
    for i, c in enumerate(f):
        s = (size >> i) ** 2
        flops += 2 * s * 9 * (c_in * c + c * c)
        c_in = c
    for i in (3, 2, 1, 0):
        s, c = (size >> i) ** 2, f[i]
        flops += 2 * (s // 4) * 4 * (2 * c) * c + 2 * s * 9 * (2 * c * c + c * c)
    flops += 2 * size * size * f[0] * classes
    return 3 * flops * batch


def time_variant(variant: str, batch: int, size: int, steps: int, base: int, mode: str) -> dict:
    """Median seconds of ``steps`` train steps of one variant (after warm-up steps)."""
    import torch

    from benchmarks.torch_unet import TorchUNet

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cl = torch.channels_last
    model = TorchUNet(base_features=base).to(dev).to(memory_format=cl)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    fwd = torch.compile(model, mode=mode) if variant == "compile" else model
    x = torch.randn(batch, 4, size, size, device=dev).to(memory_format=cl)
    y = torch.randint(0, 4, (batch, size, size), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return {
        "bench": "torch_train", "model": "unet_torch", "variant": variant,
        "compile_mode": mode if variant == "compile" else None, "image_size": size,
        "batch_size": batch, "base_features": base, "dtype": "bfloat16-autocast",
        "channels_last": True, "compile_s": round(first_s, 3),
        "step_s_median": round(statistics.median(times), 5),
        "slices_per_s": round(batch / statistics.median(times), 2),
        "flops_per_step": unet_flops(batch, size, base), "device": dev,
        "torch": torch.__version__,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.torch_bench")
    p.add_argument("--variants", default="eager,compile", help=f"subset of {VARIANTS}")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--peak", type=float, default=None, help="dense bf16 peak TFLOP/s (for MFU)")
    p.add_argument("--gpu", default="", help="card name recorded in the rows")
    p.add_argument("--smoke", action="store_true", help="32 px, width 8, 2 steps, any device")
    a = p.parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(json.dumps({"bench": "torch_train", "skipped": f"torch unavailable: {e!r}"}))
        return
    if not a.smoke and not torch.cuda.is_available():
        print(json.dumps({"bench": "torch_train", "skipped": "CUDA unavailable (use --smoke)"}))
        return
    variants = a.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        raise SystemExit(f"error: --variants={a.variants!r}; expected a subset of {VARIANTS}")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    size, base, steps = (32, 8, 2) if a.smoke else (a.image_size, 64, a.steps)
    for v in variants:
        for bs in (int(b) for b in a.batches.split(",")):
            r = time_variant(v, bs, size, steps, base, a.compile_mode)
            tf = r["flops_per_step"] / r["step_s_median"] / 1e12
            r.update(tflops=round(tf, 3), gpu=a.gpu or None, peak_bf16_tflops=a.peak)
            r["mfu"] = round(tf / a.peak, 4) if a.peak else None
            print(json.dumps(r), flush=True)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
