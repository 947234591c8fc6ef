"""Test setup: JAX on the CPU, tiny shapes, real-sample fixtures that skip when absent."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The set-up every CLI runs first (`brats_jax.runtime.setup`: the fast XLA:CPU flags), so that
# in-process runs and the CLI runs of the tests compute bit-identical numbers.
from brats_jax import runtime  # noqa: E402

runtime.setup(quiet_logs=False)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "brats_sample"


@pytest.fixture(scope="session")
def brats_sample() -> pathlib.Path:
    """Path of the real BraTS sample (../shared/data/brats_sample); skips when absent."""
    if not (SAMPLE / "nifti").is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE}")
    return SAMPLE
