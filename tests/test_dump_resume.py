"""Crash, disk-full and rerun behaviour of the dump CLI, with a cheap stand-in teacher.

The oracle is an uninterrupted run of the same command: after any sequence of SIGKILLs and
reruns the cache must hold the same records in the same order, in byte-identical files.
(tests/test_dump_cli_tiny.py does the same through the real teacher, `--model tiny`.)
"""
import json
import subprocess
import uuid

import pytest

from pipeline.cache import Ledger, open_cache
from pipeline.dump.run import DumpConfig, run_dump
from tests._dump_fixtures import FakeTeacher, assert_same_cache, fake_sequences, run_fake_cli

N = 45  # sequences: 5 full intervals of 8 and a padded last batch
# ArrayRecord crash states (open part files, footerless files): the format is named, not the
# default (tests/test_cache_ts.py runs the same kill chain on TensorStore parts)
ARGS = ["--shards", "3", "--seq-len", "32", "--batch-size", "4", "--commit-every", "8",
        "--layer-ids", "1,3", "--format", "arrayrecord"]


def _reference(directory):
    config = DumpConfig(out=str(directory), shards=3, seq_len=32, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake",
                        format="arrayrecord")
    summary = run_dump(config, teacher=FakeTeacher(16), sequences=fake_sequences(N, 32),
                       log=lambda *_: None)
    assert summary["sequences"] == N and summary["total_sequences"] == N
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("ref"))


def test_records_are_the_teachers_features_of_each_sequence_in_order(reference):
    """Row order, layer order and padding rows: record i == teacher(sequence i) run alone."""
    import numpy as np

    teacher, cache = FakeTeacher(16), open_cache(reference, verify=True)
    assert len(cache) == N and cache.manifest.layer_ids == (1, 3)
    assert cache.manifest.commit_every == 8 and cache.manifest.mask_token_id == 999
    for i, (ids, mask) in enumerate(fake_sequences(N, 32)):
        rec = cache[i]
        np.testing.assert_array_equal(rec["input_ids"], ids)
        np.testing.assert_array_equal(rec["loss_mask"], mask)
        alone = np.asarray(teacher.features(ids[None], np.ones((1, 32), np.int32), [1, 3]))[0]
        np.testing.assert_array_equal(rec["features"].view(np.uint16), alone.view(np.uint16))


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, reference):
    out = tmp_path / "cache"
    args = ARGS + ["--out", str(out)]
    # (kill point, sequences the ledger has committed once the process is dead)
    chain = [
        ("after_record:5", 0),  # mid-write: shard 1's part of interval 0 open, no footer yet
        ("before_ledger:16", 8),  # interval 1's parts closed, new ledger written to .tmp only
        ("after_close:27", 24),  # a closed part of interval 3 not yet committed
        ("after_ledger:32", 32),  # right after a commit
        ("after_record:44", 40),  # in the last, padded batch
    ]
    for point, committed in chain:
        proc = run_fake_cli(args, N, kill=point)
        assert proc.returncode == -9, (point, proc.returncode, proc.stderr[-2000:])
        ledger = Ledger.load(out)
        assert ledger is not None and ledger.committed == committed and not ledger.complete
        named = {p.file for p in ledger.parts}
        on_disk = {p.name for p in out.glob("shard-*")}
        assert named <= on_disk
        if point == "after_record:5":
            # shard 0's part closed (not committed), shard 1's still open
            assert on_disk - named == {f"shard-0000{s}-of-00003.part-00000.arrayrecord"
                                       for s in (0, 1)}
        if point == "before_ledger:16":
            assert (out / "ledger.json.tmp").exists()
        with pytest.raises(Exception):
            open_cache(out)  # unfinished
    proc = run_fake_cli(args, N)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming the dump" in proc.stderr and "after 40 committed" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["sequences"] == N - 40 and summary["total_sequences"] == N
    assert summary["tokens"] == (N - 40) * 32 and summary["bytes"] > 0
    assert_same_cache(reference, out)
    # A finished cache: the same command does nothing and says so.
    proc = run_fake_cli(args, N)
    assert proc.returncode == 0 and "already complete (45 sequences)" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["sequences"] == 0


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_line_and_a_rerun_after_freeing_space_completes(tmp_path, reference):
    mnt = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mounted = _mount_tmpfs(mnt, "1m")  # each part takes >= 128 KiB: 16 parts cannot fit
    try:
        out = mnt / "cache"
        args = ARGS + ["--out", str(out)]
        # Without permission to mount, the same error is injected at the writer's file layer.
        proc = run_fake_cli(args, N, kill=None if mounted else "fail_write:20")
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: writing ")
        assert "No space left on device" in lines[0] and "rerun the same command" in lines[0]
        ledger = Ledger.load(out)
        assert 0 < ledger.committed < N and not ledger.complete
        partial = open_cache(out, allow_incomplete=True, verify=True)  # committed work is intact
        assert {p.name for p in out.glob("shard-*")} == {p.file for p in ledger.parts}
        assert len(partial) == ledger.committed
        if mounted:  # free space: grow the filesystem, keeping its files
            assert subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)]).returncode == 0
        proc = run_fake_cli(args, N)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert_same_cache(reference, out)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)])


def test_failure_in_the_device_loop_keeps_the_last_commit(tmp_path, reference):
    """An exception mid-run (here from the data) leaves the ledger's commits usable."""

    def failing():
        for i, seq in enumerate(fake_sequences(N, 32)):
            if i == 21:
                raise RuntimeError("data source broke")
            yield seq

    config = DumpConfig(out=str(tmp_path), shards=3, seq_len=32, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake",
                        format="arrayrecord")
    with pytest.raises(RuntimeError, match="data source broke"):
        run_dump(config, teacher=FakeTeacher(16), sequences=failing(), log=lambda *_: None)
    ledger = Ledger.load(tmp_path)
    assert ledger.committed == 16
    assert {p.name for p in tmp_path.glob("shard-*")} == {p.file for p in ledger.parts}
    teacher = FakeTeacher(16)
    run_dump(config, teacher=teacher, sequences=fake_sequences(N, 32), log=lambda *_: None)
    assert teacher.calls == 8  # sequences 16..44: 29 rows in batches of 4 (last one padded)
    assert_same_cache(reference, tmp_path)


def test_kill_while_a_part_file_is_half_on_disk(tmp_path):
    """Records big enough that ArrayRecord flushes part of an open file (it buffers 16 MiB):
    the kill leaves a footerless, partly written file; the rerun replaces it."""
    from array_record.python.array_record_module import ArrayRecordReader

    n, args = 14, ["--shards", "1", "--seq-len", "256", "--batch-size", "4",
                   "--commit-every", "12", "--layer-ids", "0,1", "--format", "arrayrecord"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    config = DumpConfig(out=str(ref), shards=1, seq_len=256, batch_size=4, commit_every=12,
                        layer_ids=(0, 1), progress=False, model="fake",
                        format="arrayrecord")
    run_dump(config, teacher=FakeTeacher(2048), sequences=fake_sequences(n, 256),  # 2 MiB/record
             log=lambda *_: None)
    proc = run_fake_cli(args + ["--out", str(out)], n, hidden=2048, kill="after_record:10")
    assert proc.returncode == -9, proc.stderr[-2000:]
    part = out / "shard-00000-of-00001.part-00000.arrayrecord"
    assert part.stat().st_size >= 16 * 2**20  # bytes of records 0..10 reached the file...
    assert not ArrayRecordReader(str(part)).ok()  # ...but no footer: not a readable file
    assert Ledger.load(out).committed == 0
    assert run_fake_cli(args + ["--out", str(out)], n, hidden=2048).returncode == 0
    assert_same_cache(ref, out)
