"""--model resolution, JAX set-up (cache, backend errors, mesh shapes), default layer selection."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.teacher import jax_setup, sharding
from pipeline.errors import UserError
from pipeline.teacher.snapshot import hub_cache_dir, resolve_model

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    return root


def test_repo_id_resolves_in_hf_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--openai--gpt-oss-20b"
    _snapshot(repo / "snapshots" / "old")
    pinned = _snapshot(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    assert resolve_model("openai/gpt-oss-20b") == pinned


def test_snapshot_directory_resolves(tmp_path):
    snap = _snapshot(tmp_path / "snap")
    assert resolve_model(str(snap)) == snap.resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_missing_model_names_what_was_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(UserError) as err:
        resolve_model("openai/gpt-oss-20b")
    msg = str(err.value)
    assert "\n" not in msg and "--model tiny" in msg
    assert str(tmp_path / "hf" / "hub" / "models--openai--gpt-oss-20b") in msg
    assert "directory openai/gpt-oss-20b" in msg


def test_axis_dims_parsing_and_defaults():
    assert jax_setup.parse_axis_dims("1,1,1,8,1") == (1, 1, 1, 8, 1)
    assert jax_setup.parse_axis_dims(" 1, -1,1,1,1") == (1, -1, 1, 1, 1)
    for bad in ("1,1,8", "a,1,1,1,1", "1,-1,-1,1,1", "0,1,1,8,1"):
        with pytest.raises(UserError, match="--sharding-axis-dims"):
            jax_setup.parse_axis_dims(bad)
    assert jax_setup.check_axis_dims((2, 1, 1, 4, 1), 8) == (2, 1, 1, 4, 1)
    with pytest.raises(UserError, match="8 device"):
        jax_setup.check_axis_dims((1, 1, 1, 4, 1), 8)
    assert jax_setup.check_axis_dims((1, -1, 1, 1, 1), 8, "tpu") == (1, -1, 1, 1, 1)
    for cpu_bad in ((1, -1, 1, 1, 1), (2, 4, 1, 1, 1), (1, 1, 2, 4, 1)):
        with pytest.raises(UserError, match="XLA:CPU"):
            jax_setup.check_axis_dims(cpu_bad, 8, "cpu")
    assert sharding.default_axis_dims(1, "tpu", 32) == (1, 1, 1, 1, 1)
    assert sharding.default_axis_dims(8, "cpu", 32) == (1, 1, 1, 8, 1)  # no EP on XLA:CPU
    assert sharding.default_axis_dims(8, "tpu", 32) == (1, 8, 1, 1, 1)
    assert sharding.default_axis_dims(8, "tpu", 4) == (1, 1, 1, 8, 1)


def test_compilation_cache_dir_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(jax_setup.CACHE_ENV, raising=False)
    assert jax_setup.compilation_cache_dir() == Path(jax_setup.DEFAULT_CACHE_DIR)
    monkeypatch.setenv(jax_setup.CACHE_ENV, "off")
    assert jax_setup.compilation_cache_dir() is None
    assert jax_setup.compilation_cache_dir(tmp_path) == tmp_path


def _run(code: str, **env):
    full = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture
def restore_jax_cache_config():
    import jax
    from jax._src import compilation_cache

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


def test_compilation_cache_survives_easydel_import(tmp_path, restore_jax_cache_config):
    """Importing easydel points JAX's cache at ~/.cache/ejkernel; ours must still win."""
    import jax
    import jax.numpy as jnp

    from pipeline.teacher.easydel_teacher import _import_easydel

    _import_easydel()
    assert jax_setup.enable_compilation_cache(tmp_path / "jc", min_compile_secs=0) == tmp_path / "jc"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jc")
    jax.jit(lambda x: jnp.sin(x) * 3.5 + 0.25)(jnp.ones(13)).block_until_ready()
    assert any((tmp_path / "jc").iterdir())
    assert jax_setup.enable_compilation_cache("off") is None
    assert not jax.config.jax_enable_compilation_cache


def test_backend_failure_is_one_line():
    code = ("from pipeline.teacher.jax_setup import start_backend\n"
            "from pipeline.errors import UserError\n"
            "try:\n    start_backend()\nexcept UserError as e:\n    print('USERERROR', e)\n")
    proc = _run(code, JAX_PLATFORMS="tpu")  # no TPU here: JAX fails to start its backend
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("USERERROR")]
    assert len(lines) == 1, (proc.stdout, proc.stderr[-2000:])
    assert "accelerator backend could not start" in lines[0] and "JAX_PLATFORMS=cpu" in lines[0]


@pytest.mark.parametrize("num_layers", [4, 12, 24, 36])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_default_layer_ids_follow_reference(num_layers, k):
    from dflash.model import build_target_layer_ids

    from pipeline.teacher.easydel_teacher import Teacher

    fake = Teacher.__new__(Teacher)
    fake.num_layers = num_layers
    assert fake.default_layer_ids(k) == tuple(build_target_layer_ids(num_layers, k))
    if num_layers == 24 and k == 5:
        assert fake.default_layer_ids(k) == (1, 6, 11, 16, 21)  # gpt-oss-20b
