"""Exceptions of the training loop that belong to no other module (data set errors are
:class:`knet_lightning.data.meta.DatasetError`, checkpoint errors
:class:`knet_lightning.checkpoint.io.CheckpointError`)."""

from __future__ import annotations

import errno
import shutil

__all__ = ["NonFiniteLossError", "is_enospc", "summary"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a NaN or infinite loss."""


def summary(err: BaseException, output_dir: str | None = None) -> str:
    """``Type: message`` of the error that stopped a run, for the line printed before the traceback.

    An error raised in a DataLoader worker reaches the main process wrapped: same type, but a
    message that starts with "Caught DatasetError in DataLoader worker process 0" and the
    worker's traceback, the real message last. Here that real message comes first.
    """
    text = str(err)
    if output_dir is not None and "No space left on device" not in text and is_enospc(err):
        # Python's write() error names no file: say where the run writes, and how much is left
        try:
            free = f"{shutil.disk_usage(output_dir).free / 2**20:.0f} MB free there"
        except OSError:
            free = "free space unknown"
        return f"{type(err).__name__}: No space left on device while writing under {output_dir} ({free}): {text}"
    if "Original Traceback (most recent call last)" in text:
        lines = text.rstrip().splitlines()
        # the worker's exception line is the last one at column 0 ("pkg.mod.DatasetError: ...")
        start = max(i for i, line in enumerate(lines) if line and not line[0].isspace())
        name, _, message = " ".join(lines[start:]).partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}"
    return f"{type(err).__name__}: {text}"


def is_enospc(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is ENOSPC (no space left on device)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
