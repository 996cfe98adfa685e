"""The trainer on a corrupt cache: one `error:` line naming the part and the record, exit 2, no
traceback, whether the read failed in a Grain read thread (ArrayRecord) or the step's check of
the feature sums found it (TensorStore features preadv'd into the batch, checked on the device).
Issue 11, item 3; issue 22, item 8.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import encode_record, open_cache, prepare_cache
from tests._train_fixtures import small_run_data

ROOT = Path(__file__).resolve().parents[1]


def _as_tensorstore(src: Path, dest: Path) -> Path:
    """The same records (and teacher) as `src`, dumped by the CacheWriter as TensorStore parts."""
    import dataclasses

    cache = open_cache(src)
    m = dataclasses.replace(cache.manifest, format="tensorstore", parts=(), complete=False,
                            num_records=0)
    prepared = prepare_cache(dest, m)
    for i in range(len(cache)):
        r = cache[i]
        prepared.writer.write(encode_record(r["input_ids"], r["loss_mask"], r["features"]))
    prepared.writer.finish()
    return dest


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _train(data: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.main", "--data", str(data), "--out", str(out),
           "--steps", "6", "--batch-size", "8", "--block-size", "4", "--draft-layers", "1",
           "--anchors-per-seq", "8", "--read-threads", "2", "--save-every", "100",
           "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["arrayrecord", "tensorstore"])
def test_trainer_on_a_corrupt_cache_is_one_line(tmp_path, fmt):
    data = small_run_data(tmp_path)
    if fmt == "tensorstore":
        data = _as_tensorstore(data, tmp_path / "cache_ts")
    cache = open_cache(data)
    k, record = 1, 1  # record 1 of the second part in sequence order (parts hold 2)
    part = Path(data) / cache.parts[k].file
    row_bytes = cache.manifest.feature_dim * 2
    if fmt == "tensorstore":
        _flip(part / "features" / "c" / "0" / "0",
              record * cache.manifest.seq_len * row_bytes + 11)
    else:
        raw = part.read_bytes()
        at = raw.index(cache.read_bytes(cache.parts[0].records + record)[300:364])
        _flip(part, at + 3)
    r = _train(data, tmp_path / "run")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and str(part) in errors[0] and f"record {record} " in errors[0], errors
    assert "corrupted" in errors[0]
    if fmt == "tensorstore":
        # checked on the device by the step (feature sums): the run stops before anything
        # trained on the record is saved or exported
        assert "do not match the feature sums" in errors[0], errors
        assert "without saving, evaluating or exporting" in errors[0], errors
        run = tmp_path / "run"
        assert not (run / "export").exists() and not list(run.glob("checkpoints/*")), \
            sorted(p.name for p in run.rglob("*"))
    else:  # ArrayRecord: riegeli's chunk hash fails the read on the host
        assert "nothing was trained on it" in errors[0], errors
