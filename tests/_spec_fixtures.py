"""Fixtures for the speculative-decoding tests: a small random GPT-OSS snapshot (HF torch saves
it, so it is a real HF checkpoint) and z-lab drafts built from it. Random but peaked weights
(large init std) so greedy argmaxes are far from ties and token-for-token equality is meaningful.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 384
MASK_ID = VOCAB - 1


def make_target(out: Path, *, seed: int = 0, layers: int = 4, std: float = 0.08) -> Path:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    cfg = GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=6, max_position_embeddings=256,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False},
        initializer_range=std, tie_word_embeddings=False, eos_token_id=VOCAB - 2,
        pad_token_id=VOCAB - 3)
    model = GptOssForCausalLM(cfg).eval().float()
    with torch.no_grad():  # larger sinks/router spread than the init gives, like a trained model
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    model.save_pretrained(str(out))
    return out


def random_prompts(n: int, lengths=(5, 23), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB - 3, size=int(rng.integers(*lengths))).tolist() for _ in range(n)]


def save_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj))


def make_draft(out: Path, *, seed: int = 1, layers: int = 2, block_size: int = 4,
               target_layer_ids=(0, 1, 2), sliding: bool = True, std: float = 0.08,
               hidden: int = 64, num_target_layers: int = 4) -> Path:
    """An untrained draft in the z-lab format, written by the reference DFlashDraftModel itself.
    hidden / num_target_layers other than make_target's build a draft for another teacher."""
    import torch
    from dflash.model import DFlashDraftModel
    from transformers import Qwen3Config

    out = Path(out)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    types = ["sliding_attention" if (sliding and i % 2 == 1) else "full_attention" for i in range(layers)]
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
        max_position_embeddings=256, layer_types=types, sliding_window=5,
        use_sliding_window=sliding, initializer_range=std,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False},
        num_target_layers=num_target_layers, architectures=["DFlashDraftModel"],
        dflash_config={"block_size": block_size, "mask_token_id": MASK_ID,
                       "target_layer_ids": list(target_layer_ids)})
    model = DFlashDraftModel(cfg).eval().float()
    with torch.no_grad():  # biases non-zero so attention_bias is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, std)
    model.save_pretrained(str(out))
    return out


def make_tokenizer():
    """A real (fast) HF tokenizer with a chat template, built in memory: one token per character
    of a small alphabet. For prompt loading, where the tiny teacher's tokenizer would mean a
    teacher build."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz :<>|/_"))
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": len(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def greedy_sequences(target_dir: Path, layer_ids, n: int = 4, new: int = 32, seed: int = 5):
    """The target's own greedy continuations of random prompts, with its features: what a draft
    must imitate (the paper regenerates training responses with the target for this reason)."""
    from pipeline.speculative import loop as sp
    from pipeline.speculative.target import CachedTarget

    target = CachedTarget(target_dir, layer_ids)
    seqs, feats = [], []
    for prompt in random_prompts(n, (4, 12), seed=seed):
        g = sp.ar_generate(target, prompt, max_new_tokens=new)
        ids = np.asarray(prompt + g.tokens, np.int32)
        target.reset(len(ids))
        _, f = target.run(ids, 0, len(ids), len(ids))
        seqs.append(ids)
        feats.append(np.asarray(f))
    return target, seqs, feats


def train_draft(untrained: Path, target_dir: Path, out: Path, *, steps: int = 50, lr: float = 5e-3) -> Path:
    """Briefly train `untrained` (z-lab export) on the target's greedy outputs with the project's
    training-form forward (model.draft_hidden_train) and the DFlash loss; save to `out`."""
    import jax
    import jax.numpy as jnp
    import optax

    import model

    out = Path(out)
    if (out / "config.json").exists():
        return out
    config, params = model.load_draft(untrained)
    target, seqs, feats = greedy_sequences(target_dir, config.target_layer_ids)
    emb, head = target.params["embed"], target.params["lm_head"]
    T = min(len(s) for s in seqs)
    ids = jnp.asarray(np.stack([s[:T] for s in seqs]))
    fts = jnp.asarray(np.stack([f[:T] for f in feats]))
    B = config.block_size
    anchors = jnp.broadcast_to(jnp.arange(1, T - B), (len(seqs), T - B - 1)).astype(jnp.int32)
    w = jnp.exp(-(jnp.arange(1, B) - 1) / 4.0)

    def loss_fn(p):
        blocks = model.block_tokens(config, ids, anchors)
        h = model.draft_hidden_train(config, p, fts, model.embed_block(config, emb, blocks), anchors)
        logits = model.draft_logits(config, h[:, :, 1:], head)
        labels = jax.vmap(lambda row, a: row[a[:, None] + jnp.arange(1, B)])(ids, anchors)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(ce * w) / (w.sum() * ce.shape[0] * ce.shape[1])

    opt = optax.adamw(lr)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    for _ in range(steps):
        params, state, loss = step(params, state)
    model.save_draft(out, config, params)
    return out


def build_artifacts(d: Path) -> dict:
    """A tiny target, an untrained draft and that draft briefly trained on the target's output."""
    tgt = make_target(d / "target")
    untrained = make_draft(d / "draft")
    trained = train_draft(untrained, tgt, d / "trained")
    return {"target": tgt, "untrained": untrained, "trained": trained, "dir": d}
