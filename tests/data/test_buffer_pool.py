"""Recycled batch buffers (`data.buffer_pool`): memory is reused only once nothing refers to
it (views and JAX arrays included), batches equal numpy's stack, a held batch is never
overwritten, the pool keeps at most its limit."""

import threading

import jax
import numpy as np

from brats_jax.data import TrainIterator, buffer_pool
from brats_jax.data.synthetic import SyntheticSource


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_memory_is_reused_only_after_every_view_is_gone():
    """Bug caught: the finalizer put on the reshaped array handed out, not the array that
    owns the memory view (a view of a view keeps only the latter alive), so the buffer
    returns to the pool while `flipped` still reads it."""
    a = buffer_pool.empty((64, 32, 4), np.float32)
    a[...] = 1.5
    flipped = a[::-1, :, 1:3]  # a view of the handed-out array
    address = _address(a)
    del a
    b = buffer_pool.empty((64, 32, 4), np.float32)  # same size: would take a freed buffer
    b[...] = -7.0
    assert not np.shares_memory(b, flipped)
    np.testing.assert_array_equal(flipped, 1.5)
    b_address = _address(b)
    del flipped, b
    c = buffer_pool.empty((32, 64, 4), np.int32)  # same bytes, other shape and dtype
    assert c.flags.c_contiguous and c.flags.writeable and c.shape == (32, 64, 4)
    assert _address(c) in {address, b_address}  # one of the two freed buffers


def test_freed_buffer_is_the_next_one_handed_out():
    """Bug caught: release never keeps the buffer (every array fresh memory: the pool does
    nothing)."""
    a = buffer_pool.empty((1000,), np.float64)
    address = _address(a)
    del a
    assert _address(buffer_pool.empty((8000,), np.uint8)) == address


def test_jax_uses_a_pooled_batch_in_place_and_keeps_it():
    """On the CPU, XLA uses an aligned numpy buffer in place (no copy); the pool's buffers are
    aligned for that, and must not be handed out again while the JAX array lives (JAX holds
    the numpy array). Bugs caught: the 64-byte alignment lost (numpy's 16: every batch copied
    again on a CPU run); a pool that releases when the numpy array's last reference goes
    although JAX still reads the memory."""
    a = buffer_pool.empty((16, 24, 24, 12), np.float32)
    a[...] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    x = jax.device_put(a)
    assert x.unsafe_buffer_pointer() == _address(a)  # used in place
    del a
    for _ in range(4):  # any buffer handed out now must be other memory
        buffer_pool.empty((16, 24, 24, 12), np.float32)[...] = -1.0
    np.testing.assert_array_equal(np.asarray(x).ravel(), np.arange(x.size))


def test_stack_equals_numpy_for_numbers_and_strings():
    """Bug caught: the output buffer shaped (n, ...) from the last value or cast to the first
    value's dtype for strings (truncation of longer IDs)."""
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(5, 7, 12)).astype(np.float32) for _ in range(3)]
    images[1] = images[1][::-1]  # a flipped record arrives as a view
    ids = [np.str_("A"), np.str_("BraTS2021_00002"), np.str_("C")]
    records = [dict(image=x, case_id=c, slice_index=np.int32(i)) for i, (x, c) in
               enumerate(zip(images, ids, strict=True))]  # fmt: skip
    batch = buffer_pool.batch_records(records)
    np.testing.assert_array_equal(batch["image"], np.stack(images))
    assert batch["image"].dtype == np.float32
    assert batch["case_id"].tolist() == ["A", "BraTS2021_00002", "C"]
    np.testing.assert_array_equal(batch["slice_index"], np.array([0, 1, 2], np.int32))


def test_a_held_batch_is_not_overwritten_by_later_ones():
    """Bug caught: batches stacked into a fixed ring of buffers (reused while the training
    loop still holds one)."""
    src = SyntheticSource(num_cases=2, slices_per_case=8, image_size=16, seed=0)
    it = TrainIterator(src, np.arange(len(src)), batch_size=4, seed=1, random_flip=True)
    held = next(it)
    kept = {k: np.array(v) for k, v in held.items()}
    for _ in range(12):
        next(it)
    for k, v in kept.items():
        np.testing.assert_array_equal(held[k], v)
    it.close()


def test_the_pool_keeps_at_most_its_limit(monkeypatch):
    """Bug caught: no limit (every freed buffer kept: a pipeline that changes shapes would
    hoard memory)."""
    arrays = [buffer_pool.empty((1000,), np.uint8) for _ in range(5)]
    before = buffer_pool.free_bytes()
    monkeypatch.setattr(buffer_pool, "MAX_FREE_BYTES", before + 3000)
    del arrays
    assert buffer_pool.free_bytes() - before == 3000  # three of the five kept


def test_threads_never_share_a_live_buffer():
    """Buffers taken and freed from several threads at once: each live array keeps its own
    values. Bug caught: a buffer taken without removing it from the free list (two live
    arrays on one buffer)."""
    errors = []

    def work(k):
        for _ in range(300):
            a = buffer_pool.empty((256,), np.int64)
            a[...] = k
            b = buffer_pool.empty((256,), np.int64)
            b[...] = -k
            if not ((a == k).all() and (b == -k).all()):
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
