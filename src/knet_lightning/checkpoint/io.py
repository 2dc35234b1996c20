"""Checkpoint file IO: atomic writes and safe, well-reported loading.

:class:`SafeCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes every checkpoint to a
temporary file in the same folder, fsyncs it and renames it over the target, so a kill during
the write leaves the previous ``last.ckpt`` intact; it loads with ``weights_only=True`` unless
the user marks the file trusted, and names the file when it is truncated or corrupt. Every
checkpoint it writes carries a BLAKE2b digest of its whole payload (tensor bytes, shapes, dtypes
and plain values), checked on load: a bit flip inside tensor data, which ``torch.load`` cannot
notice, is refused with the file's name. (The README's "Fault tolerance" section says it for
users.)
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from knet_lightning.errors import is_enospc

__all__ = ["CheckpointError", "SafeCheckpointIO", "atomic_torch_save", "load_checkpoint_file", "payload_digest"]

# the key of a checkpoint dict that holds the digest of the rest
CHECKSUM_KEY = "knet_payload_blake2b"
_PLAIN = (bool, int, float, str, bytes, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or holds objects that are not safe to load."""


def _fsync_dir(folder: Path) -> None:
    # the rename is only durable once the folder entry is on disk (POSIX); best effort elsewhere
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def payload_digest(obj: Any) -> str:
    """BLAKE2b (128 bit) of a checkpoint's content: every tensor's path, dtype, shape and bytes,
    and every plain value (numbers, strings) with its path, in a fixed order."""
    h = hashlib.blake2b(digest_size=16)

    def visit(x: Any, path: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if not (path == "" and k == CHECKSUM_KEY):
                    visit(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{path}[{i}]")
        elif isinstance(x, _PLAIN):
            h.update(f"{path}={x!r}|".encode())
        else:  # other objects (trusted files only): their type, not their state
            h.update(f"{path}:{type(x).__qualname__}|".encode())

    visit(obj, "")
    return h.hexdigest()


# below this, a failed write is taken for a full disk even when the error does not say so
# (torch's zip writer reports only "file write failed")
_NEARLY_FULL_BYTES = 64 * 2**20


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or an error it was raised from) is ENOSPC, or a failed write in a
    ``folder`` whose file system has almost no space left."""
    if is_enospc(err):
        return True
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: temporary file in the same
    folder (same file system, so the rename is atomic), flushed and fsynced, then renamed. A
    dict gets :data:`CHECKSUM_KEY`, the :func:`payload_digest` that loading checks."""
    path = Path(path)
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUM_KEY: payload_digest(obj)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and is_disk_full(err, path.parent):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: writing checkpoint {path} failed ({free:.0f} MB free there); "
                f"the previous {path.name}, if any, is unchanged. Free space or move paths.log_dir",
            ) from err
        raise
    _fsync_dir(path.parent)
    # temporary files of writers that were killed mid-write (other pids) are garbage now
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", trusted: bool = False) -> Any:
    """Loads a checkpoint or weight file, with ``weights_only=True`` unless ``trusted``.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, or (untrusted) holds
            objects that ``weights_only`` loading refuses; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write that made it did not finish")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if not trusted and "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects that safe loading (torch.load weights_only=True) refuses: "
                f"{str(err).splitlines()[0]} ... If you trust this file, load it with trusted_checkpoint=true."
            ) from err
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is corrupt: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        # torch's zip reader says "failed finding central directory" for a cut-off file
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or corrupt and cannot be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use an earlier "
            "checkpoint of the run (checkpoints/*.ckpt)"
        ) from err
    # files written elsewhere (published weights, older runs) have no digest to check
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        expected = obj.pop(CHECKSUM_KEY)
        if payload_digest(obj) != expected:
            raise CheckpointError(
                f"checkpoint {path} ({size} bytes) is corrupt: its content does not match the checksum stored "
                "when it was written (a changed byte in the tensor data); use an earlier checkpoint of the run "
                "(checkpoints/*.ckpt)"
            )
    return obj


def checkpoint_entry(path: str | Path, key: str) -> dict[str, Any] | None:
    """The mapping stored under ``key`` in checkpoint ``path`` (None: absent, or a file that does not
    load weights-only); the tensors are memory-mapped, not read, so a large checkpoint costs little.
    For a look before the run loads the checkpoint itself (which reports any error)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not our format: the caller's own loading reports why
        return None
    entry = stored.get(key) if isinstance(stored, dict) else None
    return entry if isinstance(entry, dict) else None


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic local writes and safe, well-reported loading.

    Args:
        trusted: load with ``weights_only=False`` (only for files you trust: unpickling can run
            code). ``trusted_checkpoint`` in the config.
    """

    def __init__(self, trusted: bool = False) -> None:
        super().__init__()
        self.trusted = bool(trusted)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not _is_local(path):  # object stores: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        trusted = self.trusted if weights_only is None else not weights_only
        if map_location is None:
            map_location = lambda storage, loc: storage  # noqa: E731 - Lightning's own default
        return load_checkpoint_file(str(path).removeprefix("file://"), map_location=map_location, trusted=trusted)
