"""Corrupt caches never reach a saved training step (issue 11, item 3; issue 22, item 8).

Every byte a step consumes is checked: TensorStore parts carry an xxh3_64 per record (features;
input_ids + loss_mask) checked on every read, and feature sums which the trainer's step checks on
the device instead of hashing the features on the host (tests/test_feature_sums.py; the loader
path here is the host one, `device_checks=False`); ArrayRecord records are checked by Riegeli's
chunk hash; a mismatch is one CacheError line naming the part and the record.
Oracle: the clean cache reads back exactly what was dumped, and each corruption is made by hand
at a known place (byte flip, deleted chunk file).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheError, open_cache
from pipeline.dump.run import DumpConfig, run_dump
from tests._dump_fixtures import FakeTeacher, fake_sequences

N, T, H = 24, 32, 16


def _dump(directory, fmt):
    config = DumpConfig(out=str(directory), shards=2, seq_len=T, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake", format=fmt)
    run_dump(config, teacher=FakeTeacher(H), sequences=fake_sequences(N, T), log=lambda *_: None)
    return directory


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    return {"arrayrecord": _dump(root / "ar", "arrayrecord"),
            "tensorstore": _dump(root / "ts", "tensorstore")}


@pytest.fixture
def copy(clean, tmp_path):
    def make(fmt):
        dest = tmp_path / fmt
        shutil.copytree(clean[fmt], dest)
        return dest
    return make


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _part(cache_dir: Path, k: int = 0) -> tuple[Path, int]:
    """(directory or file, records) of the k-th part in sequence order, and its first record."""
    cache = open_cache(cache_dir)
    part = cache.parts[k]
    start = sum(p.records for p in cache.parts[:k])
    return Path(cache_dir) / part.file, start


def _loader_batches(cache_dir, n_batches=N // 4, device_checks=False):
    from train.loader import make_dataset, open_training_cache
    cache = open_training_cache(cache_dir)
    it = iter(make_dataset(cache, global_batch=4, anchors_per_seq=4, seed=0, read_threads=2,
                           prefetch=4, process_index=0, process_count=1,
                           device_checks=device_checks and cache.manifest.format == "tensorstore"))
    try:
        return [next(it) for _ in range(n_batches)]
    finally:
        it.close()


def test_clean_caches_read_as_dumped(clean):
    for fmt, d in clean.items():
        cache = open_cache(d)
        expect = list(fake_sequences(N, T))
        for i in range(N):
            np.testing.assert_array_equal(cache[i]["input_ids"], expect[i][0])
        for device_checks in (False, True):  # one epoch: every record checked, none refused
            batches = _loader_batches(d, device_checks=device_checks)
            assert sorted(int(i) for b in batches for i in b["index"]) == list(range(N)), fmt


def _expect_one_line(excinfo, part: Path, record: int) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(part) in msg and f"record {record}" in msg, msg
    return msg


def test_tensorstore_feature_byte_flip_is_refused(copy):
    d = copy("tensorstore")
    part, start = _part(d, 1)
    chunk = part / "features" / "c" / "0" / "0"
    row_bytes = 2 * H * 2
    flip(chunk, 2 * T * row_bytes + 5 * row_bytes + 3)  # record 2 of the part, token 5
    cache = open_cache(d)
    for i in (start, start + 1, start + 3):
        cache[i]  # the neighbours still read
    with pytest.raises(CacheError) as e:
        cache[start + 2]
    _expect_one_line(e, part, 2)
    out = np.empty((T, 2 * H), cache[0]["features"].dtype)
    with pytest.raises(CacheError):
        cache.read_features_into(start + 2, out).result()  # the loader's preadv path
    with pytest.raises(CacheError) as e:
        _loader_batches(d)
    _expect_one_line(e, part, 2)


def test_tensorstore_input_ids_byte_flip_is_refused(copy):
    d = copy("tensorstore")
    part, start = _part(d, 0)
    flip(part / "input_ids" / "c" / "0", 4 * T + 1)  # record 1 of the part
    cache = open_cache(d)
    with pytest.raises(CacheError) as e:
        cache.read_tokens(start + 1)
    _expect_one_line(e, part, 1)
    with pytest.raises(CacheError) as e:
        _loader_batches(d)
    _expect_one_line(e, part, 1)


def test_tensorstore_deleted_features_chunk_is_refused(copy):
    """zarr reads an absent chunk as fill values: without a checksum this trained on zeros."""
    d = copy("tensorstore")
    part, start = _part(d, 2)
    (part / "features" / "c" / "0" / "0").unlink()
    with pytest.raises(CacheError) as e:
        open_cache(d)[start]
    _expect_one_line(e, part, 0)
    with pytest.raises(CacheError) as e:
        _loader_batches(d)
    assert str(part) in str(e.value)


def test_arrayrecord_byte_flip_is_one_line(copy):
    d = copy("arrayrecord")
    path, start = _part(d, 1)
    cache = open_cache(d)
    rec = cache.manifest.record_nbytes
    data = path.read_bytes()
    # the record's features start after its ids and mask; flip one feature byte of record 1
    needle = cache.read_bytes(start + 1)[5 * T:5 * T + 64]
    at = data.index(needle)
    flip(path, at + 10)
    assert len(path.read_bytes()) == len(data) and rec > 0
    with pytest.raises(CacheError) as e:
        open_cache(d).read_bytes(start + 1)
    _expect_one_line(e, path, 1)
    with pytest.raises(CacheError) as e:
        _loader_batches(d)
    _expect_one_line(e, path, 1)


def test_tensorstore_part_without_checksums_is_verified_on_first_open(copy):
    """A part written before per-record checksums: verified whole (size + CRC32) on first open."""
    from pipeline.cache.ts_parts import open_kvstore, part_checksum, root_url
    d = copy("tensorstore")
    manifest = json.loads((d / "manifest.json").read_text())
    kv = open_kvstore(root_url(d, None))
    for row in manifest["parts"]:
        shutil.rmtree(d / row[2] / "checksums")
        row[4], row[5] = part_checksum(kv, row[2])
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert len(_loader_batches(d)) == N // 4  # intact old parts read as before
    part, start = _part(d, 1)
    flip(part / "features" / "c" / "0" / "0", 7)
    with pytest.raises(CacheError) as e:
        open_cache(d)[start + 1]
    assert str(part) in str(e.value) and "CRC32" in str(e.value)


def _run_verify(capsys, *args):
    from pipeline.cache import verify as cache_verify
    code = cache_verify.main([*map(str, args), "--no-progress"])
    return code, capsys.readouterr().out.strip().splitlines()


def test_verify_reports_every_bad_part(copy, capsys):
    for fmt in ("arrayrecord", "tensorstore"):
        d = copy(fmt)
        assert _run_verify(capsys, d)[0] == 0
        (p0, _), (p2, _) = _part(d, 0), _part(d, 2)
        if fmt == "tensorstore":
            flip(p0 / "input_ids" / "c" / "0", 3)
            (p2 / "features" / "c" / "0" / "0").unlink()
        else:
            flip(p0, p0.stat().st_size // 2)
            p2.unlink()
        code, lines = _run_verify(capsys, d)
        bad = [ln for ln in lines if ln.startswith("bad part: ")]
        assert code == 1 and len(bad) == 2, lines
        assert str(p0) in bad[0] and str(p2) in bad[1], lines


def test_verify_multi_host_cache(tmp_path, capsys):
    import dataclasses

    from pipeline.cache.format import MANIFEST_NAME
    from pipeline.cache.hosts import host_dirname, top_manifest
    from pipeline.cache.ledger import atomic_write_json
    top = tmp_path / "hosts"
    subs = [_dump(top / host_dirname(h, 2), "tensorstore" if h else "arrayrecord")
            for h in range(2)]
    m = open_cache(subs[0]).manifest
    atomic_write_json(top / MANIFEST_NAME, top_manifest(m, 2, 2 * N).to_json())
    assert _run_verify(capsys, top)[0] == 0
    part, _ = _part(subs[1], 1)
    flip(part / "features" / "c" / "0" / "0", 9)
    code, lines = _run_verify(capsys, top)
    assert code == 1 and len([ln for ln in lines if str(part) in ln]) == 1, lines
    shutil.rmtree(subs[0])
    code, lines = _run_verify(capsys, top)
    assert code == 1 and sum(ln.startswith("bad part: ") for ln in lines) == 2, lines
    assert dataclasses.is_dataclass(m)


def test_verify_of_no_cache_is_one_error_line(tmp_path, capsys):
    from pipeline.cache import verify as cache_verify
    assert cache_verify.main([str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no feature cache at"), err


@pytest.mark.parametrize("fmt", ["arrayrecord", "tensorstore"])
def test_dump_rerun_on_a_corrupt_complete_cache_is_refused(copy, capsys, fmt):
    from pipeline import teacher_dump
    d = copy(fmt)
    args = ["--out", str(d), "--shards", "2", "--seq-len", str(T), "--batch-size", "4",
            "--commit-every", "8", "--layer-ids", "1,3", "--format", fmt, "--no-progress",
            "--model", "fake"]

    def rerun():
        code = teacher_dump.main(args, teacher=FakeTeacher(H), sequences=fake_sequences(N, T))
        return code, capsys.readouterr().err.strip().splitlines()
    code, err = rerun()
    assert code == 0 and "already complete" in err[-1], err
    part, _ = _part(d, 1)
    flip(part if fmt == "arrayrecord" else part / "loss_mask" / "c" / "0", 40)
    code, err = rerun()
    assert code == 2 and len(err) == 1 and "complete" in err[0] and str(part) in err[0], err
    assert "--overwrite" in err[0] and "already complete" not in err[0]
    # the dump CLI's own --verify lists the same part
    assert teacher_dump.main(["--verify", "--out", str(d), "--no-progress"]) == 1
    assert str(part) in capsys.readouterr().out
