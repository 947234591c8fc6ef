"""CLI: convert a NIfTI BraTS release into the slice cache read by NiftiCacheSource.

    python -m brats_jax.data.prepare --src=DIR --out=CACHE [--dtype=float32] [--workers=2]

Resumable (finished cases are skipped), atomic per case; see brats_jax.data.cache.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from brats_jax import runtime
from brats_jax.data.cache import NiftiCacheSource, prepare
from brats_jax.data.common import DataError

_SRC = flags.DEFINE_string("src", None, "NIfTI release folder (case folders inside).")
_OUT = flags.DEFINE_string("out", None, "Cache folder to create or complete.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored image dtype.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes converting cases in parallel.")


def main(argv):
    del argv
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if not _SRC.value or not _OUT.value:
        raise app.UsageError("both --src and --out are required")
    try:
        out = prepare(_SRC.value, _OUT.value, dtype=_DTYPE.value, workers=_WORKERS.value)
        src = NiftiCacheSource(out)
    except DataError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{src!r}: {len(src.case_ids)} cases, {len(src)} slices")


if __name__ == "__main__":
    app.run(main)
