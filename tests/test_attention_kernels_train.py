"""The trainer's attention choice: TrainConfig.attention ("auto" by default), resolved per
backend and dtype (block-sparse Pallas kernels on TPU/GPU, "xla" on CPU), refused in one line
when unknown or not runnable here."""
import pytest

from pipeline.errors import UserError
from train import main as train_main
from train.config import TrainConfig
from train.step import attention_implementation


def test_default_is_auto_and_resolves_to_xla_on_cpu():
    assert TrainConfig().attention == "auto"
    assert attention_implementation(TrainConfig()) == "xla"
    assert attention_implementation(TrainConfig(attention="dense")) == "dense"


def test_kernel_for_another_backend_is_a_user_error():
    with pytest.raises(UserError, match="pallas_tpu.*runs on tpu, not on cpu"):
        attention_implementation(TrainConfig(attention="pallas_tpu"))


def test_unknown_attention_is_refused_in_one_line(capsys, tmp_path):
    with pytest.raises(ValueError, match="attention must be one of"):
        TrainConfig(attention="splash")
    rc = train_main.main(["--attention", "splash", "--data", str(tmp_path),
                          "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: attention must be one of")
    assert not (tmp_path / "run").exists()
