"""COCO panoptic predictions: PNGs of RGB-encoded segment ids and ``panoptic.json``
(:class:`COCOPanopticWriter`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from knet_lightning.data.io import id2rgb
from knet_lightning.data.meta import ClassInfo
from knet_lightning.evaluation.export.writer import (
    MAX_PNG_ID,
    Writer,
    json_image_id,
    output_png_name,
    save_png,
    to_numpy,
)

__all__ = ["COCOPanopticWriter", "segment_areas_and_boxes"]


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


def _segment_ids_and_classes(
    file_name: str, seg: np.ndarray, segments_info: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[int]]:
    """``id`` and ``category_id`` of each listed segment, checked: distinct ids in ``[1, 2^24)``
    and every non-zero id of ``seg`` listed."""
    ids, cats = [], []
    for k, s in enumerate(segments_info):
        if "id" not in s or "category_id" not in s:
            raise ValueError(f"COCOPanopticWriter: segments_info[{k}] of {file_name!r} needs 'id' and 'category_id'")
        ids.append(int(s["id"]))
        cats.append(int(s["category_id"]))
    if len(set(ids)) != len(ids) or any(not 0 < i <= MAX_PNG_ID for i in ids):
        raise ValueError(
            f"COCOPanopticWriter: segment ids of {file_name!r} must be distinct and in [1, 2^24), got {ids}"
        )
    present = np.unique(seg)
    unlisted = sorted(set(present.tolist()) - set(ids) - {0})
    if unlisted:
        raise ValueError(
            f"COCOPanopticWriter: pan_seg of {file_name!r} has segment ids {unlisted} missing from segments_info"
        )
    return ids, cats


class COCOPanopticWriter(Writer):
    """COCO panoptic predictions: ``out_dir/panoptic/<stem>.png`` + ``out_dir/panoptic.json``.

    The JSON holds ``annotations`` (per image ``image_id``, ``file_name`` (the PNG) and
    ``segments_info`` with ``id``, ``category_id`` (the data set's id, from
    ``class_info.dataset_id``), ``area``, ``bbox``, ``iscrowd: 0``, plus ``isthing`` and
    ``score`` when known), ``categories`` (from ``class_info``) and ``images`` (``id``,
    ``file_name``, ``height``, ``width``), so the output is also a valid COCO panoptic data
    set for :class:`knet_lightning.data.coco.COCOPanopticDataset`.

    Evaluate with ``panopticapi.evaluation.pq_compute(gt_json, pred_json=out_dir /
    "panoptic.json", gt_folder, pred_folder=out_dir / "panoptic")``.

    The annotations are streamed to ``<json>.part`` as they come and the JSON is assembled from it
    by :meth:`close` (then the part file goes): memory stays flat over any number of images but for
    one short line per image (``images``) and the repeat check.
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
        # one JSON line per annotation, on disk; the images' entries as compact JSON text
        self._part_path = self.json_path.with_name(self.json_path.name + ".part")
        self._part: IO[str] | None = open(self._part_path, "w", encoding="utf-8")
        self._images: list[str] = []
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
        png_name = output_png_name(file_name, self.keep_folders)
        if self._is_repeat(image_id, file_name, png_name):
            return  # a padded repeat (see the docstring of knet_lightning.evaluation.export)
        seg = to_numpy(pan_seg)
        if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
            raise ValueError(
                f"COCOPanopticWriter: pan_seg of {file_name!r} must be an (H, W) integer map, got "
                f"{seg.dtype} {seg.shape}"
            )
        ids, cats = _segment_ids_and_classes(file_name, seg, segments_info)
        segments = self._segment_entries(file_name, seg, segments_info, ids, cats)
        save_png(Image.fromarray(id2rgb(seg)), self.png_dir / png_name)
        self._file_of_id[image_id] = str(file_name)
        self._id_of_png[png_name] = image_id
        image = {"id": image_id, "file_name": str(file_name), "height": int(seg.shape[0]), "width": int(seg.shape[1])}
        self._images.append(json.dumps(image))
        assert self._part is not None
        self._part.write(json.dumps({"image_id": image_id, "file_name": png_name, "segments_info": segments}) + "\n")

    def _is_repeat(self, image_id: int | str, file_name: str, png_name: str) -> bool:
        """Whether ``image_id`` was added already for ``file_name`` (a padded repeat).

        Raises:
            ValueError: the id was added for another file, or another image has the PNG name.
        """
        if image_id in self._file_of_id:
            if self._file_of_id[image_id] != str(file_name):
                raise ValueError(
                    f"COCOPanopticWriter: image_id {image_id} added for {self._file_of_id[image_id]!r} "
                    f"and again for {file_name!r}"
                )
            return True
        if png_name in self._id_of_png:
            raise ValueError(
                f"COCOPanopticWriter: {file_name!r} (image {image_id}) and image {self._id_of_png[png_name]} "
                f"would both be written to {self.png_dir / png_name}"
            )
        return False

    def _segment_entries(
        self,
        file_name: str,
        seg: np.ndarray,
        segments_info: Sequence[Mapping[str, Any]],
        ids: list[int],
        cats: list[int],
    ) -> list[dict[str, Any]]:
        """The ``segments_info`` entries of the JSON: the data set's category ids, areas and
        boxes from ``seg``; segments without pixels are left out."""
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
        return segments

    def categories(self) -> list[dict[str, Any]]:
        """COCO panoptic ``categories`` of ``class_info`` (data-set ids)."""
        ci = self.class_info
        return [
            {"id": ci.dataset_ids[c], "name": ci.names[c], "isthing": int(ci.isthing[c]), "color": list(ci.colors[c])}
            for c in range(ci.num_classes)
        ]

    def abort(self) -> None:
        """Stop without writing ``panoptic.json`` (the part file goes too)."""
        if self._part is not None:
            self._part.close()
            self._part = None
            self._part_path.unlink(missing_ok=True)
        self.closed = True

    def close(self) -> None:
        """Write ``panoptic.json`` (idempotent): the images, the streamed annotations, the categories."""
        if self.closed or self._part is None:
            return
        self._part.close()
        self._part = None
        partial = self.json_path.with_name(self.json_path.name + ".writing")
        with open(partial, "w", encoding="utf-8") as out, open(self._part_path, encoding="utf-8") as part:
            out.write('{"images": [' + ", ".join(self._images) + '], "annotations": [')
            for k, line in enumerate(part):
                out.write((", " if k else "") + line.rstrip("\n"))
            out.write('], "categories": ' + json.dumps(self.categories()) + "}")
        partial.replace(self.json_path)  # never a half-written panoptic.json
        self._part_path.unlink()
        self.closed = True
