"""The eval section: images per second of the package's PanopticQuality, MeanIoU and (when
importable) MaskAP on synthetic predicted / ground-truth pairs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.evaluation.panoptic import PanopticQuality
from knet_lightning.evaluation.semantic import MeanIoU
from knet_lightning.postprocess.merge import panoptic_to_semantic

from .common import NUM_CLASSES, NUM_THINGS, Context, Profile, make_scene


def _eval_pool(p: Profile, seed: int, pool: int) -> list[dict[str, Any]]:
    """A few predicted/GT pairs, cycled over to reach ``eval_images`` (the metrics cache nothing)."""
    rng = np.random.default_rng(seed)
    h, w = p.eval_size
    out = []
    for _ in range(pool):
        seg, labels = make_scene(rng, h, w, *p.scene)
        num = len(labels)
        # Prediction: the layout shifted by a few pixels with some labels swapped.
        pred = np.roll(seg, shift=(max(1, h // 100), max(1, w // 60)), axis=(0, 1))
        pred_labels = labels.copy()
        swap = rng.random(num) < 0.2
        pred_labels[swap] = np.where(
            pred_labels[swap] < NUM_THINGS,
            rng.integers(0, NUM_THINGS, size=int(swap.sum())),
            rng.integers(NUM_THINGS, NUM_CLASSES, size=int(swap.sum())),
        )
        # Ground truth has void: a band at the bottom.
        gt = seg.copy()
        gt[h - max(1, h // 16) :] = 0
        gt_present = np.bincount(gt.ravel(), minlength=num + 1)[1:] > 0
        gt_segments = [
            {"id": k + 1, "category_id": int(labels[k]), "iscrowd": False} for k in range(num) if gt_present[k]
        ]
        pred_segments = [{"id": k + 1, "category_id": int(pred_labels[k])} for k in range(num)]
        lut = np.full(num + 1, IGNORE_INDEX, dtype=np.int64)
        lut[1:] = labels
        out.append(
            {
                "pred_seg": torch.from_numpy(pred),
                "pred_segments": pred_segments,
                "gt_seg": torch.from_numpy(gt),
                "gt_segments": gt_segments,
                "gt_sem": torch.from_numpy(lut[gt]),
                "thing_ids": np.nonzero(labels < NUM_THINGS)[0],
                "labels": labels,
                "seg": seg,
            }
        )
    return out


def _ap_inputs(p: Profile, item: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """Instance predictions (``ap_dets`` masks: shifted GT things + random boxes) and eval_gt RLEs."""
    from knet_lightning.evaluation.instance import encode_masks

    h, w = p.eval_size
    seg, labels, things = item["seg"], item["labels"], item["thing_ids"]
    gt_masks = seg[None] == (things + 1)[:, None, None]
    shifted = np.roll(gt_masks, shift=(max(1, h // 100), max(1, w // 60)), axis=(1, 2))
    extra = p.ap_dets - len(things)
    boxes = np.zeros((max(0, extra), h, w), dtype=bool)
    for i in range(len(boxes)):
        bh, bw = int(rng.integers(2, h // 3 + 2)), int(rng.integers(2, w // 3 + 2))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        boxes[i, y0 : y0 + bh, x0 : x0 + bw] = True
    masks = np.concatenate([shifted, boxes])[: p.ap_dets]
    pred_labels = np.concatenate([labels[things], rng.integers(0, NUM_THINGS, size=len(boxes))])[: p.ap_dets]
    pred = {
        "masks": torch.from_numpy(masks),
        "scores": torch.from_numpy(rng.random(len(masks)).astype(np.float32)),
        "labels": torch.from_numpy(pred_labels.astype(np.int64)),
    }
    gt = {
        "rles": encode_masks(gt_masks),
        "labels": torch.from_numpy(labels[things]),
        "iscrowd": torch.zeros(len(things), dtype=torch.bool),
        "area": torch.from_numpy(gt_masks.reshape(len(things), -1).sum(1).astype(np.float64)),
    }
    return pred, gt


def section_eval(ctx: Context) -> dict[str, Any]:
    """Images per second of PQ, mIoU (and mask AP) on predicted maps at ``eval_size``."""
    p = ctx.profile
    n = p.eval_images
    pool = _eval_pool(p, ctx.seed, min(n, 8))
    rows: list[dict[str, Any]] = []
    notes: list[str] = [
        f"{n} images of {p.eval_size[0]}x{p.eval_size[1]} cycled from {len(pool)} synthetic predicted/GT pairs; "
        "time = all updates + one compute()",
    ]

    def timed(name: str, update: Callable[[int], None], compute: Callable[[], Any]) -> None:
        # update(k) adds pool item k
        start = time.perf_counter()
        for i in range(n):
            update(i % len(pool))
        t_update = time.perf_counter() - start
        start = time.perf_counter()
        compute()
        t_compute = time.perf_counter() - start
        total = t_update + t_compute
        rows.append(
            {
                "metric": name,
                "images": n,
                "update_ms_per_image": t_update / n * 1e3,
                "compute_ms": t_compute * 1e3,
                "total_s": total,
                "images_per_s": n / total,
            }
        )

    pq = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    timed(
        "PanopticQuality",
        lambda k: pq.update(pool[k]["pred_seg"], pool[k]["pred_segments"], pool[k]["gt_seg"], pool[k]["gt_segments"]),
        pq.compute,
    )
    miou = MeanIoU(NUM_CLASSES, ignore_index=IGNORE_INDEX)
    timed(
        "MeanIoU (incl. panoptic_to_semantic)",
        lambda k: miou.update(
            panoptic_to_semantic(pool[k]["pred_seg"], pool[k]["pred_segments"], IGNORE_INDEX), pool[k]["gt_sem"]
        ),
        miou.compute,
    )
    try:
        from knet_lightning.evaluation.instance import MaskAP
    except ImportError as e:
        notes.append(f"MaskAP skipped: knet_lightning.evaluation.instance.MaskAP not importable ({e})")
    else:
        rng = np.random.default_rng(ctx.seed)
        ap_pool = [_ap_inputs(p, it, rng) for it in pool]
        ap = MaskAP(NUM_THINGS, max_dets=max(10, p.ap_dets))
        timed(
            f"MaskAP ({p.ap_dets} dets/image)",
            lambda k: ap.update([ap_pool[k][0]], [ap_pool[k][1]]),
            ap.compute,
        )
        notes.append("MaskAP: update RLE-encodes the predicted masks; compute runs pycocotools COCOeval")
    return {"rows": rows, "notes": notes}
