"""Input data: corpus and tokenizer determinism, harmony rendering + loss masks, packing, bad data."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pipeline.data import chat
from pipeline.data import corpus
from pipeline.data import sequences as data
from pipeline.teacher import tokenizer as tokenizer_build
from pipeline.errors import UserError
from tests._data_fixtures import SMALL_VOCAB, build_small_tokenizer, small_tokenizer_texts

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer in Python."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " Hello, café ☕!"},  # leading space, non-ASCII
        {"role": "user", "content": "again, please"},
        {"role": "assistant", "content": "ok", "thinking": "They want it twice."},
    ],
    [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},  # empty reply: only its end token is supervised
    ],
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_small_tokenizer(tmp_path_factory.mktemp("tok"))


def harmony_oracle(tok, messages):
    """Expected ids and mask, built piece by piece: special tokens split the text, so the whole
    rendering tokenizes as the concatenation of its pieces."""
    ids, mask = [], []
    special = lambda t: [tok.convert_tokens_to_ids(t)]
    text = lambda s: list(tok(s, add_special_tokens=False)["input_ids"]) if s else []

    def add(pieces, m):
        ids.extend(pieces)
        mask.extend([m] * len(pieces))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            add(special("<|start|>") + text(m["role"]) + special("<|message|>") + text(m["content"])
                + special("<|end|>"), 0)
            continue
        if m.get("thinking"):
            add(special("<|start|>") + text("assistant") + special("<|channel|>") + text("analysis")
                + special("<|message|>"), 0)
            add(text(m["thinking"]) + special("<|end|>"), 1)
        add(special("<|start|>") + text("assistant") + special("<|channel|>") + text("final")
            + special("<|message|>"), 0)
        add(text(m["content"]) + special("<|return|>" if i == len(messages) - 1 else "<|end|>"), 1)
    return ids, mask


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_corpus_is_deterministic_and_split(tmp_path):
    all_files = corpus.corpus_files("all")
    train, heldout = corpus.corpus_files("train"), corpus.corpus_files("heldout")
    assert all_files == corpus.corpus_files("all") and all_files == sorted(all_files)
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(all_files)
    assert 0.02 < len(heldout) / len(all_files) < 0.1
    root = corpus.stdlib_root()
    assert all(not {"test", "tests", "site-packages"} & set(p.relative_to(root).parts) for p in all_files)
    assert corpus.corpus_fingerprint("heldout") == corpus.corpus_fingerprint("heldout")
    with pytest.raises(UserError, match="split"):
        corpus.corpus_files("validation")


def test_tokenizer_is_deterministic_with_harmony_specials(tok):
    texts = small_tokenizer_texts()
    a = tokenizer_build.train_bpe(texts, SMALL_VOCAB).to_str()
    b = tokenizer_build.train_bpe(texts, SMALL_VOCAB).to_str()
    assert a == b
    assert len(tok) == SMALL_VOCAB
    for name in tokenizer_build.SPECIAL_TOKENS:  # each special is one id, never split
        (tid,) = tok(name, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(tid) == name
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == tok.convert_tokens_to_ids("<|mask|>")
    assert tok.eos_token == "<|return|>" and tok.pad_token == "<|endoftext|>"
    cfg = json.loads((tok.name_or_path and open(f"{tok.name_or_path}/tokenizer_config.json").read()))
    assert cfg["mask_token_id"] == tok.mask_token_id and "{% generation %}" in cfg["chat_template"]
    sample = "def f(x):\n    return 'é☕' + x  # any bytes\n"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


def test_chat_rendering_and_masks_from_jsonl(tok, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS])
    records = list(data.iter_records(path))
    assert [r[0] for r in records] == [f"{path}:{n}" for n in (1, 2, 3)]
    rendered = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert rendered == ("<|start|>system<|message|>Answer in Python.<|end|>"
                        "<|start|>user<|message|>Add two numbers.<|end|>"
                        "<|start|>assistant<|channel|>final<|message|>def add(a, b):\n    return a + b<|return|>")
    assert tok.apply_chat_template(CONVERSATIONS[0][:2], tokenize=False, add_generation_prompt=True
                                   ).endswith("<|end|><|start|>assistant")
    for (where, kind, payload), conv in zip(records, CONVERSATIONS):
        assert kind == "chat"
        ids, mask = data.encode_record(tok, where, kind, payload)
        exp_ids, exp_mask = harmony_oracle(tok, conv)
        assert ids == exp_ids
        assert mask == exp_mask, [(tok.convert_ids_to_tokens(i), m) for i, m in zip(ids, mask)]
        masked_text = tok.decode([i for i, m in zip(ids, mask) if m])
        ends = "".join(("<|end|>" if j < len(conv) - 1 else "<|return|>")
                       for j, m in enumerate(conv) if m["role"] == "assistant")
        assert len(masked_text) == sum(len(m["content"]) + len(m.get("thinking", "")) + len("<|end|>"
                                       * bool(m.get("thinking"))) for m in conv
                                       if m["role"] == "assistant") + len(ends)


def test_sentinel_masks_match_generation_markers(tok):
    """Templates without {% generation %} (published snapshots) locate assistant text by sentinels;
    on our template both methods must mark exactly the same tokens."""
    with_markers = [chat.render_with_mask(tok, c, "x") for c in CONVERSATIONS]
    original = tok.chat_template
    try:
        tok.chat_template = original.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        assert [chat.render_with_mask(tok, c, "x") for c in CONVERSATIONS] == with_markers
        # a template that trims content and wraps it in plain text is still located exactly
        tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}"
                             "{% if m['role'] == 'assistant' %}<|return|>{% endif %}\n{% endfor %}")
        ids, mask = chat.render_with_mask(tok, CONVERSATIONS[1], "x")
        masked = [i for i, m in zip(ids, mask) if m]
        # tokens straddling the boundary (a leading "Ġ" space) count as the assistant's
        assert tok.decode(masked).replace(" ", "") == "Hello,café☕!<|return|>ok<|return|>"
        assert "user" not in tok.decode(masked) and "assistant" not in tok.decode(masked)
    finally:
        tok.chat_template = original


def test_plain_text_packing_to_fixed_length(tok, tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    texts = {"b.txt": "second document\n" * 5, "a.py": "x = 1\nprint(x)\n", "sub/c.txt": "third one",
             "empty.py": ""}
    for name, text in texts.items():
        (d / name).write_text(text)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for name in ("a.py", "b.txt", "sub/c.txt"):  # sorted order; empty files carry nothing
        stream += list(tok(texts[name], add_special_tokens=False)["input_ids"]) + [sep]
    T = 8
    rows = list(data.iter_sequences(d, tok, T, min_len=1))
    assert all(r[0].shape == (T,) and r[0].dtype == np.int32 and r[1].dtype == np.uint8 for r in rows)
    n_full, tail = divmod(len(stream), T)
    assert len(rows) == n_full + (tail > 0)
    flat_ids = np.concatenate([r[0] for r in rows])
    flat_mask = np.concatenate([r[1] for r in rows])
    assert flat_ids[: len(stream)].tolist() == stream and flat_mask[: len(stream)].all()
    assert (flat_ids[len(stream):] == tok.pad_token_id).all() and not flat_mask[len(stream):].any()
    # a tail shorter than min_len is dropped rather than padded
    assert len(list(data.iter_sequences(d, tok, T, min_len=T))) == n_full
    # the same files through a glob and one by one give the same rows
    globbed = list(data.iter_sequences(str(d / "**" / "*.txt"), tok, T, min_len=1))
    only_txt = list(tok(texts["b.txt"], add_special_tokens=False)["input_ids"]) + [sep]
    assert np.concatenate([r[0] for r in globbed])[: len(only_txt)].tolist() == only_txt


def test_chat_packing_carries_masks(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS] + [{"text": "tail text"}])
    exp_ids, exp_mask = [], []
    for conv in CONVERSATIONS:
        i, m = harmony_oracle(tok, conv)
        exp_ids, exp_mask = exp_ids + i, exp_mask + m
    tail = list(tok("tail text", add_special_tokens=False)["input_ids"]) + [tok.convert_tokens_to_ids("<|endoftext|>")]
    exp_ids, exp_mask = exp_ids + tail, exp_mask + [1] * len(tail)
    rows = list(data.iter_sequences(path, tok, 16, min_len=1))
    ids = np.concatenate([r[0] for r in rows])[: len(exp_ids)]
    mask = np.concatenate([r[1] for r in rows])[: len(exp_ids)]
    assert ids.tolist() == exp_ids and mask.tolist() == exp_mask


def test_parquet_and_saved_dataset_match_jsonl(tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["alpha beta gamma", "def f():\n    pass\n"]
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    want = [r[0].tolist() for r in data.iter_sequences(jsonl, tok, 4, min_len=1)]
    assert [r[0].tolist() for r in data.iter_sequences(tmp_path / "t.parquet", tok, 4, min_len=1)] == want
    assert [r[0].tolist() for r in data.iter_sequences(tmp_path / "ds", tok, 4, min_len=1)] == want
    pq.write_table(pa.table({"messages": [CONVERSATIONS[0]]}), tmp_path / "m.parquet")
    (ids, mask), = [data.encode_record(tok, *r) for r in data.iter_records(tmp_path / "m.parquet")]
    assert (ids, mask) == tuple(harmony_oracle(tok, CONVERSATIONS[0]))


def test_builtin_corpus_is_the_default_source(tok):
    first_file, first_text = next(corpus.iter_texts("train"))
    row_ids, row_mask = next(data.iter_sequences(None, tok, 64))
    assert row_ids.tolist() == list(tok(first_text, add_special_tokens=False)["input_ids"])[:64]
    assert row_mask.all()
    heldout = next(data.iter_records("builtin:heldout"))
    assert corpus.is_heldout(heldout[0].rsplit(":", 1)[0].split(str(corpus.stdlib_root()) + "/")[1])


BAD_CASES = {
    "malformed JSON": ('{"text": "ok"}\n{"text": "broken\n', r"bad\.jsonl:2: malformed JSON"),
    "no assistant": ('\n{"text": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n',
                     r"bad\.jsonl:3: conversation has no assistant turn"),
    "no text field": ('{"prompt": "x"}\n', r"bad\.jsonl:1: expected an object with a 'text', a 'messages' or a"),
    "empty text": ('{"text": "a"}\n{"text": "  "}\n', r"bad\.jsonl:2: 'text' is empty"),
    "bad role": ('{"messages": [{"content": "x"}]}\n', r"bad\.jsonl:1: message 0 has no string 'role'"),
    "not utf-8": (b'{"text": "a"}\n{"text": "\xff\xfe"}\n', r"bad\.jsonl:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_jsonl_names_file_and_line(tok, tmp_path, case):
    content, pattern = BAD_CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=pattern) as err:
        list(data.iter_sequences(path, tok, 8, min_len=1))
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_bad_sources_give_one_line_errors(tok, tmp_path):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline two\ncaf\xe9\n")
    (tmp_path / "data.csv").write_text("a,b\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"messages": [CONVERSATIONS[0], [{"role": "user", "content": "?"}]]}),
                   tmp_path / "m.parquet")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "p.parquet")
    cases = [
        (tmp_path / "emptydir", r"emptydir: no .* files .*empty input"),
        (tmp_path / "blank.jsonl", r"blank\.jsonl: no sequences .*empty input"),
        (tmp_path / "latin1.txt", r"latin1\.txt:3: not valid UTF-8 text \(byte 0xe9\)"),
        (tmp_path / "data.csv", r"data\.csv: unsupported file type"),
        (tmp_path / "missing.jsonl", r"missing\.jsonl: no such file"),
        (str(tmp_path / "*.nothing"), r"matches no files"),
        (tmp_path / "m.parquet", r"m\.parquet row 1: conversation has no assistant turn"),
        (tmp_path / "p.parquet", r"p\.parquet: parquet file has neither"),
        ("builtin:dev", r"unknown built-in corpus"),
    ]
    for source, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            list(data.iter_sequences(source, tok, 8, min_len=1))
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(UserError, match=r"x\.jsonl:1: chat data needs a tokenizer with a chat template"):
        data.encode_record(bare, "x.jsonl:1", "chat", CONVERSATIONS[0])
    bare.chat_template = "{% for m in messages if m.role != 'assistant' %}{{ m.content }}{% endfor %}"
    with pytest.raises(UserError, match=r"x\.jsonl:1: the chat template does not render assistant"):
        data.encode_record(bare, "x.jsonl:1", "chat", CONVERSATIONS[0])
    with pytest.raises(UserError, match="seq_len"):
        list(itertools.islice(data.iter_sequences(None, tok, 1), 1))
