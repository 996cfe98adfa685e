"""The loader's direct read path (TensorStore features read straight into the batch array: by
os.preadv of plain chunk files, or by TensorStore for anything else, e.g. parts written sharded
before chunks were plain) gives the same batches, bit for bit, as the ArrayRecord path over the
same sequences, and its iterator state is the same position and round-trips. Oracle: ArrayRecord
caches read through Grain's np.stack batching, the path the loader used before the direct read
existed."""
import os

import numpy as np
import pytest

from pipeline.cache import ts_parts as cache_ts
from pipeline.cache.format import CacheError
from pipeline.cache.ts_parts import TSCacheReader, _pread_into, plain_chunk_files
from tools._bench_common import write_synthetic_cache
from train.loader import make_dataset, open_training_cache

N, T, H, K = 13, 16, 4, 2  # 13 sequences: partial parts and a partial last TS chunk


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    for fmt in ("arrayrecord", "tensorstore"):
        write_synthetic_cache(root / fmt, N, T, H, K, shards=3, commit_every=5, seed=4, fmt=fmt)
    out = {fmt: open_training_cache(root / fmt) for fmt in ("arrayrecord", "tensorstore")}
    out["tensorstore-ts"] = open_training_cache(root / "tensorstore")
    out["tensorstore-ts"].pread_plain_chunks = False  # every read through TensorStore
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """gpt-oss width (F = 5 * 2880): 2-sequence chunks of 3.7 MB, which TensorStore shards unless
    told otherwise; "tensorstore-sharded" is written the way parts were before (no codecs)."""
    root = tmp_path_factory.mktemp("wide")
    kw = dict(shards=2, commit_every=4, seed=2)
    write_synthetic_cache(root / "ar", 6, 64, 2880, 5, **kw)
    write_synthetic_cache(root / "ts", 6, 64, 2880, 5, fmt="tensorstore", **kw)
    old = cache_ts._spec

    def sharded(*a):
        spec = old(*a)
        del spec["metadata"]["codecs"]
        return spec

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cache_ts, "_spec", sharded)
        write_synthetic_cache(root / "old", 6, 64, 2880, 5, fmt="tensorstore", **kw)
    return {name: open_training_cache(root / d) for name, d in
            (("arrayrecord", "ar"), ("tensorstore", "ts"), ("tensorstore-sharded", "old"))}


def _stream(cache, **kw):
    args = dict(global_batch=4, anchors_per_seq=5, seed=11, read_threads=2, prefetch=8)
    return iter(make_dataset(cache, **{**args, **kw}))


def _assert_same(a: dict, b: dict) -> None:
    from pipeline.cache.feature_sums import feature_sums_np

    for batch in (a, b):  # TensorStore batches carry the sums the step checks: of these bytes
        if "feature_sums" in batch:
            np.testing.assert_array_equal(batch["feature_sums"],
                                          feature_sums_np(np.asarray(batch["features"])))
    a, b = ({k: v for k, v in x.items() if k != "feature_sums"} for x in (a, b))
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), k)


@pytest.mark.parametrize("fmt", ["tensorstore", "tensorstore-ts"])
def test_read_features_into_a_batch_row(caches, fmt):
    ts, ar = caches[fmt], caches["arrayrecord"]
    assert isinstance(ts, TSCacheReader)
    assert (ts._part(0)["plain"] is not None) == (fmt == "tensorstore")
    out = np.full((2, T, H * K), 7, ar[0]["features"].dtype)
    ts.read_features_into(N - 1, out[1]).result()
    assert np.array_equal(out[1].view(np.uint16), ar[N - 1]["features"].view(np.uint16))
    assert (out[0].view(np.uint16) == out.view(np.uint16)[0, 0, 0]).all()  # row 0 untouched
    tokens = ts.read_tokens(3)
    assert sorted(tokens) == ["input_ids", "loss_mask"]
    assert np.array_equal(tokens["input_ids"], ar[3]["input_ids"])


@pytest.mark.parametrize("fmt,process", [("tensorstore", None), ("tensorstore", (0, 2)),
                                         ("tensorstore", (1, 2)), ("tensorstore-ts", None)])
def test_direct_batches_equal_arrayrecord_batches(caches, fmt, process):
    kw = {} if process is None else {"process_index": process[0], "process_count": process[1]}
    a, b = _stream(caches["arrayrecord"], **kw), _stream(caches[fmt], **kw)
    for _ in range(8):  # > 2 epochs of 13 sequences
        _assert_same(next(a), next(b))


def test_wide_plain_and_sharded_parts_give_arrayrecord_batches(wide):
    new, old = wide["tensorstore"], wide["tensorstore-sharded"]
    directory, rows, row_bytes = plain_chunk_files(new.root, new.parts[0].file, "features")
    assert rows == 128 and row_bytes == 14400 * 2  # one file per 2 sequences, no inner chunks
    assert plain_chunk_files(old.root, old.parts[0].file, "features") is None  # sharded
    streams = [_stream(wide[k], global_batch=2, read_threads=1)
               for k in ("arrayrecord", "tensorstore", "tensorstore-sharded")]
    for _ in range(7):  # > 2 epochs of 6 sequences
        a, b, c = (next(s) for s in streams)
        _assert_same(a, b)
        _assert_same(a, c)


def test_direct_iterator_state_round_trips(caches):
    ts, ar = _stream(caches["tensorstore"]), _stream(caches["arrayrecord"])
    for _ in range(4):
        next(ts), next(ar)
    state = ts.get_state()
    assert state == ar.get_state()  # the same position, whichever format
    expected = [next(ts) for _ in range(3)]
    again = _stream(caches["tensorstore"])
    again.set_state(state)
    for e in expected:
        _assert_same(e, next(again))


def test_loader_leaves_malloc_alone():
    """Importing the loader changes no process-wide allocator setting (issue 11: a global mallopt
    made XLA's heap grow to 21 GB)."""
    import train.loader

    assert not hasattr(train.loader, "tune_malloc") and not hasattr(train.loader, "MALLOC_TUNED")
    assert "mallopt(" not in open(train.loader.__file__).read()  # the docstring may say why


def test_close_stops_the_prefetch_thread_and_runs_at_exit(caches):
    import threading

    prefetchers = lambda: {t for t in threading.enumerate()
                           if t.name.startswith("grain-thread-prefetch")}
    before = prefetchers()
    it = _stream(caches["tensorstore"])
    next(it)
    mine = prefetchers() - before
    assert mine  # the batch step's prefetch thread (a daemon: not joined by Python at exit)
    assert it.close.atexit  # so it is stopped before finalization: a TensorStore read still in
    it.close()  # flight then would abort the process
    assert not any(t.is_alive() for t in mine)
    with pytest.raises(ValueError, match="closed"):
        next(it)


def test_plain_chunk_files_and_pread(caches, tmp_path):
    ts = caches["tensorstore"]
    directory, rows, row_bytes = plain_chunk_files(ts.root, ts.parts[0].file, "features")
    assert row_bytes == H * K * 2 and (directory / "c" / "0" / "0").is_file()
    assert plain_chunk_files("memory://x/", ts.parts[0].file, "features") is None  # not local
    assert plain_chunk_files(ts.root, ts.parts[0].file, "offsets") is None  # not bf16 rows
    out = np.full(8, 255, np.uint8)
    _pread_into(tmp_path / "absent", out, 0)  # zarr stores no chunk of fill values only
    assert not out.any()
    (tmp_path / "short").write_bytes(b"x" * 12)
    with pytest.raises(CacheError, match="truncated"):
        _pread_into(tmp_path / "short", out, 6)


def test_batch_arrays_are_reused_once_released(caches):
    """A consumer that drops each batch gets its features in the pool's few arrays again (no
    fresh [B, T, F] allocation per batch: the page faults it cost), and they stay correct."""
    ds = make_dataset(caches["tensorstore"], global_batch=4, anchors_per_seq=5, seed=11,
                      read_threads=2, prefetch=8)
    it, oracle = iter(ds), _stream(caches["arrayrecord"])
    for _ in range(12):  # > 3 epochs
        _assert_same(next(oracle), next(it))
    assert ds.buffers.allocated <= 8 // 4 + 2  # prefetched batches + the one filled + the held


def test_batches_held_by_the_consumer_or_by_jax_are_never_overwritten(caches):
    """Reuse waits until nothing refers to a batch's array: neither the consumer's batch dicts
    nor jax.Arrays that alias its memory (jax.device_put on CPU keeps numpy memory when it can)."""
    import jax

    ds = make_dataset(caches["tensorstore"], global_batch=4, anchors_per_seq=5, seed=11,
                      read_threads=2, prefetch=8)
    it, oracle = iter(ds), _stream(caches["arrayrecord"])
    held = [next(it) for _ in range(6)]  # more than the pool keeps
    on_device, aliased = [], 0
    for _ in range(6):
        features = next(it)["features"]
        on_device.append(jax.device_put(features))
        aliased += on_device[-1].unsafe_buffer_pointer() == features.ctypes.data
        del features  # only the jax.Array refers to it now
    for _ in range(6):  # more batches through the pool
        next(it)
    for batch in held:
        _assert_same(next(oracle), batch)
    for x in on_device:
        assert np.array_equal(np.asarray(x).view(np.uint16),
                              next(oracle)["features"].view(np.uint16))
    assert aliased  # the case this test is about did occur
    assert ds.buffers.allocated >= 12  # so each held batch kept an array of its own


def test_grain_profiling_notice_is_dropped_and_other_absl_warnings_kept():
    """Importing the loader (as every trainer start does) no longer prints Grain's notice that
    its worker profiler needs a newer jaxlib; any other absl warning still gets through."""
    import subprocess
    import sys

    code = ("import logging, train.loader; "
            "logging.getLogger('absl').warning('another absl warning')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(__import__('pathlib').Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Grain multiprocess worker profiling" not in r.stderr
    assert "another absl warning" in r.stderr
