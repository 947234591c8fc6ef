"""Console entry points: user mistakes end with a one-line error, not a traceback, and
library log lines that are routine stay out of the terminal."""

import logging as pylogging
import os
import sys

from absl import app, logging

USER_ERRORS = (FileNotFoundError, ValueError, KeyError, FloatingPointError)


def run_app(main, **run_kwargs) -> None:
    """`absl.app.run(main)`, printing `error: ...` and exiting 1 on a user mistake.

    Set BRATS_JAX_DEBUG=1 to get the traceback instead. An `AttributeError` raised while
    parsing flags is ml_collections' answer to `--config.x=...` naming no config field.
    """
    try:
        app.run(main, **run_kwargs)
    except AttributeError as e:
        flag = _config_flag_for(str(e).strip("'\""))
        if flag is None or os.environ.get("BRATS_JAX_DEBUG"):
            raise
        _fail(f"unknown config field in {flag} (see the README's config table)")
    except USER_ERRORS as e:
        if os.environ.get("BRATS_JAX_DEBUG"):
            raise
        _fail(str(e))


def _config_flag_for(name: str) -> str | None:
    return next((a for a in sys.argv[1:] if a.startswith("--config.") and name in a), None)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


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
