"""Multi-process dump: two JAX processes of a localhost jax.distributed cluster each dump their
own rows (i % 2) into host-local sub-caches with one manifest; oracle: a one-process dump."""
import time

import numpy as np
import pytest

from pipeline.cache import Ledger, open_cache
from pipeline.cache.hosts import HostsReader
from pipeline.dump.run import DumpConfig, run_dump
from tests._dump_fixtures import FakeTeacher, fake_sequences
from tests._hosts_fixtures import start_processes, wait_all

N = 45
FLAGS = ["--shards", "3", "--seq-len", "32", "--batch-size", "4", "--commit-every", "8",
         "--layer-ids", "1,3"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run_dump(DumpConfig(out=str(out), shards=3, seq_len=32, batch_size=4, commit_every=8,
                        layer_ids=(1, 3), progress=False, model="fake"),
             teacher=FakeTeacher(16), sequences=fake_sequences(N, 32), log=lambda *_: None)
    return open_cache(out, verify=True)


def _args(out, fmt):
    return ["--fake-n", str(N), "--", *FLAGS, "--out", str(out), "--format", fmt]


def assert_same(a, b):
    assert len(a) == len(b) == N
    for i in range(N):
        for k in ("input_ids", "loss_mask", "features"):
            np.testing.assert_array_equal(a[i][k].view(np.uint8), b[i][k].view(np.uint8),
                                          f"record {i} {k}")


@pytest.mark.parametrize("fmt", ["arrayrecord", "tensorstore"])
def test_two_processes_union_equals_one_process_dump(tmp_path, one_process, fmt):
    out = tmp_path / "multi"
    results = wait_all(start_processes("dump", _args(out, fmt)))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    multi = open_cache(out, verify=True)
    assert isinstance(multi, HostsReader) and multi.manifest.hosts == 2
    # each process dumped only its own rows: host p holds sequences p, p+2, p+4, ...
    assert [len(multi.host(h)) for h in (0, 1)] == [23, 22]
    view = multi.process_view(1, 2)
    ids = [r[0] for r in fake_sequences(N, 32)]
    for j in range(len(view)):
        np.testing.assert_array_equal(view[j]["input_ids"], ids[view.global_index(j)])
    assert_same(multi, one_process)


def test_kill_one_process_mid_dump_then_rerun_both_completes(tmp_path, one_process):
    out = tmp_path / "multi"
    procs = start_processes("dump", _args(out, "arrayrecord"), kill={1: "after_record:13"})
    assert procs[1].wait(timeout=120) == -9
    host0 = out / "host-00000-of-00002"
    deadline = time.time() + 60  # process 0 finishes its rows, then waits for its peer
    while time.time() < deadline and procs[0].poll() is None:
        ledger = Ledger.load(host0) if (host0 / "ledger.json").exists() else None
        if ledger is not None and ledger.complete:
            break
        time.sleep(0.2)
    procs[0].kill()
    wait_all(procs)
    assert not (out / "manifest.json").exists()
    assert Ledger.load(out / "host-00001-of-00002").committed == 8  # host 1's last commit
    results = wait_all(start_processes("dump", _args(out, "arrayrecord")))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    assert "resuming the dump" in results[1][2] and "after 8 committed" in results[1][2]
    assert_same(open_cache(out, verify=True), one_process)
    results = wait_all(start_processes("dump", _args(out, "arrayrecord")))  # finished: no-op
    assert all(rc == 0 and "already complete" in err for rc, _, err in results)
