"""TrainConfig: every choice of a training run, defaults right for gpt-oss-20b on a TPU slice.

    python -m train.main --data /dev/shm/dflash/ --out runs/gpt-oss-20b

The draft's shape (hidden size, heads, vocab, target layer ids, mask id) is not here: it is derived
from the teacher recorded in the cache manifest (`train.loop.draft_config_for`), so a run can never
train a draft for one teacher on another teacher's features.
"""
from __future__ import annotations

import dataclasses
import math

from model.attention import IMPLEMENTATIONS
from model.config import DFlash2Config

ARCHS = ("dflash", "dflash2")
# Paper App. A: gamma of the slot-decay weights by block size.
_GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str = "/dev/shm/dflash/"
    """Cache directory written by `pipeline.teacher_dump` (manifest.json + ArrayRecord shards)."""
    out: str = "runs/dflash"
    """Run directory: checkpoints/, metrics.jsonl, TensorBoard events, draft_params.msgpack, export/."""
    steps: int = 20_000
    """Optimizer steps in the whole run (the cosine schedule spans them)."""
    batch_size: int = 16
    """Global batch in sequences; must divide evenly over the data x fsdp mesh axes."""
    block_size: int = 8
    """Draft block size B (z-lab gpt-oss-20b draft: 8)."""
    draft_layers: int = 8
    """Draft decoder layers (z-lab gpt-oss-20b draft: 8; the paper's speed trade-off is 5)."""
    anchors_per_seq: int = 512
    """Anchors (blocks) drawn per sequence per epoch, capped by the sequence (paper: 512)."""
    intermediate_size: int | None = None
    """Draft FFN width; None = `DraftConfig.from_target`'s default (z-lab gpt-oss-20b draft: 7680)."""
    gamma: float | None = None
    """Slot-decay gamma; None = paper default by block size (7/5/4 for 16/10/8, else B/2)."""
    lr: float = 6e-4
    warmup_frac: float = 0.04
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    """Global-norm gradient clip."""
    seed: int = 0
    """Seeds the draft init, the shuffle of every epoch and the anchor draw of every sequence."""
    mesh: str | None = None
    """e.g. "data=2,fsdp=2,tensor=2"; None = data over processes, fsdp over each process's devices."""
    compute_dtype: str = "bfloat16"
    """Activations/matmul dtype; master params and optimizer state stay float32."""
    attention: str = "auto"
    """Block-sparse attention implementation (model.attention.IMPLEMENTATIONS); "auto" = the
    Pallas kernel of the backend (TPU, GPU), "xla" on CPU."""
    remat: bool = False
    """Recompute each draft layer in the backward pass (less activation memory, ~30% more FLOPs)."""
    vocab_chunk: int = 8192
    """Vocab columns per step of the chunked CE (bounds the [tokens x vocab] logits it builds)."""
    token_chunk: int = 4096
    """Block tokens per step of the chunked CE."""
    save_every: int = 1000
    """Steps between Orbax checkpoints (and draft_params.msgpack); the last step always saves."""
    keep_checkpoints: int = 3
    log_every: int = 10
    """Steps between metric lines (JSONL + TensorBoard)."""
    read_threads: int = 8
    """Grain threads reading and decoding records."""
    prefetch: int = 64
    """Grain prefetch buffer, in records."""
    progress: bool = True
    """tqdm progress bar on stderr."""
    memory_limit_gb: float | None = None
    """Host memory the run may take, GB (default: MemAvailable, capped by the cgroup limit)."""
    eval_data: str | None = None
    """Held-out cache for evaluation (same teacher and layers); None = hold out `eval_fraction`
    of --data instead. Its first `eval_max` sequences are evaluated."""
    eval_fraction: float = 0.02
    """Fraction of --data held out (never trained on) when no --eval-data: at least one
    sequence, at most `eval_max`; chosen by a pure function of (index, seed) (train/heldout.py)."""
    eval_max: int = 256
    """At most this many held-out sequences (each evaluation reads and forwards all of them)."""
    eval_every: int = 1000
    """Steps between held-out evaluations (accuracy, loss, simulated tau); the last step always
    evaluates; 0 = only the last step."""
    arch: str = "dflash"
    """Draft architecture: "dflash", or "dflash2" (DFlash + grouped dynamic causal convolutions
    + candidate selector, model/dflash2.py; the four DFlash2 fields take their defaults)."""
    selector_alpha: float = 1.0
    """DFlash2: weight of the selector's K-way CE in the loss (speculators' selector_loss_alpha)."""
    # --- online training (train/online.py): the teacher runs in the loop, no cache -----------
    teacher: str | None = None
    """Teacher to run inside the training loop (HF snapshot dir, cached repo id, or "tiny"): --data
    is then raw data as `pipeline.teacher_dump --data` reads it, tokenized into the sequences and
    loss masks a dump would write, in the same order, and each batch's features are computed on
    the devices. None = --data is a feature cache (the teacher is never loaded)."""
    seq_len: int = 3072
    """Online: tokens per sequence (the dump's --seq-len)."""
    max_seqs: int | None = None
    """Online: train on the first this many sequences of --data (the dump's --max-seqs)."""
    teacher_layers: int = 5
    """Online: K, the teacher layers whose outputs are the features (build_target_layer_ids(L, K),
    the dump's --num-layers)."""
    teacher_dtype: str = "bfloat16"
    """Online: the teacher's compute dtype (features are rounded to bfloat16, as a cache stores
    them, whatever it is)."""
    teacher_mesh: str | None = None
    """Online: the teacher's EasyDeL mesh sizes dp,fsdp,ep,tp,sp over the same devices as --mesh
    (default: train/online.py `teacher_axis_dims`)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "block_size", "draft_layers", "anchors_per_seq",
                     "vocab_chunk", "token_chunk", "save_every", "keep_checkpoints", "log_every",
                     "read_threads", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 2:
            raise ValueError("block_size must be >= 2 (slot 0 is the anchor and carries no loss)")
        if self.eval_max < 1 or self.eval_every < 0:
            raise ValueError("eval_max must be >= 1 and eval_every >= 0")
        if not (math.isfinite(self.eval_fraction) and 0.0 <= self.eval_fraction < 1.0):
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("lr", "weight_decay", "b1", "b2", "clip", "gamma", "memory_limit_gb"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {', '.join(IMPLEMENTATIONS)}, "
                             f"got {self.attention!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not (math.isfinite(self.selector_alpha) and self.selector_alpha >= 0):
            raise ValueError(f"selector_alpha must be a finite number >= 0, got {self.selector_alpha}")
        if self.seq_len < 2 or self.teacher_layers < 1 or (self.max_seqs is not None
                                                           and self.max_seqs < 1):
            raise ValueError("seq_len must be >= 2, teacher_layers >= 1 and max_seqs >= 1")
        if self.teacher_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"teacher_dtype must be bfloat16 or float32, got {self.teacher_dtype}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16 or float32, got {self.compute_dtype}")

    @property
    def decay_gamma(self) -> float:
        if self.gamma is not None:
            return float(self.gamma)
        return _GAMMA_BY_BLOCK.get(self.block_size, self.block_size / 2.0)

    def with_arch(self, dcfg):
        """The DraftConfig `dcfg` (a DFlash backbone) as --arch builds it."""
        if self.arch == "dflash2":
            return dataclasses.replace(dcfg, dflash2=DFlash2Config())
        return dataclasses.replace(dcfg, dflash2=None)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls, **kw) -> "TrainConfig":
        """A CPU-sized run for tests: few steps, few anchors, float32 so runs compare exactly."""
        base = dict(steps=20, batch_size=8, block_size=4, draft_layers=1, anchors_per_seq=8,
                    compute_dtype="float32", vocab_chunk=96, token_chunk=64, save_every=10,
                    log_every=1, read_threads=1, prefetch=4, progress=False, eval_fraction=0.0)
        base.update(kw)
        return cls(**base)
