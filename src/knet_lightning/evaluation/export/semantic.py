"""Single-channel PNGs of class ids (:class:`SemanticPNGWriter`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from knet_lightning.evaluation.export.writer import Writer, output_png_name, save_png, to_numpy

__all__ = ["SemanticPNGWriter"]


class SemanticPNGWriter(Writer):
    """Single-channel (mode ``L``) PNGs of class ids: ``out_dir/<stem>.png``.

    Args:
        out_dir: output folder.
        id_map: optional data-set id of each contiguous class (``id_map[c]``, values in
            0..255). With it, contiguous ids are mapped and 255 (void/ignore) becomes 0. Uses:

            - Cityscapes: ``id_map`` = the labelId of each trainId, e.g.
              ``[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]``; the
              PNGs are then what ``cityscapesscripts``' ``evalPixelLevelSemanticLabeling``
              reads, where labelId 0 ("unlabeled") is ignored.
            - ADE20K (reduce-zero-label): ``id_map = list(range(1, 151))``, 0 = "other".

            Without it, the contiguous ids are written as they are (255 stays 255).
    """

    def __init__(self, out_dir: str | Path, id_map: Sequence[int] | None = None, keep_folders: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.keep_folders = keep_folders
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.id_map = None if id_map is None else [int(v) for v in id_map]
        self._lut: np.ndarray | None = None
        if self.id_map is not None:
            if not self.id_map or any(not 0 <= v <= 255 for v in self.id_map):
                raise ValueError(f"SemanticPNGWriter: id_map must be a non-empty list of ids in 0..255, got {id_map}")
            if len(self.id_map) > 255:
                raise ValueError(f"SemanticPNGWriter: id_map has {len(self.id_map)} entries; 255 is the ignore id")
            lut = np.zeros(256, dtype=np.uint8)  # unmapped values are rejected in add(); 255 -> 0
            lut[: len(self.id_map)] = self.id_map
            self._lut = lut
        self.closed = False
        self._written: dict[str, str] = {}  # PNG name -> the file name it came from

    def add(self, file_name: str, sem: Tensor | np.ndarray) -> Path:
        """Write one class map; returns the PNG's path.

        Args:
            file_name: the image's file name (the PNG is ``<stem>.png``, or its path with a
                ``.png`` suffix with ``keep_folders``).
            sem: ``(H, W)`` int contiguous class ids, 255 = void.
        """
        if self.closed:
            raise RuntimeError("SemanticPNGWriter.add: the writer is closed")
        arr = to_numpy(sem)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"SemanticPNGWriter: sem of {file_name!r} must be an (H, W) integer map, got {arr.dtype} {arr.shape}"
            )
        png_name = output_png_name(file_name, self.keep_folders)
        path = self.out_dir / png_name
        if png_name in self._written:
            if self._written[png_name] != str(file_name):
                raise ValueError(
                    f"SemanticPNGWriter: {file_name!r} and {self._written[png_name]!r} would both be written to {path}"
                )
            return path  # a padded repeat (see the docstring of knet_lightning.evaluation.export)
        valid = arr == 255
        if self.id_map is not None:
            valid |= (arr >= 0) & (arr < len(self.id_map))
            what = f"[0, {len(self.id_map)}) (id_map) or 255"
        else:
            valid |= (arr >= 0) & (arr < 255)
            what = "[0, 255]"
        if not bool(valid.all()):
            bad = sorted(set(arr[~valid].tolist()))[:10]
            raise ValueError(f"SemanticPNGWriter: sem of {file_name!r} has class ids {bad} outside {what}")
        out = arr.astype(np.uint8)
        if self._lut is not None:
            out = self._lut[out]
        save_png(Image.fromarray(out), path)  # 2-D uint8 -> mode "L"
        self._written[png_name] = str(file_name)
        return path

    def close(self) -> None:
        """Nothing is buffered; marks the writer closed."""
        self.closed = True
