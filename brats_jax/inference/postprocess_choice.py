"""Which 3D post-processing predict applies: a run's own choice (`run_postprocessing`: its
tuned `postprocessing.json`, else its config's `postprocess` fields) and an ensemble's
(`resolve_postprocessing`: its runs' choice when they agree, or one given)."""

import json
import pathlib

from brats_jax import config_fields
from brats_jax.inference import postprocess
from brats_jax.inference.case_lists import split_list


def resolve_postprocessing(workdirs, option: str = "auto", config=None):
    """The `PostprocessConfig` predict applies.

    option: "none"; a JSON file written by `brats_jax.tune_postprocessing`; or "auto": each
    run's choice (`run_postprocessing`), applied when every run of an ensemble has one that
    acts the same (`PostprocessConfig.effective`), else a one-line ValueError naming the
    runs that differ. `config`: the runs' configs (one per run, as `Ensemble.configs`), or
    the first run's; a run without one given reads its `config.json`.
    """
    if option == "none":
        return postprocess.PostprocessConfig()
    if option != "auto":
        return postprocess.load(option)
    workdirs = split_list(workdirs)
    configs = list(config) if isinstance(config, list | tuple) else [config]
    configs += [None] * (len(workdirs) - len(configs))
    chosen = [run_postprocessing(w, c).effective() for w, c in zip(workdirs, configs, strict=True)]
    if differ := [w for w, c in zip(workdirs, chosen, strict=True) if c != chosen[0]]:
        other = chosen[workdirs.index(differ[0])]
        raise ValueError(
            f"--postprocessing=auto: ensemble runs {', '.join(differ)} differ in post-processing "
            f"from {workdirs[0]} ({other.to_dict()} vs {chosen[0].to_dict()}); give one with "
            f"--postprocessing=FILE (or none)"
        )
    return chosen[0]


def run_postprocessing(workdir, config=None):
    """One run's `PostprocessConfig`: its `postprocessing.json` when present, else the
    `postprocess` fields of `config` (its config; None: read from its `config.json`), else
    the identity (no config.json)."""
    workdir = pathlib.Path(workdir)
    if (workdir / postprocess.POSTPROCESSING_FILE).is_file():
        return postprocess.load(workdir / postprocess.POSTPROCESSING_FILE)
    if config is None:
        path = workdir / "config.json"
        config = (
            config_fields.upgrade_legacy(json.loads(path.read_text())) if path.is_file() else {}
        )
    return postprocess.from_config(config)
