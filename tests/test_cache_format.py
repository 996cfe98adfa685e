"""Cache format: record encoding, the sequence -> (shard, part) layout, manifest round trip."""
import json

import numpy as np
import pytest

from pipeline.cache import BF16, CacheManifest, Layout, PartInfo, decode_record, encode_record


def _manifest(**kw):
    base = dict(seq_len=8, hidden_size=4, layer_ids=(1, 3, 5), shards=3, commit_every=6,
                teacher={"path": "t", "config_sha256": "ab"}, tokenizer="tok", mask_token_id=7,
                vocab_size=100, settings={"data": {"source": "x"}, "batch_size": 2})
    base.update(kw)
    return CacheManifest(**base)


@pytest.mark.parametrize("shards,commit_every", [(1, 1), (3, 8), (4, 8), (64, 256), (5, 7), (10, 3)])
def test_layout_is_a_bijection_whose_file_order_is_sequence_order(shards, commit_every):
    layout = Layout(shards, commit_every)
    n = 3 * commit_every + 2
    locs = [layout.locate(i) for i in range(n)]
    assert len(set(locs)) == n
    assert all(0 <= s < shards and 0 <= pos < layout.per_part for s, _, pos in locs)
    # Reading parts in (part, shard) order, each from position 0 up, gives sequence order.
    by_file = sorted(range(n), key=lambda i: (locs[i][1], locs[i][0], locs[i][2]))
    assert by_file == list(range(n))
    files = {}
    for s, p, pos in locs:
        files.setdefault((s, p), []).append(pos)
    assert all(v == list(range(len(v))) for v in files.values())
    # A part never spans a commit point: interval p holds exactly sequences [p*C, (p+1)*C).
    assert all(p == i // commit_every for i, (_, p, _) in enumerate(locs))


def test_record_round_trip_is_exact_and_zero_copy():
    rng = np.random.default_rng(0)
    t, f = 8, 12
    ids = rng.integers(-5, 2**31 - 1, t, dtype=np.int64).astype(np.int32)
    mask = rng.integers(0, 2, t).astype(np.uint8)
    feats = rng.standard_normal((t, f)).astype(np.float32)
    feats[0, :3] = [np.inf, -np.inf, 1e38]  # bf16 keeps these; 1e38 rounds like ml_dtypes does
    buf = encode_record(ids, mask, feats)
    m = _manifest(seq_len=t, hidden_size=4, layer_ids=(0, 1, 2))
    assert len(buf) == m.record_nbytes == t * (4 + 1 + 2 * f)
    rec = decode_record(buf, m)
    np.testing.assert_array_equal(rec["input_ids"], ids)
    np.testing.assert_array_equal(rec["loss_mask"], mask)
    assert rec["features"].dtype == BF16 and rec["features"].shape == (t, f)
    np.testing.assert_array_equal(rec["features"].view(np.uint16), feats.astype(BF16).view(np.uint16))
    assert not rec["features"].flags.writeable  # a view into the record bytes, not a copy
    with pytest.raises(ValueError, match="expected"):
        decode_record(buf[:-1], m)
    with pytest.raises(ValueError, match="bad record shapes"):
        encode_record(ids, mask[:-1], feats)


def test_manifest_json_round_trip_and_derived_fields():
    parts = (PartInfo(0, 0, "shard-00000-of-00002.part-00000.ts", 3, 100, 5),
             PartInfo(1, 0, "shard-00001-of-00002.part-00000.ts", 2, 90, 6))
    m = _manifest().with_parts(parts, complete=True)
    d = json.loads(json.dumps(m.to_json()))
    assert CacheManifest.from_json(d) == m
    assert d["num_features"] == 3 and d["feature_dim"] == 12 and d["num_records"] == 5
    assert d["shard_summary"][0] == {"shard": 0, "records": 3, "bytes": 100, "crc32": [5]}
    with pytest.raises(ValueError, match="schema"):
        CacheManifest.from_json({**d, "schema": "other/9"})


def test_cache_modules_import_no_heavy_framework():
    """The trainer (which must not import easydel/torch) reads caches through these modules."""
    import subprocess
    import sys

    code = ("import sys, pipeline.cache, pipeline.teacher_dump; print(sorted({m.split('.')[0] "
            "for m in sys.modules} & {'torch', 'easydel', 'jax', 'transformers', 'flax'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[1], timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
