"""brats_jax: brain-tumour segmentation on BraTS in JAX/Flax."""

__version__ = "0.1.0"

NUM_CLASSES = 4
"""Training classes: 0 background, 1 NCR/NET, 2 ED, 3 ET (ET is 4 in BraTS 2018-2021 files)."""

MODALITIES = ("flair", "t1", "t1ce", "t2")
"""Channel order of every image array in the library (the Kaggle release's order)."""
