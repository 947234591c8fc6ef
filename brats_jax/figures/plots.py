"""Figures: learning curves from `metrics.jsonl` and test-slice overlays like the study's."""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from brats_jax import fileio  # noqa: E402

# Background transparent; NCR/NET red, ED green, ET yellow (the usual BraTS colours).
LABEL_CMAP = ListedColormap([(0, 0, 0, 0), (1, 0, 0, 0.6), (0, 0.8, 0, 0.5), (1, 1, 0, 0.7)])


def read_metrics(path: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{name: (steps, values)}` from `metrics.jsonl`; a step logged twice keeps its last value.

    Lines that do not parse (cut by a killed run) or carry no step are skipped.
    """
    rows: dict[str, dict[int, float]] = {}
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue
        for k, v in row.items():
            rows.setdefault(k, {})[step] = np.nan if v is None else float(v)
    return {
        k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)], float))
        for k, d in rows.items()
    }


def _save(fig, out: pathlib.Path) -> None:
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def learning_curves(metrics_path: str | pathlib.Path, out: str | pathlib.Path) -> None:
    """Plot train/val loss and val Dice against epoch into a PNG at `out`."""
    m = read_metrics(metrics_path)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
    epoch_of = _epoch_map(m)
    for name, label in (("train_loss", "train"), ("val_loss", "validation")):
        if name in m:
            steps, vals = m[name]
            ax_loss.plot(epoch_of(steps), vals, label=label)
    for name, label in (
        ("val_paper_dice", "study's Dice (4 classes, mean over slices)"),
        ("val_dice_WT", "WT"),
        ("val_dice_TC", "TC"),
        ("val_dice_ET", "ET"),
    ):
        if name in m:
            steps, vals = m[name]
            ax_dice.plot(epoch_of(steps), vals, label=label, marker=".")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if not ax_dice.lines:
        ax_dice.text(0.5, 0.5, "no validation split", ha="center", va="center",
                     transform=ax_dice.transAxes)  # fmt: skip
    _save(fig, pathlib.Path(out))


def _epoch_map(m):
    """Step -> epoch using the logged `epoch` scalar (steps/epoch is constant in a run)."""
    if "epoch" in m and len(m["epoch"][0]) and m["epoch"][0][-1] > 0:
        steps, epochs = m["epoch"]
        per_step = epochs[-1] / steps[-1]
        return lambda s: np.asarray(s) * per_step
    return lambda s: np.asarray(s)


def overlay_grid(slices: list[tuple], out: str | pathlib.Path) -> None:
    """Rows of (FLAIR, ground truth overlay, prediction overlay), like the study's Figs 1-3.

    Args:
      slices: `(case_id, z, flair (H,W) float, label (H,W) {0..3}, pred (H,W) {0..3})` tuples.
      out: PNG path.
    """
    n = max(1, len(slices))
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row, (case_id, z, flair, label, pred) in zip(axes, slices, strict=False):
        # NIfTI voxel order: rotate so the slice looks like a radiological axial view.
        show = lambda a: np.rot90(a)  # noqa: E731
        for ax, title, overlay in (
            (row[0], f"{case_id} z={z} FLAIR", None),
            (row[1], "ground truth", label),
            (row[2], "prediction", pred),
        ):
            ax.imshow(show(flair), cmap="gray")
            if overlay is not None:
                ax.imshow(show(overlay), cmap=LABEL_CMAP, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    _save(fig, pathlib.Path(out))


def _curve(b: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean probability, share positive) per bin of one channel's bins (NaN: empty)."""
    return tuple(np.array([np.nan if v is None else v for v in b[k]], float)
                 for k in ("confidence", "frequency"))  # fmt: skip


def reliability_diagram(
    calibration: dict, out: str | pathlib.Path, title: str = "", before: dict | None = None
) -> None:
    """One panel per class or region: the share of positive voxels against the mean
    probability of each bin (the diagonal is perfect calibration), the bins' voxel counts
    (log scale) below, ECE in the panel's title.

    Args:
      calibration: `metrics.calibration.ReliabilityBins.to_dict()` (the `calibration` block
        of a run's results.json): `bins` {name: {count, confidence, frequency}}, `ece`,
        `num_bins`, `voxels`.
      out: PNG path (written atomically).
      before: another such dict (e.g. before temperature scaling), drawn as a second curve
        and its ECE in the titles ("before -> after").
    """
    names = list(calibration["bins"])
    edges = np.linspace(0.0, 1.0, int(calibration["num_bins"]) + 1)
    fig, axes = plt.subplots(
        2, len(names), figsize=(2.8 * len(names), 3.8), squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
    )  # fmt: skip
    for i, name in enumerate(names):
        b = calibration["bins"][name]
        conf, freq = _curve(b)
        top, bottom = axes[0, i], axes[1, i]
        top.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        top.bar(edges[:-1], np.nan_to_num(freq), width=np.diff(edges), align="edge",
                color="tab:blue", alpha=0.35, edgecolor="tab:blue")  # fmt: skip
        top.plot(conf, freq, marker="o", ms=3, color="tab:blue", label="after" if before else None)
        ece = calibration["ece"].get(name)
        label = f"{name}: ECE {ece:.4f}" if ece is not None else name
        if before is not None:
            top.plot(*_curve(before["bins"][name]), marker="s", ms=3, color="tab:orange",
                     label="before")  # fmt: skip
            top.legend(fontsize=7, loc="upper left")
            label = f"{name}: ECE {before['ece'][name]:.4f} -> {ece:.4f}"
        top.set_title(label, fontsize=9)
        top.set(xlim=(0, 1), ylim=(0, 1))
        bottom.bar(edges[:-1], np.maximum(b["count"], 0.1), width=np.diff(edges),
                   align="edge", color="grey", log=True)  # fmt: skip
        bottom.set_xlabel("predicted probability", fontsize=8)
        if i == 0:
            top.set_ylabel("share positive", fontsize=8)
            bottom.set_ylabel("voxels", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(title or f"Reliability ({calibration.get('voxels', '')} voxels)", fontsize=9)
    fig.tight_layout()
    _save(fig, pathlib.Path(out))
