"""Streaming writers of predictions in the official formats.

Each writer writes its files as images arrive; what stays in memory is small per image
(segment lists), never a full-resolution mask:

- :class:`COCOPanopticWriter`: COCO panoptic PNGs (RGB-encoded ids) + ``panoptic.json``, the
  format ``panopticapi.evaluation.pq_compute`` reads (also Cityscapes' panoptic evaluation,
  which uses the same format).
- :class:`COCOResultsWriter`: a COCO results JSON list (RLE masks), for ``COCO.loadRes`` /
  ``COCOeval(iouType="segm")``; entries are written to disk one by one.
- :class:`SemanticPNGWriter`: single-channel PNGs of class ids, optionally mapped to the
  data set's ids (e.g. Cityscapes labelIds for ``cityscapesscripts``' evaluation).

Which writer a run uses is its task's choice (:meth:`knet_lightning.tasks.SegmentationTask.open_writer`).

A repeated ``image_id`` is written once: ``DistributedSampler`` pads the last batch by
repeating samples, and a second copy would count twice in the official evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from knet_lightning.data.io import id2rgb
from knet_lightning.data.meta import ClassInfo
from knet_lightning.evaluation.instance import encode_masks

__all__ = [
    "COCOPanopticWriter",
    "COCOResultsWriter",
    "SemanticPNGWriter",
    "segment_areas_and_boxes",
]

_W = TypeVar("_W", bound="_Writer")

# Largest id a COCO panoptic PNG can hold (24 bits of RGB).
_MAX_PNG_ID = (1 << 24) - 1


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _png_name(file_name: str | Path, keep_folders: bool = False) -> str:
    # data sets: the stem (Cityscapes' "<city>/<stem>_leftImg8bit.png" gives a flat folder, as
    # its evaluation scripts search); mode=predict on a folder tree keeps the subfolders, so
    # that images of one name in two folders stay apart
    path = Path(str(file_name))
    return path.with_suffix(".png").as_posix() if keep_folders else path.stem + ".png"


def _save_png(image: Image.Image, path: Path) -> None:
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


def segment_areas_and_boxes(seg: Tensor | np.ndarray, ids: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Pixel area and COCO box of each listed segment of an id map, in one pass.

    Args:
        seg: ``(H, W)`` integer segment ids.
        ids: the segment ids wanted (``K`` of them).

    Returns:
        ``areas`` (``K`` ints) and ``boxes`` (``K`` lists ``[x, y, w, h]``, ints, with
        ``w = x_max - x_min + 1`` as ``pycocotools.mask.toBbox``; ``[0, 0, 0, 0]`` for an
        absent id).
    """
    seg_t = torch.as_tensor(seg).long()
    if seg_t.dim() != 2:
        raise ValueError(f"segment_areas_and_boxes: seg must be (H, W), got shape {tuple(seg_t.shape)}")
    if len(ids) == 0:
        return [], []
    height, width = seg_t.shape
    ids_t = torch.as_tensor(list(ids), dtype=torch.long, device=seg_t.device)
    # Index of each pixel's id in `ids` (len(ids) = not listed), via a sorted search.
    sorted_ids, perm = ids_t.sort()
    flat = seg_t.flatten()
    pos = torch.searchsorted(sorted_ids, flat).clamp(max=len(ids) - 1)
    index = torch.where(sorted_ids[pos] == flat, perm[pos], torch.full_like(pos, len(ids)))
    n = len(ids) + 1
    areas = torch.bincount(index, minlength=n)[:-1]
    ys = torch.arange(height, device=seg_t.device).repeat_interleave(width)
    xs = torch.arange(width, device=seg_t.device).repeat(height)
    big = max(height, width)
    bounds = []
    for coord in (xs, ys):
        lo = torch.full((n,), big, dtype=torch.long, device=seg_t.device).scatter_reduce(0, index, coord, "amin")
        hi = torch.full((n,), -1, dtype=torch.long, device=seg_t.device).scatter_reduce(0, index, coord, "amax")
        bounds.append((lo[:-1], hi[:-1]))
    (x0, x1), (y0, y1) = bounds
    present = areas > 0
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dim=1)
    boxes = torch.where(present[:, None], boxes, torch.zeros_like(boxes))
    return areas.tolist(), boxes.tolist()


class _Writer:
    """Context-manager plumbing shared by the writers."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Stop after an error without finalising the output (default: :meth:`close`)."""
        self.close()

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # After an error, do not write a JSON that looks complete but is not.
        if exc_type is None:
            self.close()
        else:
            self.abort()


class COCOPanopticWriter(_Writer):
    """COCO panoptic predictions: ``out_dir/panoptic/<stem>.png`` + ``out_dir/panoptic.json``.

    The JSON holds ``annotations`` (per image ``image_id``, ``file_name`` (the PNG) and
    ``segments_info`` with ``id``, ``category_id`` (the data set's id, from
    ``class_info.dataset_id``), ``area``, ``bbox``, ``iscrowd: 0``, plus ``isthing`` and
    ``score`` when known), ``categories`` (from ``class_info``) and ``images`` (``id``,
    ``file_name``, ``height``, ``width``), so the output is also a valid COCO panoptic data
    set for :class:`knet_lightning.data.coco.COCOPanopticDataset`.

    Evaluate with ``panopticapi.evaluation.pq_compute(gt_json, pred_json=out_dir /
    "panoptic.json", gt_folder, pred_folder=out_dir / "panoptic")``.
    """

    def __init__(
        self, out_dir: str | Path, class_info: ClassInfo, json_name: str = "panoptic.json", keep_folders: bool = False
    ) -> None:
        self.out_dir = Path(out_dir)
        self.keep_folders = keep_folders
        self.png_dir = self.out_dir / "panoptic"
        self.json_path = self.out_dir / json_name
        self.class_info = class_info
        self.png_dir.mkdir(parents=True, exist_ok=True)
        self.annotations: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self._file_of_id: dict[int | str, str] = {}
        self._id_of_png: dict[str, int | str] = {}
        self.closed = False

    def add(
        self,
        image_id: int | str,
        file_name: str,
        pan_seg: Tensor | np.ndarray,
        segments_info: Sequence[Mapping[str, Any]],
    ) -> None:
        """Write one image's PNG and record its annotation.

        Args:
            image_id: the data set's image id.
            file_name: the image's file name (the PNG is ``<stem>.png``, or its path with a
                ``.png`` suffix with ``keep_folders``).
            pan_seg: ``(H, W)`` integer segment ids at the original size, 0 = void.
            segments_info: dicts with ``id`` and ``category_id`` (contiguous) for every
                non-zero id in ``pan_seg`` (``isthing``/``score`` are kept if present).
                Listed segments without pixels are dropped (``pq_compute`` rejects them).
        """
        if self.closed:
            raise RuntimeError("COCOPanopticWriter.add: the writer is closed")
        image_id = json_image_id(image_id)
        png_name = _png_name(file_name, self.keep_folders)
        if image_id in self._file_of_id:
            if self._file_of_id[image_id] != str(file_name):
                raise ValueError(
                    f"COCOPanopticWriter: image_id {image_id} added for {self._file_of_id[image_id]!r} "
                    f"and again for {file_name!r}"
                )
            return  # a padded repeat (see the module docstring)
        if png_name in self._id_of_png:
            raise ValueError(
                f"COCOPanopticWriter: {file_name!r} (image {image_id}) and image {self._id_of_png[png_name]} "
                f"would both be written to {self.png_dir / png_name}"
            )
        seg = _to_numpy(pan_seg)
        if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
            raise ValueError(
                f"COCOPanopticWriter: pan_seg of {file_name!r} must be an (H, W) integer map, got "
                f"{seg.dtype} {seg.shape}"
            )
        ids, cats = [], []
        for k, s in enumerate(segments_info):
            if "id" not in s or "category_id" not in s:
                raise ValueError(
                    f"COCOPanopticWriter: segments_info[{k}] of {file_name!r} needs 'id' and 'category_id'"
                )
            ids.append(int(s["id"]))
            cats.append(int(s["category_id"]))
        if len(set(ids)) != len(ids) or any(not 0 < i <= _MAX_PNG_ID for i in ids):
            raise ValueError(
                f"COCOPanopticWriter: segment ids of {file_name!r} must be distinct and in [1, 2^24), got {ids}"
            )
        present = np.unique(seg)
        unlisted = sorted(set(present.tolist()) - set(ids) - {0})
        if unlisted:
            raise ValueError(
                f"COCOPanopticWriter: pan_seg of {file_name!r} has segment ids {unlisted} missing from segments_info"
            )
        areas, boxes = segment_areas_and_boxes(seg, ids)
        segments = []
        for s, seg_id, cat, area, box in zip(segments_info, ids, cats, areas, boxes):
            if area == 0:
                continue
            try:
                dataset_cat = self.class_info.dataset_id(cat)
            except IndexError as err:
                raise ValueError(f"COCOPanopticWriter: segment {seg_id} of {file_name!r}: {err}") from None
            entry: dict[str, Any] = {
                "id": seg_id,
                "category_id": dataset_cat,
                "area": int(area),
                "bbox": [int(v) for v in box],
                "iscrowd": 0,
                "isthing": int(bool(s.get("isthing", self.class_info.isthing[cat]))),
            }
            if "score" in s:
                entry["score"] = float(s["score"])
            segments.append(entry)
        _save_png(Image.fromarray(id2rgb(seg)), self.png_dir / png_name)
        self._file_of_id[image_id] = str(file_name)
        self._id_of_png[png_name] = image_id
        self.images.append(
            {"id": image_id, "file_name": str(file_name), "height": int(seg.shape[0]), "width": int(seg.shape[1])}
        )
        self.annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})

    def categories(self) -> list[dict[str, Any]]:
        """COCO panoptic ``categories`` of ``class_info`` (data-set ids)."""
        ci = self.class_info
        return [
            {"id": ci.dataset_ids[c], "name": ci.names[c], "isthing": int(ci.isthing[c]), "color": list(ci.colors[c])}
            for c in range(ci.num_classes)
        ]

    def abort(self) -> None:
        """Stop without writing ``panoptic.json``."""
        self.closed = True

    def close(self) -> None:
        """Write ``panoptic.json`` (idempotent)."""
        if self.closed:
            return
        data = {"images": self.images, "annotations": self.annotations, "categories": self.categories()}
        self.json_path.write_text(json.dumps(data))
        self.closed = True


class COCOResultsWriter(_Writer):
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
            return  # a padded repeat (see the module docstring)
        masks_np = _to_numpy(masks)
        scores_l = [float(s) for s in _to_numpy(torch.as_tensor(scores)).reshape(-1)]
        labels_l = [int(c) for c in _to_numpy(torch.as_tensor(labels)).reshape(-1)]
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


class SemanticPNGWriter(_Writer):
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
        arr = _to_numpy(sem)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"SemanticPNGWriter: sem of {file_name!r} must be an (H, W) integer map, got {arr.dtype} {arr.shape}"
            )
        png_name = _png_name(file_name, self.keep_folders)
        path = self.out_dir / png_name
        if png_name in self._written:
            if self._written[png_name] != str(file_name):
                raise ValueError(
                    f"SemanticPNGWriter: {file_name!r} and {self._written[png_name]!r} would both be written to {path}"
                )
            return path  # a padded repeat (see the module docstring)
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
        _save_png(Image.fromarray(out), path)  # 2-D uint8 -> mode "L"
        self._written[png_name] = str(file_name)
        return path

    def close(self) -> None:
        """Nothing is buffered; marks the writer closed."""
        self.closed = True
