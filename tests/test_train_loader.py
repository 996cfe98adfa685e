"""Grain loader: record content, per-epoch reshuffle, process slicing, anchors from
(seed, epoch, index), and an iterator-state round trip through the Orbax checkpoint."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipeline.errors import UserError
from tests._train_fixtures import random_records, write_cache
from train.anchors import draw_anchors
from train.checkpoint import Checkpointer
from train.loader import make_dataset, open_training_cache, to_global
from train.mesh import make_mesh
from train.step import batch_shardings

N_SEQ, T, F = 10, 24, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    recs = random_records(N_SEQ, T, F, 50, seed=1)
    write_cache(d, recs, hidden_size=4, layer_ids=(1, 2), teacher={"path": "unused"}, shards=3,
                commit_every=4, mask_token_id=49)
    return d, recs


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_records_epochs_and_anchors(cache):
    d, recs = cache
    m = open_training_cache(d)
    assert m.verify() == N_SEQ  # the fixture is a valid cache (sizes, counts, CRC32)
    it = iter(make_dataset(m, global_batch=5, anchors_per_seq=6, seed=7, read_threads=2,
                           prefetch=4))
    batches = _take(it, 6)  # 3 epochs of 10 sequences
    idx = np.concatenate([b["index"] for b in batches])
    ep = np.concatenate([b["epoch"] for b in batches])
    assert ep.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    for e in range(3):  # each epoch is a permutation of all sequences...
        assert sorted(idx[ep == e].tolist()) == list(range(N_SEQ))
    assert idx[:10].tolist() != idx[10:20].tolist()  # ...reshuffled per epoch
    for b in batches:
        for j in range(5):
            i, e = int(b["index"][j]), int(b["epoch"][j])
            ids, mask, feats = recs[i]
            assert np.array_equal(b["input_ids"][j], ids)
            assert np.array_equal(b["loss_mask"][j], mask)
            np.testing.assert_array_equal(b["features"][j].astype(np.float32),
                                          feats.astype(b["features"].dtype).astype(np.float32))
            a, v = draw_anchors(mask, 6, seed=7, epoch=e, index=i)
            assert np.array_equal(b["anchors"][j], a) and np.array_equal(b["anchor_valid"][j], v)


def test_process_slices_partition_the_stream(cache):
    d, _ = cache
    m = open_training_cache(d)
    whole = iter(make_dataset(m, global_batch=4, anchors_per_seq=3, seed=0, read_threads=1))
    parts = [iter(make_dataset(m, global_batch=4, anchors_per_seq=3, seed=0, read_threads=1,
                               process_index=p, process_count=2)) for p in range(2)]
    stream = np.concatenate([b["index"] for b in _take(whole, 5)])
    p0 = np.concatenate([b["index"] for b in _take(parts[0], 5)])
    p1 = np.concatenate([b["index"] for b in _take(parts[1], 5)])
    assert p0.tolist() == stream[0::2][:10].tolist() and p1.tolist() == stream[1::2][:10].tolist()


def test_iterator_state_round_trip_through_checkpoint(cache, tmp_path):
    d, _ = cache
    m = open_training_cache(d)
    make = lambda: iter(make_dataset(m, global_batch=3, anchors_per_seq=4, seed=3,
                                     read_threads=2, prefetch=8))
    it = make()
    _take(it, 5)  # crosses an epoch boundary (15 > 10 sequences)
    state = {"w": jnp.arange(4.0), "step": jnp.asarray(5, jnp.int32)}
    ck = Checkpointer(tmp_path / "run", keep=2)
    ck.save(5, state, it.get_state())
    ck.close()
    expected = _take(it, 4)

    ck2 = Checkpointer(tmp_path / "run", keep=2)
    assert ck2.latest_step() == 5
    restored, data_state = ck2.restore(5, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    assert isinstance(data_state, dict)  # plain JSON, captured when save() was called
    it2 = make()
    it2.set_state(data_state)
    got = _take(it2, 4)
    np.testing.assert_array_equal(restored["w"], state["w"])
    for a, b in zip(expected, got):
        for k in ("index", "epoch", "input_ids", "anchors", "anchor_valid"):
            np.testing.assert_array_equal(a[k], b[k])


def test_global_arrays_on_mesh(cache):
    d, _ = cache
    m = open_training_cache(d)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    batch = next(iter(make_dataset(m, global_batch=4, anchors_per_seq=3, seed=0)))
    g = to_global(batch, batch_shardings(mesh))
    assert g["features"].shape == (4, T, F) and g["features"].dtype == batch["features"].dtype
    assert g["input_ids"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(g["anchors"]), batch["anchors"])


def test_bad_cache_is_one_line_user_error(tmp_path, cache):
    with pytest.raises(UserError, match="manifest.json not found"):
        open_training_cache(tmp_path)
    d, recs = cache
    inc = tmp_path / "incomplete"
    write_cache(inc, recs[:2], hidden_size=4, layer_ids=(1, 2), teacher={"path": "x"})
    j = json.loads((inc / "manifest.json").read_text())
    j["complete"] = False
    (inc / "manifest.json").write_text(json.dumps(j))
    with pytest.raises(UserError, match="incomplete"):
        open_training_cache(inc)
    (inc / "manifest.json").write_text(json.dumps(dict(j, complete=True)))
    open_training_cache(inc)
    next(iter(sorted(inc.glob("*.arrayrecord")))).unlink()
    with pytest.raises(UserError, match="missing"):
        open_training_cache(inc)
