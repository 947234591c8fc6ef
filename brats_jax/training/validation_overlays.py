"""TensorBoard pictures of a run's fixed validation slices at every validation: FLAIR, the
truth and the prediction side by side (`eval.num_overlay_slices`; drawn by
`figures.overlays.slice_strip`)."""

from __future__ import annotations

import numpy as np

from brats_jax import MODALITIES, data
from brats_jax.figures import overlays
from brats_jax.inference import whole_volume
from brats_jax.models import outputs


def validation_slices(source, indices, n: int) -> np.ndarray:
    """The `n` records of `indices` (source record numbers) with the most tumour pixels
    (`source.table.class_counts` classes 1..3), ties by position in `indices`: the same
    slices every validation of a run, so their pictures show the model improving."""
    idx = np.asarray(indices, np.int64)
    tumour = source.table.class_counts[idx, 1:].sum(axis=1)
    return idx[np.argsort(-tumour, kind="stable")[: max(int(n), 0)]]


class ValidationOverlays:
    """TensorBoard pictures of one run's fixed validation slices (`validation_slices`,
    `eval.num_overlay_slices` of them): one forward of those slices per validation.

    `images(state)` -> {"val_overlays/<case>_z<slice>": uint8 (S, 3S + gaps, 3)}
    (`slice_strip`), for `MetricWriter.write_images`. `predict`: another instance's
    `predict` (same model and `model.output`) to share its compilation.
    """

    def __init__(self, run, model, predict=None):
        cfg = run.config
        self.output = outputs.of_config(cfg.model)
        self.slices = validation_slices(run.source, run.splits.val, cfg.eval.num_overlay_slices)
        k = data.context_slices(cfg)
        self.flair_channel = 4 * k + MODALITIES.index("flair")  # the centre slice's FLAIR
        self.batch = next(iter(data.eval_batches(
            run.source, self.slices, batch_size=len(self.slices),
            image_size=cfg.data.image_size, context_slices=k,
        ))) if len(self.slices) else None  # fmt: skip
        self.predict = predict or whole_volume.make_slice_predictor(
            model, image_size=0, output=self.output
        )

    def images(self, state) -> dict[str, np.ndarray]:
        """The pictures of the slices with `state`'s (a `TrainState`) predictions."""
        if self.batch is None:
            return {}
        variables = {"params": state.params, **state.model_state}
        probs = np.asarray(self.predict(variables, self.batch["image"]))
        pred = np.asarray(outputs.labels_from_probabilities(probs, self.output))
        b = self.batch
        return {
            f"val_overlays/{b['case_id'][i]}_z{int(b['slice_index'][i]):03d}": overlays.slice_strip(
                b["image"][i, ..., self.flair_channel], b["label"][i], pred[i]
            )
            for i in range(len(self.slices))
        }
