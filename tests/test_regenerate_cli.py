"""`python -m pipeline.regenerate` end to end on a small GPT-OSS stand-in with a real BPE tokenizer
and the harmony chat template: the dump's loss mask covers exactly the generated tokens (decoded
independently with the cached target), resume after an interruption is byte-identical, other
settings are refused, bad input is one error line and leaves nothing behind."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import sequences as data
from pipeline import regenerate
from pipeline.speculative import loop as sp
from pipeline.regen.run import RegenerateConfig, run_regenerate
from pipeline.speculative.generate import SamplingConfig
from pipeline.speculative.target import CachedTarget

NEW, PROMPT = 20, 12


def _build_standin(out: Path) -> Path:
    """Random GPT-OSS (vocab 512) + a BPE tokenizer trained on a few stdlib files. The LM-head
    rows of <|return|> / <|endoftext|> are swapped with the two tokens the random model's greedy
    continuations hold most, so generations do stop at EOS."""
    import torch
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    from pipeline.data import corpus
    from pipeline.teacher import tokenizer as tb

    texts = [t for _, t in zip(range(40), (t for _, t in corpus.iter_texts("train")))]
    tok = tb.train_bpe(texts, 512)
    tb.save_tokenizer(tok, out, 4096)
    ids = tb.special_token_ids(tok)
    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=6, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"], initializer_range=0.08,
        tie_word_embeddings=False, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    model = GptOssForCausalLM(cfg).eval().float()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        x = torch.tensor([hf_tok(t[:2000])["input_ids"][:PROMPT] for t in texts[:8]])
        gen = model.generate(x, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[:, PROMPT + 3:]
        top = torch.bincount(gen.flatten(), minlength=512).argsort(descending=True)
        head = model.lm_head.weight
        for special, frequent in ((ids["eos_token_id"], top[0]), (ids["pad_token_id"], top[1])):
            idx = torch.tensor([int(special), int(frequent)])
            head[idx] = head[idx.flip(0)].clone()
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return _build_standin(tmp_path_factory.mktemp("regen-standin"))


@pytest.fixture(scope="module")
def tokenizer(standin):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(standin))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    from pipeline.data import corpus
    path = tmp_path_factory.mktemp("regen-data") / "code.jsonl"
    texts = [t.strip()[:300] for _, t in zip(range(7), (t for _, t in corpus.iter_texts("heldout")))]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("regen-chat") / "chat.jsonl"
    chats = [[{"role": "user", "content": "Write a function that adds two numbers."}],
             [{"role": "system", "content": "You write Python."},
              {"role": "user", "content": "def parse(text):"},
              {"role": "assistant", "content": "dataset answer, to be replaced"}],
             [{"role": "user", "content": "import os\nimport sys\n"}]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    return path, chats


def _config(standin, data_path, out, **kw):
    return RegenerateConfig(model=str(standin), data=str(data_path), out=str(out),
                            sampling=SamplingConfig(max_new_tokens=NEW), batch_size=2,
                            prompt_tokens=PROMPT, commit_every=2, progress=False, **kw)


def _dumped(out: Path, tokenizer, total: int):
    (ids, mask), = list(data.iter_sequences(str(out), tokenizer, total, min_len=1))
    return ids.tolist(), mask.tolist()


def test_text_prompts_mask_exactly_the_generated_tokens(standin, tokenizer, text_data, tmp_path):
    summary = run_regenerate(_config(standin, text_data, tmp_path / "out"), log=lambda m: None)
    assert summary["complete"] and summary["prompts"] == 7 and summary["parts"] == 4
    eos, sep = tokenizer.convert_tokens_to_ids("<|return|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    target = CachedTarget(standin, [0])
    want_ids, want_mask, stopped = [], [], 0
    for line in text_data.read_text().splitlines():
        prompt = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"][:PROMPT]
        gen = sp.ar_generate(target, prompt, max_new_tokens=NEW, stop_ids=(eos, sep)).tokens
        tail = [] if gen[-1] == sep else [sep]
        stopped += len(gen) < NEW
        want_ids += prompt + gen + tail
        want_mask += [0] * len(prompt) + [1] * len(gen) + [0] * len(tail)
    assert stopped  # some rows end at an EOS, which is then supervised
    assert _dumped(tmp_path / "out", tokenizer, len(want_ids)) == (want_ids, want_mask)


def test_chat_prompts_mask_the_generated_turn(standin, tokenizer, chat_data, tmp_path):
    """The dump's rows of a regenerated chat are the rendered prompt (ending where the assistant's
    content starts) and then exactly the tokens the cached target generates, the end token
    included, and the mask covers exactly those. This random stand-in emits invalid UTF-8
    fragments whose decoded text re-encodes to other tokens (asserted), so the record must carry
    the ids: rendering its `messages` would supervise other tokens."""
    path, chats = chat_data
    run_regenerate(_config(standin, path, tmp_path / "out"), log=lambda m: None)
    rows = [json.loads(x) for p in sorted((tmp_path / "out").glob("part-*.jsonl"))
            for x in p.read_text().splitlines()]
    assert len(rows) == len(chats)
    eos = tokenizer.convert_tokens_to_ids("<|return|>")
    target = CachedTarget(standin, [0])
    reencoded = 0
    for chat, row in zip(chats, rows):
        user = [m for m in chat if m["role"] != "assistant"]
        assert row["messages"][:-1] == user and row["messages"][-1]["role"] == "assistant"
        text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text + "<|channel|>final<|message|>", add_special_tokens=False)["input_ids"]
        gen = sp.ar_generate(target, prompt, max_new_tokens=NEW, stop_ids=(eos,)).tokens
        assert row["finish_reason"] == ("stop" if gen[-1] == eos else "length")
        ids, mask = data.encode_record(tokenizer, "x", *data._record(row, "x"))
        assert ids == prompt + gen
        assert mask == [0] * len(prompt) + [1] * len(gen)
        body = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        reencoded += body != (gen[:-1] if gen[-1] == eos else gen)
        # the same record read from a parquet table (the dump's other file format)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([row]), tmp_path / "row.parquet")
        (where, kind, payload), = data.iter_records(tmp_path / "row.parquet")
        assert data.encode_record(tokenizer, where, kind, payload) == (ids, mask)
    assert reencoded  # the decoded text alone would not give the generated tokens back
    # fed back as prompts, a regenerated chat's user turns are the prompt again
    again = run_regenerate(_config(standin, sorted((tmp_path / "out").glob("part-*.jsonl"))[0],
                                   tmp_path / "again"), log=lambda m: None)
    assert again["complete"]
    first = json.loads(sorted((tmp_path / "again").glob("part-*.jsonl"))[0].read_text().splitlines()[0])
    assert first == rows[0]


def _bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_resume_after_interruption_is_byte_identical(standin, text_data, tmp_path):
    kw = dict(sampling=SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=3))
    full = run_regenerate(RegenerateConfig(**{**_config(standin, text_data, tmp_path / "a").__dict__, **kw}),
                          log=lambda m: None)
    cut = RegenerateConfig(**{**_config(standin, text_data, tmp_path / "b").__dict__, **kw})
    part = run_regenerate(cut, log=lambda m: None, stop_after_parts=2)
    assert not part["complete"] and part["parts"] == 2
    # what a SIGKILL in the middle of the next commit leaves: a half part and a ledger tmp file
    (tmp_path / "b" / "part-00002.jsonl.tmp").write_text('{"prompt": "half')
    (tmp_path / "b" / "regenerate-ledger.json.tmp").write_text("{")
    resumed = run_regenerate(cut, log=lambda m: None)
    assert resumed["parts_this_run"] == 2 and resumed["complete"] and full["complete"]
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    again = run_regenerate(cut, log=lambda m: None)  # complete: nothing to do
    assert again["parts_this_run"] == 0 and _bytes(tmp_path / "a") == _bytes(tmp_path / "b")


def test_cli_refuses_other_settings_and_bad_input(standin, text_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(standin), "--data", str(text_data), "--out", str(out), "--no-progress",
            "--max-new-tokens", str(NEW), "--prompt-tokens", str(PROMPT), "--batch-size", "2",
            "--commit-every", "2"]
    run_regenerate(_config(standin, text_data, out), log=lambda m: None, stop_after_parts=1)
    before = _bytes(out)
    assert regenerate.main(base[:-2] + ["--commit-every", "2", "--seed", "5", "--temperature", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sampling" in err[0]
    assert _bytes(out) == before
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    cases = [["--data", str(bad)], ["--data", str(tmp_path / "missing.jsonl")],
             ["--temperature", "-1"], ["--top-p", "0"], ["--batch-size", "0"],
             ["--model", str(tmp_path / "nomodel")]]
    for extra in cases:
        fresh = tmp_path / f"fresh{cases.index(extra)}"
        argv = ["--model", str(standin), "--data", str(text_data), "--out", str(fresh),
                "--no-progress"] + extra
        assert regenerate.main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (extra, err)
        assert not fresh.exists(), extra
