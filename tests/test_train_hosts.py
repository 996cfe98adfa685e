"""Training beyond one host: two JAX processes (localhost jax.distributed, CPU + gloo) train on
the cache two processes dumped, each reading only its own host's rows; oracle: one process fed
the same global batches. And a TensorStore cache trains exactly like an ArrayRecord one."""
import json

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.dump.run import DumpConfig, run_dump
from tests._dump_fixtures import FakeTeacher
from tests._hosts_fixtures import start_processes, vocab_sequences, wait_all
from tests._train_fixtures import write_teacher_stub

N, T, VOCAB = 24, 32, 128
DUMP = ["--shards", "2", "--seq-len", str(T), "--batch-size", "4", "--commit-every", "8",
        "--layer-ids", "1,2"]
TRAIN = ["--steps", "10", "--batch-size", "8", "--block-size", "4", "--draft-layers", "1",
         "--anchors-per-seq", "8", "--compute-dtype", "float32", "--vocab-chunk", "96",
         "--token-chunk", "64", "--save-every", "10", "--log-every", "1", "--read-threads", "1",
         "--prefetch", "4", "--no-progress"]


def teacher_stub(path):
    """The trainer's teacher stub, with a mask token id inside its vocabulary (the GPT-OSS
    default, 200000, is not)."""
    stub = write_teacher_stub(path, hidden=32, layers=4, vocab=VOCAB, complete=True)
    cfg = json.loads((stub / "config.json").read_text())
    (stub / "config.json").write_text(json.dumps({**cfg, "mask_token_id": VOCAB - 1}))
    return stub


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_stub(tmp_path_factory.mktemp("teacher"))


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]  # training rows; held-out rows carry eval_*


def _check(results):
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    return results


@pytest.mark.slow
def test_two_process_training_equals_one_process_on_the_same_global_batches(tmp_path, teacher):
    cache = tmp_path / "cache"
    _check(wait_all(start_processes("dump", [
        "--fake-n", str(N), "--fake-hidden", "32", "--teacher-path", str(teacher),
        "--fake-vocab", str(VOCAB), "--", *DUMP, "--out", str(cache)])))
    assert open_cache(cache).manifest.hosts == 2

    two = tmp_path / "two"  # 2 processes x 2 CPU devices: mesh data=2 (processes), fsdp=2
    _check(wait_all(start_processes("train", ["--data", str(cache), "--out", str(two), *TRAIN]),
                    timeout=300))
    one = tmp_path / "one"  # 1 process x 4 devices, the same mesh shape and global batches
    _check(wait_all(start_processes("train", ["--emulate", "2", "--data", str(cache), "--out",
                                              str(one), *TRAIN, "--mesh", "data=2,fsdp=2"],
                                    count=1, devices=4), timeout=300))
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == 10 and a[0] != a[-1]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)

    # the checkpoint records the process count: resuming it with one process is refused
    rc, out, err = wait_all(start_processes(
        "train", ["--data", str(cache), "--out", str(two), *TRAIN], count=1, devices=4))[0]
    assert rc == 2 and "saved by 2 JAX process(es)" in err and "Traceback" not in err, err[-2000:]


def _dump(out, fmt, teacher):
    fake = FakeTeacher(32)
    fake.path = str(teacher)
    run_dump(DumpConfig(out=str(out), shards=3, seq_len=T, batch_size=4, commit_every=8,
                        layer_ids=(1, 2), progress=False, model="fake", format=fmt),
             teacher=fake, sequences=vocab_sequences(N, T, VOCAB), log=lambda *_: None)
    return out


def test_tensorstore_and_arrayrecord_caches_give_identical_batches_and_losses(tmp_path, teacher):
    from train.config import TrainConfig
    from pipeline.cache.feature_sums import feature_sums_np
    from train.loader import make_dataset, open_training_cache
    from train.loop import train

    caches = {f: _dump(tmp_path / f, f, teacher) for f in ("arrayrecord", "tensorstore")}
    streams = [iter(make_dataset(open_training_cache(c), global_batch=8, anchors_per_seq=8,
                                 seed=3, read_threads=2)) for c in caches.values()]
    for _ in range(4):  # more than an epoch of 24 sequences
        a, b = (next(s) for s in streams)
        # the TensorStore batch also carries the sums its step checks: those of these features
        sums = b.pop("feature_sums")
        np.testing.assert_array_equal(sums, feature_sums_np(np.asarray(b["features"])))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8),
                                          np.asarray(b[k]).view(np.uint8), k)
    losses = {}
    for fmt, cache in caches.items():
        cfg = TrainConfig.tiny(data=str(cache), out=str(tmp_path / f"run-{fmt}"), steps=5)
        train(cfg)
        losses[fmt] = _losses(tmp_path / f"run-{fmt}")
    assert len(losses["tensorstore"]) == 5
    assert losses["tensorstore"] == losses["arrayrecord"]
