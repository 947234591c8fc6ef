"""Which post-processing predict applies (`inference/postprocess_choice.py`), on run folders
written by hand: the tuned file first, then the config's fields, then the identity."""

import json

import pytest

from brats_jax.inference import postprocess as pp
from brats_jax.inference.postprocess_choice import resolve_postprocessing, run_postprocessing

TUNED = pp.PostprocessConfig(min_component_voxels=40, connectivity=6)


def _run(tmp_path, name, tuned=None, fields=None):
    run = tmp_path / name
    run.mkdir()
    if tuned is not None:
        pp.save(run / pp.POSTPROCESSING_FILE, tuned)
    if fields is not None:
        (run / "config.json").write_text(json.dumps({"model": {}, "postprocess": fields}))
    return run


def _fields(**kw):
    return {"min_component_voxels": 0, "largest_component_only": False, "connectivity": 26,
            "et_min_voxels": 0} | kw  # fmt: skip


def test_run_choice_order(tmp_path):
    both = _run(tmp_path, "both", tuned=TUNED, fields=_fields(et_min_voxels=9))
    assert run_postprocessing(both) == TUNED  # the tuned file wins over the config
    cfg = _run(tmp_path, "cfg", fields=_fields(et_min_voxels=9))
    assert run_postprocessing(cfg) == pp.PostprocessConfig(et_min_voxels=9)
    # a config given in memory is used instead of config.json
    given = {"postprocess": _fields(largest_component_only=True)}
    assert run_postprocessing(str(cfg), given) == pp.PostprocessConfig(largest_component_only=True)
    assert run_postprocessing(_run(tmp_path, "bare")) == pp.PostprocessConfig()
    # an old config.json without the fields: upgraded, the identity
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
    assert run_postprocessing(old).is_identity


def test_resolve_none_file_and_auto(tmp_path):
    a = _run(tmp_path, "a", tuned=TUNED)
    assert resolve_postprocessing(str(a), "none") == pp.PostprocessConfig()
    file = tmp_path / "chosen.json"
    pp.save(file, pp.PostprocessConfig(et_min_voxels=5))
    assert resolve_postprocessing(str(a), str(file)) == pp.PostprocessConfig(et_min_voxels=5)
    assert resolve_postprocessing(str(a)) == TUNED
    # runs whose choices act alike agree (connectivity means nothing without a component step)
    b = _run(tmp_path, "b", fields=_fields(connectivity=6))
    c = _run(tmp_path, "c", fields=_fields())
    assert resolve_postprocessing(f"{b},{c}") == pp.PostprocessConfig()
    # configs given per run are used in order, a missing one is read from config.json
    one = {"postprocess": _fields(et_min_voxels=3)}  # not a list: the first run's
    assert resolve_postprocessing(str(b), config=one) == pp.PostprocessConfig(et_min_voxels=3)
    with pytest.raises(ValueError) as err:
        resolve_postprocessing([str(b), str(c)], config=[{"postprocess": _fields(et_min_voxels=3)}])
    assert f"ensemble runs {c} differ in post-processing from {b}" in str(err.value)


def test_resolve_names_the_runs_that_differ(tmp_path):
    a = _run(tmp_path, "a", tuned=TUNED)
    b = _run(tmp_path, "b", fields=_fields())
    c = _run(tmp_path, "c", tuned=TUNED)
    d = _run(tmp_path, "d", fields=_fields(et_min_voxels=2))
    with pytest.raises(ValueError) as err:
        resolve_postprocessing(f"{a},{b},{c},{d}")
    assert str(err.value) == (
        f"--postprocessing=auto: ensemble runs {b}, {d} differ in post-processing from {a} "
        f"({pp.PostprocessConfig().to_dict()} vs {TUNED.to_dict()}); give one with "
        "--postprocessing=FILE (or none)"
    )
