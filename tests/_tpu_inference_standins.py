"""What .venv-tpuinf lacks for tpu-inference's DFlash modules to import on CPU, stood in.

Imported by tests/_tpu_inference_oracle.py before any `tpu_inference` module. Exactly this is
stood in (nothing of it runs on the path the oracle checks):

- `vllm`, `compressed_tensors`, `tokamax`, `qwix`: not installed (vLLM is a CUDA build of GBs;
  tokamax and qwix need Python >= 3.12). tpu_inference imports them at module scope, mostly
  through its vLLM-backend and MoE modules that `models/jax/dflash.py` pulls in
  transitively. Every name under them is an inert placeholder class (subclassable, callable,
  usable as a decorator; `in` is False). The one vLLM object the DFlash code reads at run time,
  `VllmConfig`, is built by the oracle as a plain namespace with the fields it reads.
- `torch.ops.vllm.*`: custom ops vLLM registers on import; looked up at module scope by
  tpu_inference/layers/vllm/ops (placeholder, never called here).
- torchax 0.0.13's AMP table names `aten::prod.dim_Dimname` and `aten::index_copy.dimname`,
  which torch 2.13 (this project's CPU torch) no longer has; those two lookups get a
  placeholder while torchax imports. The AMP table is not used on this path.
- `torchax.default_env()`: weight_utils.load_hf_weights asks for it up front but uses it only
  to convert tensors from a RunAI streamer iterator (not this path: files are read with
  safetensors' flax reader); its op tables do not build against torch 2.13, so it returns a
  placeholder.
The lists of what was actually stood in are in STOOD_IN, and the oracle reports them.
"""
import abc
import importlib.abc
import importlib.machinery
import sys
import types

import torch._ops as _torch_ops

STUBBED_PACKAGES = ("vllm", "compressed_tensors", "tokamax", "qwix")
STOOD_IN = {"modules": [], "torch_ops": []}


class _InertMeta(abc.ABCMeta):
    """Attribute access, indexing, `in`, iteration and `|` on a placeholder stay inert."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)

    def __getitem__(cls, item):
        return cls

    def __contains__(cls, item):
        return False

    def __iter__(cls):
        return iter(())

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class _Inert(metaclass=_InertMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):  # as a decorator: return what it decorates
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Inert()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(name)


def _placeholder(name: str) -> type:
    return _InertMeta(name, (_Inert,), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(name)
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        STOOD_IN["modules"].append(spec.name)
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    sys.meta_path.insert(0, _StubFinder())
    packet_getattr = _torch_ops.OpOverloadPacket.__getattr__
    namespace_getattr = _torch_ops._OpNamespace.__getattr__

    def missing_overload(self, key):
        try:
            return packet_getattr(self, key)
        except AttributeError:
            if key.startswith("__"):
                raise
            STOOD_IN["torch_ops"].append(f"{self._qualified_op_name}.{key}")
            return _placeholder(key)

    def vllm_op(self, op_name):
        try:
            return namespace_getattr(self, op_name)
        except AttributeError:
            if getattr(self, "name", None) != "vllm" or op_name.startswith("__"):
                raise
            STOOD_IN["torch_ops"].append(f"vllm::{op_name}")
            return _placeholder(op_name)

    _torch_ops._OpNamespace.__getattr__ = vllm_op
    _torch_ops.OpOverloadPacket.__getattr__ = missing_overload
    try:
        import torchax  # its AMP table is built at import
    finally:
        _torch_ops.OpOverloadPacket.__getattr__ = packet_getattr
    torchax._env = _placeholder("torchax_default_env")()
    STOOD_IN["torch_ops"].append("torchax.default_env")
