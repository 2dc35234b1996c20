"""Panoptic Quality with the rules of the official COCO panoptic evaluation.

Re-implements ``panopticapi.evaluation.pq_compute`` (Kirillov et al.) on tensors:

- Per image, ONE ``bincount`` over paired (gt index, pred index) labels gives the full
  intersection table, from which all areas and overlaps are read; no per-segment
  full-image masks are built.
- A (gt, pred) pair matches when the categories agree, the GT is not crowd and
  IoU > 0.5, with IoU = inter / (pred_area + gt_area - inter - pred∩void).
- Unmatched non-crowd GT segments are false negatives; crowd GT never counts.
- GT pixels whose id the GT segments do not list are not void: they never match and are
  never false negatives, but they count in a prediction's area (so in the union and
  against its void/crowd share), as ``pq_compute_single_core`` (panopticapi/evaluation.py)
  treats a PNG id missing from ``segments_info``. Such predicted ids raise, as there.
- An unmatched prediction is a false positive unless (its overlap with void + its overlap
  with the crowd GT segment of its own category) / its area > 0.5.
- PQ/SQ/RQ are averaged over the classes with tp + fp + fn > 0.

Segment id 0 is void in both maps. States are per-class sums synced with ``sum`` across
processes, so the metric is exact under DDP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PanopticQuality"]

# Largest segment id mapped through a lookup table (8 MB of int64); larger ids use a binary search.
_MAX_LUT_ID = 1 << 20


def _index_map(seg: Tensor, ids: Tensor, what: str, unlisted: bool = False) -> Tensor:
    """Map segment ids in ``seg`` to 1-based positions in ``ids`` (0 = void).

    Args:
        seg: ``(H*W,)`` int64 ids.
        ids: ``(K,)`` int64 listed ids (non-zero, unique).
        unlisted: map a non-zero id missing from ``ids`` to ``K + 1`` (the GT rule of
            ``pq_compute_single_core`` in panopticapi/evaluation.py); else raise, as that
            function raises ``KeyError`` for such a predicted id.

    Returns:
        ``(H*W,)`` int64 with ``k + 1`` where ``seg == ids[k]``, 0 where ``seg == 0`` and
        ``K + 1`` on unlisted ids.
    """
    num = ids.numel()
    if num == 0:
        index = torch.where(seg == 0, 0, -1)
    elif int(ids.min()) > 0 and int(ids.max()) <= _MAX_LUT_ID:
        # A lookup table is faster than searchsorted; used for the usual small ids.
        max_id = int(ids.max())
        lut = torch.full((max_id + 1,), -1, dtype=torch.long, device=seg.device)
        lut[0] = 0
        lut[ids] = torch.arange(1, num + 1, device=seg.device)
        inside = (seg >= 0) & (seg <= max_id)
        index = torch.where(inside, lut[seg.clamp(0, max_id)], -1)
    else:
        # Large ids (e.g. COCO's RGB-encoded ones): binary search instead of a huge table.
        sorted_ids, perm = ids.sort()
        pos = torch.searchsorted(sorted_ids, seg).clamp(max=num - 1)
        found = sorted_ids[pos] == seg
        index = torch.where(found, perm[pos] + 1, torch.where(seg == 0, 0, -1))
    unknown = index < 0
    if bool(unknown.any()):
        if not unlisted:
            bad = int(seg[unknown][0])
            raise ValueError(f"PanopticQuality: {what} map contains segment id {bad} that is not in its segments list")
        index = torch.where(unknown, num + 1, index)
    return index


def _segment_fields(
    segments: Sequence[Mapping[str, Any]], what: str, device: torch.device, need_crowd: bool
) -> tuple[Tensor, Tensor, Tensor]:
    try:
        ids = [int(s["id"]) for s in segments]
        cats = [int(s["category_id"]) for s in segments]
    except KeyError as err:
        raise ValueError(f"PanopticQuality: every {what} segment needs `id` and `category_id` (missing {err})") from err
    crowd = [bool(s.get("iscrowd", False)) for s in segments] if need_crowd else [False] * len(ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"PanopticQuality: duplicate segment ids in the {what} segments: {ids}")
    if 0 in ids:
        raise ValueError(f"PanopticQuality: {what} segment id 0 is reserved for void")
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(cats, dtype=torch.long, device=device),
        torch.tensor(crowd, dtype=torch.bool, device=device),
    )


class PanopticQuality(Metric):
    """COCO panoptic quality (PQ, SQ, RQ; all, things, stuff), in percent.

    Classes are contiguous ids ``[0, num_classes)`` with things first: class ``c`` is a
    thing iff ``c < num_things``.

    States (``(num_classes,)`` each, summed across processes): ``iou_sum`` (float64),
    ``tp``, ``fp``, ``fn`` (int64).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    iou_sum: Tensor
    tp: Tensor
    fp: Tensor
    fn: Tensor

    def __init__(
        self, num_classes: int, num_things: int, class_names: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_classes <= 0 or not 0 <= num_things <= num_classes:
            raise ValueError(
                f"PanopticQuality: need num_classes > 0 and 0 <= num_things <= num_classes, "
                f"got num_classes={num_classes}, num_things={num_things}"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"PanopticQuality: class_names has {len(class_names)} entries, expected num_classes={num_classes}"
            )
        self.num_classes = num_classes
        self.num_things = num_things
        self.class_names = list(class_names) if class_names is not None else None
        self.add_state("iou_sum", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        pred_seg: Tensor | Sequence[Tensor],
        pred_segments: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        gt_seg: Tensor | Sequence[Tensor],
        gt_segments: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
    ) -> None:
        """Accumulate one image, or a batch given as lists (or ``(B, H, W)`` tensors).

        Args:
            pred_seg: ``(H, W)`` integer predicted segment ids, 0 = void.
            pred_segments: dicts with ``id`` and ``category_id`` for every non-zero id of ``pred_seg``.
            gt_seg: ``(H, W)`` integer GT segment ids, 0 = void.
            gt_segments: dicts with ``id``, ``category_id`` and ``iscrowd``; a non-zero id of
                ``gt_seg`` they do not list (e.g. the COCO reader's -1) is scored as the official
                evaluation scores a PNG id missing from ``segments_info`` (module docstring).
        """
        if isinstance(pred_seg, Tensor) and pred_seg.dim() == 2:
            self._update_one(pred_seg, pred_segments, gt_seg, gt_segments)  # type: ignore[arg-type]
            return
        if not (len(pred_seg) == len(pred_segments) == len(gt_seg) == len(gt_segments)):
            raise ValueError(
                "PanopticQuality.update: batch inputs must have equal lengths, got "
                f"pred_seg={len(pred_seg)}, pred_segments={len(pred_segments)}, "
                f"gt_seg={len(gt_seg)}, gt_segments={len(gt_segments)}"
            )
        for p, ps, g, gs in zip(pred_seg, pred_segments, gt_seg, gt_segments):
            self._update_one(p, ps, g, gs)  # type: ignore[arg-type]

    def _update_one(
        self,
        pred_seg: Tensor,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_seg: Tensor,
        gt_segments: Sequence[Mapping[str, Any]],
    ) -> None:
        if not isinstance(pred_seg, Tensor) or not isinstance(gt_seg, Tensor):
            raise ValueError("PanopticQuality.update: pred_seg and gt_seg must be tensors")
        if pred_seg.dim() != 2 or pred_seg.shape != gt_seg.shape:
            raise ValueError(
                f"PanopticQuality.update: pred_seg and gt_seg must be (H, W) of the same size, got "
                f"{tuple(pred_seg.shape)} and {tuple(gt_seg.shape)}"
            )
        if pred_seg.is_floating_point() or gt_seg.is_floating_point():
            raise ValueError("PanopticQuality.update: segment maps must be integer tensors")
        device = self.tp.device
        p_ids, p_cat, _ = _segment_fields(pred_segments, "pred", device, need_crowd=False)
        g_ids, g_cat, g_crowd = _segment_fields(gt_segments, "gt", device, need_crowd=True)
        for what, cats in (("pred", p_cat), ("gt", g_cat)):
            if cats.numel() and (int(cats.min()) < 0 or int(cats.max()) >= self.num_classes):
                raise ValueError(
                    f"PanopticQuality: {what} category_id out of range [0, {self.num_classes}): {cats.tolist()}"
                )
        num_pred, num_gt = p_ids.numel(), g_ids.numel()

        pi = _index_map(pred_seg.to(device=device, dtype=torch.long).flatten(), p_ids, "pred")
        gi = _index_map(gt_seg.to(device=device, dtype=torch.long).flatten(), g_ids, "gt", unlisted=True)
        # Row 0 / column 0 are void, row num_gt + 1 the unlisted GT ids; inter[g, p] = |GT_g ∩ P_p|.
        # Unlisted GT pixels are not void: they stay in pred_area, so in the union and in the
        # part of an unmatched prediction that makes it a false positive (pq_compute_single_core).
        inter = torch.bincount(gi * (num_pred + 1) + pi, minlength=(num_gt + 2) * (num_pred + 1))
        inter = inter.view(num_gt + 2, num_pred + 1)
        gt_area = inter.sum(1)[1 : num_gt + 1]
        pred_area = inter.sum(0)[1:]
        if num_pred and bool((pred_area == 0).any()):
            missing = p_ids[pred_area == 0].tolist()
            raise ValueError(f"PanopticQuality: pred segments {missing} are listed but have no pixels in pred_seg")
        pred_void = inter[0, 1:]  # (P,)
        pair = inter[1 : num_gt + 1, 1:]  # (G, P)

        same_cat = g_cat[:, None] == p_cat[None, :]
        union = pred_area[None, :] + gt_area[:, None] - pair - pred_void[None, :]
        iou = pair.double() / union.clamp(min=1).double()
        matched = same_cat & ~g_crowd[:, None] & (iou > 0.5)  # at most one True per row/column
        gt_matched = matched.any(1)
        pred_matched = matched.any(0)

        self.tp.index_add_(0, g_cat, gt_matched.long())
        self.iou_sum.index_add_(0, g_cat, (iou * matched).sum(1))
        self.fn.index_add_(0, g_cat, (~gt_matched & ~g_crowd).long())

        # The official code keeps ONE crowd segment per category (the last listed one).
        ignored = pred_void.clone()
        if num_gt and num_pred:
            crowd_same = g_crowd[:, None] & same_cat
            row = torch.arange(num_gt, device=device)[:, None].expand(num_gt, num_pred)
            last_crowd = torch.where(crowd_same, row, torch.full_like(row, -1)).amax(0)  # (P,)
            crowd_inter = pair.gather(0, last_crowd.clamp(min=0)[None, :])[0]
            ignored += torch.where(last_crowd >= 0, crowd_inter, torch.zeros_like(crowd_inter))
        is_fp = ~pred_matched & (ignored.double() / pred_area.clamp(min=1).double() <= 0.5)
        self.fp.index_add_(0, p_cat, is_fp.long())

    def _per_class(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tp = self.tp.double()
        denom = tp + 0.5 * self.fp.double() + 0.5 * self.fn.double()
        present = (self.tp + self.fp + self.fn) > 0
        pq = torch.where(present, self.iou_sum / denom.clamp(min=1e-12), torch.nan)
        sq = torch.where(present, torch.where(tp > 0, self.iou_sum / tp.clamp(min=1), 0.0), torch.nan)
        rq = torch.where(present, tp / denom.clamp(min=1e-12), torch.nan)
        return pq * 100, sq * 100, rq * 100, present

    def compute(self) -> dict[str, Tensor]:
        """PQ/SQ/RQ over all classes, things (``_th``) and stuff (``_st``), in percent.

        A group with no class having tp + fp + fn > 0 gives NaN (the official code would
        divide by zero).
        """
        pq, sq, rq, present = self._per_class()
        is_thing = torch.arange(self.num_classes, device=pq.device) < self.num_things
        out: dict[str, Tensor] = {}
        for suffix, group in (("", torch.ones_like(is_thing)), ("_th", is_thing), ("_st", ~is_thing)):
            sel = group & present
            for name, values in (("pq", pq), ("sq", sq), ("rq", rq)):
                out[name + suffix] = values[sel].mean() if bool(sel.any()) else values.new_tensor(float("nan"))
        return {k: v.float() for k, v in out.items()}

    def per_class(self) -> dict[str, Tensor]:
        """Per-class results: ``pq``, ``sq``, ``rq`` (percent, NaN where tp + fp + fn = 0),
        ``tp``, ``fp``, ``fn`` (counts), each ``(num_classes,)``."""
        pq, sq, rq, _ = self._per_class()
        return {
            "pq": pq.float(),
            "sq": sq.float(),
            "rq": rq.float(),
            "tp": self.tp.clone(),
            "fp": self.fp.clone(),
            "fn": self.fn.clone(),
        }

    def per_class_pq_by_name(self) -> dict[str, float]:
        """``{class name: PQ in percent}`` for the classes that occurred (needs ``class_names``)."""
        names = self.class_names or [str(c) for c in range(self.num_classes)]
        pq, _, _, present = self._per_class()
        return {names[c]: float(pq[c]) for c in range(self.num_classes) if bool(present[c])}
