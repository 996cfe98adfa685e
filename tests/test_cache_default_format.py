"""The format a dump writes without --format (issue 14): TensorStore parts, which the loader reads
straight into its batches at about raw read speed. A dump begun in the other format (e.g. an
ArrayRecord dump made before the default changed) resumes in it when rerun without the flag; a
--kvstore implies TensorStore; --overwrite starts over in the default. Oracle: the same records
dumped with the format named explicitly."""
import pytest

from pipeline.cache import open_cache
from pipeline.cache.prepare import existing_format
from pipeline.cache.ts_parts import TSCacheReader
from pipeline.dump.run import DumpConfig, run_dump
from pipeline.teacher_dump import parse_args
from tests._dump_fixtures import FakeTeacher, assert_same_cache, fake_sequences

N = 29


def _dump(out, sequences=None, **kw):
    config = DumpConfig(out=str(out), shards=3, seq_len=32, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake", **kw)
    return run_dump(config, teacher=FakeTeacher(16),
                    sequences=fake_sequences(N, 32) if sequences is None else sequences,
                    log=lambda *_: None)


def _failing_after(k):
    for i, seq in enumerate(fake_sequences(N, 32)):
        if i == k:
            raise RuntimeError("data source broke")
        yield seq


def test_a_dump_without_format_writes_tensorstore_parts(tmp_path):
    assert parse_args(["--out", str(tmp_path)]).format is None  # resolved by the dump
    _dump(tmp_path / "default")
    _dump(tmp_path / "named", format="tensorstore")
    cache = open_cache(tmp_path / "default", verify=True)
    assert isinstance(cache, TSCacheReader) and cache.manifest.format == "tensorstore"
    assert not list((tmp_path / "default").glob("*.arrayrecord"))
    assert_same_cache(tmp_path / "named", tmp_path / "default")


def test_an_arrayrecord_dump_resumes_as_arrayrecord_without_the_flag(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    _dump(ref, format="arrayrecord")
    with pytest.raises(RuntimeError, match="data source broke"):
        _dump(out, sequences=_failing_after(21), format="arrayrecord")  # 16 committed
    assert existing_format(out) == "arrayrecord"
    summary = _dump(out)  # no --format: continues the cache in its own format
    assert summary["sequences"] == N - 16 and summary["total_sequences"] == N
    assert_same_cache(ref, out)
    assert open_cache(out).manifest.format == "arrayrecord"
    assert _dump(out)["sequences"] == 0  # finished: recognised as complete, not refused


def test_kvstore_implies_tensorstore_and_overwrite_starts_in_the_default(tmp_path):
    out = tmp_path / "out"
    _dump(out, format="arrayrecord")
    _dump(out, overwrite=True)  # starts over: the old format is not kept
    assert open_cache(out, verify=True).manifest.format == "tensorstore"
    assert not list(out.glob("*.arrayrecord"))
    root = tmp_path / "bucket"
    _dump(tmp_path / "kv", kvstore=f"file://{root}/cache")
    cache = open_cache(tmp_path / "kv", verify=True)
    assert cache.manifest.format == "tensorstore" and len(cache) == N


def test_existing_format_of_host_sub_caches_and_of_nothing(tmp_path):
    assert existing_format(tmp_path / "absent") is None
    assert existing_format(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert existing_format(tmp_path) is None  # unreadable: the dump then refuses it by itself
    (tmp_path / "manifest.json").unlink()
    _dump(tmp_path / "host-00001-of-00002", format="arrayrecord")  # a multi-process dump's
    assert existing_format(tmp_path) == "arrayrecord"
