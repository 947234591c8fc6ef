"""Collect a sweep folder into tables and figures: `python -m experiments.report DIR [--out=R]`.

Reads every `DIR/<run>/run.json` (written by `experiments.run`: which table cells the run
fills), `results.json`, `config.json` and `metrics.jsonl`, and writes to R (default
`DIR/report/`):

- `report.md`: per sweep, a table laid out like the study's (rows = loss settings etc.,
  columns = learning rates etc.): our test Dice in the study's metric (4-class slice mean,
  background included), our BraTS region Dice WT / TC / ET (per 3D volume), and the study's
  own number where it reported one. The seeds sweep gets mean +- std over seeds and a Welch
  t-test between the models. Every section says the scale its runs were trained at. Below
  each table: cells repeated with other seeds (mean +- std), the study's metric next to the
  two readings it leaves open (absent classes excluded; pooled over all test slices), and
  per class-balanced cell the mean effective class weight over training (metrics.jsonl's
  `class_weight_0..3`) with its mean train loss and test Dice next to its unweighted twin's.
- `<sweep>.csv`: the same table, one value per column; `runs.csv`: every run, long format.
- `<sweep>_curves.png`: learning curves (train loss, validation loss, validation Dice against
  epoch) of the sweep's runs; `figure6_bars.png`, `focal_gamma.png`, `lr_range.png`,
  `seeds.png`: the sweep-specific plots.

All files are written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from brats_jax import cli, fileio  # noqa: E402
from brats_jax.figures import plots
from experiments import sweeps  # noqa: E402
from experiments.run import ERROR, RESULTS, RUN_INFO  # noqa: E402

REGIONS = ("WT", "TC", "ET")
DASH = "—"
# results.json keys: the study's metric and the two readings it leaves open, with labels
READINGS = {
    "paper_dice": "study's metric (slice mean, absent classes = 1)",
    "paper_dice_absent_excluded": "slice mean, absent classes excluded",
    "pooled_dice_4class": "pooled over all test slices",
}
CLASS_LABELS = ("bg", "NCR", "ED", "ET")


@dataclasses.dataclass
class RunRecord:
    """One run folder as found on disk.

    Attributes:
      name: folder name. workdir: its path.
      info: run.json (placements: sweep -> {"row", "col", "study"}; scale; model; overrides).
      results: results.json or None (unfinished or failed).
      config: config.json or {}.
      failed: an error.txt exists and no results.
    """

    name: str
    workdir: pathlib.Path
    info: dict
    results: dict | None
    config: dict
    failed: bool

    @property
    def state(self) -> str:
        """ "done", "failed" or "unfinished"."""
        if self.results is not None:
            return "done"
        return "failed" if self.failed else "unfinished"

    @property
    def scale(self) -> str:
        """The run's scale from run.json ("smoke" | "paper" | "?")."""
        return str(self.info.get("scale", "?"))

    def metric(self, key: str) -> float | None:
        """`paper_dice` (or another top-level number such as `pooled_dice_4class`),
        `dice_WT`.. or `hd95_WT`.. from results.json; None when absent/NaN."""
        if self.results is None:
            return None
        if key in READINGS:
            v = self.results.get(key)
        else:
            group, region = key.split("_", 1)
            v = (self.results.get(group) or {}).get(region)
        if v is None:
            return None
        v = float(v)
        return None if math.isnan(v) else v


def load_runs(root: str | pathlib.Path) -> list[RunRecord]:
    """Every run folder under `root` that has a run.json, sorted by name."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no sweep folder at {root}")
    runs = []
    for info_path in sorted(root.glob(f"*/{RUN_INFO}")):
        wd = info_path.parent
        info = _read_json(info_path) or {}
        results = _read_json(wd / RESULTS)
        config = _read_json(wd / "config.json") or {}
        runs.append(
            RunRecord(wd.name, wd, info, results, config, (wd / ERROR).exists() and not results)
        )
    return runs


def _read_json(path: pathlib.Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------- tables


def cell_runs(sweep: sweeps.Sweep, runs: Sequence[RunRecord]) -> dict[tuple[str, str], RunRecord]:
    """`{(row, col): run}` for the sweep's cells; a finished run beats an unfinished one,
    then the run named as the cell (not a repeat with another `train.seed`), then the later
    results.json wins. All runs of a cell: `cell_repeats`."""
    found: dict[tuple[str, str], RunRecord] = {}
    names = {(c.row, c.col): c.name for c in sweep.cells}
    for key, group in cell_repeats(sweep, runs).items():
        for r in group:
            old = found.get(key)
            if old is None or _rank(r, names.get(key)) > _rank(old, names.get(key)):
                found[key] = r
    return found


def cell_repeats(
    sweep: sweeps.Sweep, runs: Sequence[RunRecord]
) -> dict[tuple[str, str], list[RunRecord]]:
    """`{(row, col): [runs placed there]}`: the cell's run and its repeats (other seeds)."""
    out: dict[tuple[str, str], list[RunRecord]] = {}
    for r in runs:
        p = (r.info.get("placements") or {}).get(sweep.name)
        if p:
            out.setdefault((p["row"], p["col"]), []).append(r)
    return out


def _rank(r: RunRecord, cell_name: str | None = None) -> tuple:
    mtime = (r.workdir / RESULTS).stat().st_mtime if r.results is not None else 0.0
    return (r.results is not None, r.name == cell_name, mtime)


def _layout(sweep: sweeps.Sweep) -> tuple[list[str], list[str], dict[tuple[str, str], Any]]:
    rows, cols, study = [], [], {}
    for c in sweep.cells:
        if c.row not in rows:
            rows.append(c.row)
        if c.col not in cols:
            cols.append(c.col)
        study[(c.row, c.col)] = c.study
    return rows, cols, study


def _f(v: float | None, nd: int = 4) -> str:
    return DASH if v is None else f"{v:.{nd}f}"


def _cell_text(r: RunRecord | None) -> tuple[str, str]:
    """(paper Dice text, "WT / TC / ET" text) of a table cell."""
    if r is None:
        return DASH, DASH
    if r.state != "done":
        return f"({r.state})", DASH
    regions = " / ".join(_f(r.metric(f"dice_{k}"), 3) for k in REGIONS)
    return _f(r.metric("paper_dice")), regions


def grid_table(sweep: sweeps.Sweep, runs: Sequence[RunRecord]) -> tuple[str, str, int]:
    """(Markdown, CSV, cells filled) of a rows x columns sweep.

    Markdown columns per sweep column: our Dice (study's metric), our WT / TC / ET; the
    study's numbers sit in side columns at the right. CSV: one value per column.
    """
    rows, cols, study = _layout(sweep)
    found = cell_runs(sweep, runs)
    head = [sweep.row_header]
    for col in cols:
        head += [f"{col}: Dice (ours)", f"{col}: WT / TC / ET (ours)"]
    head += [f"{col}: Dice (study)" for col in cols]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv_head = ["row"]
    for col in cols:
        csv_head += [f"{col} {k}" for k in ("dice", "dice_WT", "dice_TC", "dice_ET", "study")]
        csv_head += [f"{col} run"]
    csv = [",".join(_csv(h) for h in csv_head)]
    filled = 0
    for row in rows:
        line, cline = [row], [row]
        for col in cols:
            r = found.get((row, col))
            dice, regions = _cell_text(r)
            line += [dice, regions]
            done = r is not None and r.state == "done"
            filled += done
            vals = [r.metric(k) if done else None for k in ("paper_dice", "dice_WT", "dice_TC",
                                                             "dice_ET")]  # fmt: skip
            cline += [_num(v) for v in vals] + [_num(study.get((row, col)))]
            cline += [r.name if r is not None else ""]
        line += [_f(study.get((row, col)), 5) if study.get((row, col)) is not None else DASH
                 for col in cols]  # fmt: skip
        md.append("| " + " | ".join(line) + " |")
        csv.append(",".join(_csv(x) for x in cline))
    return "\n".join(md) + "\n", "\n".join(csv) + "\n", filled


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _csv(s: str) -> str:
    return f'"{s}"' if any(ch in s for ch in ',"\n') else s


def seeds_table(sweep: sweeps.Sweep, runs: Sequence[RunRecord]) -> tuple[str, str, dict]:
    """(Markdown, CSV, stats) for the seeds sweep: mean +- std per model, Welch t-tests.

    stats: {"values": {model row: {metric: [..]}}, "tests": {metric: {t, p, n1, n2}}}.
    """
    from scipy import stats as sstats

    rows, _, study = _layout(sweep)
    found = cell_runs(sweep, runs)
    metrics = ["paper_dice"] + [f"dice_{k}" for k in REGIONS]
    values: dict[str, dict[str, list[float]]] = {row: {m: [] for m in metrics} for row in rows}
    seeds_of: dict[str, list[str]] = {row: [] for row in rows}
    for (row, col), r in found.items():
        if r.state != "done":
            continue
        seeds_of[row].append(col)
        for m in metrics:
            v = r.metric(m)
            if v is not None:
                values[row][m].append(v)
    study_of = {row: next((v for (rr, _), v in study.items() if rr == row), None) for row in rows}
    head = ["Model", "n", "Dice (ours) mean ± std"] + [f"{k} mean ± std" for k in REGIONS]
    head += ["Dice (study, 1 run)"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    csv = ["model,n," + ",".join(f"{m}_mean,{m}_std" for m in metrics) + ",study"]
    for row in rows:
        v = values[row]
        n = len(v["paper_dice"])
        cells = [_mean_std(v[m]) for m in metrics]
        md.append("| " + " | ".join([row, str(n), *cells, _f(study_of[row], 5)]) + " |")
        nums = []
        for m in metrics:
            a = np.asarray(v[m], float)
            nums += [_num(float(a.mean()) if a.size else None),
                     _num(float(a.std(ddof=1)) if a.size > 1 else None)]  # fmt: skip
        csv.append(",".join([_csv(row), str(n), *nums, _num(study_of[row])]))
    tests = {}
    md_tests = []
    if len(rows) == 2:
        a_row, b_row = rows
        md_tests = [
            "",
            f"Welch t-test ({a_row} vs {b_row}, unequal variances, two-sided; "
            "`scipy.stats.ttest_ind(equal_var=False)`):",
            "",
            "| metric | n " + a_row + " | n " + b_row + " | mean difference | t | p |",
            "|---|---|---|---|---|---|",
        ]
        for m in metrics:
            a, b = np.asarray(values[a_row][m], float), np.asarray(values[b_row][m], float)
            t = p = None
            if a.size >= 2 and b.size >= 2:
                res = sstats.ttest_ind(a, b, equal_var=False)
                t = float(res.statistic) if np.isfinite(res.statistic) else None
                p = float(res.pvalue) if np.isfinite(res.pvalue) else None
            diff = float(a.mean() - b.mean()) if a.size and b.size else None
            tests[m] = {"t": t, "p": p, "n1": int(a.size), "n2": int(b.size), "diff": diff}
            md_tests.append(
                f"| {m} | {a.size} | {b.size} | {_f(diff)} | {_f(t, 3)} | "
                f"{DASH if p is None else f'{p:.3g}'} |"
            )
        md_tests.append("")
        md_tests.append(
            "n < 2 on either side (or zero variance on both) leaves t and p empty. "
            "Runs differ only in `train.seed` (initialisation, shuffling, dropout); "
            "the patient split (`data.split_seed`) is the same in all of them."
        )
        csv.append("")
        csv.append("metric,n1,n2,mean_difference,t,p")
        for m, r in tests.items():
            csv.append(f"{m},{r['n1']},{r['n2']},{_num(r['diff'])},{_num(r['t'])},{_num(r['p'])}")
    stats = {"values": values, "tests": tests, "seeds": seeds_of}
    return "\n".join(md + md_tests) + "\n", "\n".join(csv) + "\n", stats


def _mean_std(v: list[float]) -> str:
    if not v:
        return DASH
    a = np.asarray(v, float)
    if a.size == 1:
        return f"{a[0]:.4f}"
    return f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"


def runs_csv(runs: Sequence[RunRecord]) -> str:
    """Every run, long format: name, state, scale, model, loss, beta, gamma, lr, batch,
    seed, steps, data source, Dice (study's metric), region Dice, HD95 (mm), sweeps."""
    head = ["run", "state", "scale", "model", "loss", "beta", "gamma", "learning_rate",
            "batch_size", "seed", "steps", "data_source", "image_size", "paper_dice"]  # fmt: skip
    head += [f"dice_{k}" for k in REGIONS] + [f"hd95_{k}" for k in REGIONS] + ["sweeps"]
    lines = [",".join(head)]
    for r in runs:
        t = r.config.get("train", {})
        d = r.config.get("data", {})
        vals = [r.name, r.state, r.scale, r.info.get("model", ""), t.get("loss", ""),
                t.get("beta", ""), t.get("gamma", ""), t.get("learning_rate", ""),
                t.get("batch_size", ""), t.get("seed", ""),
                (r.results or {}).get("steps", ""), d.get("source", ""),
                d.get("image_size", "")]  # fmt: skip
        vals = [str(v) for v in vals]
        vals += [_num(r.metric(k)) for k in ["paper_dice"] + [f"dice_{x}" for x in REGIONS]]
        vals += [_num(r.metric(f"hd95_{x}")) for x in REGIONS]
        vals += [" ".join(sorted((r.info.get("placements") or {}).keys()))]
        lines.append(",".join(_csv(v) for v in vals))
    return "\n".join(lines) + "\n"


def readings_table(sweep: sweeps.Sweep, runs: Sequence[RunRecord]) -> str:
    """Markdown: per finished cell, the study's metric next to the two readings it leaves
    open (absent classes excluded; pooled over all test slices), and the study's number."""
    rows, cols, study = _layout(sweep)
    found = cell_runs(sweep, runs)
    head = [sweep.row_header, "column", *READINGS.values(), "study"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for col in cols:
            r = found.get((row, col))
            if r is None or r.state != "done":
                continue
            vals = [_f(r.metric(k)) for k in READINGS]
            md.append("| " + " | ".join([row, col, *vals, _f(study.get((row, col)), 5)]) + " |")
    return "\n".join(md) + "\n" if len(md) > 2 else ""


def _logged(path: pathlib.Path, key: str) -> np.ndarray:
    """The non-null values of `key` in a metrics.jsonl (float64, log order)."""
    curves = plots.read_metrics(path)
    v = curves.get(key, (None, np.zeros(0)))[1]
    return v[np.isfinite(v)]


def mean_class_weights(path: pathlib.Path) -> list[float | None]:
    """Mean over training of the effective class weights `class_weight_0..3` a run logged
    (each row: the mean over a logging interval's steps in which the class was in the batch;
    null rows, class absent all interval, skipped). None where nothing was logged."""
    out = []
    for c in range(len(CLASS_LABELS)):
        v = _logged(path, f"class_weight_{c}")
        out.append(float(v.mean()) if v.size else None)
    return out


def _mean_train_loss(r: RunRecord | None) -> float | None:
    v = _logged(r.workdir / "metrics.jsonl", "train_loss") if r is not None else np.zeros(0)
    return float(v.mean()) if v.size else None


def class_weights_table(sweep: sweeps.Sweep, runs: Sequence[RunRecord]) -> str:
    """Markdown: per class-balanced (cb_*) cell, the mean effective weight per class over
    training (so a reader sees whether the weights differed from 1), and its mean train loss
    and test Dice next to its unweighted twin's (same column, loss without `cb_`)."""
    rows, cols, _ = _layout(sweep)
    found = cell_runs(sweep, runs)
    loss_of = {k: (r.config.get("train") or {}).get("loss", "") for k, r in found.items()}
    head = [sweep.row_header, "column", "n_i counts"]
    head += [f"w {c}" for c in CLASS_LABELS]
    head += ["mean train loss (this / unweighted)", "test Dice (this / unweighted)"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for col in cols:
            r = found.get((row, col))
            if r is None or not loss_of[(row, col)].startswith("cb_"):
                continue
            base = loss_of[(row, col)][3:]
            twin = next((t for k, t in found.items() if k[1] == col and loss_of[k] == base), None)
            mode = (r.config.get("train") or {}).get("class_counts", "split_pixels")
            w = [_f(x, 3) for x in mean_class_weights(r.workdir / "metrics.jsonl")]
            loss = f"{_f(_mean_train_loss(r))} / {_f(_mean_train_loss(twin))}"
            dice = (
                f"{_f(r.metric('paper_dice'))} / {_f(twin.metric('paper_dice') if twin else None)}"
            )
            md.append("| " + " | ".join([row, col, mode, *w, loss, dice]) + " |")
    return "\n".join(md) + "\n" if len(md) > 2 else ""


def repeats_table(sweep: sweeps.Sweep, runs: Sequence[RunRecord]) -> str:
    """Markdown: cells with several finished runs (repeats with other `train.seed`s, e.g.
    `--config.train.seed=1`): n, seeds, mean ± std (ddof 1) of the study's metric and WT,
    and each seed's value."""
    rows, cols, _ = _layout(sweep)
    groups = cell_repeats(sweep, runs)
    head = [sweep.row_header, "column", "n", "seeds", "Dice mean ± std", "WT mean ± std",
            "Dice per seed"]  # fmt: skip
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for col in cols:
            done = [r for r in groups.get((row, col), []) if r.state == "done"]
            done.sort(key=lambda r: int((r.config.get("train") or {}).get("seed", 0)))
            if len(done) < 2:
                continue
            seeds = [str((r.config.get("train") or {}).get("seed", "?")) for r in done]
            dice = [v for r in done if (v := r.metric("paper_dice")) is not None]
            wt = [v for r in done if (v := r.metric("dice_WT")) is not None]
            each = ", ".join(_f(v) for v in dice)
            md.append("| " + " | ".join([row, col, str(len(done)), ",".join(seeds),
                                         _mean_std(dice), _mean_std(wt), each]) + " |")  # fmt: skip
    return "\n".join(md) + "\n" if len(md) > 2 else ""


# ----------------------------------------------------------------------------- figures


def read_curves(path: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{scalar: (epochs, values)}` from a metrics.jsonl; x = epoch when the run logged
    `epoch` (steps/epoch is constant within a run), else step."""
    curves = plots.read_metrics(path)
    per_step = None
    if "epoch" in curves:
        steps, epochs = curves["epoch"]
        if steps[-1] > 0 and epochs[-1] > 0:
            per_step = epochs[-1] / steps[-1]
    return {
        k: (steps * per_step if per_step else steps.astype(float), values)
        for k, (steps, values) in curves.items()
    }


def _save(fig, path: pathlib.Path) -> None:
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


CURVE_PANELS = (("train_loss", "train loss"), ("val_loss", "validation loss"),
                ("val_paper_dice", "validation Dice (study's metric)"))  # fmt: skip


def curves_figure(
    sweep: sweeps.Sweep, runs: Sequence[RunRecord], path: pathlib.Path, *, group_by: str = "col"
) -> bool:
    """Learning curves of the sweep's runs into `path`: one figure row per group (a table
    column, e.g. a learning rate, or a row for `group_by="row"`), one line per run.
    Returns False (and writes nothing) when no run has a metrics.jsonl."""
    rows, cols, _ = _layout(sweep)
    found = cell_runs(sweep, runs)
    groups = cols if group_by == "col" else rows
    curves = {k: read_curves(r.workdir / "metrics.jsonl") for k, r in found.items()}
    if not any(curves.values()):
        return False
    fig, axes = plt.subplots(len(groups), 3, figsize=(14, 3.4 * len(groups)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    x_epoch = False
    for gi, g in enumerate(groups):
        members = [
            (row, col)
            for row in rows
            for col in cols
            if (row, col) in curves and (col if group_by == "col" else row) == g
        ]
        for row, col in members:
            m = curves[(row, col)]
            li = rows.index(row) if group_by == "col" else cols.index(col)
            x_epoch = x_epoch or "epoch" in m
            label = row if group_by == "col" else col
            for ax, (key, _) in zip(axes[gi], CURVE_PANELS, strict=True):
                if key in m:
                    x, y = m[key]
                    ax.plot(x, y, label=label, color=cmap(li % 10),
                            marker="." if key.startswith("val") else None)  # fmt: skip
        for ax, (key, title) in zip(axes[gi], CURVE_PANELS, strict=True):
            ax.set_title(f"{g}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            if key == "val_paper_dice":
                ax.set_ylim(0, 1)
        if axes[gi][2].lines:
            axes[gi][2].legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("epoch" if x_epoch else "step")
    fig.suptitle(f"{sweep.title} - learning curves", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return True


def figure6_bars(sweep: sweeps.Sweep, runs: Sequence[RunRecord], path: pathlib.Path) -> None:
    """Grouped bars like the study's Figure 6: groups = batch size, bars = learning rate;
    the study's values (batch 1 only; Table 2) as black markers."""
    rows, cols, study = _layout(sweep)
    found = cell_runs(sweep, runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(cols)
    x = np.arange(len(rows))
    for j, col in enumerate(cols):
        vals = [found[(row, col)].metric("paper_dice") if (row, col) in found else None
                for row in rows]  # fmt: skip
        ys = [np.nan if v is None else v for v in vals]
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, ys, width, label=f"{col} (ours)")
        st = [study.get((row, col)) for row in rows]
        ax.scatter(pos, [np.nan if v is None else v for v in st], color="k", marker="_", s=300,
                   zorder=3, label="study" if j == 0 else None)  # fmt: skip
    ax.set_xticks(x, rows)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test Dice (study's metric)")
    ax.set_title("TransUNet: learning rate x batch size")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def param_curve(
    sweep: sweeps.Sweep,
    runs: Sequence[RunRecord],
    path: pathlib.Path,
    *,
    xs: dict[str, float],
    xlabel: str,
    logx: bool = False,
) -> None:
    """Test Dice against a swept number (`xs`: row label -> value), one line per model
    (column); solid = study's metric, dashed = WT Dice; the study's values as black x."""
    rows, cols, study = _layout(sweep)
    found = cell_runs(sweep, runs)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    cmap = plt.get_cmap("tab10")
    for j, col in enumerate(cols):
        for key, style, suffix in (("paper_dice", "-o", "Dice"), ("dice_WT", "--.", "WT")):
            pts = [
                (xs[row], found[(row, col)].metric(key))
                for row in rows
                if (row, col) in found and found[(row, col)].metric(key) is not None
            ]
            if pts:
                px, py = zip(*pts, strict=True)
                ax.plot(px, py, style, color=cmap(j), label=f"{col} {suffix}")
        st = [(xs[row], study[(row, col)]) for row in rows if study.get((row, col)) is not None]
        if st:
            sx, sy = zip(*st, strict=True)
            ax.scatter(sx, sy, color=cmap(j), edgecolor="k", marker="X", s=70, zorder=3,
                       label=f"{col} study")  # fmt: skip
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="test Dice", ylim=(0, 1), title=sweep.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def seeds_figure(stats: dict, path: pathlib.Path) -> None:
    """Per-seed test Dice (study's metric and WT) per model, with mean +- std bars."""
    values = stats["values"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, title in ((axes[0], "paper_dice", "Dice (study's metric)"),
                           (axes[1], "dice_WT", "WT Dice")):  # fmt: skip
        for i, v in enumerate(values.values()):
            a = np.asarray(v[key], float)
            if a.size:
                ax.scatter(np.full(a.size, i) + np.linspace(-0.08, 0.08, a.size), a, s=20)
                ax.errorbar(i + 0.25, a.mean(), yerr=a.std(ddof=1) if a.size > 1 else 0,
                            fmt="o", color="k", capsize=4)  # fmt: skip
        ax.set_xticks(range(len(values)), list(values))
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Repeat runs (seeds)")
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- report


def _model_text(m: dict) -> str:
    """`unet 8 features, depth 3` / `transunet tiny` from a config's model group."""
    if m.get("name") == "unet":
        return f"unet {m.get('base_features', '?')} features, depth {m.get('depth', '?')}"
    return f"{m.get('name', '?')} {m.get('preset', '')}".strip()


def _section(title: str, table: str) -> str:
    return f"\n### {title}\n\n{table}" if table else ""


def _float_of(label: str) -> float:
    return float(label.split()[-1])


def _report_intro(root: pathlib.Path, runs: Sequence[RunRecord]) -> str:
    """The report's title and the notes before the first sweep (markdown)."""
    md = f"# Results in `{root}`\n\n"
    if "smoke" in {r.scale for r in runs}:
        md += (
            "> **SMOKE SCALE** runs are included: tiny models, 32 px images, a few dozen steps, "
            "synthetic data unless command-line overrides say otherwise (each section states "
            "the model, data, image size and steps). Far from the study's settings, their "
            "numbers check the pipeline and the direction of effects, not the study's "
            "values.\n\n"
        )
    md += (
        "Dice (ours/study): the study's metric, the mean over test slices of the 4-class Dice "
        "(background included). WT / TC / ET: standard BraTS region Dice per 3D test volume, "
        "mean over test cases. The study's numbers are from its Tables 1 and 2.\n\n"
    )
    return md


def _sweep_heading(sweep: sweeps.Sweep, placed: Sequence[RunRecord]) -> str:
    """A sweep's section title and its settings line (scale, model, data, steps), markdown."""
    sw_scales = sorted({r.scale for r in placed})
    sources = sorted({str(r.config.get("data", {}).get("source", "?")) for r in placed})
    steps = sorted({int((r.results or {}).get("steps", 0)) for r in placed if r.results})
    sizes = sorted({str(r.config.get("data", {}).get("image_size", "?")) for r in placed})
    models = sorted({_model_text(r.config.get("model", {})) for r in placed})
    return (
        f"## {sweep.title}\n\n"
        f"Scale: **{', '.join(sw_scales)}**; model: {', '.join(models)}; "
        f"data: {', '.join(sources)} at {', '.join(sizes)} px; "
        f"training steps per run: {', '.join(map(str, steps)) or DASH}.\n\n"
    )


def _sweep_tables(
    name: str, sweep: sweeps.Sweep, runs: Sequence[RunRecord], out: pathlib.Path
) -> tuple[str, str, int, list[str]]:
    """A sweep's markdown tables, CSV text, filled-cell count and files written (seeds.png)."""
    files = []
    if name == "seeds":
        text, csv, stats = seeds_table(sweep, runs)
        filled = sum(len(v["paper_dice"]) for v in stats["values"].values())
        if any(stats["values"][m]["paper_dice"] for m in stats["values"]):
            seeds_figure(stats, out / "seeds.png")
            files.append("seeds.png")
    else:
        text, csv, filled = grid_table(sweep, runs)
        text += _section("Repeat runs of a cell (other seeds)", repeats_table(sweep, runs))
        text += _section("The study's metric and the two readings it leaves open",
                         readings_table(sweep, runs))  # fmt: skip
        text += _section("Class-balanced cells: mean effective class weight over "
                         "training", class_weights_table(sweep, runs))  # fmt: skip
    return text, csv, filled, files


def _sweep_figures(
    name: str, sweep: sweeps.Sweep, runs: Sequence[RunRecord], out: pathlib.Path
) -> list[str]:
    """Draw a sweep's own figures (bars, parameter curve, training curves) into `out`.

    Returns the names of the PNGs written.
    """
    files = []
    if name == "figure6":
        figure6_bars(sweep, runs, out / "figure6_bars.png")
        files.append("figure6_bars.png")
    elif name == "focal_gamma":
        xs = {c.row: _float_of(c.row) for c in sweep.cells}
        param_curve(sweep, runs, out / "focal_gamma.png", xs=xs, xlabel="focal gamma")
        files.append("focal_gamma.png")
    elif name == "lr_range":
        xs = {c.row: _float_of(c.row) for c in sweep.cells}
        param_curve(sweep, runs, out / "lr_range.png", xs=xs, xlabel="learning rate",
                    logx=True)  # fmt: skip
        files.append("lr_range.png")
    group_by = "row" if name == "seeds" else "col"
    if curves_figure(sweep, runs, out / f"{name}_curves.png", group_by=group_by):
        files.append(f"{name}_curves.png")
    return files


def _not_finished(placed: Sequence[RunRecord]) -> str:
    """Markdown line naming the placed runs whose state is not "done" ("" when all are)."""
    bad = [r for r in placed if r.state != "done"]
    if not bad:
        return ""
    return (
        "Not finished: "
        + ", ".join(f"`{r.name}` ({r.state})" for r in sorted(bad, key=lambda r: r.name))
        + "\n\n"
    )


def _sweep_section(
    name: str, sweep: sweeps.Sweep, runs: Sequence[RunRecord], out: pathlib.Path
) -> tuple[str, dict]:
    """Write one sweep's CSV and figures into `out`; returns (its markdown, its summary)."""
    placed = list(cell_runs(sweep, runs).values())
    md = _sweep_heading(sweep, placed)
    text, csv, filled, files = _sweep_tables(name, sweep, runs, out)
    md += text + "\n"
    fileio.write_text(out / f"{name}.csv", csv)
    files.append(f"{name}.csv")
    files += _sweep_figures(name, sweep, runs, out)
    pngs = [f for f in files if f.endswith(".png")]
    if pngs:
        md += " ".join(f"![{f}]({f})" for f in pngs) + "\n\n"
    md += _not_finished(placed)
    return md, {"filled": int(filled), "cells": len(sweep.cells), "files": files}


def make_report(root: str | pathlib.Path, out: str | pathlib.Path | None = None) -> dict:
    """Write report.md, CSVs and PNGs for every sweep with runs under `root` into `out`
    (default `root/report`). Returns `{sweep: {"filled": int, "cells": int, "files": [...]}}`."""
    root = pathlib.Path(root)
    out = pathlib.Path(out) if out else root / "report"
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no runs under {root} (no */{RUN_INFO}); run experiments.run")
    out.mkdir(parents=True, exist_ok=True)
    md = io.StringIO()
    md.write(_report_intro(root, runs))
    summary: dict[str, dict] = {}
    for name, sweep in sweeps.SWEEPS.items():
        if not cell_runs(sweep, runs):
            continue
        text, summary[name] = _sweep_section(name, sweep, runs, out)
        md.write(text)
    fileio.write_text(out / "runs.csv", runs_csv(runs))
    fileio.write_text(out / "report.md", md.getvalue())
    fileio.write_json(out / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: `python -m experiments.report DIR [--out=R]`; returns the exit code."""
    p = cli.ArgumentParser(prog="python -m experiments.report", description=__doc__.split(
        "\n")[0])  # fmt: skip
    p.add_argument("root", metavar="DIR", help="the --out folder of experiments.run")
    p.add_argument("--out", default=None, help="report folder (default DIR/report)")
    args = p.parse_args(argv)
    try:
        summary = make_report(args.root, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.root) / "report"
    for name, s in summary.items():
        print(f"{name}: {s['filled']}/{s['cells']} cells filled")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
