"""Console entry points: user mistakes end with a one-line error, not a traceback, and
library log lines that are routine stay out of the terminal."""

import errno
import logging as pylogging
import os
import re
import sys
import threading

from absl import app, logging

USER_ERRORS = (FileNotFoundError, ValueError, KeyError, FloatingPointError)


def run_app(main, **run_kwargs) -> None:
    """`absl.app.run(main)`, printing `error: ...` and exiting 1 on a user mistake.

    Set BRATS_JAX_DEBUG=1 to get the traceback instead. An `AttributeError` raised while
    parsing flags is ml_collections' answer to `--config.x=...` naming no config field. An
    `OSError` (full disk, unwritable folder), also one wrapped by a library such as
    tensorstore, ends in one line naming the path and the cause (:func:`describe_failure`).
    """
    try:
        app.run(main, **run_kwargs)
    except AttributeError as e:
        flag = _config_flag_for(str(e).strip("'\""))
        if flag is None or os.environ.get("BRATS_JAX_DEBUG"):
            raise
        _fail(f"unknown config field in {flag} (see the README's config table)")
    except (*USER_ERRORS, OSError) as e:
        if os.environ.get("BRATS_JAX_DEBUG"):
            raise
        _fail(describe_failure(e))


_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the folder's permissions or write elsewhere",
    errno.EPERM: "check the folder's permissions or write elsewhere",
    errno.EROFS: "write elsewhere",
}
# tensorstore (orbax) reports file-system errors in ValueErrors of this shape
_TS_PATH = re.compile(r'local file "([^"]+)"')
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and the exceptions it was raised from or while handling, newest first."""
    out: list[BaseException] = []
    while e is not None and all(e is not x for x in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_library_noise(e: BaseException) -> bool:
    """Not one of this library's one-line messages: an OSError with an errno, or a
    multi-line or tensorstore message."""
    text = str(e)
    if isinstance(e, OSError):
        return e.errno is not None
    return "\n" in text.strip() or "os_error_code" in text


def describe_failure(e: BaseException) -> str:
    """One line for the CLI: `str(e)` for this library's own messages; for a file-system
    failure "PATH: No space left on device (ENOSPC); free some space or write elsewhere",
    the path and errno taken from `e`, the exceptions behind it, or tensorstore's text.
    """
    if not _is_library_noise(e):
        return str(e)
    chain = _chain(e)
    code = next((x.errno for x in chain if isinstance(x, OSError) and x.errno), None)
    path = next((x.filename for x in chain if isinstance(x, OSError) and x.filename), None)
    for x in chain:
        if code is None and (m := _TS_ERRNO.search(str(x))):
            code = int(m.group(1))
        if path is None and (m := _TS_PATH.search(str(x))):
            path = m.group(1)
    if code is None:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return f"{first} (BRATS_JAX_DEBUG=1 shows the rest)"
    cause = os.strerror(code) + (f" ({errno.errorcode[code]})" if code in errno.errorcode else "")
    line = f"{path}: {cause}" if path else cause
    hint = _HINTS.get(code)
    return f"{line}; {hint}" if hint else line


def _config_flag_for(name: str) -> str | None:
    return next((a for a in sys.argv[1:] if a.startswith("--config.") and name in a), None)


def _fail(message: str) -> None:
    _quiet_shutdown()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _quiet_shutdown() -> None:
    """Silence the follow-on noise of a failed run while the interpreter exits: library
    threads and coroutines that fail because the error stopped the run (orbax's "Event loop
    is closed", tensorboard's flush of a full disk) would print dozens of tracebacks after
    the one-line error."""
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
    logging.set_verbosity(logging.FATAL)


def keep_log_record(r: pylogging.LogRecord) -> bool:
    """False for orbax's per-save INFO lines and for its warning about checkpoints saved
    without metrics (the epoch-end checkpoints have no validation Dice, by design)."""
    if "orbax" not in r.pathname.replace("\\", "/"):
        return True
    if r.levelno < pylogging.WARNING:
        return False
    return "did not provide metrics" not in r.getMessage()


def quiet_library_logs() -> None:
    """Filters absl's log handler with :func:`keep_log_record` (other warnings still show)."""
    logging.get_absl_handler().addFilter(keep_log_record)
