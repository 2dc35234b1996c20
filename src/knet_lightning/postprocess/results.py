"""What :class:`knet_lightning.Segmenter` returns: one typed result per image.

A :class:`SegmentationResult` holds the task's prediction at the input's original size, the
segments it is made of (:class:`Segment`), the image it was computed on (for overlays) and
the class metadata the checkpoint carried; :meth:`SegmentationResult.to_coco` gives the
official formats, the ones ``mode=eval export_predictions=true`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

__all__ = ["Segment", "SegmentationResult", "SkippedInput"]


@dataclass(frozen=True)
class Segment:
    """One predicted segment.

    Attributes:
        id: its id in :attr:`SegmentationResult.panoptic` (panoptic), its index + 1 in
            ``instances`` (instance) or its class + 1 (semantic).
        label: contiguous class id (0..C-1; the model's classes, things first).
        class_name: the class's name.
        score: the class score (panoptic, instance); None for semantic segments.
        area: pixels at the original image size.
        is_thing: a countable object class (instance) rather than a region (stuff).
    """

    id: int
    label: int
    class_name: str
    score: float | None
    area: int
    is_thing: bool


@dataclass(frozen=True)
class SkippedInput:
    """An input that could not be read; the rest of the batch went on without it."""

    source: str
    reason: str


@dataclass
class SegmentationResult:
    """One image's prediction at its original size.

    Attributes:
        task: ``"panoptic"``, ``"instance"`` or ``"semantic"``.
        segments: the segments, in id order.
        image: uint8 ``(H, W, 3)`` RGB, the input as the model saw it before resizing
            (EXIF orientation applied).
        panoptic: panoptic: int32 ``(H, W)`` segment ids, 0 = void.
        semantic: semantic: int64 ``(H, W)`` class ids, 255 = void; panoptic: the class of
            each segment's pixels (255 = void).
        instances: instance: ``masks`` bool ``(K, H, W)``, ``scores`` ``(K,)``, ``labels``
            ``(K,)``, by descending score.
        source: the input's file name, when it came from a file.
        prediction: the task's own prediction (what ``mode=predict`` writes), on the CPU.
        task_object: the task (:mod:`knet_lightning.tasks`) that draws and exports it.
    """

    task: str
    segments: list[Segment]
    image: np.ndarray
    class_names: list[str]
    isthing: list[bool]
    colors: list[tuple[int, int, int]]
    dataset_ids: list[int]
    panoptic: Tensor | None = None
    semantic: Tensor | None = None
    instances: dict[str, Tensor] | None = None
    source: str | None = None
    prediction: Any = field(default=None, repr=False)
    task_object: Any = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the original image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def overlay(self, legend: bool = True) -> Image.Image:
        """The image with the segments drawn on it and, with ``legend``, a column naming the
        classes present with their colours."""
        image = torch.from_numpy(self.image).permute(2, 0, 1).contiguous()
        drawn = self.task_object.overlay(image, self.prediction, self.colors)
        canvas = Image.fromarray(drawn.permute(1, 2, 0).cpu().numpy())
        if not legend or not self.segments:
            return canvas
        labels = sorted({s.label for s in self.segments})
        row = 14
        width = 12 + max(len(self.class_names[c]) for c in labels) * 7 + 20
        height = max(canvas.height, row * len(labels) + 8)
        out = Image.new("RGB", (canvas.width + width, height), (255, 255, 255))
        out.paste(canvas, (0, 0))
        draw = ImageDraw.Draw(out)
        for k, c in enumerate(labels):
            y = 4 + k * row
            x = canvas.width + 6
            draw.rectangle((x, y + 1, x + 10, y + 11), fill=tuple(self.colors[c]), outline=(0, 0, 0))
            draw.text((x + 16, y), self.class_names[c], fill=(0, 0, 0))
        return out

    def to_coco(self, image_id: int | str = 0, file_name: str | None = None) -> Any:
        """The official formats, with the data set's category ids.

        - panoptic: ``{"file_name": "<stem>.png", "segments_info": [...], "png": PIL image}``
          (COCO panoptic: id = R + 256 G + 256² B; ``segments_info`` with ``id``,
          ``category_id``, ``area``, ``bbox``, ``iscrowd``, ``isthing``, ``score``);
        - instance: COCO results entries ``{"image_id", "category_id", "segmentation" (RLE),
          "bbox", "score"}``;
        - semantic: ``{"file_name": "<stem>.png", "png": PIL image}``, mode ``L`` of the data
          set's class ids (Cityscapes labelIds, ADE20K 1..150), void 0, as the evaluation
          scripts read them.
        """
        stem = Path(file_name or self.source or f"{image_id}.png").stem
        return self.task_object.coco_output(self, image_id, stem)
