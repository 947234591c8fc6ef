"""Source selection, pruning, patient-level splits, and the grain train / eval pipelines."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import numpy as np
from absl import logging

from brats_jax.data import buffer_pool, nnunet
from brats_jax.data.cache import NiftiCacheSource, default_cache_dir, prepare
from brats_jax.data.common import DataError, resize_image, resize_label
from brats_jax.data.context import check_context_slices, neighbour_records, stack_records
from brats_jax.data.folds import fold_cases
from brats_jax.data.kaggle import KaggleH5Source
from brats_jax.data.patches import random_crop
from brats_jax.data.synthetic import SyntheticSource


# --------------------------------------------------------------------------------------------
# sources
def resolve_cache_dir(data_config) -> pathlib.Path:
    """data.cache_dir, or ~/.cache/brats_jax/<hash of data.root> when empty."""
    cache_dir = data_config.cache_dir
    return pathlib.Path(cache_dir) if cache_dir else default_cache_dir(data_config.root)


SOURCES = ("synthetic", "kaggle_h5", "nifti", "nnunet")  # data.source
# the data.* fields that `make_source` reads: configs equal in these get the same source
SOURCE_FIELDS = ("source", "root", "cache_dir", "synthetic_num_cases",
                 "synthetic_slices_per_case", "synthetic_image_size", "synthetic_seed")  # fmt: skip


def source_key(data_config) -> str:
    """The `SOURCE_FIELDS` of a data config as a JSON string: two configs with equal keys
    read the same source (same records, same cache folder), so runs trained together may
    share one, whatever their splits, pruning or augmentation."""
    fields = {f: data_config.get(f) for f in SOURCE_FIELDS}
    return json.dumps(fields, sort_keys=True, default=str)


def make_source(data_config):
    """Builds the slice source named by data_config.source ("synthetic", "kaggle_h5", "nifti",
    "nnunet").

    "nifti": data.root is a NIfTI release (converted on first use into data.cache_dir, default
    ~/.cache/brats_jax/<hash of root>; resumable) or an already prepared cache (has cache.json).
    "nnunet": data.root is an nnU-Net raw dataset folder (DatasetXXX_Name: dataset.json,
    imagesTr/, labelsTr/; `data.nnunet`), its training cases converted into the same cache.
    "kaggle_h5": data.root is the folder of volume_<v>_slice_<s>.h5 files.
    "synthetic": data.synthetic_{num_cases,slices_per_case,image_size} (+ synthetic_seed, 0).
    """
    kind = data_config.source
    root = data_config.root
    if kind == "synthetic":
        return SyntheticSource(
            num_cases=data_config.synthetic_num_cases,
            slices_per_case=data_config.synthetic_slices_per_case,
            image_size=data_config.synthetic_image_size,
            seed=data_config.get("synthetic_seed", 0),
        )
    if kind not in SOURCES:
        raise DataError(f"data.source={kind!r} is not one of {', '.join(map(repr, SOURCES))}")
    if not root:
        raise DataError(f"data.source={kind!r} needs data.root (the dataset folder); it is empty")
    if not os.path.exists(root):
        raise DataError(f"data.root {root} does not exist")
    if kind == "kaggle_h5":
        return KaggleH5Source(root)
    if (pathlib.Path(root) / "cache.json").is_file():
        return NiftiCacheSource(root)
    if kind == "nifti" and nnunet.is_dataset(root):
        raise DataError(
            f"data.root {root} is an nnU-Net raw dataset (dataset.json, imagesTr/); read it "
            "with data.source=nnunet"
        )
    cache_dir = resolve_cache_dir(data_config)
    prepare(root, cache_dir, layout="nnunet" if kind == "nnunet" else "brats")
    return NiftiCacheSource(cache_dir)


def load_volume(source, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """All slices of a case at native size -> (image float32 (H,W,D,4), label int32 (H,W,D)).

    D is the number of the case's records (for the Kaggle sample, only the slices present).
    """
    if hasattr(source, "load_volume"):
        return source.load_volume(case_id)
    idx = case_indices(source, case_id)
    recs = [source[int(i)] for i in idx]
    image = np.stack([r["image"] for r in recs], axis=2).astype(np.float32)
    label = np.stack([r["label"] for r in recs], axis=2).astype(np.int32)
    return image, label


def case_indices(source, case_id: str) -> np.ndarray:
    """Record indices (int64, sorted by slice index) of all slices of `case_id` (unpruned)."""
    t = source.table
    idx = np.nonzero(t.case_id == case_id)[0]
    if not len(idx):
        known = list(dict.fromkeys(t.case_id.tolist()))[:5]
        raise DataError(f"case {case_id!r} not in {source!r}; known cases include {known}")
    return idx[np.argsort(t.slice_index[idx], kind="stable")].astype(np.int64)


def class_pixel_counts(source, indices) -> np.ndarray:
    """Total pixels per class (4,) int64 over the records `indices`, from the table (no reads)."""
    idx = np.asarray(indices, np.int64)
    return source.table.class_counts[idx].sum(0).astype(np.int64)


# --------------------------------------------------------------------------------------------
# pruning and splits
def prune_keep(source, indices, min_brain_fraction: float = 0.2) -> np.ndarray:
    """Bool mask over `indices`: False for slices the study's pruning removes.

    Reading of paper.md §3 ("we pruned our dataset to remove images with full background mask
    training images that took up less than 20% of the total image area"): a slice is dropped
    when its label is all background AND its brain (pixels where any modality is non-zero)
    covers less than `min_brain_fraction` of the image. Slices with any tumour pixel are always
    kept. Needs brain_fraction only for label-empty slices (the Kaggle source measures those
    on demand).
    """
    idx = np.asarray(indices, np.int64)
    t = source.table
    empty = t.class_counts[idx, 1:].sum(1) == 0
    bf = t.brain_fraction[idx]
    if np.isnan(bf[empty]).any() and hasattr(source, "fill_brain_fraction"):
        source.fill_brain_fraction(idx[empty])
        bf = source.table.brain_fraction[idx]
    return ~(empty & (bf < min_brain_fraction))


@dataclasses.dataclass
class Splits:
    """Record indices per split (int64, after pruning) and the sorted case ids of each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    cases: dict


def _parse_ids(value, field: str, known: list) -> list:
    if isinstance(value, list | tuple):
        ids = [str(v).strip() for v in value]
    else:
        ids = [v.strip() for v in str(value or "").split(",")]
    ids = [v for v in ids if v]
    known_set = set(known)
    bad = [v for v in ids if v not in known_set]
    if bad:
        raise DataError(
            f"data.{field}: unknown case id(s) {bad[:5]}; valid ids include {known[:5]} "
            f"({len(known)} cases)"
        )
    return sorted(set(ids))


def _n_for(frac: float, n_cases: int, field: str) -> int:
    if not 0.0 <= frac < 1.0:
        raise DataError(f"data.{field}={frac} must be in [0, 1)")
    n = int(round(frac * n_cases))
    if frac > 0 and n_cases >= 3:
        n = max(n, 1)
    return n


def _split_case_ids(cases: list, data_config) -> tuple[list, list, list]:
    """`(train, val, test)` case IDs (see `build_splits`); with `data.num_folds` > 0 the
    validation cases are fold `data.fold` of the non-test cases (`folds.fold_cases`)."""
    n = len(cases)
    num_folds = int(data_config.get("num_folds", 0))
    val_ids = _parse_ids(data_config.val_cases, "val_cases", cases)
    test_ids = _parse_ids(data_config.test_cases, "test_cases", cases)
    if num_folds and val_ids:
        raise DataError("data.num_folds picks the validation cases; leave data.val_cases empty")
    both = sorted(set(val_ids) & set(test_ids))
    if both:
        raise DataError(f"case id(s) {both[:5]} are in both data.val_cases and data.test_cases")
    pool = [c for c in cases if c not in set(val_ids) | set(test_ids)]
    rng = np.random.default_rng(int(data_config.split_seed))
    pool = [pool[i] for i in rng.permutation(len(pool))]
    if not val_ids and not num_folds:
        k = _n_for(float(data_config.val_fraction), n, "val_fraction")
        val_ids, pool = sorted(pool[:k]), pool[k:]
    if not test_ids:
        frac = float(data_config.test_fraction)
        k = _n_for(frac, n, "test_fraction")
        if frac > 0 and not k:  # asked for a test split, got none: say so before training
            raise DataError(
                f"data.test_fraction={frac:g} of {n} case{'s' * (n != 1)} gives no test case; "
                "set data.test_fraction=0 to train without a test pass, or name the test "
                "cases in data.test_cases=ID,..."
            )
        test_ids, pool = sorted(pool[:k]), pool[k:]
    if num_folds:
        fold, seed = int(data_config.fold), int(data_config.split_seed)
        pool, val_ids = fold_cases(pool, num_folds, fold, seed)
    return _first_train_cases(sorted(pool), data_config), val_ids, test_ids


def _first_train_cases(train: list, data_config) -> list:
    """The first `data.max_train_cases` of `train` in an order seeded by `data.split_seed`
    (sorted), so that a smaller subset lies inside a larger one; 0 keeps all."""
    k = int(data_config.get("max_train_cases", 0))
    if not (k and train):  # no training cases at all: build_splits says so
        return train
    if not 0 < k <= len(train):
        raise DataError(
            f"data.max_train_cases={k}: expected 0 (all) or 1..{len(train)}, the training cases"
        )
    order = np.random.default_rng(int(data_config.split_seed)).permutation(len(train))
    return sorted(train[i] for i in order[:k])


def build_splits(source, data_config) -> Splits:
    """Patient-level train/val/test split + pruning (see `prune_keep`).

    A split given by ids (data.val_cases / data.test_cases, comma-separated) ignores its
    fraction; the other is drawn with data.split_seed from the remaining cases with
    round(fraction * number of all cases) cases (at least one when the fraction is > 0 and there
    are >= 3 cases); the rest train. With data.num_folds = N > 0 the validation cases are
    fold data.fold of N over the non-test cases instead (seeded by data.split_seed;
    `data.folds.fold_cases`). With data.max_train_cases = k > 0 only k of the training
    cases train, a subset seeded by data.split_seed and nested in those of larger k (learning
    curves). Pruning (data.prune, data.min_brain_fraction) applies to all splits; slice
    counts before and after are logged per split, and so is an empty test split
    (data.test_fraction=0: the run has no test pass). Raises DataError on unknown ids,
    overlapping id lists, an empty train split, k above the number of training cases or a
    data.test_fraction > 0 that gives no test case (1 or 2 cases).
    """
    t = source.table
    cases = sorted(set(t.case_id.tolist()))
    n = len(cases)
    train_ids, val_ids, test_ids = _split_case_ids(cases, data_config)
    split_cases = {"train": train_ids, "val": val_ids, "test": test_ids}
    seen: dict = {}
    for name, ids in split_cases.items():
        for c in ids:
            assert c not in seen, f"case {c} in both {seen.get(c)} and {name}"
            seen[c] = name
    if not train_ids:
        raise DataError(
            f"no cases left for training ({n} cases: {len(val_ids)} val, {len(test_ids)} test); "
            "lower data.val_fraction/test_fraction or list fewer ids"
        )
    prune = bool(data_config.prune)
    min_bf = float(data_config.min_brain_fraction)
    out = {}
    for name, ids in split_cases.items():
        idx = np.nonzero(np.isin(t.case_id, ids))[0].astype(np.int64)
        before = len(idx)
        if prune and before:
            idx = idx[prune_keep(source, idx, min_bf)]
        out[name] = idx
        logging.info(
            "split %s: %d cases, %d slices before pruning, %d after (prune=%s, "
            "min_brain_fraction=%.3g)",
            name,
            len(ids),
            before,
            len(idx),
            prune,
            min_bf,
        )
    if not test_ids:
        logging.info(
            "no test cases (data.test_fraction=0, data.test_cases empty): no test pass will "
            "run; results.json will hold no test scores"
        )
    if not len(out["train"]):
        raise DataError(
            f"the train split ({len(train_ids)} cases, e.g. {train_ids[:3]}) is empty after "
            f"pruning (min_brain_fraction={min_bf}); set data.prune=False or lower the threshold"
        )
    return Splits(out["train"], out["val"], out["test"], split_cases)


# --------------------------------------------------------------------------------------------
# grain pipelines
class _Records:
    """Random-access view of `source` restricted to `indices` (picklable).

    With `context_slices` k > 0 a record's image is its context window (`data.context`):
    (H, W, 4 (2k+1)); the neighbour table is computed once, from `source.table`.
    """

    def __init__(self, source, indices, context_slices: int = 0):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        k = check_context_slices(context_slices)
        self.neighbours = neighbour_records(source.table, k)[self.indices] if k else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if self.neighbours is None:
            return self.source[int(self.indices[int(i)])]
        if hasattr(self.source, "read_window"):  # the slice cache reads a window in one go
            return self.source.read_window(self.neighbours[int(i)])
        return stack_records([self.source[int(j)] for j in self.neighbours[int(i)]])

    def __repr__(self) -> str:
        import hashlib

        h = hashlib.sha1(self.indices.tobytes()).hexdigest()[:12]
        k = "" if self.neighbours is None else f", context_slices={self.neighbours.shape[1] // 2}"
        return f"_Records({self.source!r}, n={len(self)}, indices_sha1={h}{k})"


def _prepare_record(rec: dict, image_size: int, flip: bool, crop=None) -> dict:
    """Resize, then `crop(image, label) -> (image, label)` if given, then flip. A cropped
    record also carries `background` (C,) float32: each channel's minimum over the whole
    slice, the normalised background that on-device spatial augmentation fills in (a crop
    inside the brain has no background pixel of its own)."""
    image, label = rec["image"], rec["label"]
    if image_size:
        image = resize_image(image, image_size)
        label = resize_label(label, image_size)
    extra = {}
    if crop is not None:
        h, w, c = image.shape  # min over rows first: long inner loops, ~4x faster
        extra["background"] = image.reshape(h, w * c).min(0).reshape(w, c).min(0)
        extra["background"] = np.asarray(extra["background"], np.float32)
        # copied: the whole slice is then freed at once (a view would hold it until batched)
        image, label = (np.ascontiguousarray(a) for a in crop(image, label))
    if flip:  # left-right: NIfTI voxel axis 0 (x) is the first array axis of a slice
        image, label = image[::-1], label[::-1]
    return dict(  # a flip stays a view: the batch's stack is its one copy (`buffer_pool`)
        image=np.asarray(image, np.float32),
        label=np.asarray(label, np.int32),
        case_id=np.str_(rec["case_id"]),
        slice_index=np.int32(rec["slice_index"]),
        **extra,
    )


class _Augment:
    """grain random map: optional resize, random crop (`data.patches`; patch_size 0 = none)
    and random left-right flip (p = 0.5). `rng` is grain's per-record generator (seeded by
    the dataset seed and the record's position), so crops resume exactly."""

    def __init__(
        self,
        image_size: int,
        random_flip: bool,
        patch_size: int = 0,
        foreground_fraction=0.0,
        foreground_sampling="voxels",
    ):
        self.image_size = int(image_size)
        self.random_flip = bool(random_flip)
        self.patch_size = int(patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.foreground_sampling = str(foreground_sampling)

    def __call__(self, rec: dict, rng: np.random.Generator) -> dict:
        flip = self.random_flip and bool(rng.integers(2))  # drawn first, as before patches
        crop = None
        if self.patch_size:
            crop = functools.partial(
                random_crop, patch_size=self.patch_size,
                foreground_fraction=self.foreground_fraction, rng=rng,
                sampling=self.foreground_sampling,
            )  # fmt: skip
        return _prepare_record(rec, self.image_size, flip, crop)


class TrainIterator:
    """Endless iterator of per-host batches with checkpointable state.

    next() -> dict(image float32 (b,S,S,4(2k+1)), label int32 (b,S,S), case_id (b,) str,
    slice_index (b,) int32), b = batch_size // shard_count, k = `context_slices`; S =
    `patch_size` when > 0 (random crops, `data.patches`, which add background (b, 4(2k+1))
    float32, see `_prepare_record`), else the (resized) slice size.
    `get_state()` returns a JSON-serialisable dict; `set_state(state)` resumes exactly.
    `steps_per_epoch` = len(indices) // batch_size (global).
    """

    def __init__(
        self,
        source,
        indices,
        *,
        batch_size: int,
        seed: int,
        image_size: int = 0,
        random_flip: bool = False,
        num_workers: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        context_slices: int = 0,
        patch_size: int = 0,
        foreground_fraction: float = 0.0,
        foreground_sampling: str = "voxels",
    ):
        import grain

        indices = np.asarray(indices, np.int64)
        if batch_size <= 0 or batch_size % shard_count:
            raise DataError(
                f"batch_size={batch_size} must be positive and divisible by shard_count="
                f"{shard_count}"
            )
        if not 0 <= shard_index < shard_count:
            raise DataError(f"shard_index={shard_index} not in [0, {shard_count})")
        self.per_host_batch = batch_size // shard_count
        shard = indices[shard_index::shard_count]
        if len(shard) < self.per_host_batch:
            raise DataError(
                f"shard {shard_index}/{shard_count} has {len(shard)} slices, fewer than the "
                f"per-host batch {self.per_host_batch}; use a smaller batch or more data"
            )
        self.steps_per_epoch = max(1, len(indices) // batch_size)
        image_size, flip, workers = int(image_size), bool(random_flip), int(num_workers)
        records = _Records(source, shard, context_slices)
        ds = grain.MapDataset.source(records).seed(int(seed)).shuffle().repeat()
        ds = ds.random_map(
            _Augment(image_size, flip, patch_size, foreground_fraction, foreground_sampling)
        )
        read = grain.ReadOptions(
            num_threads=2 if workers == 0 else 1,
            prefetch_buffer_size=max(4, 2 * self.per_host_batch),
        )
        ids = ds.to_iter_dataset(read)
        if workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (e.g. in pytest)
                flags.FLAGS.mark_as_parsed()
            ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        ids = ids.batch(
            self.per_host_batch, drop_remainder=True, batch_fn=buffer_pool.batch_records
        )
        self._ds = ids
        self._it = iter(ids)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> dict:
        """JSON-serialisable iterator state (save it with the checkpoint)."""
        return json.loads(json.dumps(self._it.get_state(), default=_json_default))

    def set_state(self, state: dict) -> None:
        """Restores a state from get_state(); the next batch is the one that followed it."""
        self._it.set_state(state)

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode()
    raise TypeError(f"iterator state value {o!r} is not JSON-serialisable")


def make_train_iterator(
    source,
    indices,
    data_config,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> TrainIterator:
    """grain training iterator over `indices` of `source` (see TrainIterator).

    Seeded per-epoch shuffle, drop-remainder batching, optional random left-right flips
    (data.random_flip), resize to data.image_size (0 = native), data.num_workers processes,
    static per-host sharding (indices[shard_index::shard_count]); with data.context_slices
    k > 0 each image holds its slice's context window, 4 (2k+1) channels (`data.context`);
    with data.patch_size p > 0 each image is a random p x p crop, data.foreground_fraction of
    them centred on tumour as data.foreground_sampling says (`data.patches`).
    """
    d = data_config
    options = dict(image_size=d.image_size, random_flip=d.random_flip, num_workers=d.num_workers)
    options["context_slices"] = d.get("context_slices", 0)
    options["patch_size"] = d.get("patch_size", 0)
    options["foreground_fraction"] = d.get("foreground_fraction", 0.33)
    options["foreground_sampling"] = d.get("foreground_sampling", "voxels")
    return TrainIterator(
        source, indices, batch_size=batch_size, seed=seed, shard_index=shard_index,
        shard_count=shard_count, **options,
    )  # fmt: skip


def eval_batches(source, indices, *, batch_size: int, image_size: int = 0, context_slices: int = 0):
    """Yields fixed-size batches over `indices` in order (no shuffle, no flips).

    Each batch: image float32 (B,S,S,4(2k+1)), label int32 (B,S,S), case_id (B,) str,
    slice_index (B,) int32, valid (B,) bool; the last batch is padded by repeating its last
    record with valid=False. S = image_size (0 = native); k = context_slices (`data.context`).
    """
    idx = np.asarray(indices, np.int64)
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    records = _Records(source, idx, context_slices)
    for start in range(0, len(idx), batch_size):
        recs = [
            _prepare_record(records[i], image_size, False)
            for i in range(start, min(start + batch_size, len(idx)))
        ]
        batch = dict(
            image=np.stack([r["image"] for r in recs]),
            label=np.stack([r["label"] for r in recs]),
            case_id=np.array([str(r["case_id"]) for r in recs]),
            slice_index=np.array([r["slice_index"] for r in recs], np.int32),
        )
        padded = {k: pad_batch(v, batch_size)[0] for k, v in batch.items()}
        yield {**padded, "valid": pad_batch(batch["image"], batch_size)[1]}


def pad_batch(x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`x` (n, ...) with n <= batch_size padded to (batch_size, ...) by repeating its last
    row, and the (batch_size,) bool mask of real rows. The one padding of a last batch:
    evaluation and whole-volume inference feed fixed-size batches so nothing recompiles."""
    n = len(x)
    if not 0 < n <= batch_size:
        raise ValueError(f"pad_batch: {n} rows for a batch of {batch_size}; expected 1..batch")
    valid = np.arange(batch_size) < n
    if n == batch_size:
        return x, valid
    return np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)]), valid
