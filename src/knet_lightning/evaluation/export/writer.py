"""What the prediction writers share: the context-manager plumbing (:class:`Writer`), the PNG
names and the image ids they record."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from torch import Tensor

__all__ = ["MAX_PNG_ID", "Writer", "json_image_id", "output_png_name", "save_png", "to_numpy"]

W_ = TypeVar("W_", bound="Writer")

# Largest id a COCO panoptic PNG can hold (24 bits of RGB).
MAX_PNG_ID = (1 << 24) - 1


def to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """A tensor (detached, on the CPU) or an array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def output_png_name(file_name: str | Path, keep_folders: bool = False) -> str:
    """The PNG that an image's prediction is written to: ``<stem>.png``, or with ``keep_folders``
    the image's relative path with a ``.png`` suffix."""
    # data sets: the stem (Cityscapes' "<city>/<stem>_leftImg8bit.png" gives a flat folder, as
    # its evaluation scripts search); mode=predict on a folder tree keeps the subfolders, so
    # that images of one name in two folders stay apart
    path = Path(str(file_name))
    return path.with_suffix(".png").as_posix() if keep_folders else path.stem + ".png"


def save_png(image: Image.Image, path: Path) -> None:
    """Saves ``image`` to ``path``, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def json_image_id(image_id: Any) -> int | str:
    """The image id as the output JSON records it: COCO ids are ints; Cityscapes ids are file
    stems (``cityscapes_panoptic_{split}.json`` uses them too), kept as strings so that the
    predictions refer to the same ids as the ground truth."""
    try:
        return int(image_id)
    except (TypeError, ValueError):
        return str(image_id)


class Writer:
    """Context-manager plumbing shared by the writers."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Stop after an error without finalising the output (default: :meth:`close`)."""
        self.close()

    def __enter__(self: W_) -> W_:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # After an error, do not write a JSON that looks complete but is not.
        if exc_type is None:
            self.close()
        else:
            self.abort()
