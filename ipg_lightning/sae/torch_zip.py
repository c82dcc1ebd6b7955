"""Read a ``torch.save`` file of tensors without unpickling it.

A ``.pt`` file is a zip archive: ``data.pkl`` describes the object as pickle opcodes, and each
tensor's bytes are in ``data/<key>``. Unpickling runs whatever callables the file names, so a
crafted file can execute code (even ``torch.load(weights_only=True)`` has had such holes). Here the
opcodes are only *parsed* (``pickletools.genops``) and interpreted by a tiny stack machine that
knows dicts, lists, tuples, strings, numbers and tensor storages; any other callable a file names
is refused before anything is built. That covers state dicts as ``torch.save(module.state_dict())``
writes them.
"""

from __future__ import annotations

import math
import pickletools
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
#: Opcodes that push their argument (numbers and strings).
_LITERALS = {"BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING"}


class UnsafeTorchFileError(ValueError):
    """The file names a callable other than those that rebuild tensors and dicts, or is not a torch zip file."""


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    """The tensor a state dict stores; it may not hold more elements than its storage (no stride-0 inflation)."""
    if not all(isinstance(value, int) and value >= 0 for value in (offset, *size, *stride)) or len(size) != len(stride):
        raise UnsafeTorchFileError(f"a tensor with offset {offset}, size {size} and stride {stride} is malformed")
    if math.prod(size) > storage.numel():
        raise UnsafeTorchFileError(f"a tensor of size {tuple(size)} would repeat the {storage.numel()} elements it stores")
    return storage.as_strided(size, stride, offset).clone()


_CALLABLES = {
    ("collections", "OrderedDict"): dict,
    ("builtins", "dict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
}


def read_torch_tensors(path: str | Path) -> Any:
    """The object in a ``torch.save`` zip file, built from plain containers and tensors only.

    Raises :class:`UnsafeTorchFileError` naming the first disallowed callable (nothing is executed).
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UnsafeTorchFileError(f"{path} is not a torch zip file (a legacy or damaged .pt); re-save it with a current torch.save") from None
    with archive:
        names = archive.namelist()
        pickle_name = next((name for name in names if name.endswith("/data.pkl") and name.count("/") == 1), None)
        if pickle_name is None:
            raise UnsafeTorchFileError(f"{path} has no data.pkl: not a file written by torch.save")
        if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):  # torch never compresses: a zip bomb
            raise UnsafeTorchFileError(f"{path} has compressed members, which torch.save never writes; refusing to inflate them")
        prefix = pickle_name[: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and archive.read(byteorder).decode().strip() != "little":
            raise UnsafeTorchFileError(f"{path} was written on a big-endian machine, which is not supported")
        try:
            return _interpret(archive.read(pickle_name), lambda key: archive.read(f"{prefix}data/{key}"), path)
        except UnsafeTorchFileError:
            raise
        except Exception as error:  # a damaged pickle: stack underflow, unknown memo, odd storage length, ...
            raise UnsafeTorchFileError(f"{path} is damaged or not a torch.save state dict ({type(error).__name__}: {error})") from None


def _interpret(data: bytes, storage_bytes: Callable[[str], bytes], path: Path) -> Any:
    """Run the pickle opcodes in ``data`` on a stack of plain values; tensors come from ``storage_bytes(key)``."""
    stack: list[Any] = []
    marks: list[int] = []  # stack heights at each MARK
    memo: dict[int, Any] = {}
    storages: dict[str, torch.Tensor] = {}

    def pop_mark() -> list[Any]:
        index = marks.pop()
        items = stack[index:]
        del stack[index:]
        return items

    for opcode, argument, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
            stack.append({"EMPTY_DICT": {}, "EMPTY_LIST": [], "EMPTY_TUPLE": ()}[name])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in _LITERALS:
            stack.append(argument)
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[argument] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[argument])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "LIST":
            stack.append(pop_mark())
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else pop_mark()
            if name == "SETITEM":
                del stack[-2:]
            stack[-1].update(zip(items[::2], items[1::2], strict=True))
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "GLOBAL":
                module, qualname = argument.split(" ", 1)
            else:
                qualname, module = stack.pop(), stack.pop()
            if module == "torch" and qualname in _STORAGE_DTYPES:
                stack.append(_STORAGE_DTYPES[qualname])
            elif (module, qualname) in _CALLABLES:
                stack.append(_CALLABLES[(module, qualname)])
            else:
                raise UnsafeTorchFileError(f"{path} names {module}.{qualname}, which is not a tensor or a container; refusing to load it")
        elif name == "REDUCE":
            arguments, function = stack.pop(), stack.pop()
            stack.append(function(*arguments))
        elif name == "BUILD":
            stack.pop()  # instance state, e.g. a state dict's ``_metadata``: not needed
        elif name == "BINPERSID":
            kind, dtype, key, _location, numel = stack.pop()
            if kind != "storage" or not isinstance(dtype, torch.dtype):
                raise UnsafeTorchFileError(f"{path} holds a persistent object {kind!r} that is not a tensor storage")
            if key not in storages:
                raw = bytearray(storage_bytes(key))
                storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            stack.append(storages[key][:numel])
        else:
            raise UnsafeTorchFileError(f"{path} uses pickle opcode {name}, which a tensor file does not need; refusing to load it")
    raise UnsafeTorchFileError(f"{path}: data.pkl ended without STOP")
