"""Bad trainer inputs (issue 11, item 4 "train:"): each is one `error:` line on stderr, exit 2, no
traceback and nothing written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._train_fixtures import small_run_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_run_data(tmp_path_factory.mktemp("guard"), seq_len=32)


def _tree(path: Path) -> list:
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else []


def _run_cli(data, out, extra=(), **kw):
    cmd = [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(out),
           "--no-progress", "--steps", "2", "--batch-size", "8", "--draft-layers", "1",
           "--block-size", "4", "--anchors-per-seq", "4"] + list(extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def _assert_one_line(r, msg):
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_bad_train_inputs_are_one_line(data, tmp_path):
    not_object = tmp_path / "list_cache"
    shutil.copytree(data, not_object)
    (not_object / "manifest.json").write_text("[1, 2, 3]")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    cases = [
        (not_object, tmp_path / "o1", [], "holds a JSON list, not an object"),
        (data, a_file, [], "is an existing file"),
        (data, a_file / "run", [], "is under the file"),
        (data, Path("/proc/dflash-run"), [], "under /proc"),
        (data, tmp_path / "o2", ["--block-size", "40"], "--block-size 40 exceeds the cache's "
                                                           "sequence length 32"),
        (data, tmp_path / "o3", ["--lr", "nan"], "lr must be a finite number"),
    ]
    before = _tree(tmp_path)
    for d, out, extra, msg in cases:
        _assert_one_line(_run_cli(d, out, extra), msg)
    assert _tree(tmp_path) == before, "nothing written"
    assert a_file.read_text() == "keep me"
    assert not Path("/proc/dflash-run").exists()


def test_cli_unwritable_out_is_one_line(data, tmp_path):
    """--out inside a directory this user cannot write. Root writes anywhere through
    CAP_DAC_OVERRIDE, so as root the child runs with every capability dropped (setpriv)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    cmd = [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(locked / "run"),
           "--no-progress"]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root's capabilities"
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] + cmd
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _assert_one_line(r, f"cannot write in {locked}")
    assert list(locked.iterdir()) == []


def test_manifest_object_refuses_non_objects(tmp_path):
    from pipeline.errors import UserError
    from train.guard import manifest_object
    p = tmp_path / "manifest.json"
    for text in ("[1]", "3", '"s"', "null"):
        p.write_text(text)
        with pytest.raises(UserError, match="not an object"):
            manifest_object(p)
    p.write_text(json.dumps({"a": 1}))
    assert manifest_object(p) == {"a": 1}
