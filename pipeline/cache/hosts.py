"""Reading a multi-process cache: P host sub-caches behind one manifest (pipeline/dump/hosts.py).

Record i of the cache is record i // P of host i % P, so `HostsReader` reads like a one-host
cache, and `process_view(p, P)` is exactly host p's sub-cache: on a pod with host-local storage
each process opens only its own files. No jax import.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.cache.format import CacheError, CacheManifest, load_manifest, settings_key
from pipeline.cache.ledger import committed_parts
from pipeline.cache.parts import parts_reader

_HOST_KEYS = ("host", "hosts")


def host_dirname(index: int, count: int) -> str:
    return f"host-{index:05d}-of-{count:05d}"


def host_kvstore(kvstore: str | None, index: int, count: int) -> str | None:
    if not kvstore:
        return None
    return kvstore.rstrip("/") + "/" + host_dirname(index, count) + "/"


def top_manifest(manifest: CacheManifest, hosts: int, num_records: int) -> CacheManifest:
    """The one manifest of a finished multi-process cache (its parts live in the hosts')."""
    settings = {k: v for k, v in manifest.settings.items() if k not in _HOST_KEYS}
    return dataclasses.replace(manifest, settings=settings, hosts=hosts, parts=(),
                               num_records=num_records, complete=True)


class HostView:
    """Host p's rows of a multi-process cache: local record j is global record j * P + p."""

    def __init__(self, reader, index: int, count: int):
        self.reader, self.index, self.count = reader, index, count
        self.manifest = reader.manifest

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, j):
        return self.reader[j]

    def global_index(self, j: int) -> int:
        return int(j) * self.count + self.index


class HostsReader:
    """`len`, `[i]`, iteration and `verify()` over every host's records, in global order."""

    def __init__(self, directory, manifest: CacheManifest):
        self.directory, self.manifest = Path(directory), manifest
        self._hosts: dict[int, object] = {}

    def host(self, index: int):
        """Host `index`'s sub-cache reader (opened, and checked against the top manifest, once)."""
        if index not in self._hosts:
            n = self.manifest.hosts
            path = self.directory / host_dirname(index, n)
            sub = load_manifest(path)  # a host's sub-cache is a finished one-host cache
            reader = parts_reader(path, sub, committed_parts(path, sub))
            mine = dataclasses.replace(reader.manifest, kvstore=self.manifest.kvstore)
            if settings_key(top_manifest(mine, n, 0)) != settings_key(self.manifest):
                raise CacheError(f"{path} was dumped with other settings than {self.directory}")
            self._hosts[index] = reader
        return self._hosts[index]

    def __len__(self) -> int:
        return self.manifest.num_records

    def __getitem__(self, index):
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for a cache of {len(self)}")
        index %= len(self)
        n = self.manifest.hosts
        return self.host(index % n)[index // n]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def process_view(self, index: int, count: int) -> HostView:
        if count != self.manifest.hosts:
            raise ValueError("process_view of a multi-host cache needs count == hosts")
        return HostView(self.host(index), index, count)

    def verify(self) -> int:
        n = self.manifest.hosts
        total = 0
        for h in range(n):
            total += self.host(h).verify()
            expect = -(-(len(self) - h) // n)
            if len(self.host(h)) != expect:
                raise CacheError(f"host {h} holds {len(self.host(h))} records, expected {expect}")
        return total

    def close(self) -> None:
        for r in self._hosts.values():
            r.close()
        self._hosts.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
