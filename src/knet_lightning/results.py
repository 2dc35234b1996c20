"""What :class:`knet_lightning.Segmenter` returns: one typed result per image.

A :class:`SegmentationResult` holds the task's prediction at the input's original size, the
segments it is made of (:class:`Segment`), the image it was computed on (for overlays) and
the class metadata the checkpoint carried; :meth:`SegmentationResult.to_coco` gives the
official formats, the ones ``mode=eval export_predictions=true`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from knet_lightning.data.io import id2rgb
from knet_lightning.evaluation.export import segment_areas_and_boxes
from knet_lightning.evaluation.instance import encode_masks

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
    score: Optional[float]
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
    """

    task: str
    segments: list[Segment]
    image: np.ndarray
    class_names: list[str]
    isthing: list[bool]
    colors: list[tuple[int, int, int]]
    dataset_ids: list[int]
    panoptic: Optional[Tensor] = None
    semantic: Optional[Tensor] = None
    instances: Optional[dict[str, Tensor]] = None
    source: Optional[str] = None
    overlay_fn: Any = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the original image."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def overlay(self, legend: bool = True) -> Image.Image:
        """The image with the segments drawn on it and, with ``legend``, a column naming the
        classes present with their colours."""
        drawn = self.overlay_fn(torch.from_numpy(self.image).permute(2, 0, 1).contiguous())
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

    def to_coco(self, image_id: int | str = 0, file_name: Optional[str] = None) -> Any:
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
        if self.task == "panoptic":
            assert self.panoptic is not None
            seg = self.panoptic.cpu().numpy()
            ids = [s.id for s in self.segments]
            areas, boxes = segment_areas_and_boxes(seg, ids)
            info = [
                {"id": s.id, "category_id": self.dataset_ids[s.label], "area": int(a), "bbox": [int(v) for v in b],
                 "iscrowd": 0, "isthing": int(s.is_thing), "score": s.score}  # fmt: skip
                for s, a, b in zip(self.segments, areas, boxes)
                if a > 0
            ]
            return {"file_name": f"{stem}.png", "segments_info": info, "png": Image.fromarray(id2rgb(seg))}
        if self.task == "instance":
            from pycocotools import mask as mask_utils

            assert self.instances is not None
            rles = encode_masks(self.instances["masks"].cpu().numpy())
            boxes = mask_utils.toBbox(rles).tolist() if rles else []
            return [
                {"image_id": image_id, "category_id": self.dataset_ids[int(c)], "segmentation": rle, "bbox": box,
                 "score": float(s)}  # fmt: skip
                for rle, box, c, s in zip(rles, boxes, self.instances["labels"], self.instances["scores"])
            ]
        assert self.semantic is not None
        sem = self.semantic.cpu().numpy()
        lut = np.zeros(256, dtype=np.uint8)
        lut[: len(self.dataset_ids)] = np.asarray(self.dataset_ids, dtype=np.int64).clip(0, 255)
        return {"file_name": f"{stem}.png", "png": Image.fromarray(lut[sem.clip(0, 255).astype(np.uint8)], mode="L")}
