"""Test set-up: 8 simulated CPU devices and exact float32 matmuls, fixed before jax imports."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def spec_artifacts(tmp_path_factory):
    """Built once per session: the harness tests and the simulated-tau tests decode the same
    target and drafts (training the draft is the slow part)."""
    from tests import _spec_fixtures as fx

    return fx.build_artifacts(tmp_path_factory.mktemp("spec"))
