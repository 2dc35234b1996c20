"""Reading a published checkpoint (MMSegmentation / MMDetection / mmengine) with ``weights_only=True``.

Only ``state_dict`` and ``meta`` are needed. An mmengine Runner checkpoint also holds a
``message_hub`` whose objects a weights-only load refuses (mmengine's ``HistoryBuffer``, which
pickles bound methods through ``builtins.getattr``, numpy arrays and scalars). Those globals,
and only those, load as inert placeholders, so nothing of the file runs; a placeholder found in
``state_dict`` or ``meta`` is an error, as is any other global.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from knet_lightning.checkpoint.convert.mapping import ConversionError

__all__ = ["PublishedCheckpoint", "read_published_checkpoint", "sha256_of"]


class _Placeholder:
    """Stands for an object of a published checkpoint that conversion does not read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Placeholder:
        return _Placeholder()


def _placeholder(*args: Any, **kwargs: Any) -> _Placeholder:
    return _Placeholder()


# what mmengine's MessageHub pickles (mmengine/logging/history_buffer.py and numpy)
_INERT_GLOBALS = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "builtins.getattr",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
)


class PublishedCheckpoint:
    """``state_dict`` (name -> tensor) and ``meta`` of a published checkpoint, with its SHA-256."""

    def __init__(self, path: Path, state_dict: dict[str, Tensor], meta: dict[str, Any], sha256: str) -> None:
        self.path = path
        self.state_dict = state_dict
        self.meta = meta
        self.sha256 = sha256

    @property
    def classes(self) -> list[str] | None:
        """The class names the checkpoint was trained with: MMSegmentation 1.x / mmengine
        ``meta.dataset_meta.classes``, MMSegmentation 0.x / MMDetection 2.x ``meta.CLASSES``."""
        dataset_meta = self.meta.get("dataset_meta")
        names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
        names = self.meta.get("CLASSES") if names is None else names
        return None if names is None else [str(n) for n in names]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contains_placeholder(obj: Any) -> bool:
    if isinstance(obj, _Placeholder):
        return True
    if isinstance(obj, Mapping):
        return any(_contains_placeholder(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_contains_placeholder(v) for v in obj)
    return False


def read_published_checkpoint(path: str | Path) -> PublishedCheckpoint:
    """Load ``path`` with ``torch.load(weights_only=True)``.

    Raises:
        ConversionError: the file is missing, truncated, not a torch checkpoint, needs a Python
            object outside the known mmengine bookkeeping, or holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"published checkpoint {path} does not exist")
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConversionError(
            f"published checkpoint {path} is not a readable torch checkpoint (truncated or another format): {err}"
        ) from err
    unknown = sorted(unsafe - set(_INERT_GLOBALS))
    if unknown:
        raise ConversionError(
            f"published checkpoint {path} needs Python objects that a weights-only load refuses: "
            f"{', '.join(unknown)}; expected an MMSegmentation/MMDetection checkpoint (state_dict + meta)"
        )
    inert = [
        (_Placeholder if name.endswith(("HistoryBuffer", "ndarray", "dtype", "DType")) else _placeholder, name)
        for name in sorted(unsafe)
    ]
    try:
        with torch.serialization.safe_globals(inert):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip / pickle / storage errors come in many types
        raise ConversionError(f"published checkpoint {path} could not be loaded: {err}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state, meta = obj["state_dict"], obj.get("meta") or {}
    else:  # a bare state dict, as some releases are
        state, meta = obj, {}
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise ConversionError(
            f"published checkpoint {path}: 'state_dict' must map parameter names to tensors, got {type(state).__name__}"
        )
    if not isinstance(meta, Mapping) or _contains_placeholder(meta):
        raise ConversionError(f"published checkpoint {path}: 'meta' must be a dict of plain values")
    return PublishedCheckpoint(path, dict(state), dict(meta), sha256_of(path))
