"""Reading the field's pickled checkpoints (`.pkl`, `.ckpt`, `.pt`) without running any of their code.

A pickle is a program: every class or function it names is looked up and called while loading, so a
checkpoint from the internet can run anything. `load_untrusted` reads one through `torch.load` with a
restricted unpickler whose `find_class` lets through only torch's tensor-rebuilding functions, its
storage and dtype objects, `collections.OrderedDict` and `set`; every other name becomes an `Inert`
stand-in that records the name, arguments and state it is given and runs nothing. A TorchScript archive,
which torch.load would hand to torch.jit.load, is refused. Tensors come back as tensors, nn.Module
objects as stand-ins whose `state` is the module's `__dict__` (`_parameters`, `_modules`, its plain
attributes), which `module_tensors` walks.

Only `vae.convert` uses this module, once per checkpoint; everything else in `vae` loads safetensors.

    checkpoint = load_untrusted("encoder.pkl")           # an Inert stand-in for dall_e.encoder.Encoder
    checkpoint.name                                       # 'dall_e.encoder.Encoder'
    weights = module_tensors(checkpoint)                  # {'blocks.input.w': tensor, ...}
"""

from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from typing import Any

import torch

from .base import VAEError

# torch's functions that turn a storage into a tensor or a parameter; they build tensors and nothing else
TENSOR_REBUILDERS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
    }
)


class Inert:
    """A stand-in for a class or function named in a pickle: it records, never runs.

    Called (the pickle's REDUCE) it keeps the arguments in `args` / `kwargs`; given state (BUILD) it keeps
    it in `state`; filled like a dict or a list (SETITEMS, APPENDS) it keeps `items` / `list`. `name` is
    the dotted name the pickle asked for.
    """

    name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = super().__new__(cls)
        self.args, self.kwargs = args, kwargs
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.list: list[Any] = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


_STAND_INS: dict[str, type[Inert]] = {}


def stand_in(module: str, name: str) -> type[Inert]:
    """The `Inert` subclass that stands for `module.name` (one per name, so stand-ins compare by class)."""
    dotted = f"{module}.{name}"
    if dotted not in _STAND_INS:
        _STAND_INS[dotted] = type(name.split(".")[-1], (Inert,), {"name": dotted, "__module__": __name__})
    return _STAND_INS[dotted]


def _allowed(module: str, name: str) -> Any | None:
    """The real object for the few names a tensor checkpoint needs, or None."""
    if (module, name) in TENSOR_REBUILDERS:
        return getattr(torch._utils, name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):  # a module's buffer-name set
        return {"set": set, "frozenset": frozenset}[name]
    if module == "torch" and not name.startswith("_"):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or value is torch.Size:
            return value
        if isinstance(value, type) and name.endswith("Storage"):  # legacy files name typed storages
            return value
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only `_allowed` names and maps every other one to a stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        real = _allowed(module, name)
        return real if real is not None else stand_in(module, name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# what torch.load takes as `pickle_module`: it uses `.Unpickler` (and `.load` for the legacy format's header)
RESTRICTED_PICKLE = types.SimpleNamespace(__name__="vae.unpickle", Unpickler=RestrictedUnpickler, load=_restricted_load)


def load_untrusted(path: str | os.PathLike) -> Any:
    """The contents of a torch pickle file, tensors on the CPU, with every non-tensor class as a stand-in."""
    if not os.path.isfile(path):
        raise VAEError(f"checkpoint file '{path}' does not exist; pass the path of the downloaded file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
                # torch.load hands such an archive to torch.jit.load, which restores TorchScript code
                raise VAEError(
                    f"'{path}' is a TorchScript archive, not a checkpoint; pass the original checkpoint file"
                )
    try:
        return torch.load(path, map_location="cpu", pickle_module=RESTRICTED_PICKLE, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise VAEError(f"'{path}' is not a readable torch checkpoint ({reason}); download it again") from None


def module_tensors(module: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict of a pickled nn.Module (a stand-in): its parameters and persistent buffers, recursively."""
    state = module.state if isinstance(module, Inert) else None
    if not isinstance(state, dict) or "_modules" not in state:
        raise VAEError(f"'{prefix or 'the checkpoint'}' is not a pickled torch module; is this the right file?")
    skip = set(state.get("_non_persistent_buffers_set") or ())
    tensors: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is not None and name not in skip:
                tensors[prefix + name] = torch.as_tensor(tensor).detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(module_tensors(child, f"{prefix}{name}."))
    return tensors

