"""A cache several times bigger than the memory budget streams through the dump's writer and
through the reader: peak resident memory grows by far less than the cache's size."""
import json
import subprocess
import sys
import textwrap

from tests._dump_fixtures import REPO

BUDGET_MB = 96  # allowed growth of peak RSS over the warmed-up process; < the one shard (244 MiB)

WRITE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from pipeline.dump.run import DumpConfig, run_dump
    from tests._dump_fixtures import FakeTeacher, fake_sequences

    out, n = sys.argv[1], int(sys.argv[2])
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    teacher = FakeTeacher(hidden_size=512)  # K=4 -> F=2048: 1 MiB per 256-token record
    config = DumpConfig(out=out, shards=1, seq_len=256, batch_size=4, commit_every=16,
                        layer_ids=(0, 1, 2, 3), queue_batches=2, progress=False, model="fake")
    # Warm every code path (compile, part files, commits) on a small cache first.
    run_dump(DumpConfig(**{**config.__dict__, "out": out + "-warm", "max_seqs": 24}),
             teacher=teacher, sequences=fake_sequences(24, 256), log=lambda *_: None)
    base = peak()
    summary = run_dump(config, teacher=teacher, sequences=fake_sequences(n, 256),
                       log=lambda *_: None)
    print(json.dumps({"growth_mb": peak() - base, "bytes": summary["bytes"]}))
""")

READ = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from pipeline.cache import open_cache

    out = sys.argv[1]
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    warm = open_cache(out + "-warm")
    sum(float(r["features"][0, 0]) for r in warm) + float(warm[3]["features"][1, 1])
    base = peak()
    cache = open_cache(out)
    total = 0.0
    for i, rec in enumerate(cache):  # streaming pass, touching every record
        total += float(rec["features"].astype(np.float32).sum())
    for i in np.random.default_rng(0).permutation(len(cache)):  # random access pass
        total += float(cache[int(i)]["features"][int(i) % 256, 7])
    cache.close()
    print(json.dumps({"growth_mb": peak() - base, "records": len(cache)}))
""")


def _run(script, *args):
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_writer_and_reader_stream_a_cache_bigger_than_their_memory_budget(tmp_path):
    n, out = 240, tmp_path / "c"
    w = _run(WRITE, out, n)
    r = _run(READ, out)
    cache_mb = w["bytes"] / 2**20
    print(f"cache {cache_mb:.0f} MiB; peak RSS growth: writer {w['growth_mb']:.0f} MiB, "
          f"reader {r['growth_mb']:.0f} MiB (budget {BUDGET_MB} MiB)")
    assert r["records"] == n and cache_mb > 2.5 * BUDGET_MB
    assert w["growth_mb"] < BUDGET_MB and r["growth_mb"] < BUDGET_MB
