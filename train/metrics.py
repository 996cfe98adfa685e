"""Training metrics: per-slot top-1 accuracy, the acceptance length it implies, and where they go
(metrics.jsonl in the run dir, TensorBoard events via tensorboardX when it is installed). Held-out
evaluations (train/evaluate.py) are lines of their own whose keys start with eval_ (TensorBoard:
eval/...).
"""
from __future__ import annotations

import json
import numbers
import os
import sys
from pathlib import Path

import numpy as np


def expected_tau(slot_acc) -> float:
    """Expected acceptance length of greedy verification from per-slot accuracies [B-1].

    Draft token k is accepted only if tokens 1..k all are, so E[accepted] = sum_k prod_{j<=k} acc_j;
    the verifier's bonus token adds 1 (tau counts it, as in the paper).
    """
    acc = np.clip(np.asarray(slot_acc, np.float64), 0.0, 1.0)
    return float(1.0 + np.cumprod(acc).sum())


def summarize(raw: dict) -> dict:
    """Device metrics of one step (or summed over several) -> plain floats for logging."""
    count = np.asarray(raw["slot_count"], np.float64)
    acc = np.asarray(raw["slot_correct"], np.float64) / np.maximum(count, 1.0)
    out = {"loss": float(raw["loss"]), "grad_norm": float(raw["grad_norm"]),
           "lr": float(raw["lr"]), "expected_tau": expected_tau(acc),
           "supervised_tokens": float(count.sum())}
    out.update({f"acc_slot{k + 1}": float(a) for k, a in enumerate(acc)})
    if "cand_hit" in raw:  # DFlash2: the selector's figures (train/loss_dflash2.py)
        hit = float(raw["cand_hit"])
        sel = np.asarray(raw["sel_slot_correct"], np.float64) / np.maximum(count, 1.0)
        out.update({"unary_loss": float(raw["unary_loss"]),
                    "selector_loss": float(raw["selector_loss"]),
                    "cand_recall": hit / max(float(count.sum()), 1.0),
                    "selector_acc": float(raw["selector_correct"]) / max(hit, 1.0),
                    "expected_tau": expected_tau(sel), "unary_expected_tau": out["expected_tau"]})
        out.update({f"sel_acc_slot{k + 1}": float(a) for k, a in enumerate(sel)})
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only metrics.jsonl's lines of steps <= `step` (the checkpoint a resume restores): the
    steps after it are run, and logged, again. Replaced atomically; a torn last line (a kill
    mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fresh_tb(tb_dir: Path) -> Path:
    """The TensorBoard directory with the event files of earlier runs removed. A resume replays
    the steps after its checkpoint, so appending would log those steps twice (TensorBoard shows
    both); metrics.jsonl (truncated to the checkpoint by `truncate_metrics`) is the record, and
    the events are rewritten from it."""
    if tb_dir.is_dir():
        for f in tb_dir.glob("events.out.tfevents.*"):
            f.unlink()
    return tb_dir


class MetricsWriter:
    """Appends one JSON object per logged step to <run>/metrics.jsonl and mirrors scalars to
    TensorBoard (<run>/tb) when tensorboardX is importable; on a resume the TensorBoard events
    are rewritten from metrics.jsonl, so replayed steps appear once."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            print("note: tensorboardX not installed; metrics go to metrics.jsonl only",
                  file=sys.stderr)
        else:
            self._tb = SummaryWriter(str(_fresh_tb(run_dir / "tb")))
            for row in _rows(run_dir / "metrics.jsonl"):  # what the steps kept logged before
                self._write_tb(int(row.pop("step")), row)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), **metrics}) + "\n")
        if self._tb is not None:
            self._write_tb(step, metrics)

    def _write_tb(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():  # held-out figures (eval_*) under eval/, beside train/
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
                self._tb.add_scalar(tag, v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
