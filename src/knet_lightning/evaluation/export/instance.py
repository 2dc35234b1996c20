"""COCO instance-segmentation results, a JSON list of RLE masks (:class:`COCOResultsWriter`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from knet_lightning.data.meta import ClassInfo
from knet_lightning.evaluation.export.writer import Writer, json_image_id, to_numpy
from knet_lightning.evaluation.instance import encode_masks

__all__ = ["COCOResultsWriter"]


class COCOResultsWriter(Writer):
    """COCO instance-segmentation results JSON (a list), streamed to ``out_path``.

    Each entry: ``image_id``, ``category_id`` (the data set's id), ``segmentation`` (RLE,
    ``str`` counts), ``score`` and, with ``with_bbox``, ``bbox`` (``pycocotools.mask.toBbox``
    of the mask, so the file also serves box AP). Load with
    ``COCO(gt_json).loadRes(str(out_path))``. The file is a valid JSON list only after
    :meth:`close` (or leaving the ``with`` block).

    Caveat for mask AP: when entries have a ``bbox``, ``COCO.loadRes`` sets each result's
    ``area`` to the BOX area, which moves detections between the small/medium/large ranges
    (overall AP is unaffected). detectron2 and mmdet drop ``bbox`` before a ``segm``
    evaluation; do the same, or write with ``with_bbox=False``, to get the numbers of
    :class:`knet_lightning.evaluation.instance.MaskAP` (mask areas).
    """

    def __init__(self, out_path: str | Path, class_info: ClassInfo, with_bbox: bool = True) -> None:
        self.out_path = Path(out_path)
        self.class_info = class_info
        self.with_bbox = with_bbox
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.out_path, "w", encoding="utf-8")
        self._file.write("[")
        self.num_entries = 0
        self._seen: set[int | str] = set()

    @property
    def closed(self) -> bool:
        return self._file is None

    def add(
        self,
        image_id: int | str,
        masks: Tensor | np.ndarray,
        scores: Tensor | np.ndarray | Sequence[float],
        labels: Tensor | np.ndarray | Sequence[int],
    ) -> None:
        """Append one image's detections.

        Args:
            image_id: the data set's image id (a repeat is ignored).
            masks: ``(K, H, W)`` bool masks at the original image size.
            scores: ``(K,)`` scores.
            labels: ``(K,)`` contiguous class ids.
        """
        from pycocotools import mask as mask_utils

        if self._file is None:
            raise RuntimeError(f"COCOResultsWriter.add: {self.out_path} is closed")
        image_id = json_image_id(image_id)
        if image_id in self._seen:
            return  # a padded repeat (see the docstring of knet_lightning.evaluation.export)
        masks_np = to_numpy(masks)
        scores_l = [float(s) for s in to_numpy(torch.as_tensor(scores)).reshape(-1)]
        labels_l = [int(c) for c in to_numpy(torch.as_tensor(labels)).reshape(-1)]
        if masks_np.ndim != 3 or not (len(scores_l) == len(labels_l) == masks_np.shape[0]):
            raise ValueError(
                f"COCOResultsWriter: image {image_id}: masks must be (K, H, W) with K scores and labels, got "
                f"masks {masks_np.shape}, {len(scores_l)} scores, {len(labels_l)} labels"
            )
        try:
            cats = [self.class_info.dataset_id(c) for c in labels_l]
        except IndexError as err:
            raise ValueError(f"COCOResultsWriter: image {image_id}: {err}") from None
        self._seen.add(image_id)
        rles = encode_masks(masks_np)
        boxes = mask_utils.toBbox(rles).tolist() if rles else []
        for rle, box, score, cat in zip(rles, boxes, scores_l, cats):
            entry: dict[str, Any] = {"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score}
            if self.with_bbox:
                entry["bbox"] = box
            self._file.write(("," if self.num_entries else "") + "\n" + json.dumps(entry))
            self.num_entries += 1

    def abort(self) -> None:
        """Close the file without terminating the JSON list (it stays invalid)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Terminate the JSON list and close the file (idempotent)."""
        if self._file is None:
            return
        self._file.write("\n]\n")
        self._file.close()
        self._file = None
