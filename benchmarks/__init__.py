"""Benchmarks: PyTorch twin of the default U-Net and side-by-side timing scripts (torch extra)."""
