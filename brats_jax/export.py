"""Export a trained run's network to ONNX, to segment without JAX (e.g. with onnxruntime).

    python -m brats_jax.export --workdir=RUN --out=model.onnx [--step=N] [--sliding_window=off]

Writes `model.onnx`, the network of the run's best checkpoint (the one predict uses; `--step`
another) with its output activation: input `image` float32 (batch, S, S, 4 (2k+1)) NHWC
slices (S = the run's data.image_size, k = data.context_slices: channels slice-major, each
slice's flair, t1, t1ce, t2), output `probabilities` (batch, S, S, 4) softmax class
probabilities or (batch, S, S, 3) sigmoid WT, TC, ET probabilities (model.output); the batch
axis is dynamic. Beside it `model.onnx.json` says what predict does around the network: input
normalisation, image size and resizing, context slices, output kind and its decoding rule,
the run's test-time flips, its post-processing and the label convention of the output files.
examples/segment_with_onnxruntime.py segments a BraTS case folder with these two files,
onnxruntime, numpy and nibabel. Needs the `export` extra and jax2onnx (installed without its
dependencies: its orbax-checkpoint pin conflicts with this project's):

    pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1

U-Net and TransUNet, class and region outputs, 2.5D input and deep supervision (its
full-resolution head) are exported; a run predicted through sliding windows
(eval.sliding_window) only with `--sliding_window=off` (whole slices). Existing output files
are an error; outputs are written atomically once onnxruntime reproduces JAX's probabilities
(`brats_jax.inference.onnx_export`).
"""

from absl import app, flags

from brats_jax import cli, runtime
from brats_jax.inference import onnx_export

FLAGS = flags.FLAGS
# --workdir (one run), --step and --sliding_window: brats_jax.cli, shared with predict
cli.define_run_flags("step", "sliding_window", workdir="one")
flags.DEFINE_string(
    "out", None, "ONNX file to write (its metadata goes to OUT.json).", allow_override=True
)


def main(argv) -> None:
    runtime.setup()  # fast XLA:CPU flags etc., before JAX computes (brats_jax.runtime)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("workdir", "out"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required")
    meta = onnx_export.export_run(
        FLAGS.workdir,
        FLAGS.out,
        step=FLAGS.step,
        sliding_window=cli.SLIDING_WINDOW[FLAGS.sliding_window],
    )
    shape = ", ".join(str(d) for d in meta["input"]["shape"])
    print(
        f"wrote {FLAGS.out} (input ({shape}) {meta['input']['layout']}, {meta['output']['kind']} "
        f"probabilities; onnxruntime = JAX to "
        f"{meta['converter']['verified_max_abs_difference']:.1e}) and "
        f"{onnx_export.metadata_path(FLAGS.out)}"
    )


def run() -> None:
    """Console entry: user mistakes end with a one-line error, not a traceback."""
    cli.run_app(main)


if __name__ == "__main__":
    run()
