"""Writers of the official formats: COCO panoptic PNG + JSON, COCO results JSON, semantic PNGs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.data.io import load_panoptic_png
from knet_lightning.data.meta import ClassInfo
from knet_lightning.evaluation.export import (
    COCOPanopticWriter,
    COCOResultsWriter,
    SemanticPNGWriter,
    segment_areas_and_boxes,
)
from knet_lightning.tasks import build_task

# Things first; data-set ids not contiguous and not sorted.
CLASS_INFO = ClassInfo(
    names=("person", "car", "sky", "road"),
    isthing=(True, True, False, False),
    colors=((220, 20, 60), (0, 0, 142), (70, 130, 180), (128, 64, 128)),
    dataset_ids=(1, 3, 187, 149),
)


def _pan_case(h: int = 24, w: int = 32) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A panoptic prediction: 2 things, 2 stuff, a void strip and a listed-but-empty segment."""
    seg = torch.zeros(h, w, dtype=torch.int32)
    seg[: h // 2] = 3  # sky
    seg[h // 2 :] = 4  # road
    seg[2:8, 3:9] = 1  # person
    seg[14:20, 20:30] = 2  # car
    seg[:, -2:] = 0  # void
    segments = [
        {"id": 1, "category_id": 0, "isthing": True, "score": 0.9},
        {"id": 2, "category_id": 1, "isthing": True, "score": 0.8},
        {"id": 3, "category_id": 2, "isthing": False, "score": 0.7},
        {"id": 4, "category_id": 3, "isthing": False, "score": 0.6},
        {"id": 5, "category_id": 1, "isthing": True, "score": 0.1},  # no pixels: dropped
    ]
    return seg, segments


def _write_images(folder: Path, names: list[str], size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((*size, 3), 128, dtype=np.uint8)).save(folder / name)


def test_segment_areas_and_boxes_match_pycocotools() -> None:
    seg, _ = _pan_case()
    ids = [1, 2, 3, 4, 9]
    areas, boxes = segment_areas_and_boxes(seg, ids)
    for seg_id, area, box in zip(ids, areas, boxes):
        mask = (seg == seg_id).numpy()
        assert area == int(mask.sum())
        if area:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert box == mask_utils.toBbox(rle).astype(int).tolist()
        else:
            assert box == [0, 0, 0, 0]
    assert boxes[0] == [3, 2, 6, 6]


def test_panoptic_writer_reads_back(tmp_path: Path) -> None:
    seg_a, segments_a = _pan_case()
    seg_b = torch.zeros(24, 32, dtype=torch.int64)
    seg_b[:, :16] = 7  # large, non-consecutive ids are kept
    seg_b[:, 16:] = 300
    segments_b = [{"id": 7, "category_id": 3}, {"id": 300, "category_id": 0}]
    with COCOPanopticWriter(tmp_path, CLASS_INFO) as writer:
        writer.add(42, "a.jpg", seg_a, segments_a)
        writer.add(5, "b.jpg", seg_b.numpy(), segments_b)
        writer.add(42, "a.jpg", seg_a, segments_a)  # padded repeat: ignored
    data = json.loads((tmp_path / "panoptic.json").read_text())

    # panopticapi's pq_compute reads `annotations` (image_id, file_name, segments_info with
    # id and category_id) and the PNGs; COCOPanopticDataset additionally needs `images`.
    assert [a["image_id"] for a in data["annotations"]] == [42, 5]
    assert data["categories"] == [
        {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
        {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
        {"id": 187, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
        {"id": 149, "name": "road", "isthing": 0, "color": [128, 64, 128]},
    ]
    ann = data["annotations"][0]
    assert ann["file_name"] == "a.png"
    assert [s["id"] for s in ann["segments_info"]] == [1, 2, 3, 4]  # id 5 had no pixels
    assert [s["category_id"] for s in ann["segments_info"]] == [1, 3, 187, 149]
    ids = load_panoptic_png(tmp_path / "panoptic" / "a.png")
    assert np.array_equal(ids, seg_a.numpy())
    for s in ann["segments_info"]:
        mask = ids == s["id"]
        assert s["area"] == int(mask.sum()) and s["iscrowd"] == 0
        ys, xs = np.nonzero(mask)
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert np.array_equal(load_panoptic_png(tmp_path / "panoptic" / "b.png"), seg_b.numpy())

    # The output is a COCO panoptic data set: the reader decodes it back to the prediction.
    _write_images(tmp_path / "images", ["a.jpg", "b.jpg"], (24, 32))
    ds = COCOPanopticDataset(tmp_path, json_file="panoptic.json", image_dir="images", png_dir="panoptic")
    assert ds.class_info == CLASS_INFO
    _, target = ds[0]
    assert target["image_id"] == 42
    assert target["labels"].tolist() == [0, 1, 2, 3]
    assert not target["iscrowd"].any()
    for k, seg_id in enumerate([1, 2, 3, 4]):
        assert torch.equal(target["masks"][k], seg_a == seg_id)
    _, target_b = ds[1]
    assert target_b["labels"].tolist() == [3, 0]
    assert torch.equal(target_b["masks"][1], torch.from_numpy(seg_b.numpy() == 300))


def test_panoptic_writer_rejects_bad_input(tmp_path: Path) -> None:
    seg, segments = _pan_case()
    writer = COCOPanopticWriter(tmp_path, CLASS_INFO)
    with pytest.raises(ValueError, match=r"'x.jpg' has segment ids \[4\] missing from segments_info"):
        writer.add(1, "x.jpg", seg, segments[:3])
    with pytest.raises(ValueError, match="must be distinct"):
        writer.add(1, "x.jpg", seg, segments + segments[:1])
    with pytest.raises(ValueError, match=r"segment 4 of 'x.jpg': contiguous class id 9 out of range"):
        writer.add(1, "x.jpg", seg, [*segments[:3], {"id": 4, "category_id": 9}])
    writer.add(1, "dir1/x.jpg", seg, segments)
    with pytest.raises(ValueError, match=r"'dir2/x.jpg' \(image 2\) and image 1 would both be written to"):
        writer.add(2, "dir2/x.jpg", seg, segments)
    # mode=predict on a folder tree keeps the folders: dir2/x.jpg is another file, dir1/x.png the same
    tree = COCOPanopticWriter(tmp_path / "tree", CLASS_INFO, keep_folders=True)
    tree.add(1, "dir1/x.jpg", seg, segments)
    tree.add(2, "dir2/x.jpg", seg, segments)
    assert (tmp_path / "tree" / "panoptic" / "dir1" / "x.png").is_file()
    assert (tmp_path / "tree" / "panoptic" / "dir2" / "x.png").is_file()
    with pytest.raises(ValueError, match=r"'dir1/x.png' \(image 3\) and image 1 would both be written to"):
        tree.add(3, "dir1/x.png", seg, segments)
    with pytest.raises(ValueError, match="image_id 1 added for 'dir1/x.jpg' and again for 'y.jpg'"):
        writer.add(1, "y.jpg", seg, segments)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(3, "z.jpg", seg, segments)


def test_panoptic_writer_does_not_finalise_after_an_error(tmp_path: Path) -> None:
    seg, segments = _pan_case()
    with pytest.raises(ValueError), COCOPanopticWriter(tmp_path, CLASS_INFO) as writer:
        writer.add(1, "x.jpg", seg, segments)
        writer.add(2, "y.jpg", seg, [])
    assert not (tmp_path / "panoptic.json").exists()


def _coco_gt(images: list[tuple[int, int, int]]) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": [{"id": i, "height": h, "width": w} for i, h, w in images],
            "annotations": [],
            "categories": [{"id": d, "name": n} for d, n in zip(CLASS_INFO.dataset_ids, CLASS_INFO.names)],
        }
        coco.createIndex()
    return coco


def test_coco_results_writer_loads_with_loadres(tmp_path: Path) -> None:
    masks_a = torch.rand(3, 20, 30) > 0.6
    masks_a[2] = False  # an empty mask is still a (zero-area) result
    scores_a = torch.tensor([0.9, 0.5, 0.25])
    labels_a = torch.tensor([1, 0, 1])
    masks_c = torch.rand(2, 16, 12) > 0.5
    path = tmp_path / "out" / "segm.json"
    with COCOResultsWriter(path, CLASS_INFO) as writer:
        writer.add(7, masks_a, scores_a, labels_a)
        # Entries reach the file as they are added, not at close().
        assert writer.num_entries == 3
        writer.add(8, torch.zeros(0, 10, 10, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
        writer.add(9, masks_c.numpy(), [0.7, 0.6], [0, 1])
        writer.add(7, masks_a, scores_a, labels_a)  # padded repeat: ignored
    entries = json.loads(path.read_text())
    assert len(entries) == 5
    assert [e["category_id"] for e in entries] == [3, 1, 3, 1, 3]
    assert [e["image_id"] for e in entries] == [7, 7, 7, 9, 9]
    assert [e["score"] for e in entries] == pytest.approx([0.9, 0.5, 0.25, 0.7, 0.6])

    with contextlib.redirect_stdout(io.StringIO()):
        results = _coco_gt([(7, 20, 30), (8, 10, 10), (9, 16, 12)]).loadRes(str(path))
    anns = results.loadAnns(results.getAnnIds())
    expected = list(masks_a) + list(masks_c)
    for ann, mask in zip(anns, expected):
        assert isinstance(ann["segmentation"]["counts"], str)
        decoded = results.annToMask(ann).astype(bool)
        assert np.array_equal(decoded, mask.numpy())
        ys, xs = np.nonzero(mask.numpy())
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(xs) else [0, 0, 0, 0]
        assert ann["bbox"] == pytest.approx(box)
        # With a bbox, loadRes takes the box area as the result's area (see the writer's caveat).
        assert ann["area"] == box[2] * box[3]

    # Without bbox, loadRes takes the mask area, as COCOeval(segm) in detectron2/mmdet/MaskAP.
    with COCOResultsWriter(tmp_path / "nobox.json", CLASS_INFO, with_bbox=False) as writer:
        writer.add(7, masks_a, scores_a, labels_a)
    with contextlib.redirect_stdout(io.StringIO()):
        results = _coco_gt([(7, 20, 30)]).loadRes(str(tmp_path / "nobox.json"))
    anns = results.loadAnns(results.getAnnIds())
    assert [a["area"] for a in anns] == [int(m.sum()) for m in masks_a]
    assert all(np.array_equal(results.annToMask(a).astype(bool), m.numpy()) for a, m in zip(anns, masks_a))


def test_coco_results_writer_empty_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    COCOResultsWriter(path, CLASS_INFO).close()
    assert json.loads(path.read_text()) == []
    writer = COCOResultsWriter(tmp_path / "bad.json", CLASS_INFO)
    with pytest.raises(ValueError, match=r"image 1: masks must be \(K, H, W\) with K scores and labels"):
        writer.add(1, torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="image 1: contiguous class id 4 out of range"):
        writer.add(1, torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1), torch.tensor([4]))
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(2, torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1), torch.tensor([0]))


def test_semantic_png_writer_with_cityscapes_id_map(tmp_path: Path) -> None:
    # Cityscapes: trainId -> labelId (first four: road 7, sidewalk 8, building 11, wall 12).
    sem = torch.tensor([[0, 1, 2, 3], [255, 3, 2, 1]], dtype=torch.int64)
    writer = SemanticPNGWriter(tmp_path / "city", id_map=[7, 8, 11, 12])
    path = writer.add("frankfurt/frankfurt_000000_000294_leftImg8bit.png", sem)
    assert path == tmp_path / "city" / "frankfurt_000000_000294_leftImg8bit.png"
    with Image.open(path) as im:
        assert im.mode == "L"
        written = np.asarray(im)
    assert written.tolist() == [[7, 8, 11, 12], [0, 12, 11, 8]]  # 255 (ignore) -> 0 (unlabeled)
    with pytest.raises(ValueError, match=r"'x.png' has class ids \[4\] outside \[0, 4\) \(id_map\) or 255"):
        writer.add("x.png", torch.tensor([[4, 0]]))
    with pytest.raises(ValueError, match="would both be written"):
        writer.add("munster/frankfurt_000000_000294_leftImg8bit.png", sem)
    tree = SemanticPNGWriter(tmp_path / "tree", keep_folders=True)
    assert tree.add("a/x.jpg", sem) == tmp_path / "tree" / "a" / "x.png"
    assert tree.add("b/x.jpg", sem) == tmp_path / "tree" / "b" / "x.png"

    plain = SemanticPNGWriter(tmp_path / "plain")
    with Image.open(plain.add("a.jpg", sem.numpy())) as im:
        assert np.asarray(im).tolist() == sem.tolist()  # contiguous ids, 255 kept
    with pytest.raises(ValueError, match=r"class ids \[256\] outside \[0, 255\]"):
        plain.add("b.jpg", torch.tensor([[256]]))
    with pytest.raises(ValueError, match="id_map must be a non-empty list of ids in 0..255"):
        SemanticPNGWriter(tmp_path, id_map=[7, 300])


def _write(task: str, batches: list[list[dict[str, Any]]], out_dir: Path) -> int:
    """Writes prediction batches the way ``PredictionExport`` does: through the task's writer."""
    kinds = {"panoptic": (4, 2), "instance": (2, 2), "semantic": (4, 0)}
    num_classes, num_things = kinds[task]
    task_obj = build_task(task, num_classes=num_classes, num_things=num_things, num_proposals=3, num_stages=1)
    count = 0
    with task_obj.open_writer(out_dir, CLASS_INFO) as writer:
        for batch in batches:
            for item in batch:
                task_obj.write(writer, item["image_id"], item["file_name"], item["prediction"])
                count += 1
    return count


def test_each_task_writes_its_official_format(tmp_path: Path) -> None:
    seg, segments = _pan_case()
    pan_batches = [
        [{"file_name": "a.jpg", "image_id": 0, "prediction": (seg, segments)}],
        [{"file_name": "b.jpg", "image_id": 1, "prediction": (seg.clone(), segments)}],
    ]
    assert _write("panoptic", pan_batches, tmp_path / "pan") == 2
    data = json.loads((tmp_path / "pan" / "panoptic.json").read_text())
    assert [a["file_name"] for a in data["annotations"]] == ["a.png", "b.png"]
    assert np.array_equal(load_panoptic_png(tmp_path / "pan" / "panoptic" / "b.png"), seg.numpy())

    masks = torch.rand(2, 24, 32) > 0.5
    inst = {"masks": masks, "scores": torch.tensor([0.8, 0.3]), "labels": torch.tensor([0, 1])}
    batches = [[{"file_name": "a.jpg", "image_id": 3, "prediction": inst}]]
    assert _write("instance", batches, tmp_path / "inst") == 1
    entries = json.loads((tmp_path / "inst" / "instances.json").read_text())
    assert [e["category_id"] for e in entries] == [1, 3]
    decoded = mask_utils.decode([e["segmentation"] for e in entries])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())

    sem = torch.tensor([[0, 1], [3, 255]])
    batches = [[{"file_name": "c.jpg", "image_id": 0, "prediction": sem}]]
    assert _write("semantic", batches, tmp_path / "sem") == 1
    with Image.open(tmp_path / "sem" / "semantic" / "c.png") as im:
        # the data set's own ids (CLASS_INFO.dataset_ids); ignored pixels as 0, the data sets' "unlabeled"
        assert np.asarray(im).tolist() == [[1, 3], [149, 0]]
    with pytest.raises(ValueError, match="task must be|expected one of"):
        build_task("depth", num_classes=2, num_things=0, num_proposals=2, num_stages=1)
