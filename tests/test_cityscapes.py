"""Cityscapes readers and data modules on a tiny fixture written in the real gtFine layout.

The fixture is built from ``instanceIds`` maps (the official annotation), from which the test
derives ``labelIds``, ``labelTrainIds`` (what ``createTrainIdLabelImgs`` writes) and the COCO
panoptic files (a transcription of ``createPanopticImgs.convert2panoptic``), so every reader's
output can be checked pixel by pixel against independently computed expectations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from knet_lightning.cli import build_datamodule, check_class_counts, config_dir
from knet_lightning.data.cityscapes import (
    CITYSCAPES_LABELS,
    CityscapesInstanceDataModule,
    CityscapesInstanceDataset,
    CityscapesPanopticDataModule,
    CityscapesPanopticDataset,
    CityscapesSemanticDataModule,
    CityscapesSemanticDataset,
    cityscapes_panoptic_categories,
)
from knet_lightning.data.meta import DatasetError
from knet_lightning.data.transforms import LargeScaleJitter

H, W = 32, 64
SPLITS = {
    "val": ["frankfurt_000000_000294", "frankfurt_000001_000538", "munster_000000_000019"],
    "train": ["aachen_000000_000019", "aachen_000001_000019"],
}
# The labels the fixture uses: labelId -> (trainId, hasInstances, ignoreInEval), from the
# Cityscapes label table (written out here so that the test does not trust the module's copy).
USED = {
    0: (255, False, True),  # unlabeled
    4: (255, False, True),  # static
    7: (0, False, False),  # road
    9: (255, False, True),  # parking
    11: (2, False, False),  # building
    23: (10, False, False),  # sky
    24: (11, True, False),  # person
    25: (12, True, False),  # rider
    26: (13, True, False),  # car
    29: (255, True, True),  # caravan
    33: (18, True, False),  # bicycle
}
# Contiguous ids: panoptic = things (labelId order) then stuff; instance = things only.
PANOPTIC_CONTIG = {24: 0, 25: 1, 26: 2, 33: 7, 7: 8, 11: 10, 23: 18}
INSTANCE_CONTIG = {24: 0, 25: 1, 26: 2, 33: 7}


def _instance_map(variant: int) -> np.ndarray:
    """``instanceIds`` values ``(H, W)``: stuff, void, instances (one with index 0), crowds, a caravan."""
    ids = np.full((H, W), 7, dtype=np.uint16)  # road
    ids[0:10] = 23  # sky
    ids[10:18] = 11  # building
    if variant == 2:  # no objects at all: an empty instance target
        ids[0:3] = 0
        return ids
    ids[0:2] = 0  # unlabeled (void)
    ids[2:4, 60:64] = 4  # static (void)
    ids[20:32, 0:6] = 9  # parking: ignoreInEval
    ids[12:24, 10:20] = 26001  # car
    ids[14:26, 30:40] = 26002  # car
    ids[8:20, 44:48] = 24000  # person, instance index 0
    ids[24:30, 50:62] = 26  # car group region: crowd
    ids[26:30, 20:28] = 29001  # caravan: instance of an ignored class
    ids[4:8, 20:24] = 33  # bicycle group: crowd
    ids[4:8, 30:34] = 25003  # rider
    if variant == 1:
        ids = np.ascontiguousarray(ids[:, ::-1])
    return ids


def _label_ids(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.where(ids >= 1000, ids // 1000, ids)


def _train_ids(ids: np.ndarray) -> np.ndarray:
    lab = _label_ids(ids)
    out = np.full(lab.shape, -1, dtype=np.int64)
    for label_id, (train_id, _, _) in USED.items():
        out[lab == label_id] = train_id
    assert (out >= 0).all()
    return out


def _create_panoptic_imgs(root: Path, split: str) -> None:
    """``createPanopticImgs.convert2panoptic`` (cityscapesscripts 2.3.0) for the labels in ``USED``."""
    gt = root / "gtFine"
    out_dir = gt / f"cityscapes_panoptic_{split}"
    out_dir.mkdir()
    images, annotations = [], []
    for f in sorted((gt / split).glob("*/*_instanceIds.png")):
        original = np.array(Image.open(f))
        file_name = f.name
        image_id = file_name.replace("_gtFine_instanceIds.png", "")
        images.append(
            {
                "id": image_id,
                "width": int(original.shape[1]),
                "height": int(original.shape[0]),
                # sic: createPanopticImgs names the image "<stem>_gtFine_leftImg8bit.png"
                "file_name": file_name.replace("_instanceIds.png", "_leftImg8bit.png"),
            }
        )
        pan = np.zeros((*original.shape, 3), dtype=np.uint8)
        segments = []
        for segment_id in np.unique(original):
            if segment_id < 1000:
                semantic_id, is_crowd = int(segment_id), 1
            else:
                semantic_id, is_crowd = int(segment_id) // 1000, 0
            _, has_instances, ignore = USED[semantic_id]
            if ignore:
                continue
            if not has_instances:
                is_crowd = 0
            mask = original == segment_id
            pan[mask] = [segment_id % 256, segment_id // 256, segment_id // 256 // 256]
            ys, xs = np.nonzero(mask)
            segments.append(
                {
                    "id": int(segment_id),
                    "category_id": semantic_id,
                    "area": int(mask.sum()),
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                    "iscrowd": is_crowd,
                }
            )
        output_name = file_name.replace("_instanceIds.png", "_panoptic.png")
        annotations.append({"image_id": image_id, "file_name": output_name, "segments_info": segments})
        Image.fromarray(pan).save(out_dir / output_name)
    data = {"images": images, "annotations": annotations, "categories": cityscapes_panoptic_categories()}
    with open(gt / f"cityscapes_panoptic_{split}.json", "w") as fh:
        json.dump(data, fh, sort_keys=True, indent=4)


def _write_fixture(root: Path) -> dict[str, dict[str, Any]]:
    """Writes leftImg8bit + gtFine (labelIds, labelTrainIds, instanceIds, panoptic); returns the arrays by stem."""
    rng = np.random.default_rng(0)
    arrays: dict[str, dict[str, Any]] = {}
    for split, stems in SPLITS.items():
        for i, stem in enumerate(stems):
            city = stem.split("_")[0]
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            ids = _instance_map(i)
            Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_instanceIds.png")  # 16-bit, as official
            Image.fromarray(_label_ids(ids).astype(np.uint8)).save(gt_dir / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(_train_ids(ids).astype(np.uint8)).save(gt_dir / f"{stem}_gtFine_labelTrainIds.png")
            arrays[stem] = {"rgb": rgb, "ids": ids.astype(np.int64), "split": split, "city": city}
        _create_panoptic_imgs(root, split)
    return arrays


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("cityscapes")
    return root, _write_fixture(root)


@pytest.fixture()
def cs_copy(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """A fresh fixture the test may break."""
    root = tmp_path / "cityscapes"
    return root, _write_fixture(root)


def _gt(root: Path, stem: str, kind: str, split: str = "val") -> Path:
    return root / "gtFine" / split / stem.split("_")[0] / f"{stem}_gtFine_{kind}.png"


# ------------------------------------------------------------------------------ label table


def test_label_table_matches_used_labels_and_counts() -> None:
    by_id = {lab.id: lab for lab in CITYSCAPES_LABELS}
    assert len(CITYSCAPES_LABELS) == 35 and sorted(by_id) == list(range(-1, 34))
    for label_id, (train_id, has_inst, ignore) in USED.items():
        lab = by_id[label_id]
        assert (lab.train_id, lab.has_instances, lab.ignore_in_eval) == (train_id, has_inst, ignore)
    evaluated = [lab for lab in CITYSCAPES_LABELS if not lab.ignore_in_eval]
    assert sorted(lab.train_id for lab in evaluated) == list(range(19))
    cats = cityscapes_panoptic_categories()
    assert len(cats) == 19 and sum(c["isthing"] for c in cats) == 8
    assert {"id": 26, "name": "car", "color": [0, 0, 142], "supercategory": "vehicle", "isthing": 1} in cats


# ------------------------------------------------------------------------------ semantic


@pytest.mark.parametrize("label_type", ["trainIds", "labelIds"])
def test_semantic_reader_pixels(cs_root: tuple[Path, dict], label_type: str) -> None:
    root, arrays = cs_root
    ds = CityscapesSemanticDataset(root, "val", label_type=label_type)
    info = ds.class_info
    assert (info.num_classes, info.num_things, info.num_stuff) == (19, 0, 19)
    assert info.names[0] == "road" and info.names[18] == "bicycle" and info.dataset_ids[13] == 26
    # sorted by path: the two frankfurt images, then munster
    assert len(ds) == 3 and [ds.image_info(i)["image_id"] for i in range(3)] == SPLITS["val"]
    for i, stem in enumerate(SPLITS["val"]):
        image, target = ds[i]
        expected = _train_ids(arrays[stem]["ids"])
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert torch.equal(image, torch.from_numpy(arrays[stem]["rgb"]).permute(2, 0, 1))
        assert isinstance(target["sem_seg"], tv_tensors.Mask) and target["sem_seg"].dtype == torch.int64
        assert torch.equal(target["sem_seg"].as_subclass(torch.Tensor), torch.from_numpy(expected))
        orig = target["sem_seg_orig"]
        assert type(orig) is torch.Tensor and orig.dtype == torch.int64
        assert torch.equal(orig, torch.from_numpy(expected))
        classes = sorted(set(np.unique(expected).tolist()) - {255})
        assert target["labels"].tolist() == classes and target["labels"].dtype == torch.int64
        assert target["masks"].dtype == torch.bool and target["masks"].shape == (len(classes), H, W)
        for k, c in enumerate(classes):
            assert torch.equal(target["masks"][k].as_subclass(torch.Tensor), torch.from_numpy(expected == c))
        assert not target["iscrowd"].any() and target["iscrowd"].shape == (len(classes),)
        assert target["image_id"] == stem and target["orig_size"] == (H, W)
        assert target["file_name"] == f"{arrays[stem]['city']}/{stem}_leftImg8bit.png"
    # the fixture has ignored pixels (void, parking, caravan) and person/rider/car/bicycle
    _, t0 = ds[0]
    assert (t0["sem_seg_orig"] == 255).any() and {11, 12, 13, 18} <= set(t0["labels"].tolist())


def test_semantic_errors(cs_copy: tuple[Path, dict]) -> None:
    root, _ = cs_copy
    stem = SPLITS["val"][0]
    with pytest.raises(DatasetError, match=r"does not exist.*leftImg8bit/\{split\}/<city>"):
        CityscapesSemanticDataset(root / "nope", "val")
    with pytest.raises(DatasetError, match=r"leftImg8bit/test is missing"):
        CityscapesSemanticDataset(root, "test")
    with pytest.raises(DatasetError, match="label_type"):
        CityscapesSemanticDataset(root, "val", label_type="colors")

    # value outside 0..18 / 255
    bad = _train_ids(_instance_map(0)).astype(np.uint8)
    bad[3, 3] = 19
    Image.fromarray(bad).save(_gt(root, stem, "labelTrainIds"))
    with pytest.raises(DatasetError, match=r"labelTrainIds.*\[19\] outside the class range") as err:
        CityscapesSemanticDataset(root, "val")[0]
    assert stem in str(err.value)
    # labelIds value that is no Cityscapes label
    bad_ids = _label_ids(_instance_map(0)).astype(np.uint8)
    bad_ids[0, 0] = 40
    Image.fromarray(bad_ids).save(_gt(root, stem, "labelIds"))
    with pytest.raises(DatasetError, match=r"labelIds value\(s\) \[40\] are not Cityscapes label ids"):
        CityscapesSemanticDataset(root, "val", label_type="labelIds")[0]
    # size mismatch
    Image.fromarray(np.zeros((H, W - 1), np.uint8)).save(_gt(root, stem, "labelTrainIds"))
    with pytest.raises(DatasetError, match=r"ground truth is 63x32 \(WxH\) but the image .* is 64x32"):
        CityscapesSemanticDataset(root, "val")[0]
    # RGB label image
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(_gt(root, stem, "labelTrainIds"))
    with pytest.raises(DatasetError, match=r"single-channel PNG .* got mode 'RGB'"):
        CityscapesSemanticDataset(root, "val")[0]
    # corrupt image
    (root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot decode image file"):
        CityscapesSemanticDataset(root, "val")[0]
    # missing ground truth: found at construction, with the preparation hint
    _gt(root, SPLITS["val"][2], "labelTrainIds").unlink()
    with pytest.raises(
        DatasetError, match=r"1 of 3 images .*/munster_000000_000019_gtFine_labelTrainIds.png.*createTrainIdLabelImgs"
    ):
        CityscapesSemanticDataset(root, "val")


# ------------------------------------------------------------------------------ instance


def test_instance_reader_pixels(cs_root: tuple[Path, dict]) -> None:
    root, arrays = cs_root
    ds = CityscapesInstanceDataset(root, "val")
    info = ds.class_info
    assert (info.num_classes, info.num_things, info.num_stuff) == (8, 8, 0)
    assert info.names == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    assert info.dataset_ids == (24, 25, 26, 27, 28, 31, 32, 33)
    for i, stem in enumerate(SPLITS["val"]):
        image, target = ds[i]
        ids = arrays[stem]["ids"]
        assert torch.equal(image, torch.from_numpy(arrays[stem]["rgb"]).permute(2, 0, 1))
        # instances (ascending id, caravan 29001 dropped), then crowd group regions
        present = set(np.unique(ids).tolist())
        inst = [v for v in (24000, 25003, 26001, 26002) if v in present]
        crowd = [v for v in (26, 33) if v in present]
        values = inst + crowd
        assert target["labels"].tolist() == [INSTANCE_CONTIG[v // 1000 if v >= 1000 else v] for v in values]
        assert target["iscrowd"].tolist() == [False] * len(inst) + [True] * len(crowd)
        masks = target["masks"]
        assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.bool and masks.shape == (len(values), H, W)
        for k, v in enumerate(values):
            assert torch.equal(masks[k].as_subclass(torch.Tensor), torch.from_numpy(ids == v))
        sem = np.full((H, W), 255, dtype=np.int64)
        for v in inst:
            sem[ids == v] = INSTANCE_CONTIG[v // 1000]
        assert torch.equal(target["sem_seg"].as_subclass(torch.Tensor), torch.from_numpy(sem))
        gt = target["eval_gt"]
        assert torch.equal(gt["labels"], target["labels"]) and torch.equal(gt["iscrowd"], target["iscrowd"])
        assert gt["area"].tolist() == [float((ids == v).sum()) for v in values]
        assert len(gt["rles"]) == len(values)
        for k, v in enumerate(values):
            rle = gt["rles"][k]
            assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
            decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert np.array_equal(decoded.astype(bool), ids == v)
        assert target["image_id"] == stem and target["orig_size"] == (H, W)
    # image 2 has no objects: an empty but well-formed target
    _, empty = ds[2]
    assert empty["masks"].shape == (0, H, W) and empty["labels"].shape == (0,) and empty["eval_gt"]["rles"] == []
    assert (empty["sem_seg"] == 255).all()


def test_instance_eval_gt_survives_transforms(cs_root: tuple[Path, dict]) -> None:
    from knet_lightning.data.transforms import build_transforms

    root, arrays = cs_root
    tf = build_transforms(True, kind="resize", short_edge=16, max_size=None, flip_prob=1.0)
    image, target = CityscapesInstanceDataset(root, "val", transforms=tf)[0]
    assert image.shape == (3, 16, 32) and target["masks"].shape[-2:] == (16, 32)
    # eval_gt stays at the original size
    assert target["eval_gt"]["rles"][0]["size"] == [H, W]
    decoded = mask_utils.decode({"size": [H, W], "counts": target["eval_gt"]["rles"][0]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), arrays[SPLITS["val"][0]]["ids"] == 24000)


def test_instance_errors(cs_copy: tuple[Path, dict]) -> None:
    root, _ = cs_copy
    stem = SPLITS["val"][1]
    with pytest.raises(DatasetError, match=r"Cityscapes root .*nope does not exist.*instance"):
        CityscapesInstanceDataset(root / "nope", "val")
    # labelId 40 (as a plain id and as an instance id)
    for value in (40, 40001):
        ids = _instance_map(1)
        ids[5, 5] = value
        Image.fromarray(ids).save(_gt(root, stem, "instanceIds"))
        with pytest.raises(DatasetError, match=r"label id\(s\) \[40\] outside the Cityscapes range 0..33") as err:
            CityscapesInstanceDataset(root, "val")[1]
        assert f"{stem}_gtFine_instanceIds.png" in str(err.value)
    # an instance id for road, which has no instances
    ids = _instance_map(1)
    ids[5, 5] = 7001
    Image.fromarray(ids).save(_gt(root, stem, "instanceIds"))
    with pytest.raises(DatasetError, match=r"instance ids .* \['road \(7\)'\], which have no instances"):
        CityscapesInstanceDataset(root, "val")[1]
    # size mismatch
    Image.fromarray(np.zeros((H + 1, W), np.uint16)).save(_gt(root, stem, "instanceIds"))
    with pytest.raises(DatasetError, match=r"ground truth is 64x33"):
        CityscapesInstanceDataset(root, "val")[1]
    # missing file
    _gt(root, stem, "instanceIds").unlink()
    with pytest.raises(DatasetError, match=r"no ground truth \*_gtFine_instanceIds.png.*frankfurt_000001_000538"):
        CityscapesInstanceDataset(root, "val")


# ------------------------------------------------------------------------------ panoptic


def test_panoptic_reader_pixels(cs_root: tuple[Path, dict]) -> None:
    root, arrays = cs_root
    ds = CityscapesPanopticDataset(root, "val")
    info = ds.class_info
    assert (info.num_classes, info.num_things, info.num_stuff) == (19, 8, 11)
    assert info.thing_names == ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    assert info.names[8] == "road" and info.names[18] == "sky" and info.dataset_ids[:3] == (24, 25, 26)
    assert len(ds) == 3
    for i, stem in enumerate(SPLITS["val"]):
        image, target = ds[i]
        ids = arrays[stem]["ids"]
        assert torch.equal(image, torch.from_numpy(arrays[stem]["rgb"]).permute(2, 0, 1))
        # createPanopticImgs lists segments in ascending id order, ignoreInEval labels left out
        values = [int(v) for v in np.unique(ids) if not USED[int(v) // 1000 if v >= 1000 else int(v)][2]]
        lab = [int(v) // 1000 if v >= 1000 else int(v) for v in values]
        crowd = [v < 1000 and USED[v][1] for v in values]
        assert target["labels"].tolist() == [PANOPTIC_CONTIG[x] for x in lab]
        assert target["iscrowd"].tolist() == crowd
        pan = np.zeros((H, W), dtype=np.int32)
        sem = np.full((H, W), 255, dtype=np.int64)
        for k, v in enumerate(values):
            assert torch.equal(target["masks"][k].as_subclass(torch.Tensor), torch.from_numpy(ids == v))
            pan[ids == v] = k + 1
            if not crowd[k]:
                sem[ids == v] = PANOPTIC_CONTIG[lab[k]]
        assert type(target["panoptic"]) is torch.Tensor and torch.equal(target["panoptic"], torch.from_numpy(pan))
        assert torch.equal(target["sem_seg"].as_subclass(torch.Tensor), torch.from_numpy(sem))
        assert target["image_id"] == stem and target["orig_size"] == (H, W)
        assert target["file_name"] == f"{arrays[stem]['city']}/{stem}_leftImg8bit.png"
    _, t0 = ds[0]
    assert t0["iscrowd"].sum() == 2 and (t0["panoptic"] == 0).any()  # car + bicycle groups; void pixels


def _edit_json(root: Path, fn: Any) -> None:
    path = root / "gtFine" / "cityscapes_panoptic_val.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_panoptic_errors(cs_copy: tuple[Path, dict]) -> None:
    root, _ = cs_copy
    json_path = root / "gtFine" / "cityscapes_panoptic_val.json"
    with pytest.raises(
        DatasetError, match=r"Cityscapes root .*nope does not exist.*cityscapes_panoptic_val.json.*createPanopticImgs"
    ):
        CityscapesPanopticDataset(root / "nope", "val")
    with pytest.raises(DatasetError, match=r"missing panoptic JSON .*cityscapes_panoptic_val_trainId.json"):
        CityscapesPanopticDataset(root, "val", use_train_id=True)

    original = json_path.read_text()
    # image size in the JSON disagrees with the image
    _edit_json(root, lambda d: d["images"][0].update(width=W + 1))
    with pytest.raises(DatasetError, match=r"image is 64x32 \(WxH\) but .*cityscapes_panoptic_val.json says 65x32"):
        CityscapesPanopticDataset(root, "val")[0]
    json_path.write_text(original)
    # a category id that is not in 'categories' (e.g. trainIds used with labelId categories)
    _edit_json(root, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=99))
    with pytest.raises(DatasetError, match=r"unknown category id 99"):
        CityscapesPanopticDataset(root, "val")
    json_path.write_text(original)
    _edit_json(root, lambda d: d["annotations"][0].update(image_id="frankfurt"))
    with pytest.raises(
        DatasetError, match=r"annotations\[0\] refers to image_id 'frankfurt', which is not in 'images'"
    ):
        CityscapesPanopticDataset(root, "val")
    json_path.write_text(original)
    _edit_json(root, lambda d: (d["annotations"][0].update(image_id="x"), d["images"][0].update(id="x")))
    with pytest.raises(DatasetError, match=r"image_id 'x' is not a Cityscapes stem <city>_<seq>_<frame>"):
        CityscapesPanopticDataset(root, "val")
    json_path.write_text(original)
    _edit_json(root, lambda d: d["categories"][0].pop("isthing"))
    with pytest.raises(DatasetError, match=r"categories\[0\] is missing key 'isthing'"):
        CityscapesPanopticDataset(root, "val")
    json_path.write_text(original[:-20])
    with pytest.raises(DatasetError, match=r"cityscapes_panoptic_val.json: malformed JSON"):
        CityscapesPanopticDataset(root, "val")
    json_path.write_text(original)
    # PNG missing / image missing
    stem = SPLITS["val"][0]
    (root / "gtFine" / "cityscapes_panoptic_val" / f"{stem}_gtFine_panoptic.png").unlink()
    with pytest.raises(DatasetError, match=r"frankfurt_000000_000294_gtFine_panoptic.png: panoptic PNG not found"):
        CityscapesPanopticDataset(root, "val")[0]
    (root / "leftImg8bit" / "val" / "munster" / f"{SPLITS['val'][2]}_leftImg8bit.png").unlink()
    with pytest.raises(
        DatasetError, match=r"leftImg8bit/val/munster/munster_000000_000019_leftImg8bit.png: image file not found"
    ):
        CityscapesPanopticDataset(root, "val")[2]


# ------------------------------------------------------------------------------ data modules


def test_semantic_datamodule_batches(cs_root: tuple[Path, dict]) -> None:
    root, _ = cs_root
    dm = CityscapesSemanticDataModule(root, batch_size=2, crop_size=(16, 32), scale_range=(0.5, 1.0), num_workers=0)
    assert dm.num_classes == 19 and dm.num_things == 0  # before setup, from the label table
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["image_sizes"] == [(16, 32), (16, 32)]
    for t in batch["targets"]:
        assert t["sem_seg"].shape == (16, 32) and t["masks"].shape[-2:] == (16, 32)
        assert t["sem_seg_orig"].shape == (H, W)
        assert set(t["labels"].tolist()) <= set(t["sem_seg"].unique().tolist())
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (2, 3, H, W)  # evaluation at the original size


def test_cityscapes_crop_defaults_match_mmseg() -> None:
    """Defaults: LSJ to 512x1024 with factor [1, 4] = mmseg's 0.5-2.0 rescale of a 1024x2048 image."""
    dm = CityscapesSemanticDataModule("unused")
    lsj = [t for t in dm.train_transforms.transforms if isinstance(t, LargeScaleJitter)]
    assert len(lsj) == 1 and lsj[0].output_size == (512, 1024) and lsj[0].scale_range == (1.0, 4.0)
    image = tv_tensors.Image(torch.zeros(3, 1024, 2048, dtype=torch.uint8))
    for _ in range(20):
        p = lsj[0].make_params([image])
        ratio = p["size"][0] / 1024
        assert 0.5 <= ratio <= 2.0 and abs(p["size"][1] / 2048 - ratio) < 1e-3
        assert p["padding"] == [0, 0, 0, 0] and p["crop"][2:] == (512, 1024)
    assert all(not isinstance(t, LargeScaleJitter) for t in dm.eval_transforms.transforms)


def test_panoptic_and_instance_datamodules(cs_root: tuple[Path, dict]) -> None:
    root, _ = cs_root
    pan = CityscapesPanopticDataModule(root, batch_size=2, val_batch_size=3, crop_size=(16, 32), scale_range=(0.5, 1.0))
    assert (pan.num_things, pan.num_stuff) == (8, 11)
    batch = next(iter(pan.train_dataloader()))
    assert batch["images"].shape == (2, 3, 32, 32)
    val = next(iter(pan.val_dataloader()))
    assert val["images"].shape == (3, 3, H, W) and [t["image_id"] for t in val["targets"]] == SPLITS["val"]
    assert val["targets"][0]["panoptic"].shape == (H, W)

    inst = CityscapesInstanceDataModule(
        root, batch_size=2, train_short_edge=(16, 24), train_max_size=64, eval_short_edge=16, eval_max_size=64
    )
    assert (inst.num_things, inst.num_stuff) == (8, 0)
    batch = next(iter(inst.train_dataloader()))
    assert batch["images"].shape[:2] == (2, 3) and 16 <= batch["image_sizes"][0][0] <= 24
    val = next(iter(inst.val_dataloader()))
    assert val["image_sizes"] == [(16, 32), (16, 32)] and "eval_gt" in val["targets"][0]


@pytest.mark.parametrize(
    ("name", "counts"),
    [("cityscapes_semantic", (0, 19, 19)), ("cityscapes_panoptic", (8, 11, 19)), ("cityscapes_instance", (8, 0, 8))],
)
def test_hydra_configs_build(cs_root: tuple[Path, dict], name: str, counts: tuple[int, int, int]) -> None:
    root, _ = cs_root
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"data={name}", f"data.root={root}"])
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.data.num_workers = 0
        cfg.data.persistent_workers = False
    assert (cfg.data.num_things, cfg.data.num_stuff, cfg.data.num_classes) == counts
    dm = build_datamodule(cfg)
    info = dm.class_info
    assert (info.num_things, info.num_stuff, info.num_classes) == counts
    check_class_counts(cfg, info)  # raises on a mismatch
    dm.setup("validate")
    assert len(dm.datasets["val"]) == 3
