"""Multi-process dump under jax.distributed: every process dumps its own rows, host-locally.

Process p of P takes the sequences i with i % P == p and dumps them, in order, into its own
sub-cache `<out>/host-PPPPP-of-QQQQQ/` (its own parts, named by shard and part, its own ledger
and manifest), so resume is per host: a rerun continues each host from its own ledger. When
every host has finished, the processes meet at a barrier of the jax.distributed coordination
service (no device collective: the teacher forward needs no cross-process communication) and
process 0 writes the one top-level manifest (hosts=P, the total count); a process that does not
see it afterwards (host-local storage such as /dev/shm) writes the same file to its own --out.
`open_cache(out)` then reads record i from host i % P, position i // P (pipeline/cache/hosts.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

from pipeline.cache.format import MANIFEST_NAME, CacheManifest
from pipeline.cache.hosts import host_dirname, host_kvstore, top_manifest
from pipeline.cache.format import CacheError, load_manifest
from pipeline.distributed import BARRIER_TIMEOUT_MS, ProcessGroup
from pipeline.dump.local import dump_into
from pipeline.errors import UserError
from pipeline.cache.ledger import atomic_write_json



def host_limit(limit: int | None, index: int, count: int) -> int | None:
    """How many of the first `limit` sequences are this process's (i % count == index)."""
    return None if limit is None else max(0, -(-(limit - index) // count))


def _check_top(out: Path, top: CacheManifest) -> bool:
    """True when `out` already holds this finished multi-process cache; refuse another cache."""
    if not (out / MANIFEST_NAME).exists():
        return False
    old = load_manifest(out)
    from pipeline.cache.format import settings_key
    if old.hosts != top.hosts or settings_key(dataclasses.replace(old, num_records=0)) != \
            settings_key(dataclasses.replace(top, num_records=0)):
        raise UserError(f"{out} holds a cache made with other settings or by {old.hosts} "
                        f"process(es) (this run has {top.hosts}); rerun with the original "
                        "settings, or --overwrite to start over")
    return old.complete


def run_host_dump(config, manifest: CacheManifest, seqs, teacher, info, group: ProcessGroup,
                  log, t0: float) -> dict:

    out, p, n = Path(config.out), group.index, group.count
    top = top_manifest(manifest, n, 0)
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    elif _check_top(out, top):
        from pipeline.cache.verify import check_complete
        check_complete(out / host_dirname(p, n))  # each host checks the parts it wrote
        log(f"cache at {out.resolve()} is already complete ({n} hosts); nothing to do")
        return {"sequences": 0, "tokens": 0, "bytes": 0, "seconds": 0.0, "tokens_per_s": 0.0,
                "setup_seconds": round(time.perf_counter() - t0, 3), "complete": True,
                "out": str(out.resolve()), "process_index": p, "process_count": n}
    host = dataclasses.replace(
        manifest, kvstore=host_kvstore(manifest.kvstore, p, n),
        settings={**manifest.settings, "host": p, "hosts": n})
    mine = itertools.islice(seqs, p, None, n)
    summary = dump_into(config, out / host_dirname(p, n), host, mine,
                        host_limit(config.max_seqs, p, n), teacher, info, log, t0)
    client = group.client
    client.key_value_set(f"dflash_dump/{p}", json.dumps(summary["total_sequences"]))
    client.wait_at_barrier("dflash_dump_hosts_done", BARRIER_TIMEOUT_MS)
    counts = [int(json.loads(client.blocking_key_value_get(f"dflash_dump/{h}", 60_000)))
              for h in range(n)]
    final = top_manifest(manifest, n, sum(counts))
    if p == 0:
        atomic_write_json(out / MANIFEST_NAME, final.to_json())
    client.wait_at_barrier("dflash_dump_manifest_written", 600_000)
    if p != 0 and not (out / MANIFEST_NAME).exists():  # host-local --out: a copy of its own
        atomic_write_json(out / MANIFEST_NAME, final.to_json())
    try:
        load_manifest(out)
    except CacheError as e:
        raise UserError(f"the top-level manifest in {out} is unreadable: {e}") from None
    summary.update(out=str(out.resolve()), total_sequences=final.num_records,
                   process_index=p, process_count=n)
    return summary
