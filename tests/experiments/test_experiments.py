"""experiments/: sweep expansion, override parsing, the sweep runner and the report."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import report, run, sweeps

# ----------------------------------------------------------------------------- sweeps


def test_table_sweeps_have_the_studys_grid():
    for name, model in (("table1", "unet"), ("table2", "transunet")):
        cells = sweeps.expand(name, "smoke")
        assert len(cells) == 16
        names = [c.name for c, _ in cells]
        assert len(set(names)) == 16
        assert all(n.startswith(model + "-") for n in names)
        combos = {
            (cfg.train.loss, cfg.train.beta if "cb" in cfg.train.loss else None,
             cfg.train.learning_rate)
            for _, cfg in cells
        }  # fmt: skip
        expected = {
            (loss, beta, lr)
            for loss, beta in [("ce", None), ("cb_ce", 0.5), ("cb_ce", 0.75), ("cb_ce", 0.99),
                               ("focal", None), ("cb_focal", 0.5), ("cb_focal", 0.75),
                               ("cb_focal", 0.99)]
            for lr in (1e-4, 1e-5)
        }  # fmt: skip
        assert combos == expected
        assert {cfg.train.gamma for _, cfg in cells} == {1.0}  # the study's focal gamma
        assert {cfg.train.batch_size for _, cfg in cells} == {1}
        assert {cfg.model.name for _, cfg in cells} == {model}
    names = {c.name for c in sweeps.SWEEPS["table1"].cells}
    assert {"unet-ce-lr1e-4", "unet-cb_focal-b0.99-lr1e-5", "unet-focal-lr1e-5"} <= names


def test_study_numbers_are_the_papers():
    # Spot checks against paper.md, Tables 1 and 2.
    t1 = {c.name: c.study for c in sweeps.SWEEPS["table1"].cells}
    t2 = {c.name: c.study for c in sweeps.SWEEPS["table2"].cells}
    assert t1["unet-ce-lr1e-4"] == 0.84240
    assert t1["unet-cb_ce-b0.5-lr1e-5"] == 0.78333
    assert t1["unet-cb_focal-b0.99-lr1e-4"] == 0.51534
    assert t2["transunet-ce-lr1e-5"] == 0.87480
    assert t2["transunet-focal-lr1e-5"] == 0.84543
    assert t2["transunet-cb_focal-b0.99-lr1e-5"] == 0.55809


def test_other_sweeps():
    f6 = {c.name for c in sweeps.SWEEPS["figure6"].cells}
    assert f6 == {"transunet-ce-lr1e-4", "transunet-ce-lr1e-5", "transunet-ce-lr1e-4-bs16",
                  "transunet-ce-lr1e-5-bs16"}  # fmt: skip
    fg = sweeps.expand("focal_gamma", "paper")
    assert sorted({cfg.train.gamma for _, cfg in fg}) == [0.0, 0.5, 1.0, 2.0, 3.0, 5.0]
    assert {cfg.train.loss for _, cfg in fg} == {"focal"}
    assert "unet-focal-g2-lr1e-4" in {c.name for c, _ in fg}
    lrs = {cfg.train.learning_rate for _, cfg in sweeps.expand("lr_range", "paper")}
    assert {1e-4, 1e-5} < lrs and len(lrs) >= 5
    long = sweeps.expand("long", "paper")
    assert [cfg.train.num_epochs for _, cfg in long] == [30, 30]
    assert all(c.name.endswith("-ep30") for c, _ in long)
    smoke_long = sweeps.expand("long", "smoke")
    assert [cfg.train.num_steps for _, cfg in smoke_long] == [3 * sweeps.SMOKE_STEPS] * 2
    seeds = sweeps.expand("seeds", "smoke")
    for model in ("unet", "transunet"):
        mine = [cfg for _, cfg in seeds if cfg.model.name == model]
        assert len({cfg.train.seed for cfg in mine}) >= 3
        assert {cfg.train.loss for cfg in mine} == {"ce"}
        assert len({cfg.data.split_seed for cfg in mine}) == 1  # same patients every seed
    assert "unet-ce-lr1e-4-seed1" in {c.name for c, _ in seeds}


def test_scales():
    (_, paper), *_ = sweeps.expand("table1", "paper")
    assert paper.data.image_size == 240 and paper.model.base_features == 64
    assert paper.train.num_epochs == 10 and paper.train.num_steps == 0
    assert paper.data.source == "synthetic"  # real data comes from the command line
    (_, smoke), *_ = sweeps.expand("table1", "smoke")
    assert smoke.data.image_size <= 64 and smoke.model.base_features <= 16
    assert 0 < smoke.train.num_steps <= 60
    assert 0 < smoke.train.eval_every_steps < smoke.train.num_steps  # a learning curve
    with pytest.raises(ValueError, match="scale"):
        sweeps.expand("table1", "huge")
    with pytest.raises(ValueError, match="unknown sweep 'table3'"):
        sweeps.get_sweep("table3")


def test_run_name_formatting():
    assert sweeps.fmt_lr(1e-4) == "1e-4" and sweeps.fmt_lr(3e-5) == "3e-5"
    assert sweeps.fmt_lr(2.5e-4) == "2.5e-4"
    n = sweeps.run_name("transunet", "ce", 1e-5, batch_size=16)
    assert n == "transunet-ce-lr1e-5-bs16"
    n = sweeps.run_name("unet", "focal", 1e-4, gamma=2.0, seed=1)
    assert n == "unet-focal-g2-lr1e-4-seed1"


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_types_and_errors():
    tmpl = sweeps.base_config("unet", "smoke")
    got = run.parse_overrides(
        ["--config.train.num_steps=5", "--config.data.source=kaggle_h5",
         "--config.data.root", "/x", "--config.data.prune=false",
         "--config.train.beta=0.9", "--config.train.gamma=2"],
        tmpl,
    )  # fmt: skip
    assert got == {"train.num_steps": 5, "data.source": "kaggle_h5", "data.root": "/x",
                   "data.prune": False, "train.beta": 0.9, "train.gamma": 2.0}  # fmt: skip
    assert isinstance(got["train.num_steps"], int) and isinstance(got["train.gamma"], float)
    with pytest.raises(ValueError, match="train has no field 'num_stepz'"):
        run.parse_overrides(["--config.train.num_stepz=5"], tmpl)
    with pytest.raises(ValueError, match="no field 'trian'"):
        run.parse_overrides(["--config.trian.num_steps=5"], tmpl)
    with pytest.raises(ValueError, match="expected a int"):
        run.parse_overrides(["--config.train.num_steps=2.5"], tmpl)
    with pytest.raises(ValueError, match="expected a bool"):
        run.parse_overrides(["--config.data.prune=maybe"], tmpl)
    with pytest.raises(ValueError, match="is a group"):
        run.parse_overrides(["--config.train=1"], tmpl)
    with pytest.raises(ValueError, match="unexpected argument"):
        run.parse_overrides(["--bogus"], tmpl)


def test_overrides_apply_to_every_run_and_swept_fields_are_refused(tmp_path):
    specs = run.plan_runs("table1", "smoke", {"train.num_steps": 3, "data.image_size": 16},
                          out=tmp_path)  # fmt: skip
    assert len(specs) == 16
    assert all(s.config.train.num_steps == 3 and s.config.data.image_size == 16 for s in specs)
    assert all(s.workdir == tmp_path / s.name for s in specs)
    with pytest.raises(ValueError, match="varies train.learning_rate"):
        run.plan_runs("table1", "smoke", {"train.learning_rate": 1e-3}, out=tmp_path)
    # A named field that the sweep keeps fixed may be overridden; the name says so.
    specs = run.plan_runs("table1", "smoke", {"train.batch_size": 8}, out=tmp_path)
    assert specs[0].name == "unet-ce-lr1e-4-bs8"
    # An epoch budget is named as run: 30 epochs, and the `long` sweep's 3x that, 90.
    specs = run.plan_runs(["table1", "long"], "paper", {"train.num_epochs": 30}, out=tmp_path)
    budgets = {s.name: s.config.train.num_epochs for s in specs if "unet-ce-lr1e-4" in s.name}
    assert budgets == {"unet-ce-lr1e-4-ep30": 30, "unet-ce-lr1e-4-ep90": 90}
    paper = run.plan_runs(["table1", "long"], "paper", {}, out=tmp_path)
    assert {s.name for s in paper} >= {"unet-ce-lr1e-4", "unet-ce-lr1e-4-ep30"}
    # Shared runs are planned once, placed in both tables.
    both = run.plan_runs(["table2", "figure6"], "smoke", {}, out=tmp_path)
    assert len(both) == 16 + 2
    shared = next(s for s in both if s.name == "transunet-ce-lr1e-5")
    assert set(shared.placements) == {"table2", "figure6"}


def test_cli_errors_and_dry_run(tmp_path, capsys):
    assert run.main(["table1", f"--out={tmp_path}", "--config.train.nope=1"]) == 2
    assert "no field 'nope'" in capsys.readouterr().err
    assert run.main(["tableX", f"--out={tmp_path}"]) == 2
    assert run.main(["table1", f"--out={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "unet-cb_focal-b0.99-lr1e-5" in out and "16 runs" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


# ----------------------------------------------------------------------------- fake training


# Fake test Dice of a run, a known function of its config (so the report can be checked).
def _fake_dice(config) -> float:
    t = config.train
    return round(0.5 + 0.1 * math.log10(t.learning_rate / 1e-5) + 0.01 * t.seed
                 + (0.05 if t.loss == "ce" else 0.0) + (0.1 if config.model.name == "transunet"
                                                        else 0.0), 6)  # fmt: skip


class FakeTrainer:
    """Writes results.json / metrics.jsonl like train_and_evaluate; records calls."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, config, workdir):
        workdir = pathlib.Path(workdir)
        self.calls.append(workdir.name)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        if workdir.name in self.fail:
            raise RuntimeError(f"boom in {workdir.name}")
        d = _fake_dice(config)
        with open(workdir / "metrics.jsonl", "a") as f:
            for step in (1, 2, 3, 4):
                f.write(json.dumps({"step": step, "train_loss": 1.0 / step, "epoch": step / 2})
                        + "\n")  # fmt: skip
                if step % 2 == 0:
                    f.write(json.dumps({"step": step, "val_loss": 1.2 / step,
                                        "val_paper_dice": d * step / 4, "val_dice_WT": d})
                            + "\n")  # fmt: skip
        res = {"paper_dice": d, "class_dice": [0.99, d, d, d],
               "dice": {"WT": d - 0.1, "TC": d - 0.2, "ET": None},
               "hd95": {"WT": 5.0, "TC": 6.0, "ET": None}, "per_case": [], "steps": 4}  # fmt: skip
        (workdir / "results.json").write_text(json.dumps(res))
        return res


def test_execute_skips_finished_resumes_missing_and_survives_failures(tmp_path):
    specs = run.plan_runs("figure6", "smoke", {}, out=tmp_path)
    fake = FakeTrainer(fail={"transunet-ce-lr1e-4-bs16"})
    outcomes = run.execute(specs, train_fn=fake)
    assert [o.status for o in outcomes] == ["done", "done", "failed", "done"]
    err = (tmp_path / "transunet-ce-lr1e-4-bs16" / "error.txt").read_text()
    assert "Traceback" in err and "boom in transunet-ce-lr1e-4-bs16" in err
    # Rerun: only the failed run runs again.
    fake2 = FakeTrainer()
    outcomes = run.execute(specs, train_fn=fake2)
    assert fake2.calls == ["transunet-ce-lr1e-4-bs16"]
    assert not (tmp_path / "transunet-ce-lr1e-4-bs16" / "error.txt").exists()
    # Delete one results.json: only that run runs.
    (tmp_path / "transunet-ce-lr1e-5" / "results.json").unlink()
    fake3 = FakeTrainer()
    run.execute(specs, train_fn=fake3)
    assert fake3.calls == ["transunet-ce-lr1e-5"]
    log = (tmp_path / "sweep.log").read_text()
    assert log.count("transunet-ce-lr1e-5: skipped") == 1
    # An unfinished run whose saved config differs is refused, not mixed.
    (tmp_path / "transunet-ce-lr1e-5" / "results.json").unlink()
    other = run.plan_runs("figure6", "smoke", {"train.num_steps": 7}, out=tmp_path)
    fake4 = FakeTrainer()
    outcomes = run.execute(other[1:2], train_fn=fake4)
    assert outcomes[0].status == "failed" and fake4.calls == []
    assert "num_steps" in outcomes[0].message


def test_cli_exit_code_when_a_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "_default_train", FakeTrainer(fail={"transunet-ce-lr1e-5-bs16"}))
    args = ["figure6", f"--out={tmp_path}", "--compile-cache=off"]
    assert run.main(args) == 1
    monkeypatch.setattr(run, "_default_train", FakeTrainer())
    assert run.main(args) == 0
    log = (tmp_path / "sweep.log").read_text()
    assert log.count(": skipped") == 3 and log.count(": done in") == 3 + 1
    # --only picks runs by name pattern.
    assert run.main([*args, "--only=*-bs16", "--dry-run"]) == 0
    assert run.main([*args, "--only=nothing*"]) == 2


def _welch(a, b):
    """Welch's t and two-sided p by the textbook formulas (Welch-Satterthwaite df)."""
    from scipy import special

    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    p = special.betainc(df / 2, 0.5, df / (df + t * t))  # = 2 * (1 - T_df(|t|))
    return t, p


def test_report_tables_and_figures_from_fake_results(tmp_path):
    fake = FakeTrainer(fail={"unet-cb_ce-b0.75-lr1e-5"})
    names = ["table1", "figure6", "focal_gamma", "lr_range", "long", "seeds"]
    run.execute(run.plan_runs(names, "smoke", {}, out=tmp_path), train_fn=fake)
    summary = report.make_report(tmp_path)
    out = tmp_path / "report"
    assert summary["table1"] == {"filled": 15, "cells": 16, "files": summary["table1"]["files"]}
    assert "table2" not in summary  # no runs
    rows = list(csv.DictReader((out / "table1.csv").open()))
    assert len(rows) == 8
    row = rows[0]
    assert row["row"] == "Unweighted CE"
    # ce, lr 1e-4, U-Net, seed 0: 0.5 + 0.1 * 1 + 0.05
    assert float(row["LR 1e-4 dice"]) == pytest.approx(0.65)
    assert float(row["LR 1e-4 dice_WT"]) == pytest.approx(0.55)
    assert float(row["LR 1e-4 study"]) == 0.8424 and float(row["LR 1e-5 study"]) == 0.8393
    md = (out / "report.md").read_text()
    assert "SMOKE SCALE" in md
    assert "| Unweighted CE | 0.6500 | 0.550 / 0.450 / — | 0.5500 |" in md
    assert "(failed)" in md and "unet-cb_ce-b0.75-lr1e-5" in md
    for f in (
        "table1_curves.png",
        "figure6_bars.png",
        "focal_gamma.png",
        "lr_range.png",
        "seeds.png",
        "seeds_curves.png",
        "long_curves.png",
        "runs.csv",
        "seeds.csv",
    ):
        assert (out / f).stat().st_size > 0, f
    assert (out / "table1_curves.png").read_bytes()[:4] == b"\x89PNG"
    # Seeds: U-Net dice = 0.65 + 0.01 s, TransUNet = 0.5 + 0.1*log10(1) + 0.05 + 0.1 + 0.01 s.
    # Seeds: U-Net (CE, lr 1e-4) dice = 0.65 + 0.01 * seed.
    seeds = sweeps.SEEDS
    a = np.array([0.65 + 0.01 * s for s in seeds])
    seeds_csv = (out / "seeds.csv").read_text()
    assert f"U-Net,{len(seeds)},{a.mean():.6g},{a.std(ddof=1):.6g}," in seeds_csv
    assert "Welch" in md and "n U-Net" in md


def test_welch_matches_textbook_formula(tmp_path):
    # Two models with different spreads; the report's t and p against the closed form.
    dice = {("unet", 0): 0.80, ("unet", 1): 0.82, ("unet", 2): 0.79, ("unet", 3): 0.85,
            ("unet", 4): 0.81, ("transunet", 0): 0.86, ("transunet", 1): 0.84,
            ("transunet", 2): 0.90, ("transunet", 3): 0.88, ("transunet", 4): 0.83}  # fmt: skip

    def trainer(config, workdir):
        d = dice[(config.model.name, config.train.seed)]
        (pathlib.Path(workdir) / "results.json").write_text(
            json.dumps(
                {"paper_dice": d, "dice": {"WT": d, "TC": d, "ET": d}, "hd95": {}, "steps": 1}
            )
        )
        return {}

    run.execute(run.plan_runs("seeds", "smoke", {}, out=tmp_path), train_fn=trainer)
    sweep = sweeps.SWEEPS["seeds"]
    _, _, stats = report.seeds_table(sweep, report.load_runs(tmp_path))
    a = [dice[("unet", s)] for s in sweeps.SEEDS]
    b = [dice[("transunet", s)] for s in sweeps.SEEDS]
    t, p = _welch(a, b)
    got = stats["tests"]["paper_dice"]
    assert got["n1"] == got["n2"] == len(sweeps.SEEDS)
    assert got["t"] == pytest.approx(t, rel=1e-9)
    assert got["p"] == pytest.approx(p, rel=1e-6)


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no runs under" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real training


def _train_stack_ready() -> bool:
    try:
        from brats_jax import data, models  # noqa: F401

        return hasattr(data, "make_source") and hasattr(models, "create_model")
    except Exception:  # noqa: BLE001
        return False


TINY = ["--config.train.num_steps=2", "--config.train.eval_every_steps=1",
        "--config.train.log_every_steps=1", "--config.eval.max_val_batches=1"]  # fmt: skip


@pytest.mark.skipif(not _train_stack_ready(), reason="training stack not importable")
def _run_cli(tmp_path, *args):
    """`python -m experiments.run ...` in a subprocess with its own compilation cache (so the
    cache setting stays out of the test process)."""
    cmd = [sys.executable, "-m", "experiments.run", *args,
           f"--compile-cache={tmp_path / 'cc'}"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    repo = pathlib.Path(run.__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not _train_stack_ready(), reason="training stack not importable")
def test_two_real_runs_resume_only_the_missing_one(tmp_path):
    out = tmp_path / "out"
    args = ["table1", f"--out={out}", "--only=unet-ce-*", *TINY]
    _run_cli(tmp_path, *args)
    names = ["unet-ce-lr1e-4", "unet-ce-lr1e-5"]
    first = {n: (out / n / "results.json").stat().st_mtime_ns for n in names}
    res = json.loads((out / names[0] / "results.json").read_text())
    assert res["steps"] == 2 and 0.0 <= res["paper_dice"] <= 1.0
    (out / names[1] / "results.json").unlink()
    _run_cli(tmp_path, *args)
    assert (out / names[0] / "results.json").stat().st_mtime_ns == first[names[0]]
    assert (out / names[1] / "results.json").stat().st_mtime_ns != first[names[1]]
    log = (out / "sweep.log").read_text()
    assert log.count(f"{names[0]}: skipped") == 1 and log.count(f"{names[0]}: starting") == 1
    assert log.count(f"{names[1]}: starting") == 1 and log.count(f"{names[1]}: resuming") == 1


@pytest.mark.slow
@pytest.mark.skipif(not _train_stack_ready(), reason="training stack not importable")
def test_table1_smoke_end_to_end(tmp_path):
    t0 = time.perf_counter()
    out = tmp_path / "out"
    args = ["table1", f"--out={out}", *TINY]
    _run_cli(tmp_path, *args)
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    assert len(first) == 16
    assert report.main([str(out)]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["table1"]["filled"] == 16
    rows = list(csv.DictReader((out / "report" / "table1.csv").open()))
    assert len(rows) == 8
    for row in rows:
        for col in ("LR 1e-4 dice", "LR 1e-5 dice"):
            assert 0.0 <= float(row[col]) <= 1.0
    assert (out / "report" / "table1_curves.png").stat().st_size > 0
    # Resume: delete one run's results; only it runs again.
    victim = "unet-cb_focal-b0.5-lr1e-5"
    (out / victim / "results.json").unlink()
    _run_cli(tmp_path, *args)
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    changed = {k for k in after if after[k] != first.get(k)}
    assert changed == {victim}
    print(f"table1 smoke (2 steps/run) + report + resume: {time.perf_counter() - t0:.1f}s")


def test_colab_notebook_is_valid_nbformat4():
    nb = json.loads((pathlib.Path(run.__file__).parent / "colab_tpu.ipynb").read_text())
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert isinstance(nb["metadata"], dict) and nb["cells"]
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict) and isinstance(cell["source"], list)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert 'pip install -q -e ".[tpu]"' in code
    assert "python -m experiments.run {ARGS}" in code and "--scale=paper" in code
    assert "--config.data.source=kaggle_h5" in code and "--config.data.root=" in code
    assert "python -m experiments.report {OUT}" in code
    assert "kagglehub" in code and "drive.mount" in code


def test_group_size_flag_and_its_vmap_alias():
    from experiments import run

    parse = run._parser().parse_known_args
    assert parse(["table1", "--out=x", "--group-size=4"])[0].group_size == 4
    assert parse(["table1", "--out=x", "--vmap=3"])[0].group_size == 3  # the old name
    assert parse(["table1", "--out=x", "--group-size"])[0].group_size == 8
    assert parse(["table1", "--out=x"])[0].group_size == 0
