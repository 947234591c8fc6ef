"""The CLI boundary: file-system errors end in one line naming the path and the cause."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from brats_jax import cli
from brats_jax.data.common import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOSPACE = "No space left on device (ENOSPC); free some space or write elsewhere"

# shortened from a real run on a full 300 KiB tmpfs: orbax's save fails in tensorstore, then
# the training loop's `finally` closes the TensorBoard writer, whose flush fails too
_TENSORSTORE = (
    "RESOURCE_EXHAUSTED: Error writing local file "
    '"/mnt/full/run/checkpoints/2.orbax-checkpoint-tmp/state/_sharding": Failed to write 19244 '
    "bytes to file 15: No space left on device [os_error_code='28'] "
    '[tensorstore_spec=\'{"context":{"cache_pool":{}}}\']'
)


def test_os_error_names_path_and_cause():
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/mnt/full/run/metrics.jsonl")
    assert cli.describe_failure(e) == f"/mnt/full/run/metrics.jsonl: {NOSPACE}"
    e = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/ro/seg.nii.gz")
    assert cli.describe_failure(e) == (
        "/ro/seg.nii.gz: Permission denied (EACCES); check the folder's permissions or write "
        "elsewhere"
    )


def test_tensorstore_error_and_the_error_raised_while_closing_are_one_line():
    try:
        try:
            raise ValueError(_TENSORSTORE)
        finally:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # tensorboard's flush
    except OSError as e:
        got = cli.describe_failure(e)
    assert got == f"/mnt/full/run/checkpoints/2.orbax-checkpoint-tmp/state/_sharding: {NOSPACE}"
    assert cli.describe_failure(ValueError(_TENSORSTORE)) == got


def test_own_one_line_messages_are_kept():
    for e in (
        DataError("/data/x.h5: 'mask' has shape (2, 2), expected (240, 240, 3)"),
        FileNotFoundError("no checkpoint in /run/checkpoints"),
        FloatingPointError("non-finite training loss (nan) at step 2"),
    ):
        assert cli.describe_failure(e) == str(e)
    try:
        raise DataError("cannot read /d/a.h5: OSError: truncated") from OSError(5, "I/O error")
    except DataError as e:
        assert cli.describe_failure(e) == "cannot read /d/a.h5: OSError: truncated"
    multi = ValueError("first line\n  160 more lines")
    assert cli.describe_failure(multi) == "first line (BRATS_JAX_DEBUG=1 shows the rest)"


_FULL_DISK = textwrap.dedent(
    """
    import errno, os, pathlib, sys
    from brats_jax import cli, fileio

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    pathlib.Path.write_text = no_space  # a full disk, as the writer sees it

    def main(argv):
        fileio.write_text(pathlib.Path(sys.argv[1]) / "results.json", "{}")

    cli.run_app(main)
    """
)


@pytest.mark.parametrize("debug", [False, True])
def test_full_disk_ends_in_one_line_at_the_cli(tmp_path, debug):
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("BRATS_JAX_DEBUG", None)
    if debug:
        env["BRATS_JAX_DEBUG"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 1
    if debug:
        assert "Traceback" in out.stderr
        return
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {tmp_path}/.results.json.")
    assert lines[0].endswith(f": {NOSPACE}")
    assert os.listdir(tmp_path) == []  # the atomic writer left no temporary file
