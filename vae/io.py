"""Building tokenizers by name and saving / loading them as plain files (safetensors + JSON).

    model = build("dvae", codebook_size=512, factor=4)
    save_pretrained(model, "runs/x/vae")      # writes vae.safetensors and vae.json, atomically
    model = load_pretrained("runs/x/vae")     # eval mode, on the CPU; never unpickles anything

A project config with every VAE field maps onto constructor arguments with `model_kwargs(kind, fields)`;
the fields in `SCHEDULE_FIELDS` are training-only and go to `vae.schedules.values_at` instead.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .base import ImageTokenizer, VAEError
from .dvae import DiscreteVAE
from .imported import IMPORTED_KINDS
from .vq import VQ

KINDS: dict[str, type[ImageTokenizer]] = {"dvae": DiscreteVAE, "vq": VQ}
# what a saved tokenizer may be: one trained here, or one converted by `python -m vae.convert` (vae.imported)
LOADABLE_KINDS: dict[str, type[ImageTokenizer]] = {**KINDS, **IMPORTED_KINDS}
FORMAT_VERSION = 1
WEIGHTS_FILE = "vae.safetensors"
CONFIG_FILE = "vae.json"

# config fields read by the training loop each step (vae.schedules), not by the constructor
SCHEDULE_FIELDS = ("temperature_start", "temperature_end", "temperature_steps", "kl_weight", "kl_warmup_steps")
# product-code fields (the dVAE's alone) and the value that switches each off
PRODUCT_CODE_FIELDS = (("group_sizes", []), ("group_dropout", 0.0), ("group_inputs", []))


def constructor_fields(kind: str) -> tuple[str, ...]:
    """Names of the constructor arguments of tokenizer `kind`."""
    return tuple(p for p in inspect.signature(_tokenizer_class(kind).__init__).parameters if p != "self")


def model_kwargs(kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of `kind` picked from a flat config mapping (other kinds' fields ignored)."""
    for name, off in PRODUCT_CODE_FIELDS:
        if fields.get(name) not in (None, off) and name not in constructor_fields(kind):
            raise VAEError(
                f"{name} = {fields[name]} needs the dvae tokenizer (product codes); the {kind} has one group, "
                f'so set vae.{name} = {off!r} (e.g. --set "vae.{name}={off!r}")'
            )
    return {name: fields[name] for name in constructor_fields(kind) if name in fields}


def build(kind: str, **kwargs: Any) -> ImageTokenizer:
    """A fresh tokenizer of `kind` (see LOADABLE_KINDS); unknown kinds and arguments are one-sentence errors."""
    unknown = sorted(set(kwargs) - set(constructor_fields(kind)))
    if unknown:
        raise VAEError(
            f"unknown argument {unknown[0]!r} for the {kind} tokenizer; allowed: {', '.join(constructor_fields(kind))}"
        )
    return LOADABLE_KINDS[kind](**kwargs)


def _tokenizer_class(kind: str) -> type[ImageTokenizer]:
    if kind not in LOADABLE_KINDS:
        raise VAEError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(LOADABLE_KINDS)}")
    return LOADABLE_KINDS[kind]


# the process's umask, read once at import (reading it means setting it, which other threads would race with)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _write_atomic(path: Path, write) -> None:
    """write(tmp), then rename it to `path`, with the mode a new file gets (safetensors writes 0600)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # its own: files.write_atomic
    write(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def save_pretrained(
    model: ImageTokenizer, folder: str | os.PathLike, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `folder/vae.safetensors` (weights and buffers) and `folder/vae.json` (kind, kwargs, version).

    `state` replaces `model.state_dict()` as the weights written (a training run whose model is sharded
    across processes passes the gathered whole weights); the model still gives kind and hyperparameters.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    # clone: safetensors refuses tensors that share storage, and weights may live on an accelerator
    state = {name: t.detach().cpu().clone().contiguous() for name, t in state.items()}
    meta = {"format_version": FORMAT_VERSION, "kind": model.kind, "kwargs": model.hyperparameters()}
    # the weights last: they are what marks the tokenizer done (train.all), so a kill between the two writes
    # leaves it undone, never done without its config
    _write_atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    _write_atomic(folder / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"kind": model.kind}))
    return folder


def read_pretrained_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed, checked `vae.json` of a saved tokenizer: {'format_version', 'kind', 'kwargs'}."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise VAEError(f"tokenizer folder '{folder}' has no {CONFIG_FILE}; save it with vae.save_pretrained")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VAEError(f"'{path}' is not valid JSON ({e}); save the tokenizer again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("kwargs"), dict) or "kind" not in meta:
        raise VAEError(f"'{path}' lacks 'kind' or 'kwargs'; save the tokenizer again with vae.save_pretrained")
    if meta.get("format_version") != FORMAT_VERSION:
        raise VAEError(
            f"'{path}' has format version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "save the tokenizer again with this version of vae"
        )
    return meta


def load_pretrained(folder: str | os.PathLike) -> ImageTokenizer:
    """The tokenizer saved in `folder`, on the CPU, in eval mode; weights read with safetensors only.

    vae.json's settings must build the weights' shapes before any memory is spent on them: a hand-edited
    res_blocks 100000000 is refused from the file's header, not by running out of memory building it.
    """
    meta = read_pretrained_config(folder)
    path, weights = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
    shapes = header_shapes(weights)
    try:
        differs = shape_mismatch(lambda: build(meta["kind"], **meta["kwargs"]), shapes)
        model = build(meta["kind"], **meta["kwargs"]) if differs is None else None
    except VAEError as e:  # a setting out of range: say which file holds it
        raise VAEError(f"'{path}': {e}") from None
    # a hand-edited setting of the wrong type, or sizes no tensor can have (negative, overflowing) or take in memory
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
        raise VAEError(
            f"'{path}' holds settings this code cannot build ({first_line(e)}); save the tokenizer again"
        ) from None
    if differs is not None:
        raise VAEError(
            f"'{path}' does not describe the weights in '{weights}' ({differs}); restore the {CONFIG_FILE} saved "
            "with them, or save the tokenizer again"
        )
    load_weights(model, weights)
    return model.eval()


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a safetensors file, read from its header alone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise VAEError(f"weights file '{path}' does not exist; save the tokenizer with vae.save_pretrained")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, e) from None


class _TooManyTensors(Exception):
    pass


def shape_mismatch(build: Callable[[], torch.nn.Module], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """How the weights of the module `build()` makes differ from a file's (`shapes`: names and shapes, from its
    header), in a phrase naming the first weight that differs; None when they agree.

    The module is built on the meta device, where a tensor has a shape but no memory, so a config asking for a
    billion-row embedding costs nothing to compare. Building its layers still takes time, so a build that
    registers far more tensors than the file holds (a depth of 10**8) is stopped there. Only this thread's
    registrations count: another thread building a model does not stop this one.
    """
    most, seen, me = 2 * len(shapes) + 64, 0, threading.get_ident()

    def count(*_: Any) -> None:
        nonlocal seen
        if threading.get_ident() == me:
            seen += 1
            if seen > most:
                raise _TooManyTensors

    registered = torch.nn.modules.module
    hooks = [registered.register_module_parameter_registration_hook(count)]
    hooks.append(registered.register_module_buffer_registration_hook(count))
    try:
        with torch.device("meta"):
            own = {name: tuple(t.shape) for name, t in build().state_dict().items()}
    except _TooManyTensors:
        return f"these settings build more than the {len(shapes)} tensors the file holds"
    finally:
        for hook in hooks:
            hook.remove()
    for name, shape in own.items():
        if name not in shapes:
            return f"'{name}' is missing from the file"
        if tuple(shapes[name]) != shape:
            return f"'{name}' has shape {tuple(shapes[name])} in the file but {shape} from these settings"
    extra = sorted(set(shapes) - set(own))
    return f"'{extra[0]}' is in the file but not in the model these settings build" if extra else None


def load_weights(model: ImageTokenizer, path: str | os.PathLike) -> ImageTokenizer:
    """Copy a safetensors file into `model` in place; missing, corrupt or mismatched files are VAEErrors."""
    path = Path(path)
    if not path.is_file():
        raise VAEError(f"weights file '{path}' does not exist; save the tokenizer with vae.save_pretrained")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, e) from None
    return copy_state(model, state, f"weights file '{path}'", "load it with the vae.json saved beside it")


def _corrupt(path: Path, e: Exception) -> VAEError:
    return VAEError(f"weights file '{path}' is corrupt or not safetensors ({first_line(e, 80)}); save it again")


def first_line(e: Exception, width: int = 120) -> str:
    """An exception's message as part of one sentence: its first line (torch's run over several), cut to `width`;
    the exception's type where it has none."""
    return str(e).splitlines()[0][:width] if str(e) else type(e).__name__


def copy_state(model: ImageTokenizer, state: dict[str, torch.Tensor], source: str, fix: str) -> ImageTokenizer:
    """Copy tensors into `model` in place; a tensor `source` lacks, has extra or of another shape is a
    one-sentence VAEError ending in `fix`."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise VAEError(f"{source} lacks '{name}', which the {model.kind} tokenizer needs; {fix}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise VAEError(
                f"{source} has '{name}' of shape {tuple(state[name].shape)} where the {model.kind} tokenizer "
                f"needs {tuple(tensor.shape)}; {fix}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise VAEError(f"{source} has '{extra[0]}', which the {model.kind} tokenizer lacks; {fix}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name].to(tensor.dtype))
    return model
