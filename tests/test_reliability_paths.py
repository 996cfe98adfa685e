"""Issue 22, item 1: a name read from a file (a manifest's or ledger's part names, a safetensors
index's file names) that leads outside its directory is refused in one line, exit != 0, by every
command that reads it; nothing outside is read. The outside target is a valid cache, so a reader
that followed the name would train on it and exit 0 (what the issue saw)."""
import json
import shutil
import sys

import pytest

from tests._reliability_fixtures import assert_hints_are_flags, one_line, run, train_cmd
from tests._train_fixtures import small_run_data, write_teacher_stub


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(cache whose manifest and ledger name ../outside/<part>, the outside copy of the parts)."""
    tmp = tmp_path_factory.mktemp("rel_paths")
    data = small_run_data(tmp, seq_len=32)
    outside = tmp / "outside"
    shutil.copytree(data, outside)
    m = json.loads((data / "manifest.json").read_text())
    for row in m["parts"]:
        (data / row[2]).unlink()
        row[2] = "../outside/" + row[2]
    (data / "manifest.json").write_text(json.dumps(m))
    return data, outside


def test_cache_part_names_outside_the_cache_are_refused(hostile, tmp_path):
    data, _ = hostile
    r = run(train_cmd(data, tmp_path / "run", 2))
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "../outside/shard-00000-of-00002.part-00000.arrayrecord" in line, line
    assert_hints_are_flags(line, "train.main")
    assert not (tmp_path / "run").exists()

    r = run([sys.executable, "-m", "pipeline.cache.verify", str(data), "--no-progress"])
    assert r.returncode == 2 and "not a part of this cache" in one_line(r.stderr)

    # an unfinished dump's ledger is read by verify too
    m = json.loads((data / "manifest.json").read_text())
    (data / "ledger.json").write_text(json.dumps({
        "version": 1, "settings_key": "x", "committed": 4, "complete": False,
        "parts": [[0, 0, "/etc/passwd", 4, 1, 0]]}))
    m["complete"], m["parts"] = False, []
    (data / "manifest.json").write_text(json.dumps(m))
    r = run([sys.executable, "-m", "pipeline.cache.verify", str(data), "--no-progress"])
    assert r.returncode == 2 and "/etc/passwd" in one_line(r.stderr)
    assert_hints_are_flags(one_line(r.stderr), "pipeline.cache.verify")


def test_weights_index_naming_files_outside_the_snapshot_is_refused(tmp_path):
    snap = write_teacher_stub(tmp_path / "teacher")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    first = snap / "model-00001-of-00002.safetensors"
    (tmp_path / "elsewhere").mkdir()
    first.rename(tmp_path / "elsewhere" / first.name)
    index["weight_map"]["model.embed_tokens.weight"] = "../elsewhere/" + first.name
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run([sys.executable, "-m", "pipeline.teacher_dump", "--model", str(snap),
             "--out", str(tmp_path / "cache"), "--seq-len", "64", "--no-progress"])
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "../elsewhere/" in line and "not a file inside" in line, line
    assert not (tmp_path / "cache").exists()
