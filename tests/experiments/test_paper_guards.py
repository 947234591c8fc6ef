"""A paper-scale sweep stops at once, with one line, on phantoms it was not asked for or on
the CPU backend (issue 16's guards)."""

import jax

from experiments import run


def test_paper_scale_without_data_source_is_refused(tmp_path, capsys):
    code = run.main(["table1", "--out", str(tmp_path / "out"), "--scale=paper", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: --scale=paper trains the study's grid")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_paper_scale_on_synthetic_data_when_asked_for(tmp_path, capsys):
    args = ["table1", "--out", str(tmp_path), "--scale=paper", "--dry-run"]
    code = run.main(args + ["--config.data.source=synthetic"])
    assert code == 0
    assert "16 runs" in capsys.readouterr().out


def test_paper_scale_on_the_cpu_is_refused_before_any_run(tmp_path, capsys):
    assert jax.default_backend() == "cpu"  # the test machine
    out = tmp_path / "out"
    args = ["table1", "--out", str(out), "--scale=paper", "--config.data.source=synthetic"]
    code = run.main(args + ["--only=unet-ce-lr1e-4", "--compile-cache=off"])
    captured = capsys.readouterr()
    assert code == 2
    assert "sweep backend: cpu" in captured.out
    assert captured.err.strip().startswith("error: --scale=paper on the CPU backend")
    assert "--allow-cpu" in captured.err
    assert not out.exists()  # nothing was trained or written


def test_allow_cpu_lets_the_backend_check_pass(capsys):
    assert run.check_paper_backend(allow_cpu=True) == "cpu"
    assert "sweep backend: cpu (1 device)" in capsys.readouterr().out


def test_sweep_skips_a_run_folder_another_process_holds(tmp_path):
    """Issue 18: two sweeps on one --out never train one run twice or write into it."""
    import subprocess
    import sys

    from configs import unet

    workdir = tmp_path / "out" / "unet-ce-lr1e-4"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from brats_jax.runs.workdir_lock import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
         str(workdir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        trained = []
        spec = run.PlannedRun("unet-ce-lr1e-4", unet.get_config("tiny"), workdir)
        outcomes = run.execute([spec], train_fn=lambda c, w: trained.append(w))
    finally:
        holder.kill()
        holder.wait()
    assert [o.status for o in outcomes] == ["skipped"]
    assert f"pid {holder.pid}" in outcomes[0].message
    assert trained == []
    assert not (workdir / run.ERROR).exists() and not (workdir / run.RUN_INFO).exists()
