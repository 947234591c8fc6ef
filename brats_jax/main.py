"""Train and evaluate: `python -m brats_jax.main --config=configs/unet.py:demo --workdir=DIR`.

`--config` takes a config file with an optional preset after a colon; any field can be
overridden, e.g. `--config.train.learning_rate=1e-5 --config.data.source=kaggle_h5`.
`--workdir` defaults to a fresh `runs/<config name>-<timestamp>`; rerunning with the same
workdir resumes from its last checkpoint.
"""

import datetime
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from brats_jax import cli, runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/unet.py:demo.")
flags.DEFINE_string("workdir", None, "Output folder; an existing run there is resumed.")
flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs)."
)


def default_workdir(config_name: str) -> pathlib.Path:
    """`runs/<config name>-<YYYYmmdd-HHMMSS>` under the current directory."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / f"{config_name}-{stamp}"


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/unet.py:demo")
    if FLAGS.distributed and not FLAGS.workdir:  # each host would stamp its own folder
        raise app.UsageError("--distributed needs --workdir (one folder shared by all hosts)")
    runtime.setup(distributed=FLAGS.distributed)  # before JAX computes anything
    import jax

    from brats_jax.training import config_choices, train

    config = FLAGS.config
    config_choices.check_choices(config)  # a misspelt name fails before any data or model work
    workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else default_workdir(config.name)
    if config.data.source == "synthetic":
        print(
            "Note: data.source=synthetic - training on the built-in synthetic phantoms. "
            "Point at real data with --config.data.source=kaggle_h5|nifti|nnunet "
            "--config.data.root=PATH.",
            flush=True,
        )
    logging.info("workdir: %s; devices: %s", workdir, jax.devices())
    results = train.train_and_evaluate(config, workdir)
    if jax.process_index() == 0:
        print("\n".join(final_lines(workdir, results)))


def final_lines(workdir, results: dict) -> list[str]:
    """The run's last lines: its folder, the test scores (or that there was no test pass)
    and where the result files are."""
    workdir = pathlib.Path(workdir)
    lines = [f"workdir: {workdir}"]
    if results.get("per_case"):
        dice = results.get("dice") or {}
        lines.append(
            "test: paper Dice {} | WT {} TC {} ET {} ({} case(s), weights of step {})".format(
                *(_f(v) for v in (results.get("paper_dice"), *map(dice.get, ("WT", "TC", "ET")))),
                len(results["per_case"]),
                results.get("tested_step", "?"),
            )
        )
        if lw_line := lesionwise_line(results.get("lesionwise")):
            lines.append(lw_line)
    else:
        lines.append(
            "test: none - no test cases (data.test_fraction=0, data.test_cases empty); "
            "results.json has no test scores"
        )
    lines.append(f"results: {workdir / 'results.json'}, per case: {workdir / 'per_case.csv'}")
    return lines


def lesionwise_line(block: dict | None) -> str | None:
    """One line of a results.json `lesionwise` block (`metrics.lesionwise.summarise`): the
    case means of the lesion-wise Dice and HD95 (mm) per region and the summed false-positive
    and missed lesions; None without the block."""
    if not block or not block.get("dice"):
        return None
    regions = ("WT", "TC", "ET")
    dice = " ".join(f"{r} {_f(block['dice'].get(r))}" for r in regions)
    hd95 = " / ".join(_f(block["hd95"].get(r), 1) for r in regions)
    fp, fn = (" / ".join(str(block[k].get(r, "n/a")) for r in regions) for k in ("fp", "fn"))
    return (
        f"test lesion-wise: {dice} | HD95 {hd95} mm | false-positive lesions {fp}, "
        f"missed {fn} (WT / TC / ET)"
    )


def _f(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
