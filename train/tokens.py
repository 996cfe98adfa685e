"""The token side of online training: raw data -> the sequences a feature dump would hold, tokens
only, in memory, presented to the loader (train/loader.py `make_dataset`) and the held-out split
(train/heldout.py) the way a cache is.

    seqs = TokenSequences.build(sequences, manifest, limit=max_seqs)
    seqs[i] == {"input_ids": [T] int32, "loss_mask": [T] uint8}   # sequence i of the dump

Sequence i is the i-th row `pipeline.dump.sources.default_sequences` yields (the dump's record
i), so the loader's shuffle, the anchors of each (seed, epoch, index) and the held-out split are
those a cache of the same data would give. Tokens cost 5 bytes per token (int32 id + uint8
mask): 15 KB per 3072-token sequence, against 44 MB of gpt-oss-20b features.
"""
from __future__ import annotations

import itertools
import sys
import time

import numpy as np

from pipeline.errors import UserError


class TokenSequences:
    """n fixed-length (input_ids, loss_mask) rows; a cache without features."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, manifest):
        if ids.shape != mask.shape or ids.ndim != 2:
            raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be equal [n, T]")
        self.ids, self.mask, self.manifest = ids, mask, manifest

    @classmethod
    def build(cls, sequences, manifest, *, limit: int | None = None,
              progress: bool = False) -> "TokenSequences":
        """Read (ids, mask) rows of manifest.seq_len tokens (at most `limit`) into memory."""
        t = manifest.seq_len
        ids_rows, mask_rows, t0, last = [], [], time.time(), 0.0
        for i, (ids, mask) in enumerate(itertools.islice(sequences, limit)):
            if len(ids) != t or len(mask) != t:
                raise UserError(f"sequence {i} has {len(ids)} tokens, expected --seq-len {t}")
            ids_rows.append(np.asarray(ids, np.int32))
            mask_rows.append(np.asarray(mask, np.uint8))
            if progress and time.time() - last > 10:
                last = time.time()
                print(f"tokenizing --data: {i + 1} sequences ({time.time() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
        if not ids_rows:
            raise UserError(f"no sequences of {t} tokens in the data "
                            f"({manifest.settings.get('data', {}).get('source')})")
        return cls(np.stack(ids_rows), np.stack(mask_rows), manifest)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i) -> dict:
        i = int(i)
        return {"input_ids": self.ids[i], "loss_mask": self.mask[i]}

    read_tokens = __getitem__  # what the evaluator reads of a held-out sequence

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.mask.nbytes)
