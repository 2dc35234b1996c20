"""MaskAP against pycocotools' COCOeval run directly on the same data."""

from __future__ import annotations

import contextlib
import io
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from knet_lightning.evaluation.instance import MaskAP, encode_masks

# Contiguous class c is data-set category DATASET_IDS[c]: not sorted, so the direct
# evaluation orders its categories differently from the metric.
DATASET_IDS = [7, 3, 11, 5]
NUM_CLASSES = len(DATASET_IDS)
NAMES = ["small", "medium", "large", "crowd"]


def _rect(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO JSON's uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _case() -> list[dict[str, Any]]:
    """Images with GT masks (+ crowd flag, area) and predictions (masks, scores, labels).

    Covers: several classes, small (< 32^2), medium and large (>= 96^2) objects, a crowd
    GT region with detections inside it, an image without GT, an image without
    predictions, a duplicate detection, a wrong-class detection, tied scores.
    """
    rng = np.random.default_rng(0)
    images: list[dict[str, Any]] = []

    # Image 12 (64x64): small + medium objects of two classes, a duplicate and a false positive.
    h, w = 64, 64
    g_small = _rect(h, w, 2, 2, 6, 7)  # area 20
    g_small2 = _disk(h, w, 50, 10, 3)
    g_med = _disk(h, w, 30, 40, 20)  # area ~1257
    gts = [(g_small, 0, False), (g_small2, 0, False), (g_med, 1, False)]
    p_med = _disk(h, w, 31, 41, 19)
    preds = [
        (_rect(h, w, 2, 2, 6, 6), 0.9, 0),  # IoU 16/20 with g_small
        (p_med, 0.8, 1),
        (p_med, 0.8, 1),  # duplicate: tie in score, a false positive
        (_disk(h, w, 50, 11, 3), 0.3, 0),
        (_rect(h, w, 40, 40, 60, 60), 0.75, 1),  # false positive
        (g_small2, 0.6, 1),  # right place, wrong class
    ]
    images.append({"id": 12, "size": (h, w), "gts": gts, "preds": preds})

    # Image 3 (48x40): a crowd region (given as uncompressed RLE) and a normal object.
    h, w = 48, 40
    crowd = _rect(h, w, 0, 0, 20, 40)
    g_obj = _rect(h, w, 25, 5, 45, 30)
    gts = [(crowd, 3, True), (g_obj, 3, False), (_rect(h, w, 30, 32, 40, 39), 0, False)]
    preds = [
        (_rect(h, w, 2, 2, 12, 20), 0.95, 3),  # inside the crowd: ignored
        (_rect(h, w, 5, 10, 15, 30), 0.5, 3),  # inside the crowd: ignored
        (_rect(h, w, 26, 5, 45, 28), 0.7, 3),
        (_rect(h, w, 30, 30, 40, 39), 0.5, 0),  # ties with the crowd detection above
    ]
    images.append({"id": 3, "size": (h, w), "gts": gts, "preds": preds, "uncompressed_crowd": True})

    # Image 40 (32x32): no GT at all, two detections (false positives).
    h, w = 32, 32
    preds = [(_rect(h, w, 0, 0, 10, 10), 0.65, 0), (_disk(h, w, 16, 16, 8), 0.2, 2)]
    images.append({"id": 40, "size": (h, w), "gts": [], "preds": preds})

    # Image 7 (128x120): large objects.
    h, w = 128, 120
    g_large = _rect(h, w, 5, 5, 115, 110)  # area 11550 >= 96^2
    g_large2 = _disk(h, w, 64, 60, 58)
    jitter = g_large.copy()
    jitter[rng.random((h, w)) < 0.1] = False
    gts = [(g_large, 2, False), (g_large2, 1, False), (_rect(h, w, 118, 100, 124, 106), 0, False)]
    preds = [
        (jitter, 0.85, 2),
        (_disk(h, w, 66, 58, 55), 0.55, 1),
        (_rect(h, w, 0, 0, 60, 60), 0.4, 2),
        (_rect(h, w, 118, 100, 124, 105), 0.45, 0),
    ]
    images.append({"id": 7, "size": (h, w), "gts": gts, "preds": preds})

    # Image 5 (40x48): GT only, no prediction (false negatives).
    h, w = 40, 48
    gts = [(_rect(h, w, 5, 5, 30, 40), 1, False), (_rect(h, w, 0, 0, 4, 4), 0, False)]
    images.append({"id": 5, "size": (h, w), "gts": gts, "preds": []})
    return images


def _eval_gt(image: dict[str, Any]) -> dict[str, Any]:
    """The reader contract's ``eval_gt``; areas as in a JSON (not exactly the pixel count)."""
    rles, labels, crowd, area = [], [], [], []
    for k, (mask, label, is_crowd) in enumerate(image["gts"]):
        if is_crowd and image.get("uncompressed_crowd"):
            rles.append(_uncompressed_rle(mask))
        else:
            rles.append(encode_masks(mask[None])[0])
        labels.append(label)
        crowd.append(is_crowd)
        area.append(float(mask.sum()) - 0.25 * k)
    return {
        "rles": rles,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.tensor(crowd, dtype=torch.bool),
        "area": torch.tensor(area, dtype=torch.float64),
    }


def _pred(image: dict[str, Any]) -> dict[str, torch.Tensor]:
    h, w = image["size"]
    if not image["preds"]:
        return {
            "masks": torch.zeros(0, h, w, dtype=torch.bool),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
    return {
        "masks": torch.from_numpy(np.stack([p[0] for p in image["preds"]])),
        "scores": torch.tensor([p[1] for p in image["preds"]], dtype=torch.float32),
        "labels": torch.tensor([p[2] for p in image["preds"]], dtype=torch.int64),
    }


def _update(metric: MaskAP, images: list[dict[str, Any]]) -> None:
    metric.update(
        [_pred(im) for im in images],
        [_eval_gt(im) for im in images],
        image_ids=[im["id"] for im in images],
        image_sizes=[im["size"] for im in images],
    )


def _direct_cocoeval(images: list[dict[str, Any]]) -> COCOeval:
    """COCOeval exactly as one runs it on a GT JSON and a results JSON."""
    gt_json: dict[str, Any] = {
        "images": [{"id": im["id"], "height": im["size"][0], "width": im["size"][1]} for im in images],
        "annotations": [],
        "categories": [{"id": d, "name": n} for d, n in zip(DATASET_IDS, NAMES)],
    }
    results = []
    for im in images:
        gt = _eval_gt(im)
        fields = zip(gt["rles"], gt["labels"].tolist(), gt["iscrowd"].tolist(), gt["area"].tolist())
        for rle, label, crowd, area in fields:
            gt_json["annotations"].append(
                {
                    "id": 1000 + len(gt_json["annotations"]),
                    "image_id": im["id"],
                    "category_id": DATASET_IDS[label],
                    "segmentation": rle,
                    "area": area,
                    "iscrowd": int(crowd),
                    "bbox": [0, 0, 1, 1],
                }
            )
        pred = _pred(im)
        for rle, score, label in zip(encode_masks(pred["masks"]), pred["scores"].tolist(), pred["labels"].tolist()):
            results.append(
                {"image_id": im["id"], "category_id": DATASET_IDS[label], "segmentation": rle, "score": score}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]


def _new(**kwargs: Any) -> MaskAP:
    return MaskAP(num_classes=NUM_CLASSES, category_ids=DATASET_IDS, **kwargs)


def _assert_equals_direct(result: dict[str, torch.Tensor], ev: COCOeval, metric: MaskAP | None = None) -> None:
    if metric is not None:
        # Bit-identical in float64, before the float32 cast of compute().
        own = metric.coco_eval()
        assert own is not None
        assert np.array_equal(own.stats, ev.stats), (own.stats, ev.stats)
        assert np.array_equal(own.eval["precision"], ev.eval["precision"])
    for i, key in enumerate(KEYS):
        expected = torch.tensor(ev.stats[i] * 100, dtype=torch.float32)
        assert result[key].dtype == torch.float32
        assert torch.equal(result[key], expected), (key, float(result[key]), ev.stats[i] * 100)


def test_encode_masks_roundtrip() -> None:
    masks = torch.rand(3, 17, 23) > 0.5
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    decoded = mask_utils.decode(rles)  # (H, W, K)
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert encode_masks(torch.zeros(0, 4, 5, dtype=torch.bool)) == []


def test_mask_ap_equals_cocoeval() -> None:
    images = _case()
    metric = _new(class_names=NAMES)
    _update(metric, images[:2])  # two batches, images not in id order
    _update(metric, images[2:])
    result = metric.compute()
    assert set(result) == set(KEYS)
    ev = _direct_cocoeval(images)
    _assert_equals_direct(result, ev, metric)
    # The case is not degenerate: AP is neither 0 nor 100, and every area range has GT.
    assert 0 < float(result["map"]) < 100
    assert all(float(result[k]) > 0 for k in ("map_small", "map_medium", "map_large"))

    # Per-class AP: the direct evaluation's categories are sorted data-set ids.
    per_class = metric.per_class()
    assert per_class.shape == (NUM_CLASSES,)
    precision = ev.eval["precision"][:, :, :, 0, -1]
    for c, dataset_id in enumerate(DATASET_IDS):
        k = ev.params.catIds.index(dataset_id)
        values = precision[:, :, k]
        values = values[values > -1]
        assert per_class[c] == torch.tensor(float(np.mean(values)) * 100, dtype=torch.float32)
    # COCO's mAP is the mean of the per-class APs.
    assert torch.isclose(per_class.mean(), result["map"], atol=1e-4)

    # With the default ids (c + 1) the classes are averaged in another order: equal up to
    # float64 rounding, so equal after the float32 cast.
    default_ids = MaskAP(num_classes=NUM_CLASSES)
    _update(default_ids, images)
    _assert_equals_direct(default_ids.compute(), ev)


def test_mask_ap_class_without_gt_is_nan() -> None:
    images = _case()[2:3]  # only the image without GT ...
    images.append(_case()[3])  # ... and the large-object image (classes 0, 1, 2)
    metric = _new()
    _update(metric, images)
    per_class = metric.per_class()
    assert torch.isnan(per_class[3]) and not torch.isnan(per_class[:3]).any()
    # No small-area GT besides the 6x6 box: still equal to COCOeval, including -1 entries.
    _assert_equals_direct(metric.compute(), _direct_cocoeval(images), metric)


def test_mask_ap_without_predictions_is_zero() -> None:
    images = [{**im, "preds": []} for im in _case()]
    metric = _new()
    _update(metric, images)
    result = metric.compute()
    assert {k: float(v) for k, v in result.items()} == dict.fromkeys(KEYS, 0.0)
    assert torch.equal(metric.per_class(), torch.zeros(NUM_CLASSES))
    # Nothing at all (not even GT) gives 0 as well.
    empty = MaskAP(num_classes=2)
    empty.update([], [])
    assert float(empty.compute()["map"]) == 0.0


def test_mask_ap_perfect_predictions_give_100() -> None:
    images = [im for im in _case() if im["gts"] and im["id"] != 3]  # no crowd
    for im in images:
        im["preds"] = [(m, 0.9, lab) for m, lab, _ in im["gts"]]
    metric = _new()
    _update(metric, images)
    result = metric.compute()
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large"):
        assert float(result[key]) == pytest.approx(100.0), key


def test_merged_states_equal_one_metric() -> None:
    images = _case()
    full = _new()
    _update(full, images)
    a, b = _new(), _new()
    _update(a, images[:3])
    _update(b, images[3:])
    a.merge_state(b)
    _assert_equals_direct(a.compute(), _direct_cocoeval(images), a)
    assert torch.equal(a.per_class(), full.per_class())


def test_sync_dist_gathers_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """_sync_dist with a simulated 2-rank world: rank 0 ends up with both ranks' records."""
    images = _case()
    rank0, rank1 = _new(), _new()
    _update(rank0, images[:2])
    _update(rank1, images[2:])
    # Records must survive pickling, as all_gather_object pickles them.
    other = pickle.loads(pickle.dumps(list(rank1.images)))

    def fake_all_gather_object(out: list[Any], obj: Any, group: Any = None) -> None:
        out[0], out[1] = pickle.loads(pickle.dumps(obj)), other

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", fake_all_gather_object)
    rank0.sync(distributed_available=lambda: True)
    assert len(rank0.images) == len(images)
    synced = rank0.coco_eval()  # compute() itself would try to sync again
    assert synced is not None
    assert np.array_equal(synced.stats, _direct_cocoeval(images).stats)
    rank0.unsync()
    assert len(rank0.images) == 2  # back to the local records


def test_compute_syncs_through_a_gloo_process_group(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real (1-process) gloo group: compute() goes through all_gather_object."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.fail("a process group is already initialised by another test")
    calls = []
    original = MaskAP._sync_dist

    def spy(self: MaskAP, *args: Any, **kwargs: Any) -> None:
        calls.append(len(self.images))
        original(self, *args, **kwargs)

    monkeypatch.setattr(MaskAP, "_sync_dist", spy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        images = _case()
        metric = _new()
        _update(metric, images)
        result = metric.compute()
    finally:
        dist.destroy_process_group()
    assert calls == [len(images)]
    _assert_equals_direct(result, _direct_cocoeval(images), metric)


def test_repeated_image_ids_count_once() -> None:
    """DistributedSampler pads with repeated samples: they must not count twice."""
    images = _case()
    metric = _new()
    _update(metric, images)
    _update(metric, images[:2])
    _assert_equals_direct(metric.compute(), _direct_cocoeval(images), metric)

    changed = dict(images[0])
    changed["gts"] = changed["gts"][:1]
    _update(metric, [changed])
    with pytest.raises(ValueError, match="image_id 12 was updated twice with different ground truth"):
        metric.compute()


def test_images_without_ids_get_distinct_ids() -> None:
    images = _case()
    metric = _new()
    metric.update([_pred(im) for im in images], [_eval_gt(im) for im in images])
    _assert_equals_direct(metric.compute(), _direct_cocoeval(images), metric)


def test_state_is_small_and_device_moves_keep_it() -> None:
    images = _case()
    metric = _new()
    _update(metric, images)
    record = metric.images[0]
    # Only RLEs (str), numbers and ids: no arrays or tensors of masks are kept.
    assert all(isinstance(r["counts"], str) for r in record["pred_rles"] + record["gt_rles"])
    assert not any(isinstance(v, (np.ndarray, torch.Tensor)) for v in record.values())
    metric.to("cpu")
    metric.to(torch.float64)
    clone = metric.clone()
    _assert_equals_direct(clone.compute(), _direct_cocoeval(images), clone)
    metric.reset()
    assert metric.images == []
    on_cpu = _new(compute_on_cpu=True)
    _update(on_cpu, images)
    _assert_equals_direct(on_cpu.compute(), _direct_cocoeval(images), on_cpu)


def test_max_dets_is_passed_to_cocoeval() -> None:
    images = _case()
    metric = _new(max_dets=20)
    _update(metric, images)
    metric.compute()
    ev = metric.coco_eval()
    assert ev is not None and ev.params.maxDets == [1, 10, 20]
    with pytest.raises(ValueError, match="max_dets must be >= 10"):
        MaskAP(num_classes=2, max_dets=5)


def test_bad_inputs_raise_clear_errors() -> None:
    image = _case()[0]
    metric = _new()
    with pytest.raises(ValueError, match=r"pred masks are \[64, 64\] \(H, W\) but image 12 is \[32, 64\]"):
        metric.update([_pred(image)], [_eval_gt(image)], image_ids=[12], image_sizes=[(32, 64)])
    bad_gt = _eval_gt(image)
    bad_gt["rles"][0] = encode_masks(torch.zeros(1, 8, 8, dtype=torch.bool))[0]
    with pytest.raises(ValueError, match=r"eval_gt rles\[0\] has size \[8, 8\], but the image is \[64, 64\]"):
        metric.update([_pred(image)], [bad_gt], image_ids=[12])
    bad_gt = _eval_gt(image)
    bad_gt["area"] = bad_gt["area"][:1]
    with pytest.raises(ValueError, match="must be aligned"):
        metric.update([_pred(image)], [bad_gt])
    bad_pred = _pred(image)
    bad_pred["labels"] = bad_pred["labels"] + 3
    with pytest.raises(ValueError, match=r"pred labels \[4, 4, 4, 4\] out of range \[0, 4\)"):
        metric.update([bad_pred], [_eval_gt(image)])
    with pytest.raises(ValueError, match="eval_gt dict has no `area` field"):
        metric.update([_pred(image)], [{"rles": [], "labels": [], "iscrowd": []}])
    with pytest.raises(ValueError, match="got 1 predictions and 2 ground truths"):
        metric.update([_pred(image)], [_eval_gt(image)] * 2)
    assert metric.images == []


# Run by two gloo processes in test_two_process_gloo_sync and, for the reference, in-process.
_DDP_SCRIPT = r"""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from knet_lightning.evaluation.instance import MaskAP, encode_masks


def make_images():
    rng = np.random.default_rng(1)
    images = []
    for image_id in range(6):
        h, w = 24 + 4 * image_id, 32
        gt = rng.random((3, h, w)) < 0.3
        pred = gt ^ (rng.random((3, h, w)) < 0.1)
        scores = torch.tensor(rng.random(3), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, 2, 3))
        images.append(
            {
                "id": image_id,
                "pred": {"masks": torch.from_numpy(pred), "scores": scores, "labels": labels},
                "gt": {
                    "rles": encode_masks(gt),
                    "labels": torch.tensor(rng.integers(0, 2, 3)),
                    "iscrowd": torch.tensor([False, False, image_id == 2]),
                    "area": torch.tensor(gt.reshape(3, -1).sum(1), dtype=torch.float64),
                },
            }
        )
    return images


def evaluate(images):
    metric = MaskAP(num_classes=2)
    metric.update([im["pred"] for im in images], [im["gt"] for im in images], image_ids=[im["id"] for im in images])
    return {k: float(v) for k, v in metric.compute().items()}, [float(v) for v in metric.per_class()]


if __name__ == "__main__":
    import torch.distributed as dist

    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    images = make_images()
    # Uneven shards, and rank 1 repeats image 0 as DistributedSampler's padding does.
    mine = images[:2] if rank == 0 else images[2:] + images[:1]
    result = evaluate(mine)
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f)
"""


@pytest.mark.slow  # two fresh interpreters importing torch + torchmetrics
def test_two_process_gloo_sync(tmp_path: Any) -> None:
    """Two real gloo processes, each with part of the set: both compute the full-set AP."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_mask_ap.py"
    script.write_text(_DDP_SCRIPT)
    init = f"file://{tmp_path / 'pg'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(rank), init, str(tmp_path / f"r{rank}.json")], env=env)
        for rank in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    namespace: dict[str, Any] = {}
    exec(compile(_DDP_SCRIPT, "ddp_mask_ap", "exec"), namespace)  # __name__ is not __main__: only defines
    expected = namespace["evaluate"](namespace["make_images"]())
    assert 0 < expected[0]["map"] < 100
    for rank in (0, 1):
        assert json.loads((tmp_path / f"r{rank}.json").read_text()) == [expected[0], expected[1]]
