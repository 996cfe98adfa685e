"""Held-out evaluation during training: per-slot accuracy, loss and simulated tau on sequences
the run never trains on (`--eval-data`, or the split of train/heldout.py).

Per held-out sequence, one training-form forward with an anchor at every position (plus the
short tail blocks) gives the draft's argmax for every block (`pipeline.speculative.simulate`); from them:
  eval_sim_tau       the decoder's tau replayed on the sequence (pipeline.speculative.simulate.walk: what
                     greedy serving measures on target-regenerated data);
  eval_acc_slot{k}   top-1 accuracy of slot k over every anchor the trainer could draw (t and
                     t+1 supervised), slot k counted where t+k is supervised: the training
                     figure, on unseen data;
  eval_expected_tau  the acceptance length those accuracies imply (biased high: see issue 13);
  eval_loss          decay-weighted NLL over the same slots (the training loss's weights).
The forward runs one sequence per data x fsdp shard, under the training mesh, with the
training compute dtype; every process gets the whole batch's predictions back and computes the
same figures (process 0 logs them).
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pipeline.speculative import simulate as sim
from train.anchors import valid_anchor_positions
from train.loss import decay_weights
from train.mesh import batch_sharding


def _local_rows(cache, heldout: np.ndarray):
    """(reader, local row ids) of the held-out sequences this process reads."""
    pi, pc = jax.process_index(), jax.process_count()
    m = cache.manifest
    if m.hosts > 1 and m.hosts == pc:  # host-sliced: only host pi's rows are readable here
        view = cache.process_view(pi, pc)
        glob = np.asarray([view.global_index(j) for j in range(len(view))], np.int64)
        return view.reader, np.flatnonzero(np.isin(glob, heldout))
    return cache, np.asarray(heldout[pi::pc], np.int64)


def _max_over_processes(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    return int(np.max(multihost_utils.process_allgather(np.asarray([x], np.int64))))


class Evaluator:
    """`Evaluator(...)(params, frozen) -> {"eval_sim_tau": ..., ...}`; collective (every process
    calls it at the same step)."""

    def __init__(self, cfg, dcfg, mesh, cache, heldout: np.ndarray, state_param_sh, frozen_sh):
        self.dcfg, self.block = dcfg, dcfg.block_size
        self.reader, rows = _local_rows(cache, np.asarray(heldout, np.int64))
        pc = jax.process_count()
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch = shards if shards % pc == 0 else cfg.batch_size
        local = self.batch // pc
        n_batches = -(-_max_over_processes(len(rows)) // local)
        self.rows = np.full(n_batches * local, -1, np.int64)  # -1: padding (no generated tokens)
        self.rows[:len(rows)] = rows
        self.sequences = int(len(heldout))
        # the held-out tokens are small: read once; features are re-read at every evaluation
        m = cache.manifest
        self.t, self.f = m.seq_len, m.feature_dim
        self.ids = np.zeros((len(self.rows), self.t), np.int32)
        self.mask = np.zeros((len(self.rows), self.t), np.uint8)
        for i, r in enumerate(rows):
            rec = (self.reader.read_tokens(int(r)) if hasattr(self.reader, "read_tokens")
                   else self.reader[int(r)])
            self.ids[i], self.mask[i] = rec["input_ids"], rec["loss_mask"]
        runs = max([len(sim.generated_runs(mk)) for mk in self.mask] + [1])
        self.runs = _max_over_processes(runs)
        self.weights = decay_weights(self.block, cfg.decay_gamma)[1:].astype(np.float64)
        cdt = jnp.dtype(cfg.compute_dtype)
        rep = NamedSharding(mesh, P())
        in_sh = {"input_ids": batch_sharding(mesh, 2), "loss_mask": batch_sharding(mesh, 2),
                 "features": batch_sharding(mesh, 3), "tails": batch_sharding(mesh, 3)}
        self._in_sh = in_sh

        def predict(params, frozen, batch):
            p = jax.tree.map(lambda x: x.astype(cdt), params)
            pred, nll, tails = sim.sequence_predictions(
                dcfg, p, frozen["embed"], frozen["lm_head"], batch["input_ids"],
                batch["features"].astype(cdt), batch["tails"])
            return pred, nll, tails, batch["input_ids"], batch["loss_mask"], batch["tails"]

        self._predict = jax.jit(predict, in_shardings=(state_param_sh, frozen_sh, in_sh),
                                out_shardings=rep)
        self._compiled = None

    def compile(self, params_abs, frozen_abs):
        """Compile the evaluation forward ahead of time (the memory pre-flight reads its memory
        analysis; the evaluations then run this compiled program)."""
        tails = np.stack([sim.tail_anchors(sim.generated_runs(mk), self.block, self.runs)
                          for mk in self.mask[:1]])
        shapes = {"input_ids": ((self.batch, self.t), np.int32),
                  "loss_mask": ((self.batch, self.t), np.uint8),
                  "features": ((self.batch, self.t, self.f), jnp.bfloat16),
                  "tails": ((self.batch,) + tails.shape[1:], tails.dtype)}
        batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=self._in_sh[k])
                 for k, (shape, dt) in shapes.items()}
        self._compiled = self._predict.lower(params_abs, frozen_abs, batch).compile()
        return self._compiled

    def _features(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), self.t, self.f), jnp.bfloat16)
        for i, r in enumerate(rows):
            if r >= 0:
                out[i] = self.reader[int(r)]["features"]
        return out

    def __call__(self, params, frozen) -> dict:
        local = self.batch // jax.process_count()
        stats = _Stats(self.block, self.weights)
        for start in range(0, len(self.rows), local):
            sl = slice(start, start + local)
            tails = np.stack([sim.tail_anchors(sim.generated_runs(mk), self.block, self.runs)
                              for mk in self.mask[sl]])
            host = {"input_ids": self.ids[sl], "loss_mask": self.mask[sl],
                    "features": self._features(self.rows[sl]), "tails": tails}
            batch = {k: v if isinstance(v, jax.Array) else  # features computed on the devices
                     jax.make_array_from_process_local_data(self._in_sh[k], v)
                     for k, v in host.items()}
            out = jax.device_get((self._compiled or self._predict)(params, frozen, batch))
            stats.add(*out)
        return stats.result(self.sequences)


class _Stats:
    """Accumulates the figures over batches (host numpy, identical on every process)."""

    def __init__(self, block: int, weights: np.ndarray):
        self.block, self.w = block, weights
        self.steps: list[int] = []
        self.correct = np.zeros(block - 1)
        self.count = np.zeros(block - 1)
        self.nll = 0.0
        self.wsum = 0.0

    def add(self, pred, nll, tail_pred, ids, mask, tails) -> None:
        t = ids.shape[1]
        for j in range(ids.shape[0]):
            runs = sim.generated_runs(mask[j])
            if not runs:
                continue
            full = sim.correct_full(ids[j], pred[j])
            tail = sim.correct_tails(ids[j], tails[j], [p[j] for p in tail_pred])
            self.steps += sim.walk(full, tail, runs, self.block)
            anchors = valid_anchor_positions(mask[j])
            pos = anchors[:, None] + np.arange(1, self.block)
            sup = (pos < t) & mask[j][np.minimum(pos, t - 1)].astype(bool)
            self.correct += (full[anchors] & sup).sum(0)
            self.count += sup.sum(0)
            self.nll += float((nll[j][anchors] * sup * self.w).sum())
            self.wsum += float((sup * self.w).sum())

    def result(self, sequences: int) -> dict:
        acc = self.correct / np.maximum(self.count, 1.0)
        out = {"eval_sim_tau": float(np.mean(self.steps)) if self.steps else None,
               "eval_loss": self.nll / self.wsum if self.wsum else None,
               "eval_expected_tau": float(1.0 + np.cumprod(acc).sum()),
               "eval_steps": len(self.steps), "eval_sequences": sequences}
        out.update({f"eval_acc_slot{k + 1}": float(a) for k, a in enumerate(acc)})
        return out
