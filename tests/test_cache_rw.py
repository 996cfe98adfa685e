"""Cache writer, reader and verification: what is written is what every reader returns, an
unfinished cache is refused, every damaged byte is detected, and resume drops uncommitted files."""
import json
import os

import numpy as np
import pytest

from pipeline.cache import (
    LEDGER_NAME, MANIFEST_NAME, CacheError, CacheManifest, Ledger, encode_record, open_cache,
    prepare_cache)
from pipeline.errors import UserError


def _manifest(**kw):
    base = dict(seq_len=16, hidden_size=4, layer_ids=(1, 2), shards=3, commit_every=5,
                teacher={"path": "t"}, settings={"batch_size": 1})
    base.update(kw)
    return CacheManifest(**base)


def _records(n, m, seed=0):
    rng = np.random.default_rng(seed)
    return [encode_record(rng.integers(0, 1000, m.seq_len), rng.integers(0, 2, m.seq_len),
                          rng.standard_normal((m.seq_len, m.feature_dim)))
            for _ in range(n)]


def _write(directory, m, records, finish=True):
    prepared = prepare_cache(directory, m)
    for r in records:
        prepared.writer.write(r)
    if finish:
        prepared.writer.finish()
    return prepared


def test_reader_and_grain_return_what_was_written_in_order(tmp_path):
    import grain

    m = _manifest()
    recs = _records(13, m)
    _write(tmp_path, m, recs)
    cache = open_cache(tmp_path, verify=True)
    assert len(cache) == 13 and cache.manifest.complete and cache.manifest.num_records == 13
    assert [cache.read_bytes(i) for i in range(13)] == recs
    assert cache.read_bytes(-1) == recs[-1]
    with pytest.raises(IndexError):
        cache.read_bytes(13)
    for i, rec in enumerate(cache):
        assert rec["input_ids"].tobytes() == recs[i][: 4 * m.seq_len]
    np.testing.assert_array_equal(cache[4]["features"].view(np.uint16),
                                  np.frombuffer(recs[4][5 * m.seq_len:], np.uint16).reshape(16, 8))
    for paths in (cache.grain_paths, cache.paths):  # Grain's key i is sequence i too
        src = grain.sources.ArrayRecordDataSource(paths)
        assert len(src) == 13 and [src[i] for i in range(13)] == recs
    # 13 sequences, intervals of 5, 2 per part (ceil(5/3)): parts 0,1 full (3 files), part 2: 2 files.
    assert len(cache.paths) == 8
    summary = json.loads((tmp_path / MANIFEST_NAME).read_text())["shard_summary"]
    assert [s["records"] for s in summary] == [6, 5, 2]


def test_unfinished_cache_is_refused_unless_asked(tmp_path):
    m = _manifest()
    recs = _records(13, m)
    _write(tmp_path, m, recs, finish=False)
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path)
    partial = open_cache(tmp_path, allow_incomplete=True, verify=True)
    assert [partial.read_bytes(i) for i in range(len(partial))] == recs[:10]  # 2 commits of 5
    with pytest.raises(CacheError, match="no feature cache"):
        open_cache(tmp_path / "nothing")


def test_resume_drops_uncommitted_files_and_continues_identically(tmp_path):
    m = _manifest()
    recs = _records(13, m)
    _write(tmp_path / "ref", m, recs)
    d = tmp_path / "run"
    _write(d, m, recs[:12], finish=False)  # committed 10; part of sequences 10-11 left open
    (d / (LEDGER_NAME + ".tmp")).write_text("{garbage")  # a crash between tmp and rename
    stray = d / "shard-00002-of-00003.part-00009.arrayrecord"
    stray.write_bytes(b"junk")
    prepared = prepare_cache(d, m)
    assert prepared.resumed_from == 10 and not stray.exists()
    assert not (d / (LEDGER_NAME + ".tmp")).exists()
    for r in recs[10:]:
        prepared.writer.write(r)
    prepared.writer.finish()
    a, b = open_cache(tmp_path / "ref", verify=True), open_cache(d, verify=True)
    assert [a.read_bytes(i) for i in range(13)] == [b.read_bytes(i) for i in range(13)]
    for pa, pb in zip(a.paths, b.paths):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    assert prepare_cache(d, m).complete  # a finished cache: nothing to do


def test_verification_detects_truncation_and_every_sampled_bit_flip(tmp_path):
    m = _manifest()
    _write(tmp_path, m, _records(13, m))
    cache = open_cache(tmp_path)
    path = cache.paths[3]
    data = open(path, "rb").read()
    offsets = sorted(set(range(0, 80)) | set(range(0, len(data), 257))
                     | set(range(len(data) - 80, len(data))))
    for off in offsets:  # header, records, the padding ArrayRecord leaves unhashed, footer
        flipped = bytearray(data)
        flipped[off] ^= 1 << (off % 8)
        open(path, "wb").write(flipped)
        with pytest.raises(CacheError, match="corrupted"):
            open_cache(tmp_path, verify=True)
    open(path, "wb").write(data[:-1])
    with pytest.raises(CacheError, match="truncated"):
        cache.verify()
    open(path, "wb").write(data)
    os.remove(cache.paths[0])
    with pytest.raises(CacheError, match="missing"):
        cache.verify()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_resume_refuses_a_damaged_committed_part(tmp_path, damage):
    m = _manifest()
    _write(tmp_path, m, _records(12, m), finish=False)
    part = Ledger.load(tmp_path).parts[1]
    path = tmp_path / part.file
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x10
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"cannot resume: {path}.*--overwrite"):
        prepare_cache(tmp_path, m)
    assert prepare_cache(tmp_path, m, overwrite=True).resumed_from == 0


def test_other_settings_are_refused_and_overwrite_starts_over(tmp_path):
    m = _manifest()
    _write(tmp_path, m, _records(7, m))
    (tmp_path / "models").mkdir()  # other things in the directory survive --overwrite
    other = _manifest(seq_len=32, settings={"batch_size": 2})
    with pytest.raises(UserError) as e:
        prepare_cache(tmp_path, other)
    msg = str(e.value)
    assert "seq_len: 16 -> 32" in msg and "batch_size: 1 -> 2" in msg and "--overwrite" in msg
    assert "\n" not in msg
    prepared = prepare_cache(tmp_path, other, overwrite=True)
    assert prepared.resumed_from == 0 and not list(tmp_path.glob("shard-*"))
    assert (tmp_path / "models").is_dir()


def test_an_unreadable_ledger_is_a_one_line_error(tmp_path):
    m = _manifest()
    _write(tmp_path, m, _records(7, m), finish=False)
    (tmp_path / LEDGER_NAME).write_text('{"version": 1, "committed": ')
    with pytest.raises(UserError, match="ledger.json is unreadable.*--overwrite"):
        prepare_cache(tmp_path, m)
