"""Console entry points: user mistakes end with a one-line error, not a traceback, and
library log lines that are routine stay out of the terminal."""

import argparse
import errno
import logging as pylogging
import os
import re
import sys
import threading

from absl import app, flags, logging

from brats_jax import config_fields

USER_ERRORS = (FileNotFoundError, ValueError, KeyError, FloatingPointError)

# The flags below are defined on behalf of the command that calls define_run_flags: absl
# then counts them as that command's own (its --help lists them; see _help_of_module).
flags.disclaim_key_flags()

# --workdir of the commands that use trained runs: `predict` and `tune_postprocessing` take
# comma-separated run folders (an ensemble), `calibrate` and `export` one run folder.
# (`main`'s --workdir is the output folder of a training run, defined there.)
WORKDIR_KINDS = {
    "one": "Training run folder (holds config.json, checkpoints/).",
    "ensemble": "Training run folder (holds config.json, checkpoints/); several, "
    "comma-separated, form an ensemble (their probabilities averaged).",
}
SLIDING_WINDOW = {"auto": None, "on": True, "off": False}  # --sliding_window -> its option


def _define_tta() -> None:
    flags.DEFINE_enum(
        "tta", "none", ["none", "flips", "flips_ud"], "Test-time mirror averaging.",
        allow_override=True,
    )  # fmt: skip


def _define_step() -> None:
    flags.DEFINE_integer(
        "step", None, "Checkpoint step to use instead of the best one.", allow_override=True
    )


def _define_batch_size() -> None:
    flags.DEFINE_integer(
        "batch_size", 0, "Slices per model call (0: the run's eval.batch_size).",
        allow_override=True,
    )  # fmt: skip


def _define_sliding_window() -> None:
    flags.DEFINE_enum(
        "sliding_window", "auto", list(SLIDING_WINDOW),
        "Slide a window of the run's data.patch_size over each slice (nnU-Net's "
        "Gaussian-weighted tiles): on, off, or auto (the run's eval.sliding_window).",
        allow_override=True,
    )  # fmt: skip


def _define_data_root() -> None:
    flags.DEFINE_string(
        "data_root", "", "Where case IDs are looked up (default: the run's data.root).",
        allow_override=True,
    )  # fmt: skip


_RUN_FLAGS = {
    "tta": _define_tta,
    "step": _define_step,
    "batch_size": _define_batch_size,
    "sliding_window": _define_sliding_window,
    "data_root": _define_data_root,
}


def define_run_flags(*names: str, workdir: str) -> None:
    """Define `--workdir` and the flags `names` (of `tta`, `step`, `batch_size`,
    `sliding_window`, `data_root`) that the commands using a trained run share,
    alike in each: one definition here, with `allow_override` so that one process may import
    several commands. `workdir`: "one" (a single run folder) or "ensemble" (comma-separated
    run folders); the flags count as the calling module's own (its --help lists them)."""
    if workdir not in WORKDIR_KINDS:
        raise ValueError(f"workdir={workdir!r}: expected one of {sorted(WORKDIR_KINDS)}")
    unknown = [n for n in names if n not in _RUN_FLAGS]
    if unknown:
        raise ValueError(f"unknown run flag(s) {unknown}; known: {sorted(_RUN_FLAGS)}")
    flags.DEFINE_string("workdir", None, WORKDIR_KINDS[workdir], allow_override=True)
    for name in names:
        _RUN_FLAGS[name]()


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose options may also be spelt with underscores, as the absl
    commands spell theirs: `--group_size=4` is `--group-size=4` (bench, experiments). Only
    a spelling that names one of this parser's options is rewritten; anything else (e.g.
    `--config.data.cache_dir=...`, passed on to a config) is left as it is."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = set(self._option_string_actions)
        out = []
        for arg in args:
            name, eq, value = arg.partition("=")
            dashed = name.replace("_", "-")
            if name.startswith("--") and name not in known and dashed in known:
                arg = dashed + eq + value
            out.append(arg)
        return super().parse_known_args(out, namespace)


def run_app(main, **run_kwargs) -> None:
    """`absl.app.run(main)`, printing `error: ...` and exiting 1 on a user mistake.

    Set BRATS_JAX_DEBUG=1 to get the traceback instead. Flags are parsed by
    :func:`parse_flags` (unless `flags_parser` is given): a `--config.x=...` naming no
    config field, an unknown config preset or any other bad flag is one line. An `OSError`
    (full disk, unwritable folder), also one wrapped by a library such as tensorstore, ends
    in one line naming the path and the cause (:func:`describe_failure`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any backend starts
    run_kwargs.setdefault("flags_parser", parse_flags)
    _help_of_module(main)
    try:
        app.run(main, **run_kwargs)
    except (*USER_ERRORS, OSError) as e:
        if os.environ.get("BRATS_JAX_DEBUG"):
            raise
        _fail(describe_failure(e))


def _help_of_module(main) -> None:
    """Give a console script (`brats-train`, `[project.scripts]`) the `--help` of
    `python -m MODULE --help`: absl takes the text from `__main__`'s docstring and lists the
    flags of the module named `sys.argv[0]`, both the generated script's (no docstring, no
    flags) when `main`'s module is not `__main__`."""
    module = sys.modules.get(getattr(main, "__module__", None) or "")
    script = sys.modules.get("__main__")
    if module is None or script is None or module is script:
        return
    if not getattr(script, "__doc__", None):
        script.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run`'s `flags_parser`; returns the arguments left), with a
    bad flag ending in one `error:` line: an unknown `--config.a.b` field names the field
    and the closest one (:func:`unknown_config_fields`), a config file's own error (e.g. an
    unknown preset) its message, any other flag error absl's first line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:  # ml_collections: no such field
        if os.environ.get("BRATS_JAX_DEBUG"):
            raise
        is_flag_error = isinstance(e, flags.Error)
        problems = [] if is_flag_error else unknown_config_fields(argv)
        if not (is_flag_error or problems):
            raise
        _fail("; ".join(problems) or _flag_error_line(e))


def unknown_config_fields(argv: list[str]) -> list[str]:
    """One message per `--config.a.b[=v]` argument of `argv` that names no field of the
    config file given by `--config=FILE[:preset]` (loaded again by the flag's own parser):
    "unknown config field --config.a.b: a has no field 'b'; known: ...; did you mean 'c'?".
    """
    path = _flag_value(argv, "--config")
    if path is None or "config" not in flags.FLAGS:
        return []
    config = flags.FLAGS["config"].parser.parse(path)
    out = []
    for arg in argv[1:]:
        if arg.startswith("--config."):
            field = arg[len("--config.") :].partition("=")[0]
            try:
                config_fields.get_field(config, field)
            except KeyError as e:
                out.append(f"unknown config field --config.{field}: {e.args[0]}")
    return out


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `name=VALUE` or `name VALUE` in `argv[1:]`, else None."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _flag_error_line(e: BaseException) -> str:
    """absl's `flag --x=v: message` with ml_collections' traceback text replaced by the
    config file's own first error line (e.g. its unknown preset)."""
    text = str(e)
    inner = _chain(e)[-1]
    if inner is not e and "Error whilst parsing config file" in text:
        flag = text.split(": Error whilst parsing config file")[0]
        return f"{flag}: {_first_line(inner)}"
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


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
        return f"{_first_line(e)} (BRATS_JAX_DEBUG=1 shows the rest)"
    cause = os.strerror(code) + (f" ({errno.errorcode[code]})" if code in errno.errorcode else "")
    line = f"{path}: {cause}" if path else cause
    hint = _HINTS.get(code)
    return f"{line}; {hint}" if hint else line


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


# orbax's save threads log a file-system error (tensorstore's text) before the save raises it
# in the main thread, where it ends the run in one line (describe_failure)
_FS_ERROR_TEXT = ("RESOURCE_EXHAUSTED", "os_error_code", "No space left on device")


# orbax's warnings that only repeat what this library asked for: a checkpoint opened
# read-only for inference (`RunCheckpoints(read_only=True)`) and epoch-end checkpoints saved
# without validation metrics, by design
_ORBAX_EXPECTED_WARNINGS = ("Given directory is read only", "did not provide metrics")


def _is_missing_tpu_line(r: pylogging.LogRecord) -> bool:
    """JAX's INFO line "Unable to initialize backend 'tpu': ... libtpu.so ..." that every
    process without a TPU logs when it starts its backends. (A machine whose TPU is present
    but cannot be used still gets JAX's own WARNING, "A Google TPU may be present ...".)"""
    return (
        r.name == "jax._src.xla_bridge"
        and r.levelno < pylogging.WARNING
        and r.getMessage().startswith("Unable to initialize backend 'tpu'")
    )


def keep_log_record(r: pylogging.LogRecord) -> bool:
    """False for JAX's "Unable to initialize backend 'tpu'" line on a machine without a
    TPU, for orbax's per-save INFO lines, for its warnings that a checkpoint was opened
    read-only (inference) or saved without metrics (the epoch-end checkpoints have no
    validation Dice, by design) and for its save threads' errors of a file-system failure
    (full disk: the save raises it). Every other warning is kept."""
    if _is_missing_tpu_line(r):
        return False
    if "orbax" not in r.pathname.replace("\\", "/"):
        return True
    if r.levelno < pylogging.WARNING:
        return False
    message = r.getMessage()
    if r.levelno >= pylogging.ERROR and any(t in message for t in _FS_ERROR_TEXT):
        return False
    return not any(t in message for t in _ORBAX_EXPECTED_WARNINGS)


def is_closed_loop_callback(unraisable) -> bool:
    """True for the "Event loop is closed" RuntimeError of a tensorstore write finishing
    after the orbax save that awaited it failed (and closed its event loop): a follow-on
    of the error the save raised, printed by `sys.unraisablehook` once per pending write."""
    e = unraisable.exc_value
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _without_closed_loop_callbacks(previous):
    def hook(unraisable):
        if not is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    return hook


def quiet_library_logs() -> None:
    """Filters absl's log handler with :func:`keep_log_record` (other warnings still show)
    and drops :func:`is_closed_loop_callback` reports from `sys.unraisablehook`."""
    logging.get_absl_handler().addFilter(keep_log_record)
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _without_closed_loop_callbacks(sys.unraisablehook)
