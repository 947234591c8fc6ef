"""brats_jax.data: slice sources (synthetic, Kaggle HDF5, NIfTI cache of BraTS folders or nnU-Net
raw datasets), splits, grain pipelines."""

from brats_jax.data.brats import (
    Case,
    CaseData,
    NiftiDecodedSource,
    case_from_files,
    find_cases,
    load_case,
)
from brats_jax.data.cache import NiftiCacheSource, default_cache_dir, prepare
from brats_jax.data.common import DataError, SliceTable, resize_image, resize_label
from brats_jax.data.context import (
    context_positions,
    context_slices,
    input_channels,
    neighbour_records,
    stack_context,
)
from brats_jax.data.kaggle import KaggleH5Source
from brats_jax.data.pipeline import (
    Splits,
    TrainIterator,
    build_splits,
    case_indices,
    class_pixel_counts,
    eval_batches,
    load_volume,
    make_source,
    make_train_iterator,
    prune_keep,
    resolve_cache_dir,
    source_key,
)
from brats_jax.data.synthetic import SyntheticSource

__all__ = [
    "Case",
    "CaseData",
    "DataError",
    "KaggleH5Source",
    "NiftiCacheSource",
    "NiftiDecodedSource",
    "SliceTable",
    "Splits",
    "SyntheticSource",
    "TrainIterator",
    "build_splits",
    "case_from_files",
    "case_indices",
    "class_pixel_counts",
    "context_positions",
    "context_slices",
    "default_cache_dir",
    "eval_batches",
    "find_cases",
    "input_channels",
    "load_case",
    "load_volume",
    "make_source",
    "make_train_iterator",
    "neighbour_records",
    "prepare",
    "prune_keep",
    "resize_image",
    "resize_label",
    "resolve_cache_dir",
    "source_key",
    "stack_context",
]
