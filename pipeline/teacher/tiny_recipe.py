"""Train the miniature GPT-OSS teacher in torch on CPU and measure what it learned.

The model is transformers' own `GptOssForCausalLM` (MoE experts with top-k routing, alternating
sliding/full attention, attention sinks, YaRN RoPE), only small; so everything downstream that
loads it loads a real gpt-oss architecture. Training is deterministic for a seed and a thread
count: fixed data order, torch.manual_seed, and a fixed number of torch threads.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TinyTeacherConfig:
    """Recipe of the tiny teacher. The default build takes about 6 CPU minutes, on one core.

    The budget is CPU-bound at ~0.65 ms per trained token whatever the width (the step is made of
    many small ops), so what buys quality is many small steps: 1000 steps of 4 x 128 tokens learn
    far more per CPU second than 200 steps of 8 x 256 (which stayed near unigram level).
    """

    seed: int = 0
    steps: int = 1000  # optimizer steps; the result depends only on (recipe, seed, threads)
    max_minutes: float | None = None  # wall-clock cap on training; hitting it breaks determinism
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 4e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    # One thread: reproducible, and on a shared machine 2 spinning threads can run 5x slower than 1.
    threads: int = 1
    eval_sequences: int = 256  # held-out sequences of seq_len scored for the report
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 128  # per expert; a wider one costs more per step than it gives here
    num_hidden_layers: int = 8  # build_target_layer_ids(8, 5) = [1, 2, 3, 4, 5]: five distinct layers
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    sliding_window: int = 32  # well below seq_len, so positions past the window are exercised
    rope_theta: float = 150000.0  # gpt-oss's value
    # gpt-oss: YaRN factor 32 over an original context of 4096 (truncate false); scaled down here.
    yarn_factor: float = 4.0
    yarn_original_max_position: int = 256
    max_files: int | None = None  # use only the first N corpus files (tests build quick variants)

    def hf_config(self, special_ids: dict[str, int]):
        """The transformers GptOssConfig of this recipe."""
        from transformers import GptOssConfig

        rope = {
            "rope_type": "yarn",
            "factor": self.yarn_factor,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": self.yarn_original_max_position,
            "rope_theta": self.rope_theta,
        }
        return GptOssConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            sliding_window=self.sliding_window,
            max_position_embeddings=int(self.yarn_original_max_position * self.yarn_factor),
            rope_parameters=rope,
            bos_token_id=special_ids["bos_token_id"],
            eos_token_id=special_ids["eos_token_id"],
            pad_token_id=special_ids["pad_token_id"],
            tie_word_embeddings=False,
            attn_implementation="eager",  # the one CPU path with attention sinks and no kernels
        )


def pack_documents(token_lists: list[list[int]], separator: int, seq_len: int) -> np.ndarray:
    """Join documents with `separator` after each and cut into [n, seq_len] int64 rows (tail dropped)."""
    total = sum(len(t) + 1 for t in token_lists)
    stream = np.empty(total, dtype=np.int64)
    pos = 0
    for toks in token_lists:
        stream[pos : pos + len(toks)] = toks
        stream[pos + len(toks)] = separator
        pos += len(toks) + 1
    n = total // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def unigram_perplexity(train_rows: np.ndarray, eval_rows: np.ndarray, vocab_size: int) -> float:
    """Perplexity on eval targets (tokens 1..T-1 of each row) of add-one-smoothed train counts."""
    counts = np.bincount(train_rows.reshape(-1), minlength=vocab_size).astype(np.float64)
    log_p = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(np.exp(-log_p[eval_rows[:, 1:].reshape(-1)].mean()))


def lr_at(step: int, cfg: TinyTeacherConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


def train_model(cfg: TinyTeacherConfig, hf_config, train_rows: np.ndarray, log: Callable[[str], None]):
    """Train GptOssForCausalLM from a seeded init on shuffled rows; returns (model, stats)."""
    import torch
    from transformers import GptOssForCausalLM

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = GptOssForCausalLM(hf_config).float()
    # fused: one kernel per step instead of a dozen per tensor (a third of the optimizer's time);
    # it is elementwise, so as deterministic as the unfused one.
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True
    )
    order = np.random.default_rng(cfg.seed).permutation(len(train_rows))
    start, losses, step = time.monotonic(), [], 0
    model.train()
    for step in range(cfg.steps):
        if cfg.max_minutes is not None and time.monotonic() - start > 60.0 * cfg.max_minutes:
            log(f"stopping at step {step}/{cfg.steps}: --minutes {cfg.max_minutes} reached "
                "(the weights now depend on machine speed, not only on the seed)")
            break
        idx = order[(np.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
        batch = torch.from_numpy(train_rows[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {losses[-1]:.3f}  {time.monotonic() - start:6.1f}s")
    else:
        step = cfg.steps
    model.eval()
    stats = {
        "steps_done": step,
        "train_seconds": round(time.monotonic() - start, 1),
        "final_train_loss": float(np.mean(losses[-10:])) if losses else None,
    }
    return model, stats


def heldout_perplexity(model, eval_rows: np.ndarray, batch_size: int = 16) -> tuple[float, list[int]]:
    """(perplexity on tokens 1..T-1 of each row, top-k routing counts per expert summed over layers)."""
    import torch

    total_nll, total_tokens = 0.0, 0
    usage = np.zeros(model.config.num_local_experts, dtype=np.int64)
    with torch.no_grad():
        for i in range(0, len(eval_rows), batch_size):
            batch = torch.from_numpy(eval_rows[i : i + batch_size])
            out = model(input_ids=batch, output_router_logits=True)
            logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
            total_nll += float(nll.sum())
            total_tokens += nll.numel()
            for router_logits in out.router_logits:
                top = torch.topk(router_logits, model.config.num_experts_per_tok, dim=-1).indices
                usage += np.bincount(top.reshape(-1).numpy(), minlength=len(usage))
    return math.exp(total_nll / total_tokens), usage.tolist()
