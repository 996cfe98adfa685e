"""The TensorStore (zarr3) cache format: same records as ArrayRecord, same crash-resume, same
verification. Oracle: an ArrayRecord dump and an uninterrupted TensorStore dump of the same data.
"""
import numpy as np
import pytest

from pipeline.cache import CacheError, Ledger, open_cache
from pipeline.cache.ts_parts import TSCacheReader
from pipeline.dump.run import DumpConfig, run_dump
from tests._dump_fixtures import FakeTeacher, fake_sequences, run_fake_cli

N = 45
ARGS = ["--shards", "3", "--seq-len", "32", "--batch-size", "4", "--commit-every", "8",
        "--layer-ids", "1,3", "--format", "tensorstore"]


def _dump(directory, fmt, **kw):
    config = DumpConfig(out=str(directory), shards=3, seq_len=32, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake", format=fmt, **kw)
    run_dump(config, teacher=FakeTeacher(16), sequences=fake_sequences(N, 32), log=lambda *_: None)
    return directory


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    return _dump(root / "ar", "arrayrecord"), _dump(root / "ts", "tensorstore")


def assert_same_records(a, b) -> None:
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert set(ra) == set(rb) == {"input_ids", "loss_mask", "features"}
        for k in ra:
            assert ra[k].dtype == rb[k].dtype and ra[k].shape == rb[k].shape, (i, k)
            np.testing.assert_array_equal(ra[k].view(np.uint8), rb[k].view(np.uint8), f"{i} {k}")


def test_tensorstore_records_equal_arrayrecord_records(caches):
    ar, ts = (open_cache(c, verify=True) for c in caches)
    assert isinstance(ts, TSCacheReader) and ts.manifest.format == "tensorstore"
    assert_same_records(ar, ts)
    assert [r["input_ids"].tolist() for r in ts] == [r["input_ids"].tolist() for r in ar]
    # the jagged layout: flat token-major arrays and per-sequence offsets, one part = 3 seqs
    import tensorstore

    part = ts.paths[0]
    feats = tensorstore.open({"driver": "zarr3", "kvstore": part + "/features/"}).result()
    offs = tensorstore.open({"driver": "zarr3", "kvstore": part + "/offsets/"}).result().read()
    assert feats.shape == (3 * 32, 2 * 16) and str(feats.dtype) == "dtype(\"bfloat16\")"
    assert offs.result().tolist() == [0, 32, 64, 96]


def test_tensorstore_reader_is_a_picklable_grain_source(caches):
    import pickle

    import grain

    ts = open_cache(caches[1])
    ds = grain.MapDataset.source(pickle.loads(pickle.dumps(ts)))
    np.testing.assert_array_equal(ds[7]["features"].view(np.uint16),
                                  ts[7]["features"].view(np.uint16))


def test_tensorstore_sigkill_then_resume_equals_uninterrupted(tmp_path, caches):
    out = tmp_path / "cache"
    args = ARGS + ["--out", str(out)]
    for point, committed in [("after_record:5", 0), ("before_ledger:16", 8),
                             ("after_close:27", 24), ("after_record:44", 40)]:
        proc = run_fake_cli(args, N, kill=point)
        assert proc.returncode == -9, (point, proc.stderr[-2000:])
        assert Ledger.load(out).committed == committed
    proc = run_fake_cli(args, N)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "after 40 committed" in proc.stderr
    got, want = open_cache(out, verify=True), open_cache(caches[1], verify=True)
    # same parts, byte for byte (sizes and CRC32 of every key and value), and same records
    assert [(p.file, p.records, p.bytes, p.crc32) for p in got.parts] == \
           [(p.file, p.records, p.bytes, p.crc32) for p in want.parts]
    assert_same_records(got, want)
    rerun = run_fake_cli(args, N)
    assert rerun.returncode == 0 and "already complete" in rerun.stderr


def test_tensorstore_bit_flip_is_detected_by_verify_and_resume(tmp_path):
    out = _dump(tmp_path / "ts", "tensorstore")
    chunk = next(p for p in sorted(out.rglob("c/*/*")) if "features" in str(p))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupted"):
        open_cache(out, verify=True)
    ledger = Ledger.load(out)  # resume must refuse too: reopen the finished cache as unfinished
    Ledger(ledger.settings_key, 40, tuple(p for p in ledger.parts if p.part < 5)).save(out)
    import json
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    proc = run_fake_cli(ARGS + ["--out", str(out)], N)
    assert proc.returncode != 0 and "corrupted" in proc.stderr, proc.stderr[-1000:]


def test_kvstore_url_holds_the_parts_and_the_manifest_stays_in_out(tmp_path, caches):
    """--kvstore: parts under any TensorStore kvstore URL (gs:// on a pod; a file:// URL here),
    manifest and ledger in --out; the reader finds the parts through the manifest."""
    root = tmp_path / "bucket"
    out = _dump(tmp_path / "out", "tensorstore", kvstore=f"file://{root}/cache")
    got = open_cache(out, verify=True)
    assert not list(out.glob("shard-*"))
    assert sorted(p.name for p in root.glob("cache/shard-*.ts")) == sorted(
        p.file for p in got.parts) and len(got.parts) == 17  # 5 intervals x 3 shards + 2
    assert got.manifest.kvstore == f"file://{root}/cache" and got.paths[0].startswith("file://")
    assert_same_records(got, open_cache(caches[0]))


def test_kvstore_needs_tensorstore_format_and_a_usable_url(tmp_path):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="--kvstore needs --format tensorstore"):
        _dump(tmp_path / "a", "arrayrecord", kvstore="file:///tmp/x")
    with pytest.raises(UserError, match="cannot open the TensorStore kvstore"):
        _dump(tmp_path / "b", "tensorstore", kvstore="nosuchdriver://x/")


def test_chunks_split_a_part_evenly_so_no_chunk_is_mostly_padding(tmp_path, monkeypatch):
    """Zarr stores every chunk whole: a part of 4 sequences whose chunk target fits 3 is stored
    as chunks of 2 + 2 (the features' exact bytes), not 3 + 3 (1.5x: 2 sequences of padding)."""
    from pipeline.cache import ts_parts
    from tools._bench_common import write_synthetic_cache

    per_seq = 32 * 2 * 16 * 2  # T x F bf16
    monkeypatch.setattr(ts_parts, "CHUNK_TARGET_BYTES", 3 * per_seq)
    write_synthetic_cache(tmp_path / "ts", 8, 32, 16, 2, shards=2, commit_every=8,
                          fmt="tensorstore")  # 2 parts of 4 sequences
    cache = open_cache(tmp_path / "ts", verify=True)
    files = [p for p in (tmp_path / "ts").rglob("features/c/*/*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) == len(cache) * per_seq == 8 * per_seq
    assert len(files) == 4  # two chunks per part
    directory, rows, _ = ts_parts.plain_chunk_files(cache.root, cache.parts[0].file, "features")
    assert rows == 2 * 32
