"""PanopticQuality and MeanIoU on crafted cases with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from knet_lightning.evaluation import MeanIoU, PanopticQuality

# Classes used in the crafted PQ cases: 0, 1 things; 2, 3 stuff.
NUM_CLASSES, NUM_THINGS = 4, 2


def _seg(rows: list[str]) -> torch.Tensor:
    """A segment-id map drawn as text: each character is a digit id, '.' = 0 (void)."""
    return torch.tensor([[0 if ch == "." else int(ch) for ch in row] for row in rows], dtype=torch.int32)


def _gts(*items: tuple[int, int, bool]) -> list[dict]:
    return [{"id": i, "category_id": c, "iscrowd": crowd} for i, c, crowd in items]


def _preds(*items: tuple[int, int]) -> list[dict]:
    return [{"id": i, "category_id": c} for i, c in items]


def _pq(pred, pred_segs, gt, gt_segs) -> dict[str, float]:
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    metric.update(pred, pred_segs, gt, gt_segs)
    return {k: float(v) for k, v in metric.compute().items()}


# ---------------------------------------------------------------------------- reference


def reference_pq_stats(images, num_classes: int) -> dict[int, dict[str, float]]:
    """Straight port of panopticapi ``pq_compute_single_core`` (dicts, np.unique)."""
    offset = 256 * 256 * 256
    stats = {c: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0} for c in range(num_classes)}
    for pan_pred, pred_list, pan_gt, gt_list in images:
        pan_pred = pan_pred.numpy().astype(np.uint64)
        pan_gt = pan_gt.numpy().astype(np.uint64)
        gt_segms = {el["id"]: dict(el) for el in gt_list}
        pred_segms = {el["id"]: dict(el) for el in pred_list}
        for label, cnt in zip(*np.unique(pan_gt, return_counts=True)):
            if int(label) in gt_segms:
                gt_segms[int(label)]["area"] = int(cnt)
        for el in gt_segms.values():
            el.setdefault("area", 0)
        for label, cnt in zip(*np.unique(pan_pred, return_counts=True)):
            if int(label) == 0:
                continue
            pred_segms[int(label)]["area"] = int(cnt)
        pan_gt_pred = pan_gt * offset + pan_pred
        gt_pred_map = {}
        for label, inter in zip(*np.unique(pan_gt_pred, return_counts=True)):
            gt_pred_map[(int(label) // offset, int(label) % offset)] = int(inter)
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), inter in gt_pred_map.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            if gt_segms[gt_label]["iscrowd"]:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - inter
                - gt_pred_map.get((0, pred_label), 0)
            )
            iou = inter / union
            if iou > 0.5:
                stats[gt_segms[gt_label]["category_id"]]["tp"] += 1
                stats[gt_segms[gt_label]["category_id"]]["iou"] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd_labels = {}
        for gt_label, info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if info["iscrowd"]:
                crowd_labels[info["category_id"]] = gt_label
                continue
            stats[info["category_id"]]["fn"] += 1
        for pred_label, info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            inter = gt_pred_map.get((0, pred_label), 0)
            if info["category_id"] in crowd_labels:
                inter += gt_pred_map.get((crowd_labels[info["category_id"]], pred_label), 0)
            if inter / info["area"] > 0.5:
                continue
            stats[info["category_id"]]["fp"] += 1
    return stats


def reference_pq_average(stats, num_things: int) -> dict[str, float]:
    out = {}
    for suffix, keep in (("", lambda c: True), ("_th", lambda c: c < num_things), ("_st", lambda c: c >= num_things)):
        vals = {"pq": [], "sq": [], "rq": []}
        for c, s in stats.items():
            if not keep(c) or s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            denom = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
            vals["pq"].append(s["iou"] / denom)
            vals["sq"].append(s["iou"] / s["tp"] if s["tp"] else 0.0)
            vals["rq"].append(s["tp"] / denom)
        for k, v in vals.items():
            out[k + suffix] = 100 * sum(v) / len(v) if v else math.nan
    return out


def _random_image(gen: torch.Generator, size: int = 24):
    """Blobby GT and prediction maps with non-contiguous ids, crowd, void and label noise."""

    def blobs(num: int) -> torch.Tensor:
        coarse = torch.randint(0, num + 1, (size // 4, size // 4), generator=gen)
        seg = coarse.repeat_interleave(4, 0).repeat_interleave(4, 1)
        noise = torch.rand(size, size, generator=gen) < 0.1
        return torch.where(noise, torch.randint(0, num + 1, (size, size), generator=gen), seg)

    gt_idx, pred_idx = blobs(6), blobs(6)
    # Predictions agree with the GT on ~70% of pixels so that matches happen.
    pred_idx = torch.where(torch.rand(size, size, generator=gen) < 0.7, gt_idx, pred_idx)
    gt_ids = torch.randperm(50, generator=gen)[:6] * 7 + 3
    pred_ids = torch.randperm(50, generator=gen)[:6] * 11 + 5
    gt_seg = torch.where(gt_idx > 0, gt_ids[(gt_idx - 1).clamp(min=0)], 0)
    pred_seg = torch.where(pred_idx > 0, pred_ids[(pred_idx - 1).clamp(min=0)], 0)
    cats = torch.randint(0, NUM_CLASSES, (6,), generator=gen).tolist()
    pred_cats = [c if torch.rand(1, generator=gen).item() < 0.8 else (c + 1) % NUM_CLASSES for c in cats]
    crowd = (torch.rand(6, generator=gen) < 0.25).tolist()
    gt_segs = [
        {"id": int(gt_ids[k]), "category_id": cats[k], "iscrowd": crowd[k]}
        for k in range(6)
        if bool((gt_seg == gt_ids[k]).any())
    ]
    pred_segs = [
        {"id": int(pred_ids[k]), "category_id": pred_cats[k]} for k in range(6) if bool((pred_seg == pred_ids[k]).any())
    ]
    return pred_seg, pred_segs, gt_seg, gt_segs


# --------------------------------------------------------------------------- PQ: crafted


def test_perfect_prediction_is_100():
    gt = _seg(["1122", "1122", "3344", "3344"])
    segs = _gts((1, 0, False), (2, 1, False), (3, 2, False), (4, 3, False))
    # Different ids in the prediction: matching goes by pixels and category, not id.
    pred = torch.where(gt > 0, gt + 10, 0)
    res = _pq(pred, _preds((11, 0), (12, 1), (13, 2), (14, 3)), gt, segs)
    for key in ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st"):
        assert res[key] == pytest.approx(100.0)


def test_iou_exactly_half_is_not_a_match_and_things_stuff_split():
    # Thing 1 (class 0) = row 0 (10 px), stuff 2 (class 2) = rows 1-3 (30 px).
    gt = _seg(["1111111111", "2222222222", "2222222222", "2222222222"])
    gt_segs = _gts((1, 0, False), (2, 2, False))
    # Pred 1 (class 0) = 6 px of the thing + 2 px of stuff: IoU = 6 / (10 + 8 - 6) = 0.5.
    pred = _seg(["1111112222", "1122222222", "2222222222", "2222222222"])
    res = _pq(pred, _preds((1, 0), (2, 2)), gt, gt_segs)
    stuff_iou = 28 / (30 + 32 - 28)
    # Class 0: tp 0, fp 1, fn 1 -> PQ 0; class 2: one TP. Class 1 and 3 never occur.
    assert res["pq_th"] == pytest.approx(0.0)
    assert res["pq_st"] == pytest.approx(100 * stuff_iou)
    assert res["sq_st"] == pytest.approx(100 * stuff_iou)
    assert res["rq_st"] == pytest.approx(100.0)
    assert res["pq"] == pytest.approx(100 * stuff_iou / 2)
    assert res["rq"] == pytest.approx(50.0)
    assert res["sq"] == pytest.approx(100 * stuff_iou / 2)


def test_iou_just_above_half_is_a_match():
    gt = _seg(["1111111111", "2222222222", "2222222222", "2222222222"])
    gt_segs = _gts((1, 0, False), (2, 2, False))
    # Pred 1 = 6 px of the thing + 1 px of stuff: IoU = 6 / (10 + 7 - 6) = 6/11.
    pred = _seg(["1111112222", "1222222222", "2222222222", "2222222222"])
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    metric.update(pred, _preds((1, 0), (2, 2)), gt, gt_segs)
    res = metric.compute()
    assert float(res["pq_th"]) == pytest.approx(100 * 6 / 11)
    assert float(res["pq_st"]) == pytest.approx(100 * 29 / 34)
    per = metric.per_class()
    assert per["tp"].tolist() == [1, 0, 1, 0]
    assert per["fp"].tolist() == [0, 0, 0, 0]
    assert per["fn"].tolist() == [0, 0, 0, 0]
    assert torch.isnan(per["pq"][1]) and torch.isnan(per["pq"][3])


def test_crowd_region_is_neither_fp_nor_fn():
    # 1 = thing class 0 (4 px), 2 = CROWD class 0 (8 px), 3 = stuff class 2 (18 px).
    gt = _seg(["1133222233", "1133222233", "3333333333"])
    gt_segs = _gts((1, 0, False), (2, 0, True), (3, 2, False))
    # Pred 1 = thing 1 exactly. Pred 2 (class 0) = 6 crowd px + 2 stuff px: (0 void + 6
    # crowd) / 8 > 0.5 -> ignored. Pred 4 (class 1) lies on the crowd region but has another
    # class, so the crowd does not excuse it -> FP. Pred 3 = 16 px, all on GT stuff.
    pred = _seg(["1133224433", "1133222233", "3333223333"])
    pred_segs = _preds((1, 0), (2, 0), (3, 2), (4, 1))
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    metric.update(pred, pred_segs, gt, gt_segs)
    per = metric.per_class()
    assert per["tp"].tolist() == [1, 0, 1, 0]
    assert per["fp"].tolist() == [0, 1, 0, 0]
    assert per["fn"].tolist() == [0, 0, 0, 0]  # the crowd GT is never a FN
    res = metric.compute()
    assert float(res["pq_st"]) == pytest.approx(100 * 16 / 18)  # inter 16, union 18 + 16 - 16
    assert float(res["pq_th"]) == pytest.approx(50.0)  # class 0 perfect, class 1 a lone FP
    assert per_ref_equal(metric, [(pred, pred_segs, gt, gt_segs)])


def per_ref_equal(metric: PanopticQuality, images) -> bool:
    ref = reference_pq_stats(images, metric.num_classes)
    per = metric.per_class()
    for c, s in ref.items():
        if (int(per["tp"][c]), int(per["fp"][c]), int(per["fn"][c])) != (s["tp"], s["fp"], s["fn"]):
            return False
        if not math.isclose(float(metric.iou_sum[c]), s["iou"], rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def test_crowd_prediction_of_same_class_mostly_outside_crowd_is_fp():
    gt = _seg(["2222333333", "3333333333"])
    gt_segs = _gts((2, 0, True), (3, 2, False))
    # Pred 1 (class 0): 4 crowd px + 6 stuff px -> 4/10 <= 0.5 -> FP.
    pred = _seg(["1111111111", "3333333333"])
    per = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    per.update(pred, _preds((1, 0), (3, 2)), gt, gt_segs)
    assert per.per_class()["fp"].tolist() == [1, 0, 0, 0]
    # Stuff: IoU = 10 / (16 + 10 - 10) = 0.625 -> TP; the crowd GT is no FN.
    assert per.per_class()["tp"].tolist() == [0, 0, 1, 0]
    assert per.per_class()["fn"].tolist() == [0, 0, 0, 0]


def test_void_excluded_from_union_and_prediction_on_void_not_fp():
    # GT: thing 1 (class 0) = 10 px, the rest void.
    gt = _seg(["11111000", "11111000", "00000000"])
    gt_segs = _gts((1, 0, False))
    # Pred 1 (class 0): 9 thing px + 1 void px -> IoU = 9 / (10 + 10 - 9 - 1) = 0.9.
    # Pred 3 (class 1): 1 thing px + 1 void px -> void ratio exactly 0.5 (not > 0.5) -> FP.
    # Pred 2 (class 1): 12 px, all void -> ignored.
    pred = _seg(["11113322", "11111122", "22222222"])
    pred_segs = _preds((1, 0), (2, 1), (3, 1))
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    metric.update(pred, pred_segs, gt, gt_segs)
    per = metric.per_class()
    assert per["tp"].tolist() == [1, 0, 0, 0]
    assert per["fp"].tolist() == [0, 1, 0, 0]
    assert per["fn"].tolist() == [0, 0, 0, 0]
    assert float(metric.iou_sum[0]) == pytest.approx(0.9)
    res = metric.compute()
    assert float(res["pq_th"]) == pytest.approx((90.0 + 0.0) / 2)
    assert per_ref_equal(metric, [(pred, pred_segs, gt, gt_segs)])


def test_multi_image_accumulation_and_batch_update():
    gt1 = _seg(["1122", "1122"])
    segs1 = _gts((1, 0, False), (2, 2, False))
    gt2 = _seg(["3322", "3322"])
    segs2 = _gts((3, 0, False), (2, 2, False))
    pred2 = _seg(["0022", "0022"])  # thing missed: FN for class 0
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    metric.update(gt1, _preds((1, 0), (2, 2)), gt1, segs1)
    metric.update(pred2, _preds((2, 2)), gt2, segs2)
    res = {k: float(v) for k, v in metric.compute().items()}
    # Class 0: tp 1 (IoU 1), fn 1 -> PQ = 1 / 1.5; class 2: 2 TPs with IoU 1.
    assert res["pq_th"] == pytest.approx(100 / 1.5)
    assert res["sq_th"] == pytest.approx(100.0)
    assert res["rq_th"] == pytest.approx(100 / 1.5)
    assert res["pq_st"] == pytest.approx(100.0)
    assert res["pq"] == pytest.approx((100 / 1.5 + 100) / 2)

    batched = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    batched.update([gt1, pred2], [_preds((1, 0), (2, 2)), _preds((2, 2))], [gt1, gt2], [segs1, segs2])
    for key, value in batched.compute().items():
        assert float(value) == pytest.approx(res[key])


def test_merge_state_sums_like_ddp_sync():
    gen = torch.Generator().manual_seed(1)
    images = [_random_image(gen) for _ in range(6)]
    whole = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    part_a = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    part_b = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    for i, img in enumerate(images):
        whole.update(*img)
        (part_a if i % 2 else part_b).update(*img)
    part_a.merge_state(part_b)
    for key, value in whole.compute().items():
        torch.testing.assert_close(part_a.compute()[key], value, equal_nan=True)


def test_matches_reference_implementation_on_random_segmentations():
    gen = torch.Generator().manual_seed(0)
    images = [_random_image(gen) for _ in range(40)]
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    for img in images:
        metric.update(*img)
    stats = reference_pq_stats(images, NUM_CLASSES)
    per = metric.per_class()
    assert per["tp"].tolist() == [stats[c]["tp"] for c in range(NUM_CLASSES)]
    assert per["fp"].tolist() == [stats[c]["fp"] for c in range(NUM_CLASSES)]
    assert per["fn"].tolist() == [stats[c]["fn"] for c in range(NUM_CLASSES)]
    assert sum(s["tp"] for s in stats.values()) > 10  # the random cases do exercise matching
    ref = reference_pq_average(stats, NUM_THINGS)
    for key, value in metric.compute().items():
        assert float(value) == pytest.approx(ref[key], rel=1e-6)


def test_unlisted_gt_ids_are_scored_as_panopticapi_not_as_void():
    # GT id 9 (and the COCO reader's -1) is in the PNG but not in segments_info.
    gt = _seg(["1111..99"])
    pred = _seg(["11111111"])
    # pq_compute_single_core: union = pred 8 + gt 4 - inter 4 - pred∩void 2 = 6 -> IoU 4/6;
    # were the unlisted pixels void, the union would be 4 and the IoU 1.
    for unlisted in (9, -1):
        gt_u = torch.where(gt == 9, unlisted, gt)
        assert _pq(pred, _preds((1, 0)), gt_u, _gts((1, 0, False)))["pq"] == pytest.approx(100 * 4 / 6)
    # Unmatched pred 2 lies on 2 void + 4 unlisted pixels: 2/6 <= 0.5 is ignored, so it is a
    # false positive (were the unlisted pixels void: 6/6, not counted). PQ = 1 / (1 + 0.5).
    gt, pred = _seg(["11..9999"]), _seg(["11222222"])
    images = [(pred, _preds((1, 0), (2, 0)), gt, _gts((1, 0, False)))]
    assert _pq(*images[0])["pq"] == pytest.approx(100 / 1.5)
    assert reference_pq_stats(images, NUM_CLASSES)[0] == {"iou": 1.0, "tp": 1, "fp": 1, "fn": 0}
    # never a false negative when nothing covers it
    assert _pq(_seg(["1111...."]), _preds((1, 0)), _seg(["1111..99"]), _gts((1, 0, False)))["rq"] == pytest.approx(100)


def test_unlisted_gt_ids_match_reference_on_random_segmentations():
    gen = torch.Generator().manual_seed(1)
    images = []
    for _ in range(30):
        pred_seg, pred_segs, gt_seg, gt_segs = _random_image(gen)
        # drop a listed GT segment: its pixels stay in the map with an id the list lacks
        drop = int(torch.randint(0, len(gt_segs), (1,), generator=gen))
        images.append((pred_seg, pred_segs, gt_seg, gt_segs[:drop] + gt_segs[drop + 1 :]))
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    for img in images:
        metric.update(*img)
    stats = reference_pq_stats(images, NUM_CLASSES)
    per = metric.per_class()
    for key in ("tp", "fp", "fn"):
        assert per[key].tolist() == [stats[c][key] for c in range(NUM_CLASSES)]
    ref = reference_pq_average(stats, NUM_THINGS)
    for key, value in metric.compute().items():
        assert float(value) == pytest.approx(ref[key], rel=1e-6)
    # the binary-search path (large ids) scores unlisted ids the same way
    big = 256 * 256 * 200
    small = _seg(["1111..99"]).long()
    gt = torch.where(small == 1, big, torch.where(small == 9, big + 9, 0))
    assert _pq(torch.ones_like(gt), _preds((1, 0)), gt, _gts((big, 0, False)))["pq"] == pytest.approx(100 * 4 / 6)


def test_large_ids_use_binary_search_path():
    big = 256 * 256 * 200  # RGB-encoded COCO-style id, above the lookup-table limit
    gt = torch.tensor([[big, big], [big + 1, big + 1]], dtype=torch.int64)
    segs = _gts((big, 0, False), (big + 1, 2, False))
    assert _pq(gt, _preds((big, 0), (big + 1, 2)), gt, segs)["pq"] == pytest.approx(100.0)


def test_empty_metric_gives_nan_and_missing_group_is_nan():
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()["pq"]))
    gt = _seg(["11", "11"])
    metric.update(gt, _preds((1, 0)), gt, _gts((1, 0, False)))
    res = metric.compute()
    assert float(res["pq_th"]) == pytest.approx(100.0)
    assert math.isnan(float(res["pq_st"]))


def test_bad_inputs_raise_clear_errors():
    metric = PanopticQuality(NUM_CLASSES, NUM_THINGS)
    gt = _seg(["11", "11"])
    with pytest.raises(ValueError, match="pred map contains segment id 5"):
        metric.update(_seg(["15", "11"]), _preds((1, 0)), gt, _gts((1, 0, False)))
    with pytest.raises(ValueError, match="listed but have no pixels"):
        metric.update(gt, _preds((1, 0), (2, 0)), gt, _gts((1, 0, False)))
    with pytest.raises(ValueError, match="same size"):
        metric.update(_seg(["111"]), _preds((1, 0)), gt, _gts((1, 0, False)))
    with pytest.raises(ValueError, match="category_id out of range"):
        metric.update(gt, _preds((1, 7)), gt, _gts((1, 0, False)))
    with pytest.raises(ValueError, match="num_things"):
        PanopticQuality(3, 4)


# --------------------------------------------------------------------- target conversion


def test_miou_matches_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    preds = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    metric = MeanIoU(num_classes=4)
    metric.update(preds, target)
    # Valid pixels: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) as (gt, pred).
    # class 0: inter 1, gt 2, pred 2 -> 1/3; class 1: inter 2, gt 2, pred 3 -> 2/3;
    # class 2: inter 1, gt 2, pred 1 -> 1/2; class 3: absent -> NaN, left out of the mean.
    res = metric.compute()
    expected = torch.tensor([1 / 3, 2 / 3, 1 / 2, float("nan")]) * 100
    torch.testing.assert_close(res["per_class_iou"], expected, equal_nan=True)
    assert float(res["miou"]) == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert float(res["acc"]) == pytest.approx(100 * 4 / 6)
    assert metric.confmat[:, :4].tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_miou_invalid_prediction_counts_as_wrong_and_batches_accumulate():
    metric = MeanIoU(num_classes=2)
    target = torch.tensor([[[0, 0], [1, 1]], [[1, 1], [255, 0]]])
    preds = torch.tensor([[[0, 255], [1, 1]], [[1, 0], [1, 0]]])
    metric.update(preds, target)
    # Pairs: (0,0) (0,void) (1,1) (1,1) (1,1) (1,0) (0,0).
    # class 0: inter 2, gt 3, pred 3 (void pred is in no class) -> 2/4.
    # class 1: inter 3, gt 4, pred 3 -> 3/4. acc = 5/7.
    res = metric.compute()
    torch.testing.assert_close(res["per_class_iou"], torch.tensor([50.0, 75.0]))
    assert float(res["acc"]) == pytest.approx(100 * 5 / 7)
    # A class predicted but never in the GT has IoU 0 (union > 0), which counts in the mean.
    other = MeanIoU(num_classes=3)
    other.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    assert other.compute()["per_class_iou"].tolist()[2] == 0.0
    assert float(other.compute()["miou"]) == pytest.approx(25.0)


def test_miou_bad_target_raises():
    metric = MeanIoU(num_classes=2)
    with pytest.raises(ValueError, match="target contains class 5"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]))
