"""COCO mask AP through pycocotools' ``COCOeval(iouType="segm")``.

The numbers are those of running ``COCOeval`` directly: :meth:`MaskAP.compute` builds a
``COCO`` ground-truth object and ``loadRes`` results from the accumulated data and runs
``evaluate / accumulate / summarize`` unchanged (see ``tests/test_mask_ap.py``).

Memory: full-resolution masks are never kept across the set. Each predicted mask is
RLE-encoded at ``update`` time (``pycocotools.mask.encode`` on a Fortran-ordered uint8
array) and only RLEs, scores, labels and image ids are stored; the ground truth arrives
already as RLE (the readers' ``eval_gt``).

State: one list state ``images`` of per-image plain-Python records (RLEs with ``str``
counts, floats, ints), so it pickles. Under DDP the records of every rank are gathered
with ``torch.distributed.all_gather_object`` (works with gloo and NCCL); tensor-only
syncing (torchmetrics' default) cannot carry them.

Repeated image ids (``DistributedSampler`` pads the last batch by repeating samples)
are evaluated once: the first record of an id wins. Repeats with different ground truth
are an error.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MaskAP", "encode_masks"]

# Index in COCOeval.stats of each reported number (iouType="segm", default params).
_STAT_INDEX = {"map": 0, "map_50": 1, "map_75": 2, "map_small": 3, "map_medium": 4, "map_large": 5}


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs of binary masks.

    Args:
        masks: ``(K, H, W)`` bool (or 0/1 integer) masks, any device.

    Returns:
        ``K`` dicts ``{"size": [H, W], "counts": str}`` (``str`` counts, as in COCO JSON).
    """
    from pycocotools import mask as mask_utils

    if isinstance(masks, Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"encode_masks: masks must be (K, H, W), got shape {masks.shape}")
    if masks.dtype != np.bool_:
        masks = masks != 0
    rles = []
    for mask in masks.view(np.uint8):  # a bool array views as 0/1 uint8 without a copy
        # One mask at a time: the Fortran copy then costs H*W bytes, not K*H*W.
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def _normalize_rle(rle: Any, size: tuple[int, int], where: str) -> dict[str, Any]:
    """A compressed RLE dict with ``str`` counts; uncompressed (list) counts are compressed."""
    from pycocotools import mask as mask_utils

    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"MaskAP.update: {where} must be a COCO RLE dict with 'size' and 'counts', got {rle!r:.80}")
    rle_size = (int(rle["size"][0]), int(rle["size"][1]))
    if rle_size != size:
        raise ValueError(f"MaskAP.update: {where} has size {list(rle_size)}, but the image is {list(size)} (H, W)")
    counts = rle["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE (COCO JSON uses it for some crowd regions).
        out = mask_utils.frPyObjects({"size": list(rle_size), "counts": counts}, *rle_size)
        counts = out["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise ValueError(f"MaskAP.update: {where}['counts'] must be str, bytes or a list, got {type(counts).__name__}")
    return {"size": list(rle_size), "counts": counts}


def _as_list(values: Any, where: str, cast: Callable[[Any], Any]) -> list[Any]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().tolist()
    elif isinstance(values, np.ndarray):
        values = values.tolist()
    try:
        return [cast(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"MaskAP.update: {where} must be a 1-D sequence of numbers ({err})") from err


def coco_image_id(image_id: Any) -> int:
    """An int id for COCOeval: COCO ids are ints already; a string id (a Cityscapes file stem)
    maps to a stable int through CRC-32."""
    try:
        return int(image_id)
    except (TypeError, ValueError):
        return zlib.crc32(str(image_id).encode()) & 0x7FFFFFFF


class MaskAP(Metric):
    """COCO instance-segmentation AP (``segm``), in percent.

    Args:
        num_classes: contiguous classes ``[0, num_classes)``; predicted and GT labels must lie
            in this range.
        category_ids: the COCO category id of each contiguous class (e.g.
            ``class_info.dataset_ids``); default ``c + 1``. Only the order matters: COCOeval
            sorts categories by id and averages in that order, so the data set's ids make
            the float results bit-identical to the official evaluation's.
        max_dets: COCO's largest ``maxDets`` (detections per image and category), the one
            AP is read at; the parameters are ``maxDets = [1, 10, max_dets]`` as COCO.
        class_names: optional names, for :meth:`per_class` users.

    ``compute()`` returns ``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``,
    ``map_large`` (float32 scalars, percent): exactly ``100 * COCOeval.stats[0:6]``. With
    no prediction at all every value is 0 (``COCO.loadRes`` cannot load an empty list). A
    value COCO leaves undefined (e.g. ``map_small`` when the set has no small GT) stays
    -100, COCO's -1 in percent.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    images: list[dict[str, Any]]

    def __init__(
        self,
        num_classes: int,
        max_dets: int = 100,
        class_names: Sequence[str] | None = None,
        category_ids: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes <= 0:
            raise ValueError(f"MaskAP: num_classes must be positive, got {num_classes}")
        if max_dets < 10:
            # COCO's maxDets are [1, 10, max_dets] and must be increasing.
            raise ValueError(f"MaskAP: max_dets must be >= 10, got {max_dets}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"MaskAP: class_names has {len(class_names)} entries, expected {num_classes}")
        if category_ids is None:
            category_ids = range(1, num_classes + 1)
        self.category_ids = [int(c) for c in category_ids]
        if len(self.category_ids) != num_classes or len(set(self.category_ids)) != num_classes:
            raise ValueError(
                f"MaskAP: category_ids must be {num_classes} distinct ids (one per class), got {list(category_ids)}"
            )
        self.num_classes = num_classes
        self.max_dets = max_dets
        self.class_names = list(class_names) if class_names is not None else None
        # "cat" makes merge_state / forward concatenate the lists; _sync_dist is overridden.
        self.add_state("images", [], dist_reduce_fx="cat")
        self._per_class_ap: Tensor | None = None

    # ------------------------------------------------------------------ update

    def update(
        self,
        preds: Sequence[Mapping[str, Any]],
        gts: Sequence[Mapping[str, Any]],
        image_ids: Sequence[int] | None = None,
        image_sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Encode and store a batch of images.

        Args:
            preds: per image, ``masks`` bool ``(K, H, W)`` at the ORIGINAL image size,
                ``scores`` float ``(K,)``, ``labels`` int ``(K,)`` contiguous.
            gts: per image, the reader's ``eval_gt``: ``rles`` (``G`` COCO RLE dicts at the
                original size), ``labels`` int64 ``(G,)``, ``iscrowd`` bool ``(G,)``,
                ``area`` float ``(G,)`` (COCO's area, used for the small/medium/large ranges).
            image_ids: per image, its data-set id (repeats are evaluated once); a string id
                (Cityscapes' file stems) maps to a stable int, as COCOeval needs. ``None``
                gives every image a fresh id of its own.
            image_sizes: per image, ``(H, W)``; checked against the masks and RLEs. ``None``
                takes it from ``masks``.
        """
        if len(preds) != len(gts):
            raise ValueError(f"MaskAP.update: got {len(preds)} predictions and {len(gts)} ground truths")
        if image_ids is not None and len(image_ids) != len(preds):
            raise ValueError(f"MaskAP.update: got {len(image_ids)} image_ids for {len(preds)} images")
        if image_sizes is not None and len(image_sizes) != len(preds):
            raise ValueError(f"MaskAP.update: got {len(image_sizes)} image_sizes for {len(preds)} images")
        for i, (pred, gt) in enumerate(zip(preds, gts)):
            image_id = None if image_ids is None else coco_image_id(image_ids[i])
            size = None if image_sizes is None else (int(image_sizes[i][0]), int(image_sizes[i][1]))
            self.images.append(self._record(pred, gt, image_id, size))

    def _record(
        self, pred: Mapping[str, Any], gt: Mapping[str, Any], image_id: int | None, size: tuple[int, int] | None
    ) -> dict[str, Any]:
        for key in ("masks", "scores", "labels"):
            if key not in pred:
                raise ValueError(f"MaskAP.update: prediction dict has no `{key}` field (image {image_id})")
        for key in ("rles", "labels", "iscrowd", "area"):
            if key not in gt:
                raise ValueError(f"MaskAP.update: eval_gt dict has no `{key}` field (image {image_id})")
        masks = pred["masks"]
        if masks.ndim != 3:
            raise ValueError(f"MaskAP.update: pred masks must be (K, H, W), got shape {tuple(masks.shape)}")
        mask_size = (int(masks.shape[1]), int(masks.shape[2]))
        if size is None:
            size = mask_size
        elif mask_size != size:
            raise ValueError(
                f"MaskAP.update: pred masks are {list(mask_size)} (H, W) but image {image_id} is {list(size)}; "
                "predictions must be at the original image size"
            )
        num_pred = int(masks.shape[0])
        scores = _as_list(pred["scores"], "pred scores", float)
        labels = _as_list(pred["labels"], "pred labels", int)
        if len(scores) != num_pred or len(labels) != num_pred:
            raise ValueError(
                f"MaskAP.update: image {image_id} has {num_pred} pred masks, {len(scores)} scores, {len(labels)} labels"
            )

        rles = list(gt["rles"])
        num_gt = len(rles)
        gt_labels = _as_list(gt["labels"], "eval_gt labels", int)
        crowd = _as_list(gt["iscrowd"], "eval_gt iscrowd", bool)
        area = _as_list(gt["area"], "eval_gt area", float)
        if not (len(gt_labels) == len(crowd) == len(area) == num_gt):
            raise ValueError(
                f"MaskAP.update: eval_gt of image {image_id} has {num_gt} rles, {len(gt_labels)} labels, "
                f"{len(crowd)} iscrowd, {len(area)} area entries; they must be aligned"
            )
        for what, labs in (("pred", labels), ("eval_gt", gt_labels)):
            bad = [lab for lab in labs if not 0 <= lab < self.num_classes]
            if bad:
                raise ValueError(f"MaskAP.update: {what} labels {bad} out of range [0, {self.num_classes})")
        return {
            "image_id": image_id,
            "size": list(size),
            "pred_rles": encode_masks(masks) if num_pred else [],
            "scores": scores,
            "labels": labels,
            "gt_rles": [_normalize_rle(r, size, f"eval_gt rles[{k}]") for k, r in enumerate(rles)],
            "gt_labels": gt_labels,
            "gt_iscrowd": crowd,
            "gt_area": area,
        }

    # ------------------------------------------------------------------ torchmetrics plumbing

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = ()) -> torch.nn.Module:
        # The records are plain Python objects: `.to(device)` must leave them alone.
        return super()._apply(fn, exclude_state=(*exclude_state, "images"))

    def _move_list_states_to_cpu(self) -> None:
        # compute_on_cpu=True: the records already live in host memory (and have no `.to`).
        pass

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        """Gather every rank's records (in rank order) with ``all_gather_object``."""
        import torch.distributed as dist

        group = process_group or self.process_group
        gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, list(self.images), group=group)
        self.images = [record for part in gathered for record in (part or [])]

    def reset(self) -> None:
        super().reset()
        self._per_class_ap = None

    # ------------------------------------------------------------------ compute

    def _unique_records(self) -> list[dict[str, Any]]:
        """Records with ids assigned (fresh ones for ``None``) and repeats dropped."""
        given = [r["image_id"] for r in self.images if r["image_id"] is not None]
        next_id = max(given, default=0) + 1
        seen: dict[int, dict[str, Any]] = {}
        out = []
        for record in self.images:
            image_id = record["image_id"]
            if image_id is None:
                image_id, next_id = next_id, next_id + 1
            elif image_id in seen:
                first = seen[image_id]
                if any(first[k] != record[k] for k in ("size", "gt_rles", "gt_labels", "gt_iscrowd")):
                    raise ValueError(f"MaskAP: image_id {image_id} was updated twice with different ground truth")
                continue
            record = {**record, "image_id": image_id}
            seen[image_id] = record
            out.append(record)
        return out

    def coco_eval(self) -> Any | None:
        """The evaluated ``COCOeval`` (after ``evaluate``, ``accumulate``, ``summarize``) on
        this process's records, or ``None`` when there is no prediction at all."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        records = self._unique_records()
        images, annotations, detections = [], [], []
        for record in records:
            height, width = record["size"]
            images.append({"id": record["image_id"], "height": height, "width": width})
            for rle, label, crowd, area in zip(
                record["gt_rles"], record["gt_labels"], record["gt_iscrowd"], record["gt_area"]
            ):
                annotations.append(
                    {
                        # COCOeval reads an id of 0 as "unmatched": ids start at 1.
                        "id": len(annotations) + 1,
                        "image_id": record["image_id"],
                        "category_id": self.category_ids[label],
                        "segmentation": rle,
                        "area": area,
                        "iscrowd": int(crowd),
                    }
                )
            for rle, score, label in zip(record["pred_rles"], record["scores"], record["labels"]):
                detections.append(
                    {
                        "image_id": record["image_id"],
                        "category_id": self.category_ids[label],
                        "segmentation": rle,
                        "score": score,
                    }
                )
        if not detections:
            return None
        names = self.class_names or [str(c) for c in range(self.num_classes)]
        categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, names)]
        # pycocotools prints progress; keep it out of the training logs.
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(detections)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
            evaluator.params.maxDets = [1, 10, self.max_dets]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator

    def compute(self) -> dict[str, Tensor]:
        """``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large`` in percent."""
        evaluator = self.coco_eval()
        if evaluator is None:
            self._per_class_ap = torch.zeros(self.num_classes)
            return {name: torch.tensor(0.0) for name in _STAT_INDEX}
        # precision: (T iou thresholds, R recall points, K classes, A area ranges, M maxDets);
        # area "all" is index 0 and maxDets=max_dets the last. -1 marks "no GT" (detectron2's rule).
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = []
        for cid in self.category_ids:
            values = precision[:, :, evaluator.params.catIds.index(cid)]
            values = values[values > -1]
            per_class.append(float(np.mean(values)) * 100 if values.size else float("nan"))
        self._per_class_ap = torch.tensor(per_class, dtype=torch.float32)
        stats = evaluator.stats
        return {name: torch.tensor(float(stats[i]) * 100, dtype=torch.float32) for name, i in _STAT_INDEX.items()}

    def per_class(self) -> Tensor:
        """Per-class AP (IoU .50:.95, all areas, ``max_dets``) in percent, ``(num_classes,)``;
        NaN for a class without GT (0 for every class when there is no prediction).

        Uses the result of the last :meth:`compute` (running it first when needed, which
        syncs across processes like ``compute`` does)."""
        if self._computed is None or self._per_class_ap is None:
            self.compute()
        assert self._per_class_ap is not None  # set by compute
        return self._per_class_ap.clone()
