"""Input data for the feature dump: files or datasets -> fixed-length (input_ids, loss_mask) rows.

Sources (`iter_sequences(source, ...)`):
  None / "builtin[:train|:heldout|:all]"  the built-in corpus (Python stdlib source; default train)
  DIR            every .txt/.py/.jsonl/.parquet file under DIR (sorted), or a `datasets`
                 dataset saved with `save_to_disk`
  GLOB           e.g. "data/*.jsonl" (sorted matches)
  FILE           .txt/.py (plain text), .jsonl (one {"text": ...}, {"messages": [...]} or
                 {"prompt": ..., "completion": ...} per line), .parquet (a `text` or `messages`
                 column, or `prompt` + `completion`)
Plain text is supervised everywhere (loss_mask 1) and each document ends with `<|endoftext|>`.
A prompt/completion pair (what `pipeline.regenerate` writes for plain-text prompts) supervises
only the completion's tokens; the prompt and completion are tokenized separately so the boundary
is exact (or taken verbatim from `prompt_ids` / `completion_ids` when the record has them: decoded
text need not re-encode to the generated tokens), and an unsupervised `<|endoftext|>` follows
unless the completion already ends with it.
Chats are rendered with the tokenizer's chat template (harmony for gpt-oss) and only what the
assistant writes is supervised. A chat that carries `prompt_ids` + `completion_ids` (what
`pipeline.regenerate` writes: the rendered prompt and the generated tokens) is taken verbatim
instead, the completion supervised, so the mask covers exactly the generated tokens even when
their decoded text re-encodes differently; its `messages` are for people and other tools. Documents are packed back to back and cut into rows of seq_len;
a final partial row is padded (loss_mask 0) if it holds at least min_len tokens.
Bad data raises UserError naming the file and line (or row).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import chat
from pipeline.data import corpus
from pipeline.errors import UserError

TEXT_SUFFIXES = (".txt", ".py")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
DOC_SEPARATOR = "<|endoftext|>"  # gpt-oss's document separator (its pad token)
COLUMNS = ("text", "messages", "prompt", "completion", "prompt_ids", "completion_ids")  # tables


def resolve_source(source: str | Path | None) -> list[tuple[str, Path | str]]:
    """The ordered list of (kind, location) that `source` names; kind in builtin/text/jsonl/parquet/datasets."""
    if source is None or str(source) == "builtin" or str(source).startswith("builtin:"):
        split = "train" if source is None or str(source) == "builtin" else str(source).partition(":")[2]
        if split not in corpus.SPLITS:
            raise UserError(f"unknown built-in corpus {source!r}; use builtin, builtin:train, "
                            "builtin:heldout or builtin:all")
        return [("builtin", split)]
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise UserError(f"{path} is a datasets DatasetDict; pass one split's directory, "
                            f"e.g. {path / 'train'}")
        if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            return [("datasets", path)]
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory (empty input)")
        return [_file_kind(p) for p in files]
    if path.is_file():
        return [_file_kind(path)]
    if glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{source}: the pattern matches no files (empty input)")
        return [_file_kind(p) for p in files]
    raise UserError(f"{source}: no such file, directory or dataset")


def _file_kind(path: Path) -> tuple[str, Path]:
    if path.suffix in TEXT_SUFFIXES:
        return ("text", path)
    if path.suffix in (".jsonl", ".parquet"):
        return (path.suffix[1:], path)
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _decode(data: bytes, path: Path, line_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_offset + data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _token_ids(obj, where: str):
    """(prompt_ids, completion_ids) of a record that carries them, else None."""
    ids = obj.get("prompt_ids"), obj.get("completion_ids")
    if ids == (None, None):
        return None
    if not all(isinstance(x, list) and all(type(t) is int and t >= 0 for t in x) for x in ids) \
            or not ids[1]:
        raise UserError(f"{where}: 'prompt_ids' and 'completion_ids' must be lists of token "
                        "ids, the completion non-empty")
    return ids


def _record(obj, where: str, require_assistant: bool = True):
    """Validate one {"text"}, {"messages"} or {"prompt", "completion"} record -> ("text", str),
    ("chat", list), ("chat_ids", (messages, prompt_ids, completion_ids)) or
    ("completion", (prompt, completion))."""
    if not isinstance(obj, dict) or not ({"text", "messages", "completion"} & obj.keys()):
        raise UserError(f"{where}: expected an object with a 'text', a 'messages' or a "
                        "'prompt' + 'completion' field")
    if "messages" in obj and obj["messages"] is not None:
        messages = chat.validate_messages(obj["messages"], where, require_assistant)
        ids = _token_ids(obj, where)  # the exact tokens (a decoded text need not re-encode to them)
        return ("chat", messages) if ids is None else ("chat_ids", (messages, *ids))
    if obj.get("completion") is not None:
        pair = obj.get("prompt"), obj["completion"]
        if not all(isinstance(x, str) for x in pair) or not pair[1]:
            raise UserError(f"{where}: 'prompt' and 'completion' must be strings, the completion "
                            "non-empty")
        ids = _token_ids(obj, where)  # the exact tokens (a decoded text need not re-encode to them)
        return ("completion", pair) if ids is None else ("completion", ids)
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' is empty or not a string")
    return "text", text


def iter_records(source: str | Path | None = None, *, require_assistant: bool = True
                 ) -> Iterator[tuple[str, str, object]]:
    """(where, kind, payload) for each document, kind "text" (payload str), "chat" (messages),
    "chat_ids" ((messages, prompt_ids, completion_ids)) or "completion" ((prompt, completion),
    strings or id lists); chats without an assistant turn are refused unless
    `require_assistant` is False (regeneration prompts)."""
    for kind, loc in resolve_source(source):
        if kind == "builtin":
            for path, text in corpus.iter_texts(loc):
                yield f"{path}:1", "text", text
        elif kind == "text":
            text = _decode(_read(loc), loc)
            if text.strip():  # empty files (e.g. __init__.py) carry no text; not an error
                yield f"{loc}:1", "text", text
        elif kind == "jsonl":
            yield from _jsonl_records(loc, require_assistant)
        else:
            for i, obj in enumerate(_table_rows(kind, loc)):
                yield (f"{loc} row {i}", *_record(obj, f"{loc} row {i}", require_assistant))


def _jsonl_records(loc: Path, require_assistant: bool = True) -> Iterator[tuple[str, str, object]]:
    try:
        f = open(loc, "rb")  # streamed: a jsonl file may be far larger than memory
    except OSError as e:
        raise UserError(f"{loc}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, start=1):
            line = _decode(raw, loc, n - 1)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{loc}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield (f"{loc}:{n}", *_record(obj, f"{loc}:{n}", require_assistant))


def _table_rows(kind: str, loc: Path) -> Iterator[dict]:
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{loc}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(loc)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise UserError(f"{loc}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
        if not set(cols) & {"text", "messages", "completion"}:
            raise UserError(f"{loc}: parquet file has neither a 'text', a 'messages' nor a "
                            "'completion' column")
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            yield from batch.to_pylist()
        return
    try:
        import datasets
    except ImportError:
        raise UserError(f"{loc} is a saved `datasets` dataset but the datasets package is not "
                        "installed (pip install datasets)") from None
    ds = datasets.load_from_disk(str(loc))
    cols = [c for c in COLUMNS if c in ds.column_names]
    if not set(cols) & {"text", "messages", "completion"}:
        raise UserError(f"{loc}: dataset has neither a 'text', a 'messages' nor a 'completion' column")
    yield from ds.select_columns(cols)


def encode_record(tokenizer, where: str, kind: str, payload) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of one document (text gets a trailing document separator)."""
    if kind == "chat":
        return chat.render_with_mask(tokenizer, payload, where)
    if kind == "chat_ids":  # the template's end token is in the completion when the teacher wrote it
        _, prompt, completion = payload
        return list(prompt) + list(completion), [0] * len(prompt) + [1] * len(completion)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # noqa: E731
    sep = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
    if sep is None or sep == tokenizer.unk_token_id:
        sep = tokenizer.eos_token_id
    if kind == "completion":
        prompt, completion = (encode(x) if isinstance(x, str) else list(x) for x in payload)
        tail = [] if completion[-1:] == [sep] else [sep]  # a generated separator is supervised
        return prompt + completion + tail, [0] * len(prompt) + [1] * len(completion) + [0] * len(tail)
    ids = encode(payload)
    return ids + [sep], [1] * (len(ids) + 1)


def iter_sequences(source, tokenizer, seq_len: int, *, min_len: int = 32
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows of (input_ids int32 [seq_len], loss_mask uint8 [seq_len]) in a deterministic order."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids_buf: list[int] = []
    mask_buf: list[int] = []
    produced = False
    for where, kind, payload in iter_records(source):
        ids, mask = encode_record(tokenizer, where, kind, payload)
        ids_buf.extend(ids)
        mask_buf.extend(mask)
        start = 0
        while len(ids_buf) - start >= seq_len:
            produced = True
            end = start + seq_len
            yield (np.asarray(ids_buf[start:end], np.int32), np.asarray(mask_buf[start:end], np.uint8))
            start = end
        del ids_buf[:start], mask_buf[:start]  # once per document: long documents stay linear
    if ids_buf and len(ids_buf) >= min(min_len, seq_len):
        produced = True
        n = seq_len - len(ids_buf)
        yield (np.asarray(ids_buf + [pad] * n, np.int32), np.asarray(mask_buf + [0] * n, np.uint8))
    if not produced:
        raise UserError(f"{source if source is not None else 'builtin'}: no sequences of at least "
                        f"{min(min_len, seq_len)} tokens (empty input)")
