"""Trainer entry of the multi-process tests: `python -m tests._hosts_fixtures train [--emulate P]
<train.main flags> [--coordinator-address A --num-processes P --process-id I]`.

With the jax.distributed flags (handled by `train.main`) it is one process of a localhost cluster.
With `--emulate P` it is the one-process oracle: the same global batches, built by concatenating
the P per-process streams of the loader (in process order), fed to the same trainer.
"""
from __future__ import annotations

import argparse

import numpy as np


class _Concat:
    def __init__(self, its):
        self._its = its

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self._its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"emulated": [it.get_state() for it in self._its]}

    def set_state(self, state):
        for it, s in zip(self._its, state["emulated"]):
            it.set_state(s)


def _emulating(make_dataset, count: int):
    def make(cache, **kw):
        class _Dataset:
            def __iter__(self):
                return _Concat([iter(make_dataset(cache, **kw, process_index=p,
                                                  process_count=count)) for p in range(count)])
        return _Dataset()
    return make


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--emulate", type=int, default=None)
    a, rest = p.parse_known_args(argv)  # the jax.distributed flags go to train.main itself
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if a.emulate:
        import train.loop
        train.loop.make_dataset = _emulating(train.loop.make_dataset, a.emulate)
    from train.main import main as train_main
    return train_main(rest)
