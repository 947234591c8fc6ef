"""brats_jax: brain-tumour segmentation on BraTS in JAX/Flax."""

__version__ = "0.1.0"

from brats_jax.labels import NUM_CLASSES  # noqa: E402, F401  (the label vocabulary: labels.py)

MODALITIES = ("flair", "t1", "t1ce", "t2")
"""Channel order of every image array in the library (the Kaggle release's order)."""
