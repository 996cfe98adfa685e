"""Bad dump inputs give one `error:` line and leave nothing behind; the data fingerprint covers
the content of exactly the files the reader reads (issue 11, item 4 "dump" and "dump resume").

Oracle: each snapshot is built by hand with one defect; "nothing written" is an empty --out (no
manifest.json, no ledger.json); a pickle that would create a marker file if it were ever loaded.
"""
import json
import pickle

import pytest

from pipeline import teacher_dump
from pipeline.dump.sources import data_identity
from tests._dump_fixtures import FakeTeacher, fake_sequences
from tests._train_fixtures import write_teacher_stub


def _dump(capsys, argv, n=4, seq_len=None, teacher=None):
    seq_len = seq_len or teacher_dump.parse_args(argv).seq_len
    code = teacher_dump.main(argv + ["--no-progress"], teacher=teacher,
                             sequences=fake_sequences(n, seq_len))
    return code, capsys.readouterr().err.strip().splitlines()


def _assert_refused(code, err, out, expect):
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


class _Boom:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _snapshot(tmp_path, defect: str):
    snap = write_teacher_stub(tmp_path / "teacher")
    cfg_path = snap / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if defect == "max_positions":
        cfg["max_position_embeddings"] = 1024  # the tiny teacher's; default --seq-len is 3072
        cfg_path.write_text(json.dumps(cfg))
    elif defect == "not_json":
        cfg_path.write_text('{"model_type": "gpt_oss", "hidden_size": 32,,')
    elif defect == "not_object":
        cfg_path.write_text("[1, 2]")
    elif defect == "other_model":
        cfg_path.write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    elif defect == "no_layers":
        del cfg["num_hidden_layers"]
        cfg_path.write_text(json.dumps(cfg))
    elif defect in ("no_weights", "pickle_only"):
        for f in list(snap.glob("*.safetensors")) + [snap / "model.safetensors.index.json"]:
            f.unlink()
        if defect == "pickle_only":
            (snap / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(tmp_path / "LOADED")))
    elif defect == "missing_shard":
        (snap / "model-00002-of-00002.safetensors").unlink()
    return snap


@pytest.mark.parametrize("defect,extra,expect", [
    ("max_positions", [], "--seq-len 3072 exceeds the teacher's max_position_embeddings 1024"),
    ("not_json", ["--seq-len", "32"], "config.json is not valid JSON"),
    ("not_object", ["--seq-len", "32"], "config.json is not a JSON object"),
    ("other_model", ["--seq-len", "32"], "model_type 'bert' is not gpt_oss"),
    ("no_layers", ["--seq-len", "32"], "num_hidden_layers is None, expected a positive integer"),
    ("no_weights", ["--seq-len", "32"], "has no weights (no *.safetensors file)"),
    ("pickle_only", ["--seq-len", "32"], "holds only pickled weights (pytorch_model.bin)"),
    ("missing_shard", ["--seq-len", "32"], "model-00002-of-00002.safetensors"),
])
def test_bad_teacher_snapshot_is_one_line_and_writes_nothing(tmp_path, capsys, defect, extra,
                                                             expect):
    snap = _snapshot(tmp_path, defect)
    out = tmp_path / "cache"
    code, err = _dump(capsys, ["--model", str(snap), "--out", str(out), "--shards", "2"] + extra)
    _assert_refused(code, err, out, expect)
    assert not (tmp_path / "LOADED").exists()  # no pickle was ever unpickled


def test_teacher_load_refuses_a_pickle_only_snapshot(tmp_path):
    """The teacher itself (spec decode, training checks) validates before EasyDeL sees a file."""
    from pipeline.errors import UserError
    from pipeline.teacher.easydel_teacher import Teacher
    snap = _snapshot(tmp_path, "pickle_only")
    with pytest.raises(UserError, match="holds only pickled weights"):
        Teacher.from_pretrained(str(snap))
    assert not (tmp_path / "LOADED").exists()


@pytest.mark.parametrize("ids,expect", [
    ("1,1,2", "--layer-ids repeats layer(s) [1]"),
    ("2,7", "unknown layer id(s) [7]: the teacher has 6 layers"),
])
def test_bad_layer_ids_are_refused(tmp_path, capsys, ids, expect):
    out = tmp_path / "cache"
    code, err = _dump(capsys, ["--out", str(out), "--shards", "2", "--seq-len", "32",
                               "--layer-ids", ids, "--model", "fake"], teacher=FakeTeacher(16))
    _assert_refused(code, err, out, expect)


def test_fingerprint_counts_only_files_the_reader_reads(tmp_path):
    data = tmp_path / "data"
    (data / "__pycache__").mkdir(parents=True)
    (data / "a.py").write_text("print('hello world')\n")
    (data / "notes.md").write_text("not read: not a data file type\n")
    (data / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0" * 64)
    ident = data_identity(str(data))
    assert ident["files"] == 1
    (data / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\1" * 99)
    (data / "notes.md").write_text("changed")
    assert data_identity(str(data)) == ident  # what the reader does not read changes nothing


def test_fingerprint_sees_a_same_size_edit(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "the cat sat on the mat"}\n')
    before = data_identity(str(f))
    f.write_text('{"text": "the dog sat on the mat"}\n')  # same size, other content
    assert data_identity(str(f))["fingerprint"] != before["fingerprint"]


def test_resume_after_a_same_size_data_edit_is_refused(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("alpha beta gamma\n")
    out = tmp_path / "cache"
    args = ["--out", str(out), "--shards", "2", "--seq-len", "32", "--batch-size", "4",
            "--commit-every", "8", "--layer-ids", "1,3", "--model", "fake", "--data", str(data)]
    assert _dump(capsys, args, n=12, teacher=FakeTeacher(16))[0] == 0
    data.write_text("alpha zeta gamma\n")  # same size
    code, err = _dump(capsys, args, n=12, teacher=FakeTeacher(16))
    assert code == 2 and len(err) == 1 and "other settings (data:" in err[0], err
