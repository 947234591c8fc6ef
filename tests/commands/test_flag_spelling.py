"""The argparse commands (bench, experiments) take absl's underscore spelling of their
dashed options, so every command of the project accepts one style."""

import pytest

from brats_jax import bench, cli
from experiments import run as run_cmd


def _parser():
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--dry-run", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("train")
    s.add_argument("--image-size", type=int, default=0)
    return p


def test_underscore_spellings_name_the_dashed_options_in_parsers_and_subparsers():
    args, rest = _parser().parse_known_args(
        ["--group_size=3", "--dry_run", "train", "--image_size", "64", "--config.data.cache_dir=c"]
    )
    assert (args.group_size, args.dry_run, args.image_size) == (3, True, 64)
    assert rest == ["--config.data.cache_dir=c"]  # not an option of the parser: left as it is
    args = _parser().parse_args(["--group-size=2", "train", "--image-size=8"])
    assert (args.group_size, args.image_size) == (2, 8)


def test_an_unknown_underscore_option_is_still_an_error():
    with pytest.raises(SystemExit):
        _parser().parse_args(["--group_sizes=3"])


def test_experiments_run_and_bench_take_both_spellings():
    for argv in (["--group-size=2", "--dry-run"], ["--group_size=2", "--dry_run"]):
        args, _ = run_cmd._parser().parse_known_args(["table1", "--out=o", *argv])
        assert (args.group_size, args.dry_run) == (2, True)
    args = bench._parser().parse_args(
        ["train", "--model=unet", "--image_size=64", "--batch_size=3"]
    )
    assert (args.image_size, args.batch_size) == (64, 3)
