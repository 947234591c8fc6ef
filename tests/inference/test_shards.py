"""Work split over machines (`brats_jax.inference.work_split`): `predict --num_parts/--part_id` and
`experiments.run --shard=i/N|slurm` partition the cases / runs (groups kept whole), and two
processes on one `--out` train every run of a sweep once."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from absl import app

from brats_jax import predict
from brats_jax.inference import case_prediction, work_split
from experiments import report, run

# ----------------------------------------------------------------------------- parts


@pytest.mark.parametrize("n_items", [0, 1, 7, 12])
def test_parts_partition_round_robin(n_items):
    items = [f"case{j:02d}" for j in range(n_items)]
    for num_parts in range(1, 6):
        parts = [work_split.part_of(items, i, num_parts) for i in range(num_parts)]
        assert sorted(x for p in parts for x in p) == items  # every item exactly once
        for i, part in enumerate(parts):
            assert part == [x for j, x in enumerate(items) if j % num_parts == i]


@pytest.mark.parametrize(
    "part_id, num_parts, match",
    [(0, 0, "--num_parts=0; expected at least 1"), (-1, 2, "--part_id=-1 with --num_parts=2"),
     (2, 2, r"--part_id=2 with --num_parts=2; expected 0\.\.1"), (0.5, 2, "--part_id=0.5")],
)  # fmt: skip
def test_bad_parts_are_one_line_errors(part_id, num_parts, match):
    with pytest.raises(ValueError, match=match) as e:
        work_split.part_of([1, 2, 3], part_id, num_parts)
    assert "\n" not in str(e.value)


def _case_folders(root: pathlib.Path, ids) -> None:
    for cid in ids:
        (root / cid).mkdir(parents=True)
        for m in ("flair", "t1", "t1ce", "t2"):
            (root / cid / f"{cid}_{m}.nii.gz").touch()


def test_predict_parts_cover_every_case_once(tmp_path, monkeypatch, run_command):
    ids = ["Brats18_C_1", "Brats18_A_1", "Brats18_E_1", "Brats18_B_1", "Brats18_D_1"]
    _case_folders(tmp_path / "HGG", ids[:3])  # a list of two folders: found folder by folder,
    _case_folders(tmp_path / "LGG", ids[3:])  # parts are taken of the sorted case IDs
    given = f"{tmp_path / 'LGG'},{tmp_path / 'HGG'}"  # B, D then A, C, E
    got = []

    def fake_predict_cases(workdir, cases, output_dir, **kw):
        got.extend(c.case_id for c in cases)
        return []

    monkeypatch.setattr(case_prediction, "predict_cases", fake_predict_cases)
    for num_parts in (1, 2, 3, 7):
        seen = []
        for part_id in range(num_parts):
            got.clear()
            args = [f"--input={given}", f"--output={tmp_path / 'out'}", "--workdir=RUN",
                    f"--num_parts={num_parts}", f"--part_id={part_id}"]  # fmt: skip
            run_command(predict, *args)
            assert got == sorted(ids)[part_id::num_parts]  # round-robin over sorted IDs
            seen += got
        assert sorted(seen) == sorted(ids) and len(seen) == len(ids)


@pytest.mark.parametrize(
    "args, match",
    [(["--num_parts=0"], "--num_parts=0; expected at least 1"),
     (["--num_parts=2", "--part_id=2"], "--part_id=2 with --num_parts=2"),
     (["--num_parts=2", "--output=seg.nii.gz"], "--num_parts splits a folder of cases"),
     (["--output=seg.nii.gz", "--probabilities=probs"], "--probabilities probs: give a .nii"),
     (["--output=seg.nii.gz", "--uncertainty=./seg.nii.gz"],
      r"--output and --uncertainty are both \./seg\.nii\.gz; give each its own"),
     (["--output=o", "--probabilities=p", "--uncertainty=p/"],
      "--probabilities and --uncertainty are both p/")],
)  # fmt: skip
def test_predict_bad_parts_are_usage_errors(tmp_path, args, match, run_command):
    _case_folders(tmp_path, ["Brats18_A_1"])
    base = [f"--input={tmp_path / 'Brats18_A_1'}", f"--output={tmp_path / 'out'}", "--workdir=R"]
    with pytest.raises(app.UsageError, match=match) as e:
        run_command(predict, *base + args)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- shards


def test_parse_shard_and_slurm():
    assert work_split.parse_shard("1/4") == (1, 4)
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert work_split.parse_shard("slurm", env) == (2, 4)
    # sbatch --array=1-4: ids 1..4, SLURM_ARRAY_TASK_MIN=1
    assert work_split.parse_shard("slurm", {**env, "SLURM_ARRAY_TASK_ID": "4",
                                            "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4)  # fmt: skip
    bad = [("4/4", {}, r"--shard i=4 with --shard N=4; expected 0\.\.3"),
           ("1-4", {}, "--shard='1-4'; expected i/N"), ("0/0", {}, "--shard N=0"),
           ("slurm", {}, "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT not set"),
           ("slurm", {"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT not set"),
           ("slurm", {**env, "SLURM_ARRAY_TASK_ID": "x"}, "expected integers")]  # fmt: skip
    for text, environ, match in bad:
        with pytest.raises(ValueError, match=match) as e:
            work_split.parse_shard(text, environ)
        assert "\n" not in str(e.value)


def _by_model(runs):
    return {m: [r.name for r in runs if r.config.model.name == m] for m in ("unet", "transunet")}


def test_shards_partition_the_runs_and_keep_groups_whole(tmp_path, monkeypatch):
    runs = run.plan_runs(["table1", "table2"], "smoke", {}, out=tmp_path)  # 16 + 16 runs
    keys, real_key = {}, run._group_key  # the real keys, computed once per run
    monkeypatch.setattr(run, "_group_key", lambda c: keys.setdefault(c.name, real_key(c)))
    names = [r.name for r in runs]
    by_model = {m: {run._group_key(r.config) for r in runs if r.config.model.name == m}
                for m in ("unet", "transunet")}  # fmt: skip
    assert all(len(k) == 1 for k in by_model.values())
    assert by_model["unet"] != by_model["transunet"]
    for group_size in (0, 3, 8):
        g = max(group_size, 1)
        # hand-made units: each model's runs in sweep order, g at a time, unet's first
        units = [ms[i : i + g] for ms in _by_model(runs).values() for i in range(0, len(ms), g)]
        for n in (1, 2, 3, 5, 40):
            shards = [run.shard_runs(runs, i, n, group_size) for i in range(n)]
            got = [r.name for s in shards for r in s]
            assert sorted(got) == sorted(names) and len(got) == len(names)
            for i, shard in enumerate(shards):
                want = [x for u in units[i::n] for x in u]
                assert [r.name for r in shard] == [x for x in names if x in want]
                # the shard's process re-forms exactly its units
                formed = [[r.name for r in u] for u in run.plan_units(shard, group_size)]
                assert sorted(formed) == sorted(units[i::n])


def _dry_run_names(capsys, argv) -> list[str]:
    assert run.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.split()[0] for line in lines if "to run" in line or "finished" in line]


def test_cli_shards_plan_every_run_once_without_training(tmp_path, capsys, monkeypatch):
    base = ["table1", f"--out={tmp_path}", "--dry-run", "--only=unet-ce-*,unet-focal-*"]
    everything = _dry_run_names(capsys, base)
    assert len(everything) == 4
    for n in (2, 3):
        parts = [_dry_run_names(capsys, [*base, f"--shard={i}/{n}"]) for i in range(n)]
        assert sorted(x for p in parts for x in p) == sorted(everything)
    grouped = [_dry_run_names(capsys, [*base, "--group-size=2", f"--shard={i}/2"]) for i in (0, 1)]
    assert grouped == [everything[:2], everything[2:]]  # the two units of 2, one per shard
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert _dry_run_names(capsys, [*base, "--shard=slurm"]) == everything[1::2]
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert run.main([*base, "--shard=slurm"]) == 2
    assert "SLURM_ARRAY_TASK_COUNT not set" in capsys.readouterr().err


TINY = ["--config.train.num_steps=2", "--config.train.eval_every_steps=1",
        "--config.train.log_every_steps=1", "--config.eval.max_val_batches=1"]  # fmt: skip


@pytest.mark.slow
def test_two_processes_on_one_out_train_every_run_once(tmp_path):
    out = tmp_path / "out"
    args = ["table1", f"--out={out}", "--only=unet-ce-*", *TINY]
    repo = pathlib.Path(run.__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.run",
                *args,
                f"--shard={i}/2",
                f"--compile-cache={tmp_path / f'cc{i}'}",
            ],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    names = ["unet-ce-lr1e-4", "unet-ce-lr1e-5"]
    for name in names:
        assert json.loads((out / name / "results.json").read_text())["steps"] == 2
        assert json.loads((out / name / "run.json").read_text())["status"] == "done"
    log = (out / "sweep.log").read_text()
    assert all(log.count(f"{n}: starting") == 1 and log.count(f"{n}: done") == 1 for n in names)
    assert "shard=0/2 runs=1" in log and "shard=1/2 runs=1" in log
    assert sorted(r.name for r in report.load_runs(out)) == names
