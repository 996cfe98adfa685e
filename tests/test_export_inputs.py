"""export_draft on damaged checkpoints: a truncated msgpack / safetensors or a config.json that
is not JSON is one `error:` line and exit 2, and OUT is never created."""
import json

import jax
import numpy as np
import pytest

import model
from model.io import CheckpointError
from tools import export_draft


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_inputs")
    config = model.DraftConfig.tiny()
    params = model.init_draft_params(config, jax.random.key(0))
    model.save_msgpack(d / "d.msgpack", config, params)
    model.save_draft(d / "zlab", config, params)
    (d / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return {"config": config, "params": params, "dir": d}


def _refused(capsys, argv, out, match):
    capsys.readouterr()
    assert export_draft.main([*map(str, argv[:1]), str(out), *map(str, argv[1:])]) == 2
    got, err = capsys.readouterr()
    assert got == "" and not out.exists()  # nothing written, nothing claimed
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines


@pytest.mark.parametrize("where", ["map_header", "config_string", "array_payload", "last_byte"])
def test_truncated_msgpack(draft, tmp_path, capsys, where):
    data = (draft["dir"] / "d.msgpack").read_bytes()
    cut = {"map_header": 1, "config_string": 40, "array_payload": len(data) // 2,
           "last_byte": len(data) - 1}[where]
    src = tmp_path / "t.msgpack"
    src.write_bytes(data[:cut])
    _refused(capsys, [src], tmp_path / "out", "t.msgpack: not a readable msgpack file")
    with pytest.raises(CheckpointError):
        model.load_msgpack(src)
    # a bare params msgpack (the seed's format, config given) truncated the same way
    from flax import serialization
    bare = serialization.to_bytes(draft["params"])
    src.write_bytes(bare[: min(cut, len(bare) - 1)])
    _refused(capsys, [src, "--config", draft["dir"] / "config.json"], tmp_path / "out",
             "not a readable msgpack file")


def test_msgpack_that_is_not_a_dict(tmp_path, capsys, draft):
    from flax import serialization
    src = tmp_path / "n.msgpack"
    src.write_bytes(serialization.msgpack_serialize([1, 2, 3]))
    _refused(capsys, [src, "--config", draft["dir"] / "config.json"], tmp_path / "out",
             "n.msgpack: msgpack holds a list")


def test_the_intact_files_still_export(draft, tmp_path):
    """Oracle for the damaged cases: the same files, whole, export to the same params."""
    for src in (draft["dir"] / "d.msgpack", draft["dir"] / "zlab"):
        assert export_draft.main([str(src), str(tmp_path / src.stem)]) == 0
        config, params = model.load_draft(tmp_path / src.stem)
        assert config == draft["config"]
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(draft["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _zlab_copy(draft, tmp_path):
    import shutil
    src = tmp_path / "zlab"
    shutil.copytree(draft["dir"] / "zlab", src)
    return src


@pytest.mark.parametrize("where", ["header", "tensor_data", "last_byte"])
def test_truncated_safetensors(draft, tmp_path, capsys, where):
    src = _zlab_copy(draft, tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: {"header": 20, "tensor_data": len(data) // 2, "last_byte": len(data) - 1}[where]])
    _refused(capsys, [src], tmp_path / "out", "model.safetensors: not a readable safetensors file")


def test_config_or_index_not_json(draft, tmp_path, capsys):
    src = _zlab_copy(draft, tmp_path)
    (src / "config.json").write_bytes(b"\xff\xfe{not json")
    _refused(capsys, [src], tmp_path / "out", "config.json: not a usable DFlash draft config")
    src = _zlab_copy(draft, tmp_path / "b")
    (src / "model.safetensors.index.json").write_text('{"weight_map": ')
    _refused(capsys, [src], tmp_path / "out", "model.safetensors.index.json: not a safetensors index")
