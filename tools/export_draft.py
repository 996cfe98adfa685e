"""Convert a draft checkpoint to the z-lab format (default) or the speculators one.

  python -m tools.export_draft SRC OUT [--config CONFIG] [--dtype bfloat16]
                               [--format z-lab|speculators] [--verifier openai/gpt-oss-20b]
                               [--engine tpu-inference]

SRC is a training run directory (`train.main --out`: its latest committed Orbax checkpoint), a
`model.save_msgpack` file, a bare params msgpack (the seed's draft_params.msgpack, with --config),
or a z-lab or speculators directory (re-export, e.g. to change dtype or format). A z-lab result
loads with `dflash.model.DFlashDraftModel.from_pretrained`, SGLang and vLLM; a speculators one
with `speculators.models.dflash.DFlashDraftModel.from_pretrained` and vLLM (`--verifier` names
the target there). A config the chosen format cannot express is refused before anything is
written. --engine tpu-inference first checks the draft against what vLLM TPU
(tpu-inference 0.32.0) can run (model/engine_support.py): a draft it cannot load or run is
refused, and what it would compute differently (sliding windows, RoPE) is printed as warnings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from model.config import DraftConfig
from model.engine_support import TPU_INFERENCE, tpu_inference_findings
from model.io import FORMATS, CheckpointError, load_config, load_draft, load_msgpack, save_draft
from model.speculators_format import FormatError
from pipeline.errors import UserError


def _is_zlab(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _load_zlab(path: Path, config: DraftConfig | None):
    stored, params = load_draft(path)
    if config is not None and config != stored:
        raise UserError(f"{path}: its config.json differs from --config")
    return stored, params


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "checkpoints").is_dir()


def _load_run_dir(path: Path, config: DraftConfig | None):
    """Params of the run's latest committed checkpoint; config from the run's msgpack snapshot."""
    from train.checkpoint import restore_params_on_host  # jax/orbax only when needed

    if config is None:
        snapshot = path / "draft_params.msgpack"
        if not snapshot.is_file():
            raise UserError(f"{path}: run has no draft_params.msgpack to read its config from; "
                            "pass --config")
        config, _ = load_msgpack(snapshot)
    try:
        step, params = restore_params_on_host(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    print(f"{path}: checkpoint of step {step}", file=sys.stderr)
    return config, params


# (name, matches(path), load(path, config or None) -> (config, params)), tried in order.
LOADERS: list[tuple[str, Callable[[Path], bool], Callable]] = [
    ("training run", _is_run_dir, _load_run_dir),
    ("msgpack", lambda p: p.is_file() and p.suffix == ".msgpack", load_msgpack),
    ("z-lab or speculators", _is_zlab, _load_zlab),
]


def load_params(src, config: DraftConfig | None = None):
    """(config, params) from any checkpoint kind in LOADERS."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    for _, matches, load in LOADERS:
        if matches(src):
            return load(src, config)
    kinds = ", ".join(name for name, _, _ in LOADERS)
    raise UserError(f"{src}: not a draft checkpoint this tool knows ({kinds})")


ENGINES = ("tpu-inference",)


def check_engine(config: DraftConfig, engine: str) -> list[str]:
    """Refuse (UserError) a draft `engine` cannot run; -> warnings of what it runs differently."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r} (expected one of {ENGINES})")
    blocking, divergent = tpu_inference_findings(config)
    if blocking:
        raise UserError(f"{TPU_INFERENCE} cannot run this draft: " + "; ".join(blocking))
    return [f"{TPU_INFERENCE}: {d}" for d in divergent]


def export(src, out, config_path=None, dtype: str | None = None, fmt: str = "z-lab",
           verifier: str | None = None, engine: str | None = None) -> Path:
    """Load SRC (config from config_path when given) and write format `fmt` to OUT; with
    `engine`, refuse first a draft that engine cannot run and warn of what it runs differently."""
    config = load_config(config_path) if config_path else None
    config, params = load_params(src, config)
    if engine is not None:
        for warning in check_engine(config, engine):
            print(f"warning: {warning}", file=sys.stderr)
    return save_draft(out, config, params, dtype=dtype, fmt=fmt, verifier=verifier)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.export_draft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="training run directory, msgpack file, z-lab or speculators "
                    "directory")
    ap.add_argument("out", help="output directory (created)")
    ap.add_argument("--config", help="z-lab config.json (or its directory) for a bare msgpack")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="weight dtype to write (default: as stored)")
    ap.add_argument("--format", choices=FORMATS, default="z-lab", dest="fmt",
                    help="checkpoint format to write (default: z-lab)")
    ap.add_argument("--verifier", default=None,
                    help="speculators format: the target's name or path, stored as its verifier")
    ap.add_argument("--engine", choices=ENGINES, default=None,
                    help="check the draft against this serving engine first: refuse one it "
                    "cannot run, warn of what it computes differently")
    args = ap.parse_args(argv)
    try:
        path = export(args.src, args.out, args.config, args.dtype, args.fmt, args.verifier,
                      args.engine)
    except (UserError, CheckpointError, FormatError, OSError) as e:  # OSError: e.g. OUT is an existing file, disk full
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from pipeline.stderr_filter import install  # XLA:CPU / Grain noise
    install()
    sys.exit(main())
