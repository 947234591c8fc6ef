"""Test setup: JAX on the CPU, tiny shapes, real-sample fixtures that skip when absent."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The XLA:CPU flags `python -m brats_jax.main` sets, so that in-process runs and the CLI runs
# of the tests compute bit-identical numbers (and convolutions are fast).
from brats_jax.ops.flags import set_cpu_xla_flags  # noqa: E402

set_cpu_xla_flags()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "brats_sample"


@pytest.fixture(scope="session")
def brats_sample() -> pathlib.Path:
    """Path of the real BraTS sample (../shared/data/brats_sample); skips when absent."""
    if not (SAMPLE / "nifti").is_dir():
        pytest.skip(f"real BraTS sample not found at {SAMPLE}")
    return SAMPLE
