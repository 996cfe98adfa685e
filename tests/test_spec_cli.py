"""The spec-decode CLI and prompt loading: bad input is one clear line, never a traceback."""
import json

import pytest

from pipeline.errors import UserError
from pipeline.data.prompts import load_prompts
from tools import spec_decode


def test_cli_help_and_bad_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        spec_decode.main(["--help"])
    assert e.value.code == 0
    assert spec_decode.main(["--draft", str(tmp_path / "nope"), "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert spec_decode.main(["--draft", "x", "--compare-draft", "nolabel"]) == 2
    assert "LABEL=DIR" in capsys.readouterr().err


def test_prompt_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n\n" + "{oops\n")
    with pytest.raises(UserError, match=r"p.jsonl:3: not JSON"):
        load_prompts(str(f), None)
    f.write_text(json.dumps({"input_ids": [1, 2]}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: needs a `prompt`, `messages` or `input_ids`"):
        load_prompts(str(f), None)
    f.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(UserError, match="need a teacher with a tokenizer"):
        load_prompts(str(f), None)
    with pytest.raises(UserError, match="not found"):
        load_prompts(str(tmp_path / "missing.jsonl"), None)
    f.write_text("\n".join(json.dumps({"input_ids": [i, i + 1]}) for i in range(5)))
    assert load_prompts(str(f), None, limit=2) == [[0, 1], [1, 2]]


def test_chat_and_text_prompts_use_the_teacher_tokenizer(tmp_path):
    """`messages` rows go through the tiny teacher's chat template; `prompt` rows are plain text."""
    from tools.make_tiny_teacher import ensure_tiny_teacher
    from pipeline.data.prompts import load_tokenizer

    tok = load_tokenizer(ensure_tiny_teacher())
    msgs = [{"role": "user", "content": "write a sort"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"prompt": "def f(x):"}) + "\n")
    chat, text = load_prompts(str(f), tok)
    want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert chat == list(want) and len(chat) > len(msgs[0]["content"].split())
    assert tok.decode(text) == "def f(x):"
    assert len(load_prompts("builtin", tok)) >= 4
