"""Feature sums (pipeline/cache/feature_sums.py): the per-record checksum the dump computes on the
device and the trainer's step checks on the device, so the loader need not hash 28.8 KB per token
on the host (issue 22, item 8).

Oracles: the numpy implementation (written independently of the jax one) for the definition;
the bytes on disk for what the dump stored; a flipped byte for the step's check.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import ml_dtypes

from pipeline.cache import open_cache
from pipeline.cache.feature_sums import feature_sums, feature_sums_np
from pipeline.dump.run import DumpConfig, run_dump
from tests._dump_fixtures import FakeTeacher, fake_sequences

BF16 = ml_dtypes.bfloat16


def _features(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(BF16)


@pytest.mark.parametrize("shape", [(3, 130, 640), (2, 1, 7), (5, 33, 96)])
def test_jax_equals_numpy(shape):
    x = _features(shape)
    np.testing.assert_array_equal(np.asarray(jax.jit(feature_sums)(jnp.asarray(x))),
                                  feature_sums_np(x))
    np.testing.assert_array_equal(feature_sums_np(x[1]), feature_sums_np(x)[1])


def test_sharded_batch_equals_one_device():
    x = _features((8, 40, 64), seed=1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    # rows over data x fsdp (the step's batch sharding), or the feature dim split too: a sum
    # mod 2**32 is the same bits in any reduction order
    for spec in (jax.sharding.PartitionSpec(("data", "fsdp")),
                 jax.sharding.PartitionSpec("data", None, "fsdp")):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        np.testing.assert_array_equal(np.asarray(jax.jit(feature_sums)(xs)), feature_sums_np(x))


def test_every_single_word_change_is_caught_and_rows_are_ordered():
    rng = np.random.default_rng(2)
    x = _features((64, 48), seed=2)
    ref = feature_sums_np(x)
    words = x.view(np.uint16)
    for _ in range(200):  # one word changed by any amount: both sums change (odd weights)
        y = words.copy()
        t, f = rng.integers(64), rng.integers(48)
        y[t, f] = (int(y[t, f]) + int(rng.integers(1, 1 << 16))) & 0xFFFF
        assert (feature_sums_np(y.view(BF16)) != ref).all()
    swapped = x.copy()
    swapped[[3, 40]] = swapped[[40, 3]]
    assert (feature_sums_np(swapped) != ref).all()  # two rows swapped
    assert (feature_sums_np(np.roll(x, 1, axis=0)) != ref).all()  # a record read one row off


def _dump(out, n: int) -> None:
    """A TensorStore cache of n fake-teacher sequences, dumped as `teacher_dump` does."""
    config = DumpConfig(out=str(out), shards=2, seq_len=32, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake")
    run_dump(config, teacher=FakeTeacher(16), sequences=fake_sequences(n, 32),
             log=lambda *_: None)


def test_dump_stores_the_device_sums_of_what_it_wrote(tmp_path):
    _dump(tmp_path / "c", 11)
    cache = open_cache(tmp_path / "c")
    assert cache.has_feature_sums()
    for i in range(len(cache)):
        np.testing.assert_array_equal(cache.feature_sums(i),
                                      feature_sums_np(cache[i]["features"]))


def _flip_features(cache, index) -> None:
    """Flip one bit of record `index`'s features in its plain zarr chunk file."""
    from pathlib import Path

    _, lo, _, k, _ = cache._locate(index)
    directory, rows, row_bytes = cache._part(k)["plain"]
    c, r = divmod(lo, rows)
    path = Path(directory) / "c" / str(c) / "0"
    data = bytearray(path.read_bytes())
    data[r * row_bytes + 5] ^= 0x10
    path.write_bytes(bytes(data))


def _drop_feature_sums(part_dir) -> None:
    """Rewrite a part's checksums as a dump before the feature sums wrote them: [records, 2]."""
    import tensorstore as ts

    url = f"file://{part_dir}/checksums/"
    table = ts.open({"driver": "zarr3", "kvstore": url}, open=True).result().read().result()
    old = ts.open({"driver": "zarr3", "kvstore": url, "create": True, "delete_existing": True,
                   "metadata": {"shape": [len(table), 2], "data_type": "uint64",
                                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                                "chunk_grid": {"name": "regular", "configuration": {
                                    "chunk_shape": [len(table), 2]}}}}).result()
    old.write(table[:, :2]).result()


def _one_epoch(cache, **kw):
    from train.loader import make_dataset

    it = iter(make_dataset(cache, global_batch=4, anchors_per_seq=4, seed=0, read_threads=1,
                           prefetch=4, process_index=0, process_count=1, **kw))
    return [next(it) for _ in range(len(cache) // 4)]


def test_loader_hands_corrupt_features_to_the_step_check_not_the_host_hash(tmp_path):
    from pipeline.cache.format import CacheError
    from train.loader import features_checked_on_device, open_training_cache

    _dump(tmp_path / "c", 12)
    cache = open_training_cache(tmp_path / "c")
    bad = 7
    _flip_features(cache, bad)
    cache = open_training_cache(tmp_path / "c")
    assert features_checked_on_device(cache)
    seen = set()
    for batch in _one_epoch(cache):  # no host hash: the corrupt record is delivered
        want = np.stack([cache.feature_sums(int(i)) for i in batch["index"]])
        np.testing.assert_array_equal(batch["feature_sums"], want)
        ok = np.asarray(jnp.all(jax.jit(feature_sums)(batch["features"])
                                == batch["feature_sums"], axis=-1))  # what the step computes
        np.testing.assert_array_equal(ok, batch["index"] != bad)
        seen.update(int(i) for i in batch["index"])
    assert bad in seen
    # A cache dumped before the feature sums (checksums without their column): the host hash
    # checks the features as they are read
    for part in cache.parts:
        _drop_feature_sums(tmp_path / "c" / part.file)
    old = open_training_cache(tmp_path / "c")
    assert not features_checked_on_device(old)
    with pytest.raises(CacheError, match=f"record {bad % 4}"):
        _one_epoch(old)
    # parts of two versions (a dump resumed across them): the part without sums is refused
    _flip_features(old, bad)  # (flip back: this check is about the missing sums)
    _dump(tmp_path / "d", 12)
    mixed = open_training_cache(tmp_path / "d")
    _drop_feature_sums(tmp_path / "d" / mixed.parts[1].file)
    mixed = open_training_cache(tmp_path / "d")
    assert features_checked_on_device(mixed)  # first and last part have them
    with pytest.raises(CacheError, match="stores no feature sums"):
        _one_epoch(mixed)
