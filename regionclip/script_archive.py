"""TorchScript archives (OpenAI's CLIP files) read as data, without ``torch.jit.load``.

``torch.jit.load`` runs an archive's ``__setstate__`` methods and cannot be limited to tensors
(``weights_only``); here the pickled module tree is rebuilt from stand-in classes, and each
module's parameters and buffers are taken as its class declares them in the archive's code
files, which are read as text, never compiled or run.
"""
import collections
import io
import pickle
import re
import zipfile
from typing import Dict, List, Optional, Tuple

import torch


def read_script_archive(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, the only format OpenAI released CLIP in, read
    as data: its pickled module tree is rebuilt from stand-in classes (no code of the archive
    runs, as ``torch.jit.load`` would run its ``__setstate__`` methods), and each module's
    parameters and buffers, as its class declares them in the archive's code (read as text),
    are taken under ``state_dict()``'s names."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        declared = _declared_tensors(archive, root)
        module = _ScriptUnpickler(archive, root, path).load()
    state: Dict[str, torch.Tensor] = {}
    _collect_tensors(module, "", declared, state, path)
    return state


class _ScriptObject:
    """Stand-in for a class of a TorchScript archive: keeps the pickled attributes."""

    qualname = ""

    def __setstate__(self, state) -> None:
        self.attributes = state


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool}


def _tensor_from_storage(storage: Tuple[torch.UntypedStorage, torch.dtype], offset: int,
                         size, stride, *_) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 for :meth:`_ScriptUnpickler.persistent_load`'s
    storages (gradient flags and hooks do not matter to a state dict)."""
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


class _ScriptUnpickler(pickle.Unpickler):
    """A TorchScript archive's ``data.pkl``: its classes become :class:`_ScriptObject` types;
    of everything else only tensor rebuilding and plain containers are allowed."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _tensor_from_storage,
                ("collections", "OrderedDict"): collections.OrderedDict,
                ("torch", "device"): torch.device, ("torch", "Size"): torch.Size}

    def __init__(self, archive: zipfile.ZipFile, root: str, path: str):
        super().__init__(io.BytesIO(archive.read(f"{root}/data.pkl")))
        self.archive, self.root, self.path = archive, root, path
        self.classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            return self.classes.setdefault(
                qualname, type(name, (_ScriptObject,), {"qualname": qualname}))
        if module == "torch.jit._pickle":  # build_intlist(x), restore_type_tag(x, t), ...
            return lambda value, *_: value
        if module == "torch" and name in _STORAGE_DTYPES:  # a storage's type: its dtype
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise ValueError(
            f"{self.path} is a TorchScript archive that refers to {qualname}, which a "
            "weights-only archive does not need; it is not loaded. Convert it once, in a "
            "trusted environment, with torch.save(torch.jit.load(path).state_dict(), ...)")

    def persistent_load(self, saved_id) -> Tuple[torch.UntypedStorage, torch.dtype]:
        _, dtype, key, _, _ = saved_id
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else \
            torch.UntypedStorage(0)
        return untyped, dtype


def _declared_tensors(archive: zipfile.ZipFile, root: str) -> Dict[str, Optional[List[str]]]:
    """Class (``__torch__...`` name) -> its ``__parameters__`` and ``__buffers__``, from the
    archive's code files, whose paths are the classes' module names; None for a class whose
    code lists no ``__buffers__`` (older archives): all its tensor attributes are taken."""
    declared: Dict[str, List[str]] = {}
    without_buffers = set()
    code = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")
        for line in archive.read(name).decode("utf-8").splitlines():
            if line.startswith("class "):
                current = module + "." + re.match(r"class ([\w.]+)", line).group(1)
                declared[current] = []
                without_buffers.add(current)
            match = re.match(r"\s+__(parameters|buffers)__ = \[(.*)\]", line)
            if match and declared:
                declared[current] += re.findall(r'"([^"]+)"', match[2])
                if match[1] == "buffers":
                    without_buffers.discard(current)
    return {cls: None if cls in without_buffers else names for cls, names in declared.items()}


def _collect_tensors(module: _ScriptObject, prefix: str,
                     declared: Dict[str, Optional[List[str]]],
                     state: Dict[str, torch.Tensor], path: str) -> None:
    attributes = getattr(module, "attributes", None)
    if not isinstance(attributes, dict):
        raise ValueError(f"{path}: TorchScript class {module.qualname} stores a custom state "
                         "(its own __getstate__), not its attributes; convert it once, in a "
                         "trusted environment, with "
                         "torch.save(torch.jit.load(path).state_dict(), ...)")
    names = declared.get(module.qualname, ())
    for name in attributes if names is None else names:
        if isinstance(attributes.get(name), torch.Tensor):  # an absent bias is None
            state[prefix + name] = attributes[name]
    for name, value in attributes.items():
        if isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", declared, state, path)
