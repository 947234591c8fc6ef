"""Time one case of `python -m brats_jax.predict` on this machine, split into its phases, beside
the same run exported to ONNX under onnxruntime and the PyTorch twin under MONAI (issue 49).

usage: python benchmarks/predict_timing.py --run=NAME=RUN_DIR [--run=NAME2=RUN_DIR2] --case=CASE
           [--tta=none,flips] [--repeats=3] [--peers=onnx,torch] [--folder-cases=10]
           [--batch-size=0] [--skip=cli] [--markdown]

Every measurement is a fresh process (what a user's command is), `--repeats` times:

* `startup`: `python -c "import brats_jax.predict"` (the interpreter and the imports);
* `brats_jax cold` / `warm`: `predict_case` of CASE in a process that times its phases by
  wrapping the library's functions (nothing else changes): the imports, `load_model`
  (`ensembles.load_ensemble`: the checkpoint), `read` (`brats.load_case`), `compile` (the
  first model call less the median of the others: tracing and XLA compilation, or with a warm
  persistent compilation cache (`--compile_cache`) tracing and the cache's load), `infer`
  (`whole_volume.predict_volume` less `compile`: batches, resizing, TTA views), `postprocess`
  and `write`; `wall` is the process's whole life. Cold runs get an empty cache folder, warm
  runs the folder the cold run filled;
* `predict CLI warm`: `python -m brats_jax.predict` itself with that cache (its wall);
* `folder`: the CLI on `--folder-cases` case folders (CASE's siblings, sorted) with a warm
  cache, wall per case (the first run only, no TTA);
* `onnxruntime`: the run exported once (`python -m brats_jax.export`, untimed) and segmented by
  examples/segment_with_onnxruntime.py, its functions wrapped the same way (`infer`: the batch
  loop: `session.run`, numpy resizing and flips; `model`: `session.run` alone);
* `torch+monai`: the PyTorch twin (benchmarks/torch_unet.py) of the run's network (same
  input channels, outputs and width; random weights: the time does not depend on them) under
  MONAI's `SliceInferer` (`sliding_window_inference` over (S, S) axial windows of the 2.5D
  input), read, resized, decoded and written as the onnxruntime example does.

Prints one JSON line per measurement (phases: median, min and max over the repeats) and with
`--markdown` a table. torch and monai are optional (`pip install -e '.[torch]'`), onnxruntime
and the exporter too (the `export` extra); a missing peer is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "segment_with_onnxruntime.py"
PHASES = ("imports", "load_model", "read", "compile", "infer", "postprocess", "write", "wall")


class Timer:
    """Seconds per phase name, summed over calls; `wrap(module, name, phase)` replaces
    `module.name` by a timed call of it until `restore()`; `calls` keeps the model calls'
    seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: list[float] = []
        self._wrapped: list[tuple] = []

    def restore(self) -> None:
        """Put back every function `wrap` replaced."""
        for module, name, fn in reversed(self._wrapped):
            setattr(module, name, fn)
        self._wrapped.clear()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def wrap(self, module, name: str, phase: str) -> None:
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t)

        self._wrapped.append((module, name, fn))
        setattr(module, name, timed)


def split_compile(calls: list[float]) -> tuple[float, float]:
    """(compile, steady) seconds from the model calls' seconds: the first call less the
    median of the others (0 when there is one call), and the calls' sum less that."""
    if len(calls) < 2:
        return 0.0, sum(calls)
    compile_s = max(0.0, calls[0] - statistics.median(calls[1:]))
    return compile_s, sum(calls) - compile_s


def child_jax(workdir, case, out, *, tta="none", batch_size=0, cache="") -> dict:
    """Segment `case` with `predict_case` (as `python -m brats_jax.predict` does) and return
    the seconds of its phases (module docstring) and the number of model calls."""
    t0 = time.perf_counter()
    import jax

    from brats_jax import runtime
    from brats_jax.data import brats
    from brats_jax.inference import case_prediction, ensembles, postprocess, whole_volume

    timer = Timer()
    timer.add("imports", time.perf_counter() - t0)
    runtime.setup(compile_cache=cache or None)
    timer.wrap(ensembles, "load_ensemble", "load_model")
    timer.wrap(brats, "load_case", "read")
    timer.wrap(whole_volume, "predict_volume", "volume")
    timer.wrap(postprocess, "apply", "postprocess")
    timer.wrap(case_prediction, "write_case", "write")
    volume = whole_volume.predict_volume

    def counted_volume(predict, *args, **kwargs):
        def call(*a):
            t = time.perf_counter()
            out = jax.block_until_ready(predict(*a))
            timer.calls.append(time.perf_counter() - t)
            return out

        return volume(call, *args, **kwargs)

    timer._wrapped.append((whole_volume, "predict_volume", volume))
    whole_volume.predict_volume = counted_volume
    try:
        case_prediction.predict_case(workdir, case, out, tta=tta, batch_size=batch_size)
    finally:
        timer.restore()
    s = timer.seconds
    compile_s, _ = split_compile(timer.calls)
    s["compile"], s["infer"] = compile_s, s.pop("volume") - compile_s
    s["model"] = sum(timer.calls) - compile_s
    return {**s, "model_calls": len(timer.calls)}


def _load_example():
    spec = importlib.util.spec_from_file_location("segment_with_onnxruntime", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child_onnx(model, case, out, *, batch_size=16) -> dict:
    """Segment `case` with examples/segment_with_onnxruntime.py and `model` (an export) and
    return its phases' seconds (`infer`: the batch loop; `model`: `session.run` alone)."""
    t0 = time.perf_counter()
    mod = _load_example()
    import nibabel

    timer = Timer()
    timer.add("imports", time.perf_counter() - t0)
    timer.wrap(mod.ort, "InferenceSession", "load_model")
    for name in ("read_case", "normalise"):
        timer.wrap(mod, name, "read")
    timer.wrap(mod, "run", "model")
    timer.wrap(mod, "resize", "resize")
    timer.wrap(mod, "postprocess", "postprocess")
    timer.wrap(nibabel, "save", "write")
    t = time.perf_counter()
    try:
        mod.main(str(model), str(case), str(out), batch_size=batch_size)
    finally:
        timer.restore()
    s = timer.seconds
    other = sum(v for k, v in s.items() if k in ("load_model", "read", "postprocess", "write"))
    s["infer"] = time.perf_counter() - t - other  # the loop: model, resizing, flips, decoding
    s.pop("resize", None)
    return s


def child_torch(workdir, case, out, *, tta="none", batch_size=16, threads=0) -> dict:
    """Segment `case` with the PyTorch twin of the run's network under MONAI's SliceInferer
    (random weights); returns the phases' seconds."""
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from monai.inferers import SliceInferer

    from benchmarks.torch_unet import TorchUNet

    mod = _load_example()
    timer = Timer()
    timer.add("imports", time.perf_counter() - t0)
    torch.set_num_threads(threads or os.cpu_count())
    t = time.perf_counter()
    config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
    m, d = config["model"], config["data"]
    if m["name"] != "unet" or d.get("patch_size"):
        raise SystemExit(f"{workdir}: the twin is a U-Net of whole slices, not {m['name']}")
    k, regions = int(d.get("context_slices", 0)), m.get("output") == "regions"
    torch.manual_seed(0)
    net = TorchUNet(4 * (2 * k + 1), 3 if regions else 4, int(m["base_features"]), m["depth"])
    net.eval()
    timer.add("load_model", time.perf_counter() - t)
    t = time.perf_counter()
    vols, flair, naming, to_lps = mod.read_case(pathlib.Path(case))
    x = mod.normalise(vols, "brain")  # (H, W, D, 4)
    timer.add("read", time.perf_counter() - t)
    t = time.perf_counter()
    (h, w, depth), size = x.shape[:3], int(d["image_size"]) or x.shape[0]
    windows = np.clip(np.arange(depth)[:, None] + np.arange(-k, k + 1), 0, depth - 1)
    stacked = x[:, :, windows.ravel()].reshape(h, w, depth, -1)  # (H, W, D, 4 (2k+1))
    vol = torch.from_numpy(np.ascontiguousarray(stacked.transpose(3, 2, 0, 1)))  # (C, D, H, W)
    vol = torch.nn.functional.interpolate(vol, size=(size, size), mode="bilinear")
    vol = vol.permute(0, 2, 3, 1)[None]  # (1, C, S, S, D): MONAI's 3D layout, 2D windows
    inferer = SliceInferer(roi_size=(size, size), sw_batch_size=batch_size, spatial_dim=2)
    # whole_volume's TTA views: x (NIfTI axis 0, here dim 2) mirrored, and y (dim 3)
    views = [()] if tta == "none" else [(), (2,)] + ([(3,), (2, 3)] if tta == "flips_ud" else [])
    with torch.inference_mode():
        probs = 0
        for axes in views:
            view = torch.flip(vol, axes) if axes else vol
            logits = inferer(view, net)
            p = torch.sigmoid(logits) if regions else torch.softmax(logits, 1)
            probs = probs + (torch.flip(p, axes) if axes else p)
        probs = probs[0] / len(views)  # (C, S, S, D)
        probs = torch.nn.functional.interpolate(
            probs.permute(3, 0, 1, 2), size=(h, w), mode="bilinear"
        )  # (D, C, H, W)
        probs = probs.permute(2, 3, 0, 1).numpy()
    labels = mod.decode(probs, regions)  # the example's numpy decoding (no JAX import)
    timer.add("infer", time.perf_counter() - t)
    t = time.perf_counter()
    header = flair.header.copy()
    header.set_data_dtype(np.int16)
    back = mod.nib.orientations.ornt_transform(mod.LPS, mod.nib.io_orientation(flair.affine))
    labels = mod.nib.orientations.apply_orientation(labels, back).astype(np.int16)
    mod.nib.save(mod.nib.Nifti1Image(labels, flair.affine, header), str(out))
    timer.add("write", time.perf_counter() - t)
    return timer.seconds


def summarise(rows: list[dict]) -> dict:
    """{phase: {"median", "min", "max"}} over repeated measurements (dicts of seconds); a
    phase some repeat lacks is summarised over those that have it."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float | int)})
    out = {}
    for k in keys:
        v = [float(r[k]) for r in rows if k in r]
        out[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _timed(cmd: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of a command run in the repository root; raises on failure."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _child(mode: str, **kw) -> dict:
    """Run `child_<mode>` in a fresh process; its phases plus the process's `wall`."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    wall, out = _timed([sys.executable, str(pathlib.Path(__file__)), f"--child={mode}", *args])
    return {**json.loads(out.strip().splitlines()[-1]), "wall": wall}


def _onnx_with_tta(onnx: pathlib.Path, tta: str) -> pathlib.Path:
    """`onnx` under another name whose JSON asks the example for `tta`'s flips (the export
    writes the run's own eval.tta)."""
    from brats_jax.inference import whole_volume

    path = onnx.with_name(f"{onnx.stem}-{tta}.onnx")
    if not path.exists():
        path.symlink_to(onnx)
        meta = json.loads(pathlib.Path(f"{onnx}.json").read_text())
        meta["tta"]["flip_axes"] = [list(x) for x in whole_volume.tta_flip_axes(tta)]
        pathlib.Path(f"{path}.json").write_text(json.dumps(meta))
    return path


def _measure_run(a, name: str, workdir: str, scratch: pathlib.Path) -> list[dict]:
    """The rows of one run: start-up, then per TTA brats_jax cold / warm / CLI warm and the
    peers, each over `a.repeats` fresh processes."""
    py, rows = sys.executable, []
    startup = [{"wall": _timed([py, "-c", "import brats_jax.predict"])[0]}
               for _ in range(a.repeats)]  # fmt: skip
    rows.append({"run": name, "what": "startup (import brats_jax.predict)", "rows": startup})
    onnx = scratch / f"{name}.onnx"
    if "onnx" in a.peers:
        _timed([py, "-m", "brats_jax.export", f"--workdir={workdir}", f"--out={onnx}"])
    batch = a.batch_size or json.loads((pathlib.Path(workdir) / "config.json").read_text())[
        "eval"]["batch_size"]  # fmt: skip
    for tta in a.tta.split(","):
        got = {k: [] for k in ("brats_jax cold", "brats_jax warm", "predict CLI warm",
                               "onnxruntime", "torch+monai")}  # fmt: skip
        for r in range(a.repeats):
            cache, out = scratch / f"cache-{name}-{tta}-{r}", scratch / f"{name}-{tta}.nii.gz"
            kw = dict(workdir=workdir, case=a.case, out=out, tta=tta, batch_size=a.batch_size)
            got["brats_jax cold"].append(_child("jax", **kw, cache=cache))
            got["brats_jax warm"].append(_child("jax", **kw, cache=cache))
            if "cli" not in a.skip:
                cli = [py, "-m", "brats_jax.predict", f"--workdir={workdir}", f"--input={a.case}",
                       f"--output={out}", f"--tta={tta}", f"--compile_cache={cache}",
                       f"--batch_size={a.batch_size}"]  # fmt: skip
                out.unlink()
                got["predict CLI warm"].append({"wall": _timed(cli)[0]})
            if "onnx" in a.peers:
                model = _onnx_with_tta(onnx, tta)
                got["onnxruntime"].append(
                    _child("onnx", model=model, case=a.case, out=out, batch_size=batch)
                )
            if "torch" in a.peers:
                got["torch+monai"].append(_child("torch", **{**kw, "batch_size": batch}))
        rows += [{"run": name, "tta": tta, "what": k, "rows": v} for k, v in got.items() if v]
    return rows


def _measure_folder(a, name: str, workdir: str, scratch: pathlib.Path) -> dict:
    """`python -m brats_jax.predict` on `a.folder_cases` case folders (CASE and its sorted
    siblings) with a warm cache: the wall per case of each repeat."""
    case = pathlib.Path(a.case)
    cases = [case, *sorted(p for p in case.parent.iterdir() if p.is_dir() and p != case)]
    cases = cases[: a.folder_cases]
    cache = scratch / f"cache-{name}-none-0"
    rows = []
    for r in range(a.repeats):
        out = scratch / f"folder-{r}"
        cmd = [sys.executable, "-m", "brats_jax.predict", f"--workdir={workdir}",
               f"--input={','.join(map(str, cases))}", f"--output={out}",
               f"--compile_cache={cache}", f"--batch_size={a.batch_size}"]  # fmt: skip
        wall = _timed(cmd)[0]
        rows.append({"wall": wall, "per_case": wall / len(cases)})
    return {"run": name, "tta": "none", "what": f"predict CLI warm, {len(cases)} cases",
            "rows": rows}  # fmt: skip


def _cell(summary: dict, phase: str) -> str:
    if phase not in summary:
        return ""
    s = summary[phase]
    return f"{s['median']:.2f}" if s["min"] == s["max"] else (
        f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})")  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """A table of the measurements: per phase the median seconds and (min-max) over the
    repeats; the folder row's `wall` is per case."""
    head = ["run", "tta", "what", *PHASES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        summary = summarise(r["rows"])
        if "per_case" in summary:
            summary["wall"] = summary.pop("per_case")
        cells = [r["run"], r.get("tta", ""), r["what"], *(_cell(summary, p) for p in PHASES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    p.add_argument("--case", help="a BraTS case folder")
    p.add_argument("--tta", default="none,flips")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peers", default="onnx,torch", help="onnx, torch, both or none")
    p.add_argument("--folder-cases", type=int, default=10, help="0: no folder measurement")
    p.add_argument("--batch-size", type=int, default=0, help="0: each run's eval.batch_size")
    p.add_argument("--skip", default="", help="cli: leave the predict CLI process out")
    p.add_argument("--markdown", action="store_true")
    for name in ("child", "workdir", "out", "cache", "model"):  # a child process's own
        p.add_argument(f"--{name}", default="", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> list[dict]:
    """Measure (or, with --child, be one measured process); returns the rows printed."""
    a = _parser().parse_args(argv)
    if a.child:
        kw = dict(batch_size=a.batch_size)
        if a.child == "jax":
            res = child_jax(a.workdir, a.case, a.out, tta=a.tta, cache=a.cache, **kw)
        elif a.child == "onnx":
            res = child_onnx(a.model, a.case, a.out, **kw)
        else:
            res = child_torch(a.workdir, a.case, a.out, tta=a.tta, **kw)
        print(json.dumps(res))
        return [res]
    if not (a.run and a.case):
        raise SystemExit("give --run=NAME=RUN_DIR and --case=CASE_DIR")
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict_timing-") as scratch:
        for i, spec in enumerate(a.run):
            name, _, workdir = spec.partition("=")
            new = _measure_run(a, name, workdir, pathlib.Path(scratch))
            if i == 0 and a.folder_cases:
                new.append(_measure_folder(a, name, workdir, pathlib.Path(scratch)))
            for r in new:
                print(json.dumps({**r, "summary": summarise(r["rows"])}), flush=True)
            rows += new
    if a.markdown:
        print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
