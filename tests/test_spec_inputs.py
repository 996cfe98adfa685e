"""spec_decode refuses inputs that do not fit: a draft built for another teacher, broken files,
prompts outside the vocabulary or of the wrong shape. Each is one `error:` line, exit 2, no report.

The oracle for "does not fit" is the teacher stand-in's own config (fx.make_target: hidden 64,
vocab 384, 4 layers); every draft here is the reference DFlashDraftModel's save, then edited.
"""
import json
import shutil

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.data.prompts import load_prompts
from tests import _spec_fixtures as fx
from tools import spec_decode


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec_inputs")
    prompts = d / "ids.jsonl"
    prompts.write_text("\n".join(json.dumps({"input_ids": p}) for p in fx.random_prompts(2, (4, 8))))
    return {"target": fx.make_target(d / "target"), "draft": fx.make_draft(d / "draft"),
            "prompts": prompts, "dir": d}


def _cli(capsys, draft, target, prompts, *extra):
    capsys.readouterr()  # drop what fixtures printed (HF save progress bars)
    rc = spec_decode.main(["--draft", str(draft), "--model", str(target), "--prompts", str(prompts),
                           "--max-new-tokens", "4", "--no-ngram", *extra])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def _refused(capsys, draft, target, prompts, match):
    rc, out, err = _cli(capsys, draft, target, prompts)
    assert rc == 2, (rc, err[-3:])
    assert out == ""  # no table, no JSON line: nothing reported as if it had run
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert match in err[0], err[0]
    return err[0]


def _edited_draft(art, tmp_path, edit):
    draft = tmp_path / "draft"
    shutil.copytree(art["draft"], draft)
    cfg = json.loads((draft / "config.json").read_text())
    edit(cfg)
    (draft / "config.json").write_text(json.dumps(cfg))
    return draft


def _set(key, value, dflash=False):
    def edit(cfg):
        (cfg["dflash_config"] if dflash else cfg)[key] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set("hidden_size", 128), "hidden_size 128"),
    (_set("vocab_size", 500), "vocab_size 500 but the teacher's is 384"),
    (_set("num_target_layers", 6), "num_target_layers 6 but the teacher's is 4"),
    (_set("target_layer_ids", [0, 1], dflash=True), "2 target layers"),
    (_set("target_layer_ids", [1, 2, 3, 0], dflash=True), "4 target layers"),
    (_set("target_layer_ids", [0, 1, 7], dflash=True), "outside the teacher's layers 0..3"),
    (_set("target_layer_ids", [-1, 1, 2], dflash=True), "outside the teacher's layers 0..3"),
    (_set("target_layer_ids", [1, 1, 2], dflash=True), "repeat a layer"),
    (_set("mask_token_id", 999, dflash=True), "mask_token_id 999 outside"),
], ids=["hidden", "vocab", "num_target_layers", "fewer_ids", "more_ids", "id_too_big",
        "id_negative", "id_repeated", "mask_id"])
def test_draft_config_that_does_not_fit_the_teacher_is_refused(art, tmp_path, capsys, edit, match):
    _refused(capsys, _edited_draft(art, tmp_path, edit), art["target"], art["prompts"], match)


def test_consistent_draft_for_another_teacher_is_refused(art, tmp_path, capsys):
    """Self-consistent drafts (weights match their config) built for a wider / deeper teacher."""
    wide = fx.make_draft(tmp_path / "wide", hidden=32)
    err = _refused(capsys, wide, art["target"], art["prompts"], "hidden_size 32 but the teacher's is 64")
    deep = fx.make_draft(tmp_path / "deep", num_target_layers=8, target_layer_ids=(1, 3, 5))
    err = _refused(capsys, deep, art["target"], art["prompts"], "num_target_layers 8")
    assert "outside the teacher's layers 0..3" in err


@pytest.mark.slow
def test_the_untouched_draft_still_runs_losslessly(art, capsys):
    """The checks refuse only what does not fit: the fixture pair decodes, lossless."""
    rc, out, _ = _cli(capsys, art["draft"], art["target"], art["prompts"])
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1])["lossless"] is True


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("which", ["draft", "target"])
@pytest.mark.parametrize("damage", ["truncated_weights", "header_only", "config_not_json",
                                    "config_binary"])
def test_broken_files_are_one_line(art, tmp_path, capsys, which, damage):
    draft, target = tmp_path / "draft", tmp_path / "target"
    shutil.copytree(art["draft"], draft)
    shutil.copytree(art["target"], target)
    victim = draft if which == "draft" else target
    if damage == "truncated_weights":
        _truncate(victim / "model.safetensors")
        match = "model.safetensors: not a readable safetensors file"
    elif damage == "header_only":
        _truncate(victim / "model.safetensors", keep=0.0001)
        match = "model.safetensors: not a readable safetensors file"
    elif damage == "config_not_json":
        (victim / "config.json").write_text('{"hidden_size": 64,')
        match = "config.json"
    else:
        (victim / "config.json").write_bytes(bytes(range(256)))
        match = "config.json"
    _refused(capsys, draft, target, art["prompts"], match)


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize("ids, match", [
    ([1, 2, fx.VOCAB], "token ids [384] outside the teacher's vocabulary (0..383)"),
    ([1, 2, 10**6], "token ids [1000000] outside"),
    ([-1, 2], "token ids [-1] outside"),
    ([1, 2.7], "must be a list of integer token ids"),
    ([1, True], "must be a list of integer token ids"),
    ("123", "must be a list of integer token ids"),
], ids=["vocab", "huge", "negative", "float", "bool", "string"])
def test_prompt_ids_outside_the_vocab_or_not_ints(art, tmp_path, capsys, ids, match):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps({"input_ids": ids}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: ") as e:
        load_prompts(str(f), None, vocab_size=fx.VOCAB)
    assert match in str(e.value)
    _refused(capsys, art["draft"], art["target"], f, match)


def test_tokenizer_prompts_are_checked_against_the_vocab(tmp_path):
    """Ids from a tokenizer larger than the teacher's vocabulary (a mismatched snapshot)."""
    tok = fx.make_tokenizer()
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "abz"}) + "\n")
    want = tok("abz", add_special_tokens=False)["input_ids"]
    assert load_prompts(str(f), tok, vocab_size=max(want) + 1) == [want]
    with pytest.raises(UserError, match=r"p.jsonl:1: token ids \[%d\] outside" % max(want)):
        load_prompts(str(f), tok, vocab_size=max(want))


@pytest.mark.parametrize("messages, match", [
    ("not a list", "'messages' must be a non-empty list"),
    ([], "'messages' must be a non-empty list"),
    ({"role": "user", "content": "hi"}, "'messages' must be a non-empty list"),
    (["hi"], "message 0 has no string 'role'"),
    ([{"role": "user", "content": 3}], "message 0 (user) has no string 'content'"),
], ids=["string", "empty", "dict", "bare_string_item", "int_content"])
def test_chat_messages_must_be_a_list_of_role_content(tmp_path, messages, match):
    tok = fx.make_tokenizer()
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: ") as e:
        load_prompts(str(f), tok)
    assert match in str(e.value)


def test_a_prompt_chat_needs_no_assistant_turn(tmp_path):
    tok = fx.make_tokenizer()
    msgs = [{"role": "user", "content": "sort a list"}]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert load_prompts(str(f), tok) == [want]


def test_prompts_file_of_random_bytes(art, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")  # the premise: these bytes are not UTF-8 text
    f.write_bytes(data)
    with pytest.raises(UserError, match=r"p.jsonl: not UTF-8 text"):
        load_prompts(str(f), None)
    _refused(capsys, art["draft"], art["target"], f, "not UTF-8 text")
