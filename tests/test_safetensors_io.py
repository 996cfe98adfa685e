"""model.safetensors_io, the one reader of drafts, the cached target and the trainer's head:
single-file and sharded snapshots, only the requested tensors read, broken files one line.

Oracle: the tensors written with safetensors.numpy.save_file."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from model.errors import CheckpointError, UserError
from model.safetensors_io import read_safetensors, weight_map

RNG = np.random.default_rng(0)
A = {"a": RNG.normal(size=(3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int32)}
B = {"c": RNG.normal(size=(2,)).astype(np.float16)}


def _sharded(d):
    d.mkdir()
    save_file(A, str(d / "model-00001-of-00002.safetensors"))
    save_file(B, str(d / "model-00002-of-00002.safetensors"))
    wmap = {**{k: "model-00001-of-00002.safetensors" for k in A},
            **{k: "model-00002-of-00002.safetensors" for k in B}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return d


def _same(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)


def test_single_file_and_sharded_read_all_or_some(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file({**A, **B}, str(single / "model.safetensors"))
    sharded = _sharded(tmp_path / "sharded")
    for d in (single, sharded):
        _same(read_safetensors(d), {**A, **B})
        _same(read_safetensors(d, ["c", "a", "absent"]), {"a": A["a"], "c": B["c"]})
    assert weight_map(sharded)["c"] == "model-00002-of-00002.safetensors"


def test_only_the_requested_tensors_files_are_read(tmp_path):
    """A truncated second shard does not matter when nothing in it is asked for."""
    d = _sharded(tmp_path / "s")
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    _same(read_safetensors(d, ["a"]), {"a": A["a"]})
    with pytest.raises(CheckpointError, match="00002.safetensors: not a readable safetensors file"):
        read_safetensors(d, ["c"])


@pytest.mark.parametrize("damage", ["truncated", "no_files", "bad_index"])
def test_broken_snapshots_are_one_user_error(tmp_path, damage):
    d = tmp_path / "s"
    d.mkdir()
    if damage == "truncated":
        save_file(A, str(d / "model.safetensors"))
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        match = "model.safetensors: not a readable safetensors file"
    elif damage == "no_files":
        match = "no \\*.safetensors weights"
    else:
        (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
        match = "model.safetensors.index.json: not a safetensors index"
    with pytest.raises(UserError, match=match):
        read_safetensors(d)
