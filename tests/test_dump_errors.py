"""Bad input to the dump CLI: one `error:` line on stderr, exit 2, and no cache left behind."""
import pytest

from pipeline import teacher_dump
from tests._dump_fixtures import FakeTeacher, fake_sequences

BASE = ["--shards", "2", "--seq-len", "32", "--batch-size", "4", "--commit-every", "8",
        "--no-progress"]


def _run(capsys, argv, sequences=None, n=10):
    seq_len = teacher_dump.parse_args(argv).seq_len
    code = teacher_dump.main(argv, teacher=FakeTeacher(16, num_layers=6),
                             sequences=fake_sequences(n, seq_len) if sequences is None else sequences)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("extra,sequences,expect", [
    (["--layer-ids", "1,6"], None, "unknown layer id(s) [6]: the teacher has 6 layers"),
    (["--layer-ids", "-1"], None, "unknown layer id(s) [-1]"),
    (["--num-layers", "7"], None, "--num-layers 7 exceeds the teacher's 6 layers"),
    (["--seq-len", "8", "--block-size", "8"], None, "is not longer than one draft block"),
    ([], [], "no sequences of 32 tokens in the data"),
    (["--shards", "0"], None, "--shards must be >= 1"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys, extra, sequences, expect):
    out = tmp_path / "cache"
    code, err = _run(capsys, BASE + ["--out", str(out)] + extra, sequences)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _run(capsys, BASE + ["--out", str(blocker / "cache")])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: cannot write the cache to {blocker}")


def test_sequences_of_the_wrong_length_are_refused(tmp_path, capsys):
    code, err = _run(capsys, BASE + ["--out", str(tmp_path)], sequences=fake_sequences(3, 31))
    assert code == 2 and len(err) == 1 and "sequence 0 has 31 tokens, expected --seq-len 32" in err[0]


def test_settings_mismatch_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    args = BASE + ["--out", str(tmp_path)]
    assert _run(capsys, args + ["--layer-ids", "1,3"])[0] == 0
    code, err = _run(capsys, args + ["--layer-ids", "0,5"])
    assert code == 2 and len(err) == 1
    assert "other settings (layer_ids: [1, 3] -> [0, 5])" in err[0] and "--overwrite" in err[0]
    code, err = _run(capsys, args + ["--layer-ids", "0,5", "--overwrite"])
    assert code == 0
    code, err = _run(capsys, args + ["--layer-ids", "0,5"])
    assert code == 0 and "already complete (10 sequences)" in err[0]


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        teacher_dump.parse_args(["--help"])
    assert e.value.code == 0


def test_a_second_dump_on_the_same_cache_is_refused(tmp_path, capsys):
    from pipeline.cache.prepare import lock_cache

    with lock_cache(tmp_path):
        code, err = _run(capsys, BASE + ["--out", str(tmp_path)])
    assert code == 2 and len(err) == 1 and "another dump is writing to" in err[0]
    assert _run(capsys, BASE + ["--out", str(tmp_path)])[0] == 0


def _teacher_with(attention, max_positions=None):
    t = FakeTeacher(16, num_layers=6)
    t.attention = attention
    if max_positions is not None:
        t.config["max_position_embeddings"] = max_positions
    return t


def test_attention_is_recorded_and_a_change_refused(tmp_path, capsys):
    """The attention the teacher runs is part of the cache's settings (its features differ in
    the last bits): resuming with another one is refused."""
    from pipeline.cache import open_cache

    args = BASE + ["--out", str(tmp_path)]
    for attention, expect in [("blocksparse", 0), ("vanilla", 2)]:
        code = teacher_dump.main(args, teacher=_teacher_with(attention),
                                 sequences=fake_sequences(10, 32))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == expect, err
    assert "other settings (attention: 'blocksparse' -> 'vanilla')" in err[0]
    assert open_cache(tmp_path).manifest.settings["attention"] == "blocksparse"


def test_blocksparse_padding_beyond_positions_is_one_line(tmp_path, capsys):
    out = tmp_path / "cache"
    argv = BASE[:2] + ["--seq-len", "520"] + BASE[4:] + ["--out", str(out)]
    code = teacher_dump.main(argv, teacher=_teacher_with("blocksparse", 600),
                             sequences=fake_sequences(4, 520))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seq-len 520 runs as 1024 tokens" in err[0], err
    assert not out.exists() or not any(out.iterdir())
