"""CLI: convert a NIfTI BraTS release into the slice cache read by NiftiCacheSource.

    python -m brats_jax.prepare --src=DIR --out=CACHE [--dtype=float32] [--workers=2]

`--src` is a folder of BraTS case folders, or an nnU-Net raw dataset folder
(`DatasetXXX_Name` with dataset.json and imagesTr/: `brats_jax.data.nnunet`). Resumable
(finished cases are skipped), atomic per case; see brats_jax.data.cache. Bad data
and file-system errors (a full disk, an unwritable --out) end in one `error: ...` line; the
worker processes exit when this process dies.
"""

from __future__ import annotations

from absl import app, flags

from brats_jax import cli, runtime
from brats_jax.data import nnunet
from brats_jax.data.cache import NiftiCacheSource, prepare

_SRC = flags.DEFINE_string(
    "src", None, "NIfTI release folder (case folders inside), or an nnU-Net dataset folder."
)
_OUT = flags.DEFINE_string("out", None, "Cache folder to create or complete.", allow_override=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored image dtype.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes converting cases in parallel.")


def main(argv):
    del argv
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if not _SRC.value or not _OUT.value:
        raise app.UsageError("both --src and --out are required")
    layout = "nnunet" if nnunet.is_dataset(_SRC.value) else "brats"
    out = prepare(_SRC.value, _OUT.value, dtype=_DTYPE.value, workers=_WORKERS.value, layout=layout)
    src = NiftiCacheSource(out)
    print(f"{src!r}: {len(src.case_ids)} cases, {len(src)} slices")


def run() -> None:
    """Console entry: bad data and file-system errors end in one line."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
