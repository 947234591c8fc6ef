"""Run a sweep: `python -m experiments.run NAME --out=DIR [--scale=smoke|paper] [--dry-run]
[--config.a.b=value ...]`.

Every run of sweep NAME (see `experiments/sweeps.py`; several names may be given) trains
in-process into `DIR/<run name>/`. A run whose `results.json` exists is skipped; an
interrupted one resumes from its checkpoints (`train_and_evaluate` does that); a run that
raises has its traceback written to `DIR/<run>/error.txt` and the sweep goes on; the exit
code is 1 if any run failed. `DIR/sweep.log` records what each invocation did.

`--only=PATTERNS` restricts the sweep to matching run names (e.g. `--only='unet-ce-*'`).
`--shard=i/N` (or `--shard=slurm`: a SLURM job array's task) trains only the i-th of N
deterministic shares of the runs (`shard_runs`: training units dealt round-robin, grouped
runs kept together), so N machines on one shared `--out` train every run once; give every
shard the same sweep, `--only`, `--group-size` and overrides.
`--config.a.b=value` (or `--config.a.b value`) sets a config field in every run, converted
to the field's type (bool: true/false/1/0/yes/no). Fields a sweep varies (its learning
rates, losses, ...) cannot be overridden.

The code is split into `plan_runs` (what to run) and `execute` (running it), so that runs
sharing a shape can later be grouped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import fnmatch
import gc
import json
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from brats_jax import cli, config_fields, fileio, runtime
from brats_jax.inference import work_split
from brats_jax.runs.workdir_lock import WorkdirBusy, WorkdirLock
from experiments import sweeps

RESULTS = "results.json"
RUN_INFO = "run.json"
ERROR = "error.txt"
SWEEP_LOG = "sweep.log"


@dataclasses.dataclass
class PlannedRun:
    """One training run, planned: its full config and folder (`sweeps.SweepRun` is where it
    sits in a sweep; `brats_jax.training.run_group.Run` is the run while it trains).

    Attributes:
      name: run name (= folder name under the output folder).
      config: the run's full `ml_collections.ConfigDict`.
      workdir: `out/<name>`.
      placements: sweep name -> {"row", "col", "study"}: where the run sits in each table.
      scale: "smoke" | "paper".
      overrides: the command-line overrides applied (dotted field -> value).
    """

    name: str
    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    placements: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    scale: str = "smoke"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunOutcome:
    """What `execute` did with one training run: status in {"done", "skipped", "failed"}."""

    name: str
    status: str
    seconds: float = 0.0
    message: str = ""


# ----------------------------------------------------------------------------- overrides


def parse_overrides(args: Sequence[str], template: ml_collections.ConfigDict) -> dict[str, Any]:
    """`{"a.b": typed value}` from `--config.a.b=value` / `--config.a.b value` arguments.

    Values are converted to the field's type by `ml_collections.config_flags` (the parser
    `brats_jax.main` uses; bool: true/false/t/f/1/0).

    Args:
      args: command-line tokens left after the known options.
      template: a config holding every field (its values give the types).

    Raises:
      ValueError: on a token that is not a config override, a missing value, an unknown
        field (listing the group's fields) or a value of the wrong type.
    """
    out: dict[str, Any] = {}
    tokens = list(args)
    while tokens:
        tok = tokens.pop(0)
        if not tok.startswith("--config."):
            raise ValueError(
                f"unexpected argument {tok!r}; "
                "config overrides look like --config.train.num_steps=5"
            )
        field, eq, value = tok[len("--config.") :].partition("=")
        if not eq:
            if not tokens or tokens[0].startswith("--"):
                raise ValueError(f"{tok}: missing value (write {tok}=VALUE)")
            value = tokens.pop(0)
        current = _check_field(template, field)
        out[field] = _parse_value(template, field, value, current)
    return out


def _check_field(config: ml_collections.ConfigDict, field: str) -> Any:
    """The current value of a settable field; a ValueError names an unknown field (with the
    group's known fields) or a group."""
    try:
        value = config_fields.get_field(config, field)
    except KeyError as e:
        raise ValueError(f"unknown config field --config.{field}: {e.args[0]}") from None
    if isinstance(value, dict):
        raise ValueError(f"--config.{field} is a group, not a field; set one of its fields")
    return value


def _parse_value(template: ml_collections.ConfigDict, field: str, text: str, current: Any):
    """`text` parsed as `--config.<field>` by `config_flags` against `template`'s types."""
    argv = ["experiments.run", f"--config.{field}={text}"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict(
        "config", copy.deepcopy(template), flag_values=flag_values, sys_argv=argv
    )
    try:
        flag_values(argv)
    except flags.Error as e:
        raise ValueError(
            f"--config.{field}={text!r}: expected a {type(current).__name__} "
            f"(the field's current value is {current!r}; {e})"
        ) from None
    return config_fields.get_field(flag_values.config, field)


def infer_data_source(overrides: dict[str, Any]) -> dict[str, Any]:
    """Add `data.source` when only `data.root` was given: kaggle_h5 for a folder with .h5
    slices or meta_data.csv, nnunet for an nnU-Net dataset folder (dataset.json, imagesTr/),
    else nifti (a note is printed). Returns a new dict."""
    out = dict(overrides)
    root = out.get("data.root")
    if root and out.get("data.source", "synthetic") == "synthetic" and "data.source" not in out:
        p = pathlib.Path(root)
        if not p.is_dir():
            raise ValueError(f"--config.data.root={root!r}: no such folder")
        kaggle = (p / "meta_data.csv").exists() or next(p.glob("*.h5"), None) is not None
        nnunet_dataset = (p / "dataset.json").is_file() and (p / "imagesTr").is_dir()
        out["data.source"] = "kaggle_h5" if kaggle else "nnunet" if nnunet_dataset else "nifti"
        print(f"note: --config.data.root given without data.source; using {out['data.source']}")
    return out


# ----------------------------------------------------------------------------- planning


def plan_runs(
    names: str | Sequence[str],
    scale: str = "smoke",
    overrides: dict[str, Any] | None = None,
    *,
    out: str | os.PathLike = "experiments_out",
) -> list[PlannedRun]:
    """The runs of sweep(s) `names` at `scale` with `overrides`, in table order.

    A run shared by several sweeps (same name, hence same config) is planned once, with one
    placement per sweep. Raises ValueError for an unknown sweep or scale, and for an
    override of a field a sweep varies.
    """
    if isinstance(names, str):
        names = [names]
    overrides = dict(overrides or {})
    out = pathlib.Path(out)
    specs: dict[str, PlannedRun] = {}
    for name in names:
        sweep = sweeps.get_sweep(name)
        clash = sorted(set(overrides) & sweeps.refused_overrides(sweep))
        if clash:
            raise ValueError(
                f"sweep {name!r} varies {', '.join(clash)}; overriding "
                f"{'it' if len(clash) == 1 else 'them'} would make its runs the same"
            )
        for cell, config in sweeps.expand(name, scale, overrides):
            placement = {"row": cell.row, "col": cell.col, "study": cell.study}
            spec = specs.get(config.name)
            if spec is None:
                spec = PlannedRun(config.name, config, out / config.name, {}, scale, overrides)
                specs[config.name] = spec
            spec.placements[name] = placement
    return list(specs.values())


# ----------------------------------------------------------------------------- execution


def _config_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _log(out: pathlib.Path, line: str) -> None:
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / SWEEP_LOG, "a") as f:
        f.write(f"{stamp} {line}\n")
    print(line, flush=True)


def _write_run_info(spec: PlannedRun, **extra) -> None:
    path = spec.workdir / RUN_INFO
    info = {}
    if path.exists():
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError:
            info = {}
    placements = {**info.get("placements", {}), **spec.placements}
    info.update(
        name=spec.name,
        model=spec.config.model.name,
        scale=spec.scale,
        overrides=spec.overrides,
        placements=placements,
        **extra,
    )
    fileio.write_json(path, info)


def _default_train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    from brats_jax.training import train

    return train.train_and_evaluate(config, workdir)


def _default_train_group(configs, workdirs, mapping: str) -> list[dict]:
    from brats_jax.training import train

    return train.train_runs(configs, workdirs, mapping=mapping)


def _group_key(config: ml_collections.ConfigDict) -> str:
    from brats_jax.training import run_group

    return run_group.group_key(config)


def plan_units(runs: Sequence[PlannedRun], group_size: int) -> list[list[PlannedRun]]:
    """Split runs into units trained together: runs sharing architecture, image size, batch
    size and step budget (`brats_jax.training.run_group.group_key`), at most `group_size` per
    unit, in sweep order. `group_size <= 1` gives one run per unit."""
    if group_size <= 1:
        return [[r] for r in runs]
    groups: dict[str, list[PlannedRun]] = {}
    for r in runs:
        groups.setdefault(_group_key(r.config), []).append(r)
    units = []
    for members in groups.values():
        units += [members[i : i + group_size] for i in range(0, len(members), group_size)]
    return units


def shard_runs(
    runs: Sequence[PlannedRun], shard: int, num_shards: int, group_size: int = 0
) -> list[PlannedRun]:
    """The runs of shard `shard` of `num_shards`, in sweep order: the training units of all
    `runs` (`plan_units`: with `group_size` > 1 the runs trained together) dealt
    round-robin (`work_split.part_of`), so the shards partition the runs and never split a
    unit. Computed from the plan alone (not from which runs are finished), so every shard's
    process deals the same way. `execute(..., group_size)` on a shard re-forms its units."""
    units = work_split.part_of(plan_units(runs, group_size), shard, num_shards)
    names = {spec.name for unit in units for spec in unit}
    return [spec for spec in runs if spec.name in names]


def execute(
    runs: Sequence[PlannedRun],
    *,
    train_fn: Callable[[ml_collections.ConfigDict, pathlib.Path], dict] | None = None,
    group_size: int = 0,
    mapping: str = "auto",
    train_group_fn: Callable[..., list[dict]] | None = None,
) -> list[RunOutcome]:
    """Run each spec into its workdir; never raises for a failing run.

    Skips a run whose `results.json` exists; refuses (status "failed") to resume a workdir
    whose `config.json` differs from the planned config. A raising run gets its traceback
    in `<workdir>/error.txt`. Progress goes to stdout and `<out>/sweep.log`.
    `train_fn(config, workdir)` defaults to `brats_jax.training.train.train_and_evaluate`.
    With `group_size=K > 1`, runs that share architecture, image size and batch size are
    trained K at a time in one compiled program (`brats_jax.training.train.train_runs` with
    `mapping`); each still gets its own outputs.
    """
    train_fn = train_fn or _default_train
    train_group_fn = train_group_fn or _default_train_group
    outcomes, todo = [], []
    for i, spec in enumerate(runs):
        tag = f"[{i + 1}/{len(runs)}] {spec.name}"
        outcome = _triage(spec, tag)
        if outcome is None:
            todo.append((tag, spec))
        else:
            outcomes.append(outcome)
    tags = {id(spec): tag for tag, spec in todo}
    for unit in plan_units([spec for _, spec in todo], group_size):
        outcomes += _train_unit(unit, tags, train_fn, train_group_fn, mapping)
    order = {spec.name: i for i, spec in enumerate(runs)}
    return sorted(outcomes, key=lambda o: order.get(o.name, 0))


def _triage(spec: PlannedRun, tag: str) -> RunOutcome | None:
    """None when `spec` is to be trained; else its outcome: "skipped" (finished) or
    "failed" (an unfinished run with a different saved config is in its folder)."""
    out = spec.workdir.parent
    saved_path = spec.workdir / "config.json"
    diff = []
    if saved_path.exists():
        try:
            saved = config_fields.upgrade_legacy(json.loads(saved_path.read_text()))
            diff = config_fields.format_diff(
                config_fields.config_diff(saved, _config_json(spec.config))
            )
        except json.JSONDecodeError:
            diff = []
    if (spec.workdir / RESULTS).exists():
        note = f" (its config differs: {'; '.join(diff)})" if diff else ""
        _log(out, f"{tag}: skipped, finished{note}")
        _write_run_info(spec)
        return RunOutcome(spec.name, "skipped", message=note.strip(" ()"))
    spec.workdir.mkdir(parents=True, exist_ok=True)
    if diff:
        msg = (
            f"{spec.workdir} holds an unfinished run with a different config "
            f"({'; '.join(diff)}); delete the folder or use another --out"
        )
        fileio.write_text(spec.workdir / ERROR, msg + "\n")
        _log(out, f"{tag}: FAILED: {msg}")
        return RunOutcome(spec.name, "failed", message=msg)
    return None


def _train_unit(unit, tags, train_fn, train_group_fn, mapping) -> list[RunOutcome]:
    """Train the runs of `unit` together (one alone with `train_fn`); their outcomes. A run
    folder that another process holds (`WorkdirLock`) skips the unit, touching no file."""
    out = unit[0].workdir.parent
    with contextlib.ExitStack() as locks:
        try:
            for spec in unit:
                locks.enter_context(WorkdirLock(spec.workdir))
        except WorkdirBusy as e:
            msg = str(e).splitlines()[0]
            for spec in unit:
                _log(out, f"{tags[id(spec)]}: skipped, in use: {msg}")
            return [RunOutcome(spec.name, "skipped", message=msg) for spec in unit]
        return _train_locked_unit(unit, tags, train_fn, train_group_fn, mapping)


def _saved_steps(workdir: pathlib.Path) -> set[int]:
    """The checkpoint steps in `workdir/checkpoints` (folder names; none: empty)."""
    folder = workdir / "checkpoints"
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def _train_locked_unit(unit, tags, train_fn, train_group_fn, mapping) -> list[RunOutcome]:
    out = unit[0].workdir.parent
    saved = [_saved_steps(spec.workdir) for spec in unit]
    if len(unit) > 1 and any(saved) and not set.intersection(*saved):
        # e.g. a run that diverged in this group kept older checkpoints than the others
        names = ", ".join(tags[id(s)] for s in unit)
        _log(out, f"{names}: their checkpoints share no step; each resumes alone")
        alone = (_train_locked_unit([s], tags, train_fn, train_group_fn, mapping) for s in unit)
        return [o for outcomes in alone for o in outcomes]
    for spec in unit:
        resume = (spec.workdir / "checkpoints").exists()
        _log(
            out,
            f"{tags[id(spec)]}: {'resuming' if resume else 'starting'}"
            + (f" (trained together with {len(unit) - 1} more)" if len(unit) > 1 else ""),
        )
        _write_run_info(spec, status="running")
    t0 = time.perf_counter()
    error, finished = None, [True] * len(unit)
    try:
        if len(unit) == 1:
            train_fn(unit[0].config, unit[0].workdir)
        else:
            train_group_fn([s.config for s in unit], [s.workdir for s in unit], mapping)
    except Exception as e:  # noqa: BLE001 - one failing run must not stop the sweep
        error = (f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc())
        # brats_jax.training.train.RunsDiverged: the runs with results finished, the others stopped
        finished = [r is not None for r in getattr(e, "results", [None] * len(unit))]
    finally:
        seconds = time.perf_counter() - t0
        _release_memory()
    return [
        _record_outcome(spec, tags[id(spec)], seconds, len(unit), None if done else error)
        for spec, done in zip(unit, finished, strict=True)
    ]


def _record_outcome(spec, tag, seconds, trained_with, error) -> RunOutcome:
    """Log and record a trained run: "done", or "failed" with `error` = (one-line message,
    traceback), the traceback in `<workdir>/error.txt`."""
    out = spec.workdir.parent
    if error is None:
        (spec.workdir / ERROR).unlink(missing_ok=True)
        _write_run_info(spec, status="done", seconds=seconds, trained_with=trained_with)
        _log(out, f"{tag}: done in {seconds:.1f}s")
        return RunOutcome(spec.name, "done", seconds)
    msg, trace = error
    fileio.write_text(spec.workdir / ERROR, trace)
    _write_run_info(spec, status="failed", seconds=seconds)
    _log(out, f"{tag}: FAILED after {seconds:.1f}s: {msg} (see {spec.workdir / ERROR})")
    return RunOutcome(spec.name, "failed", seconds, msg)


def _release_memory() -> None:
    """Drop compiled executables of the finished run (each run jits fresh functions)."""
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m experiments.run",
        description="Run the study's sweeps. Any --config.a.b=value applies to every run.",
        epilog=f"sweeps: {', '.join(sweeps.SWEEPS)}",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="sweep name(s)")
    p.add_argument("--out", required=True, help="output folder; runs go to OUT/<run name>/")
    p.add_argument("--scale", choices=sweeps.SCALES, default="smoke")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument(
        "--only",
        default="",
        metavar="PATTERNS",
        help="comma-separated run-name patterns (fnmatch, e.g. 'unet-ce-*'): run only those",
    )
    p.add_argument(
        "--group-size",
        "--vmap",  # the old name, kept as an alias for one release
        dest="group_size",
        nargs="?",
        type=int,
        const=8,
        default=0,
        metavar="K",
        help="train runs that share architecture, image size and batch size K at a time "
        "in one compiled program (default K=8 when given without a value)",
    )
    p.add_argument(
        "--mapping",
        choices=("auto", "vmap", "map", "grouped"),
        default="auto",
        help="with --group-size: lax.map over runs (auto; measured faster), jax.vmap, or "
        "grouped (vmap with convolutions as batched GEMMs; meant for GPUs)",
    )
    p.add_argument(
        "--shard",
        default="",
        metavar="i/N|slurm",
        help="train only shard i of N of the runs (grouped runs stay together); 'slurm': "
        "i = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, N = SLURM_ARRAY_TASK_COUNT",
    )
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="let a --scale=paper sweep train on the CPU (days per run; refused by default)",
    )
    p.add_argument(
        "--compile-cache",
        default=str(pathlib.Path.home() / ".cache" / "brats_jax" / "jax_compile"),
        help="JAX persistent compilation cache folder shared by the runs ('off' = none)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit code (0 ok, 1 a run failed, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    try:
        template = sweeps.base_config("unet", args.scale)
        overrides = infer_data_source(parse_overrides(rest, template))
        runs = plan_runs(args.names, args.scale, overrides, out=args.out)
        if args.only:
            patterns = [x.strip() for x in args.only.split(",") if x.strip()]
            runs = [r for r in runs if any(fnmatch.fnmatchcase(r.name, x) for x in patterns)]
            if not runs:
                raise ValueError(f"--only={args.only!r} matches none of the sweep's runs")
        from brats_jax.training import config_choices  # imports JAX: after runtime.setup

        for spec in runs:
            config_choices.check_choices(spec.config, what=spec.name)
        shard = ""
        if args.shard:
            i, n = work_split.parse_shard(args.shard)
            total, runs = len(runs), shard_runs(runs, i, n, args.group_size)
            shard = f" shard={i}/{n}"
            print(f"shard {i}/{n}: {len(runs)} of {total} runs", flush=True)
        if args.scale == "paper":
            check_paper_data(runs, overrides)
            if not args.dry_run:
                check_paper_backend(allow_cpu=args.allow_cpu)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in runs:
            done = (spec.workdir / RESULTS).exists()
            c = spec.config
            steps = f"{c.train.num_steps} steps" if c.train.num_steps else (
                f"{c.train.num_epochs} epochs")  # fmt: skip
            print(
                f"{spec.name:<34} {'finished' if done else 'to run':<8} "
                f"{c.model.name} loss={c.train.loss} lr={sweeps.fmt_lr(c.train.learning_rate)} "
                f"bs={c.train.batch_size} {steps} {c.data.image_size}px data={c.data.source}"
            )
        print(f"{len(runs)} runs into {args.out} (scale {args.scale})")
        return 0
    if args.compile_cache != "off":
        runtime.enable_compile_cache(args.compile_cache)
    out = pathlib.Path(args.out)
    _log(out, f"sweep {' '.join(args.names)} scale={args.scale}{shard} runs={len(runs)} "
              f"overrides={json.dumps(overrides)}")  # fmt: skip
    t0 = time.perf_counter()
    outcomes = execute(runs, group_size=args.group_size, mapping=args.mapping)
    failed = [o for o in outcomes if o.status == "failed"]
    n = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    _log(out, f"sweep finished in {time.perf_counter() - t0:.1f}s: {n['done']} done, "
              f"{n['skipped']} skipped, {n['failed']} failed")  # fmt: skip
    for o in failed:
        print(f"  FAILED {o.name}: {o.message}", file=sys.stderr)
    return 1 if failed else 0


def check_paper_data(runs: Sequence[PlannedRun], overrides: dict[str, Any]) -> None:
    """A paper-scale sweep trains on real data: a synthetic source is a ValueError unless the
    command line asked for it (`--config.data.source=synthetic`)."""
    synthetic = [r.name for r in runs if r.config.data.source == "synthetic"]
    if synthetic and overrides.get("data.source") != "synthetic":
        raise ValueError(
            "--scale=paper trains the study's grid: give the data with "
            "--config.data.source=kaggle_h5|nifti --config.data.root=PATH "
            "(or --config.data.source=synthetic to train it on the synthetic phantoms)"
        )


def check_paper_backend(*, allow_cpu: bool) -> str:
    """Logs the backend and device count a paper-scale sweep trains on and returns the
    backend; a CPU backend (e.g. a TPU held by another process) is a ValueError unless
    `allow_cpu`."""
    import jax

    backend, count = jax.default_backend(), jax.device_count()
    print(f"sweep backend: {backend} ({count} device{'s' * (count != 1)})", flush=True)
    if backend == "cpu" and not allow_cpu:
        raise ValueError(
            "--scale=paper on the CPU backend takes days per run (is the GPU/TPU visible, or "
            "held by another process such as a notebook kernel?); pass --allow-cpu to run anyway"
        )
    return backend


def run() -> None:
    """Console entry (`python -m experiments.run`): the arguments are parsed by `main`, and
    `cli.run_app` turns an unexpected user error into one `error: ...` line, as every CLI."""
    cli.run_app(lambda argv: sys.exit(main(argv[1:])), flags_parser=_absl_skips_arguments)


def _absl_skips_arguments(argv: list[str]) -> list[str]:
    """absl's flags parse nothing here (no absl flag is defined); `main` parses `argv`."""
    flags.FLAGS(argv[:1])
    return argv


if __name__ == "__main__":
    run()
