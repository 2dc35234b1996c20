"""The COCO instance reader and data module on a tiny fixture written in the real on-disk format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

from knet_lightning.data.coco_instance import COCOInstanceDataModule, COCOInstanceDataset, rle_string_counts
from knet_lightning.data.meta import DatasetError

# JSON order is not id order: contiguous ids must follow the JSON (dog 0, person 1, car 2).
CATEGORIES = [
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]
H_A, W_A = 24, 32


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts written by hand: column-major runs starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    runs, value, n = [], 0, 0
    for x in flat:
        if x == value:
            n += 1
        else:
            runs.append(n)
            value, n = x, 1
    runs.append(n)
    return runs


def _expected_a() -> dict[str, np.ndarray]:
    """Hand-drawn masks of image A (pycocotools fills integer-corner rectangles as [x0, x1) x [y0, y1))."""
    person = np.zeros((H_A, W_A), bool)
    person[2:10, 1:5] = True  # part 1: polygon x 1..5, y 2..10
    person[14:20, 3:7] = True  # part 2 (an occluded person seen in two pieces)
    ring = np.zeros((H_A, W_A), bool)  # a car with a hole: only RLE can encode it
    ring[4:16, 10:22] = True
    ring[7:13, 13:19] = False
    crowd = np.zeros((H_A, W_A), bool)
    crowd[12:22, 20:30] = True  # overlaps the ring's corner
    person2 = np.zeros((H_A, W_A), bool)
    person2[0:6, 24:32] = True
    return {"person": person, "ring": ring, "crowd": crowd, "person2": person2}


def _write_fixture(root: Path, split: str = "val") -> dict[str, Any]:
    """A (PNG, 4 annotations: 2-part polygon, compressed-RLE ring, crowd uncompressed RLE, polygon),
    B (JPEG, no annotation), C (PNG, one polygon without 'area')."""
    rng = np.random.default_rng(0)
    (root / f"{split}2017").mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    img_a = rng.integers(0, 256, (H_A, W_A, 3), dtype=np.uint8)
    Image.fromarray(img_a).save(root / f"{split}2017" / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(root / f"{split}2017" / "b.jpg")
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / f"{split}2017" / "c.png")

    m = _expected_a()
    ring_rle = mask_utils.encode(np.asfortranarray(m["ring"].astype(np.uint8)))
    anns = [
        {
            "id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 56.0, "bbox": [1, 2, 6, 18],
            "segmentation": [[1, 2, 5, 2, 5, 10, 1, 10], [3.0, 14.0, 7.0, 14.0, 7.0, 20.0, 3.0, 20.0]],
        },
        {
            "id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 108.0, "bbox": [10, 4, 12, 12],
            "segmentation": {"size": [H_A, W_A], "counts": ring_rle["counts"].decode("ascii")},
        },
        {
            "id": 12, "image_id": 1, "category_id": 18, "iscrowd": 1, "area": 100.0, "bbox": [20, 12, 10, 10],
            "segmentation": {"size": [H_A, W_A], "counts": _runs(m["crowd"])},
        },
        {
            "id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 48.0, "bbox": [24, 0, 8, 6],
            "segmentation": [[24, 0, 32, 0, 32, 6, 24, 6]],
        },
        {
            "id": 14, "image_id": 3, "category_id": 18, "iscrowd": 0, "bbox": [0, 0, 4, 4],
            "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]],
        },
    ]  # fmt: skip
    data = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.png", "width": W_A, "height": H_A},
            {"id": 2, "file_name": "b.jpg", "width": 20, "height": 16},
            {"id": 3, "file_name": "c.png", "width": 16, "height": 16},
        ],
        "annotations": anns,
        "categories": CATEGORIES,
    }
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return {"img_a": img_a, "masks": m, "data": data}


@pytest.fixture
def fixture(tmp_path: Path) -> dict[str, Any]:
    info = _write_fixture(tmp_path)
    info["root"] = tmp_path
    return info


def test_class_info_all_things_in_json_order(fixture: dict[str, Any]) -> None:
    info = COCOInstanceDataset(fixture["root"], split="val").class_info
    assert info.names == ("dog", "person", "car")
    assert info.dataset_ids == (18, 1, 3)
    assert (info.num_things, info.num_stuff, info.num_classes) == (3, 0, 3)


def test_image_a_pixel_exact(fixture: dict[str, Any]) -> None:
    ds = COCOInstanceDataset(fixture["root"], split="val")
    assert len(ds) == 3
    image, target = ds[0]
    m = fixture["masks"]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy(fixture["img_a"]).permute(2, 0, 1))

    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.bool
    expected = np.stack([m["person"], m["ring"], m["crowd"], m["person2"]])
    np.testing.assert_array_equal(target["masks"].numpy(), expected)
    assert target["labels"].tolist() == [1, 2, 0, 1]
    assert target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [False, False, True, False]

    sem = np.full((H_A, W_A), 255, np.int64)  # background and crowd: ignore
    sem[m["person"]] = 1
    sem[m["ring"]] = 2
    sem[m["person2"]] = 1
    assert isinstance(target["sem_seg"], tv_tensors.Mask) and target["sem_seg"].dtype == torch.int64
    np.testing.assert_array_equal(target["sem_seg"].numpy(), sem)
    assert target["image_id"] == 1 and target["file_name"] == "a.png" and target["orig_size"] == (H_A, W_A)

    gt = target["eval_gt"]
    assert [type(r["counts"]) for r in gt["rles"]] == [str] * 4
    assert all(r["size"] == [H_A, W_A] for r in gt["rles"])
    decoded = np.stack([mask_utils.decode(r) for r in gt["rles"]]).astype(bool)
    np.testing.assert_array_equal(decoded, expected)
    assert gt["labels"].tolist() == [1, 2, 0, 1]
    assert gt["iscrowd"].tolist() == [False, False, True, False]
    assert gt["area"].tolist() == [56.0, 108.0, 100.0, 48.0]  # from the JSON
    assert [int(x.sum()) for x in expected] == [56, 108, 100, 48]  # the fixture's areas are right


def test_image_without_annotations_and_missing_area(fixture: dict[str, Any]) -> None:
    ds = COCOInstanceDataset(fixture["root"], split="val")
    image, target = ds[1]
    assert image.shape == (3, 16, 20)
    assert target["masks"].shape == (0, 16, 20) and target["masks"].dtype == torch.bool
    assert target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)
    assert bool((target["sem_seg"] == 255).all())
    assert target["eval_gt"]["rles"] == [] and target["eval_gt"]["area"].shape == (0,)

    _, target_c = ds[2]
    assert target_c["eval_gt"]["area"].tolist() == [16.0]  # no 'area' in the JSON: the mask's pixel count
    assert int(target_c["masks"][0].sum()) == 16 and bool(target_c["masks"][0, :4, :4].all())


def test_filter_empty(fixture: dict[str, Any]) -> None:
    kept = COCOInstanceDataset(fixture["root"], split="val", filter_empty=True)
    assert len(kept) == 2
    assert [kept.image_info(i)["file_name"] for i in range(2)] == ["a.png", "c.png"]
    assert len(COCOInstanceDataset(fixture["root"], split="val", filter_empty=False)) == 3


def test_min_size_drops_small_images_as_mmdet(fixture: dict[str, Any], caplog: Any) -> None:
    import logging

    root = fixture["root"]
    # min(width, height) >= min_size stays: A is 32x24, B 20x16, C 16x16
    names = lambda ds: [ds.image_info(i)["file_name"] for i in range(len(ds))]  # noqa: E731
    assert names(COCOInstanceDataset(root, split="val", min_size=16)) == ["a.png", "b.jpg", "c.png"]
    with caplog.at_level(logging.INFO, logger="knet_lightning.data.coco"):
        ds = COCOInstanceDataset(root, split="val", filter_empty=True, min_size=17)
    assert names(ds) == ["a.png"]
    assert (
        "kept 1 of 3 images; dropped 1 without an annotation (filter_empty=True) and 1 with a side below" in caplog.text
    )
    with pytest.raises(DatasetError, match=r"instances_val2017.json: no image left for training out of 3: 1 without an "
                                           r"annotation .* 2 with a side below min_size=25 px"):  # fmt: skip
        COCOInstanceDataset(root, split="val", filter_empty=True, min_size=25)
    with pytest.raises(DatasetError, match="min_size must be >= 0"):
        COCOInstanceDataset(root, split="val", min_size=-1)


def test_datamodule_filters_small_training_images_by_default(tmp_path: Path) -> None:
    import inspect

    from omegaconf import OmegaConf

    _write_fixture(tmp_path, split="train")
    _write_fixture(tmp_path, split="val")
    dm = COCOInstanceDataModule(tmp_path, filter_min_size_train=17, num_workers=0)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1 and len(dm.datasets["val"]) == 3  # evaluation keeps every image
    # mmdet's min_size=32, in the class and in the config: the fixture's images are all smaller
    with pytest.raises(DatasetError, match="no image left for training"):
        COCOInstanceDataModule(tmp_path, num_workers=0).setup("fit")
    assert inspect.signature(COCOInstanceDataModule).parameters["filter_min_size_train"].default == 32
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "coco_instance.yaml")
    assert (conf.filter_empty_train, conf.filter_min_size_train) == (True, 32)


def test_transforms_move_masks_but_not_eval_gt(fixture: dict[str, Any]) -> None:
    ds = COCOInstanceDataset(fixture["root"], split="val", transforms=v2.RandomHorizontalFlip(p=1.0))
    image, target = ds[0]
    raw = COCOInstanceDataset(fixture["root"], split="val")[0][1]
    assert torch.equal(target["masks"], raw["masks"].flip(-1))
    assert torch.equal(target["sem_seg"], raw["sem_seg"].flip(-1))
    assert target["eval_gt"]["rles"] == raw["eval_gt"]["rles"]  # original orientation and size


def test_rle_string_counts_matches_hand_runs() -> None:
    rng = np.random.default_rng(1)
    for density in (0.0, 0.05, 0.5, 0.97, 1.0):
        mask = rng.random((9, 13)) < density
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
        assert rle_string_counts(counts) == _runs(mask)
    with pytest.raises(ValueError, match="invalid character"):
        rle_string_counts("a b")
    with pytest.raises(ValueError, match="truncated"):
        rle_string_counts("P")  # 0x20 "more" bit set on the last character


# ----------------------------------------------------------------------------- bad inputs


def _edit_json(root: Path, edit: Any) -> None:
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _ann(data: dict[str, Any], ann_id: int) -> dict[str, Any]:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


JSON_ERRORS = [
    ("unknown_image", lambda d: _ann(d, 10).update(image_id=99), r"image_id 99, which is not in 'images'"),
    ("unknown_category", lambda d: _ann(d, 13).update(category_id=7), r"annotations\[3\].*unknown category id 7"),
    ("bbox_only", lambda d: _ann(d, 13).pop("segmentation"), r"annotations\[3\] \(id 13\).*no 'segmentation'"),
    ("empty_polygons", lambda d: _ann(d, 10).update(segmentation=[]), r"no 'segmentation'.*bbox-only"),
    ("odd_polygon", lambda d: _ann(d, 10)["segmentation"][1].pop(), r"segmentation\[1\] must be a polygon.*7 values"),
    ("short_polygon", lambda d: _ann(d, 13).update(segmentation=[[0, 0, 4, 4]]), r"segmentation\[0\].*4 values"),
    ("string_segm", lambda d: _ann(d, 13).update(segmentation="polygon"), r"must be a list of polygons or an RLE"),
    ("rle_size", lambda d: _ann(d, 12)["segmentation"].update(size=[H_A, W_A + 1]), r"RLE mask size 24x33 .* 24x32"),
    ("rle_keys", lambda d: _ann(d, 12)["segmentation"].pop("counts"), r"RLE segmentation needs keys"),
    ("rle_sum", lambda d: _ann(d, 12)["segmentation"]["counts"].append(3), r"sum to 771, expected .* = 768"),
    ("rle_counts_type", lambda d: _ann(d, 12)["segmentation"].update(counts=5), r"'counts' must be a list"),
    ("rle_negative", lambda d: _ann(d, 12)["segmentation"]["counts"].__setitem__(0, -1), r"non-negative"),
    ("rle_string", lambda d: _ann(d, 11)["segmentation"].update(counts="a b"), r"not a valid COCO RLE string"),
    ("no_categories", lambda d: d.pop("categories"), r"top level is missing key 'categories'"),
    ("dup_image", lambda d: d["images"].append(dict(d["images"][0])), r"repeats image id 1"),
]


@pytest.mark.parametrize("edit,pattern", [(e, p) for _, e, p in JSON_ERRORS], ids=[n for n, _, _ in JSON_ERRORS])
def test_bad_json_fails_at_construction(fixture: dict[str, Any], edit: Any, pattern: str) -> None:
    _edit_json(fixture["root"], edit)
    with pytest.raises(DatasetError, match=pattern) as err:
        COCOInstanceDataset(fixture["root"], split="val")
    assert "instances_val2017.json" in str(err.value)


def test_missing_json_and_image_folder(tmp_path: Path) -> None:
    _write_fixture(tmp_path)
    with pytest.raises(DatasetError, match=r"missing instance JSON .*instances_train2017\.json"):
        COCOInstanceDataset(tmp_path, split="train")
    (tmp_path / "val2017").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match=r"missing image folder .*val2017"):
        COCOInstanceDataset(tmp_path, split="val")
    with pytest.raises(DatasetError, match="does not exist"):
        COCOInstanceDataset(tmp_path / "nope", split="val")
    _edit_json(tmp_path, lambda d: None)
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    (tmp_path / "elsewhere").rename(tmp_path / "val2017")
    with pytest.raises(DatasetError, match="malformed JSON"):
        COCOInstanceDataset(tmp_path, split="val")


def test_bad_files_fail_at_getitem(fixture: dict[str, Any]) -> None:
    root = fixture["root"]
    (root / "val2017" / "c.png").unlink()
    ds = COCOInstanceDataset(root, split="val")
    with pytest.raises(DatasetError, match=r"c\.png: image file not found"):
        ds[2]
    Image.fromarray(np.zeros((16, 17, 3), np.uint8)).save(root / "val2017" / "c.png")
    with pytest.raises(DatasetError, match=r"c\.png: image is 17x16 \(WxH\) but .* says 16x16"):
        ds[2]
    (root / "val2017" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match="cannot decode image file"):
        ds[2]


def test_non_numeric_polygon_fails_at_getitem(fixture: dict[str, Any]) -> None:
    _edit_json(fixture["root"], lambda d: _ann(d, 14)["segmentation"][0].__setitem__(2, "x"))
    ds = COCOInstanceDataset(fixture["root"], split="val")
    with pytest.raises(DatasetError, match=r"annotations\[4\] \(id 14\) \(image c\.png\): cannot decode"):
        ds[2]


# ----------------------------------------------------------------------------- data module


def test_datamodule_batches_and_filter_empty_train(tmp_path: Path) -> None:
    _write_fixture(tmp_path, split="train")
    _write_fixture(tmp_path, split="val")
    dm = COCOInstanceDataModule(
        tmp_path, batch_size=2, val_batch_size=3, num_workers=0, train_short_edge=None, eval_short_edge=None,
        flip_prob=0.0, filter_min_size_train=0,  # the fixture's images are under mmdet's 32 px
    )  # fmt: skip
    assert dm.class_info.names == ("dog", "person", "car") and dm.num_stuff == 0
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 2  # the empty image b.jpg is dropped for training
    assert len(dm.datasets["val"]) == 3  # and kept for evaluation
    train = list(dm.train_dataloader())
    assert sum(len(b["targets"]) for b in train) == 2
    for batch in train:
        assert batch["images"].dtype == torch.float32 and batch["images"].shape[-2:] == (32, 32)
        for t, (h, w) in zip(batch["targets"], batch["image_sizes"]):
            assert t["masks"].shape[1:] == (h, w) and len(t["labels"]) == t["masks"].shape[0] > 0

    (val,) = list(dm.val_dataloader())
    assert [t["file_name"] for t in val["targets"]] == ["a.png", "b.jpg", "c.png"]
    assert val["image_sizes"] == [(H_A, W_A), (16, 20), (16, 16)]
    assert val["images"].shape == (3, 3, 32, 32)
    assert len(val["targets"][0]["eval_gt"]["rles"]) == 4 and val["targets"][1]["masks"].shape == (0, 16, 20)


def test_datamodule_keeps_empty_when_asked(tmp_path: Path) -> None:
    _write_fixture(tmp_path, split="train")
    dm = COCOInstanceDataModule(tmp_path, val_split="train", filter_empty_train=False, filter_min_size_train=0,
                                num_workers=0)  # fmt: skip
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3
