"""ClassInfo and the COCO panoptic reader on a tiny fixture written in the real on-disk format."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from knet_lightning.data.coco import COCOPanopticDataModule, COCOPanopticDataset
from knet_lightning.data.io import id2rgb, load_panoptic_png, rgb2id
from knet_lightning.data.meta import ClassInfo, DatasetError, UnknownCategoryError, default_palette
from knet_lightning.tasks import build_task

# JSON order interleaves stuff and things; the reader must put things first.
CATEGORIES = [
    {"id": 7, "name": "road", "supercategory": "ground", "isthing": 0, "color": [128, 64, 128]},
    {"id": 3, "name": "person", "supercategory": "human", "isthing": 1, "color": [220, 20, 60]},
    {"id": 12, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 5, "name": "car", "supercategory": "vehicle", "isthing": 1},  # no colour: palette
]
# Segment ids chosen to use every RGB channel of the PNG encoding.
SKY, PERSON1, CAR_CROWD, ROAD, PERSON2 = 5 + 256 * 200, 1 + 256 * 3, 70000, 300, 256**3 - 1


def _write_fixture(root: Path, layout: str = "annotations") -> dict[str, Any]:
    """Three images: A (PNG, crowd + void), B (JPEG, an id missing from JSON), C (all void)."""
    rng = np.random.default_rng(0)
    png_dir = root / "annotations" / "panoptic_val2017" if layout == "annotations" else root / "panoptic_val2017"
    (root / "val2017").mkdir(parents=True)
    png_dir.mkdir(parents=True)

    ids_a = np.zeros((24, 32), dtype=np.uint32)
    ids_a[0:8] = SKY
    ids_a[16:24] = ROAD
    ids_a[4:14, 2:8] = PERSON1  # occludes part of the sky
    ids_a[10:20, 20:30] = CAR_CROWD  # crosses into the road
    ids_a[9:12, 10:14] = PERSON2  # rows 8..15 elsewhere stay void (0)
    img_a = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(img_a).save(root / "val2017" / "a.png")
    Image.fromarray(id2rgb(ids_a)).save(png_dir / "a.png")

    ids_b = np.full((16, 20), 42, dtype=np.uint32)
    ids_b[0:4] = 0
    ids_b[12:16, 0:5] = 999  # not in segments_info
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(root / "val2017" / "b.jpg")
    Image.fromarray(id2rgb(ids_b)).save(png_dir / "b.png")

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "val2017" / "c.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png_dir / "c.png")

    def seg(i: int, cat: int, crowd: int = 0) -> dict[str, Any]:
        return {"id": i, "category_id": cat, "iscrowd": crowd, "area": 1, "bbox": [0, 0, 1, 1]}

    data = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
            {"id": 2, "file_name": "b.jpg", "width": 20, "height": 16},
            {"id": 30, "file_name": "c.png", "width": 16, "height": 16},
        ],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "a.png",
                "segments_info": [seg(SKY, 12), seg(PERSON1, 3), seg(CAR_CROWD, 5, 1), seg(ROAD, 7), seg(PERSON2, 3)],
            },
            {"image_id": 2, "file_name": "b.png", "segments_info": [seg(42, 7)]},
            {"image_id": 30, "file_name": "c.png", "segments_info": []},
        ],
        "categories": CATEGORIES,
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return {"ids_a": ids_a, "img_a": img_a, "ids_b": ids_b, "json": data, "png_dir": png_dir}


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path / "coco"
    return root, _write_fixture(root)


def _rewrite_json(root: Path, edit: Any) -> None:
    path = root / "annotations" / "panoptic_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- ClassInfo


def test_class_info_from_categories_things_first() -> None:
    info = ClassInfo.from_coco_categories(CATEGORIES, source="x.json")
    assert info.names == ("person", "car", "road", "sky")
    assert info.isthing == (True, True, False, False)
    assert info.dataset_ids == (3, 5, 7, 12)
    assert (info.num_classes, info.num_things, info.num_stuff) == (4, 2, 2)
    assert info.thing_names == ("person", "car") and info.stuff_names == ("road", "sky")
    assert info.colors[0] == (220, 20, 60) and info.colors[3] == (70, 130, 180)
    assert info.colors[1] == default_palette(4)[1]  # car had no colour
    assert [info.contiguous_id(d) for d in (3, 5, 7, 12)] == [0, 1, 2, 3]
    assert [info.dataset_id(i) for i in range(4)] == [3, 5, 7, 12]
    assert issubclass(UnknownCategoryError, KeyError)
    with pytest.raises(UnknownCategoryError, match=r"unknown category id 99; known ids: \[3, 5, 7, 12\]"):
        info.contiguous_id(99)
    assert ClassInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_class_info_validation() -> None:
    with pytest.raises(DatasetError, match=r"x\.json: categories\[1\] is missing key 'isthing'"):
        ClassInfo.from_coco_categories([CATEGORIES[0], {"id": 1, "name": "a"}], source="x.json")
    inst = ClassInfo.from_coco_categories([{"id": 1, "name": "a"}], source="i.json", default_isthing=True)
    assert inst.num_things == 1
    with pytest.raises(DatasetError, match="duplicate category id 7"):
        ClassInfo.from_coco_categories([CATEGORIES[0], CATEGORIES[0]], source="x.json")
    with pytest.raises(ValueError, match="thing classes before the stuff"):
        ClassInfo(names=("a", "b"), isthing=(False, True), colors=((0, 0, 0),) * 2, dataset_ids=(1, 2))
    with pytest.raises(ValueError, match="colors has 1 entries, expected 2"):
        ClassInfo(names=("a", "b"), isthing=(True, True), colors=((0, 0, 0),), dataset_ids=(1, 2))
    assert len(set(default_palette(20))) == 20


def test_rgb_id_round_trip() -> None:
    ids = np.array([[0, 1, 256], [65536, 256**3 - 1, 70000]], dtype=np.uint32)
    rgb = id2rgb(ids)
    assert rgb[1, 2].tolist() == [70000 % 256, (70000 // 256) % 256, 70000 // 65536]
    assert np.array_equal(rgb2id(rgb), ids)


# --------------------------------------------------------------------------- reader


@pytest.mark.parametrize("layout", ["annotations", "root"])
def test_reader_pixel_exact(tmp_path: Path, layout: str) -> None:
    root = tmp_path / layout
    fx = _write_fixture(root, layout)
    ds = COCOPanopticDataset(root, split="val", layout=layout)
    assert len(ds) == 3
    assert ds.class_info.names == ("person", "car", "road", "sky")

    image, t = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert np.array_equal(image.permute(1, 2, 0).numpy(), fx["img_a"])
    seg_order = [SKY, PERSON1, CAR_CROWD, ROAD, PERSON2]
    assert isinstance(t["masks"], tv_tensors.Mask) and t["masks"].dtype == torch.bool
    assert tuple(t["masks"].shape) == (5, 24, 32)
    for k, sid in enumerate(seg_order):
        assert np.array_equal(t["masks"][k].numpy(), fx["ids_a"] == sid)
    assert t["labels"].dtype == torch.int64
    assert t["labels"].tolist() == [3, 0, 1, 2, 0]  # sky, person, car, road, person
    assert t["iscrowd"].dtype == torch.bool
    assert t["iscrowd"].tolist() == [False, False, True, False, False]

    # Expected maps written out by hand from the fixture's id layout.
    sem = np.full((24, 32), 255)
    sem[0:8] = 3
    sem[16:24] = 2
    sem[4:14, 2:8] = 0
    sem[10:20, 20:30] = 255  # crowd → ignore
    sem[9:12, 10:14] = 0
    assert isinstance(t["sem_seg"], tv_tensors.Mask) and t["sem_seg"].dtype == torch.int64
    assert np.array_equal(t["sem_seg"].numpy(), sem)
    pan = np.zeros((24, 32), dtype=np.int32)
    pan[0:8] = 1
    pan[16:24] = 4
    pan[4:14, 2:8] = 2
    pan[10:20, 20:30] = 3
    pan[9:12, 10:14] = 5
    assert type(t["panoptic"]) is torch.Tensor and t["panoptic"].dtype == torch.int32
    assert np.array_equal(t["panoptic"].numpy(), pan)
    assert (t["image_id"], t["file_name"], t["orig_size"]) == (1, "a.png", (24, 32))

    image, t = ds[1]  # JPEG image; PNG id 999 is not in the JSON: ignored in sem_seg, -1 in panoptic
    assert tuple(image.shape) == (3, 16, 20) and t["orig_size"] == (16, 20)
    assert t["labels"].tolist() == [2] and t["iscrowd"].tolist() == [False]
    assert np.array_equal(t["masks"][0].numpy(), fx["ids_b"] == 42)
    sem_b = np.where(fx["ids_b"] == 42, 2, 255)
    assert np.array_equal(t["sem_seg"].numpy(), sem_b)
    pan_b = np.select([fx["ids_b"] == 42, fx["ids_b"] == 999], [1, -1], 0).astype(np.int32)
    assert np.array_equal(t["panoptic"].numpy(), pan_b)

    image, t = ds[2]  # no segments at all
    assert tuple(t["masks"].shape) == (0, 16, 16) and t["labels"].shape == (0,)
    assert (t["sem_seg"] == 255).all() and (t["panoptic"] == 0).all() and t["image_id"] == 30


def test_reader_explicit_paths(coco: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, _ = coco
    other = tmp_path / "elsewhere"
    (other / "pngs").parent.mkdir(parents=True)
    shutil.move(str(root / "annotations" / "panoptic_val2017"), str(other / "pngs"))
    shutil.move(str(root / "annotations" / "panoptic_val2017.json"), str(other / "pan.json"))
    shutil.move(str(root / "val2017"), str(root / "imgs"))
    ds = COCOPanopticDataset(root, "val", json_file=other / "pan.json", image_dir="imgs", png_dir=other / "pngs")
    assert ds.json_path == other / "pan.json" and ds.image_dir == root / "imgs"
    assert ds[0][1]["labels"].tolist() == [3, 0, 1, 2, 0]


def test_transforms_keep_panoptic_at_original_size(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    flip = COCOPanopticDataset(root, "val", transforms=v2.RandomHorizontalFlip(p=1.0))
    plain = COCOPanopticDataset(root, "val")
    image, t = flip[0]
    image0, t0 = plain[0]
    assert torch.equal(image, image0.flip(-1))
    assert torch.equal(t["masks"], t0["masks"].flip(-1))
    assert torch.equal(t["sem_seg"], t0["sem_seg"].flip(-1))
    assert torch.equal(t["panoptic"], t0["panoptic"])  # plain tensor: untouched
    resized = COCOPanopticDataset(root, "val", transforms=v2.Resize((12, 16)))[0][1]
    assert tuple(resized["masks"].shape) == (5, 12, 16) and tuple(resized["panoptic"].shape) == (24, 32)


def test_png_id_missing_from_json_is_scored_as_the_official_pq(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    _, t = COCOPanopticDataset(root, "val")[1]
    task = build_task("panoptic", num_classes=4, num_things=2, num_proposals=4, num_stages=1)
    gt = task.ground_truth(t)
    # one predicted road segment over the whole 16x20 image: 80 void, 20 unlisted (id 999),
    # 220 road pixels. panopticapi's pq_compute_single_core: union = 320 + 220 - 220 - 80 = 240;
    # were id 999 void, the union would be 220 and PQ 100.
    task.update("test", 1, [(torch.ones(16, 20, dtype=torch.int32), [{"id": 1, "category_id": 2}])], [gt], [t])
    assert float(task.compute("test")["test/pq"]) == pytest.approx(100 * 220 / 240)


def _image_ids(ds: COCOPanopticDataset) -> list[int]:
    return [ds.image_info(i)["image_id"] for i in range(len(ds))]


def test_training_filter_drops_images_as_mmdet(coco: tuple[Path, dict[str, Any]], caplog: Any) -> None:
    root, _ = coco
    # B's only segment becomes a crowd of cars: mmdet's _filter_imgs counts crowd things too
    _rewrite_json(root, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=5, iscrowd=1))
    assert _image_ids(COCOPanopticDataset(root, "val")) == [1, 2, 30]  # off by default
    with caplog.at_level(logging.INFO, logger="knet_lightning.data.coco"):
        ds = COCOPanopticDataset(root, "val", filter_empty=True)
    assert _image_ids(ds) == [1, 2]  # C has no segment at all
    assert "kept 2 of 3 images; dropped 1 without a thing segment" in caplog.text
    # min(width, height) >= min_size stays: A is 32x24, B 20x16, C 16x16
    assert _image_ids(COCOPanopticDataset(root, "val", min_size=16)) == [1, 2, 30]
    assert _image_ids(COCOPanopticDataset(root, "val", min_size=17)) == [1]
    with pytest.raises(DatasetError, match=r"no image left for training out of 3: 1 without .* 2 with a side below"):
        COCOPanopticDataset(root, "val", filter_empty=True, min_size=33)
    # a stuff-only image goes
    _rewrite_json(root, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=7, iscrowd=0))
    assert _image_ids(COCOPanopticDataset(root, "val", filter_empty=True)) == [1]


def test_data_module_filters_the_training_split_only(coco: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco
    dm = COCOPanopticDataModule(root, train_split="val", filter_min_size_train=17, num_workers=0)
    dm.setup("fit")
    assert _image_ids(dm.datasets["train"]) == [1] and _image_ids(dm.datasets["val"]) == [1, 2, 30]
    assert _image_ids(dm._dataset("test")) == [1, 2, 30]
    off = COCOPanopticDataModule(root, train_split="val", filter_empty_train=False, filter_min_size_train=0)
    assert _image_ids(off._dataset("train")) == [1, 2, 30]
    # the official defaults, in the class and in the config
    params = inspect.signature(COCOPanopticDataModule).parameters
    assert (params["filter_empty_train"].default, params["filter_min_size_train"].default) == (True, 32)
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "coco_panoptic.yaml")
    assert (conf.filter_empty_train, conf.filter_min_size_train) == (True, 32)


def test_load_panoptic_png(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    assert np.array_equal(load_panoptic_png(fx["png_dir"] / "a.png"), fx["ids_a"])


# --------------------------------------------------------------------------- bad input


def test_missing_root_lists_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope does not exist.*layout='annotations'.*panoptic_val2017\.json"):
        COCOPanopticDataset(tmp_path / "nope", "val")
    with pytest.raises(DatasetError, match="layout must be one of"):
        COCOPanopticDataset(tmp_path, "val", layout="detectron2")


def test_wrong_layout_names_missing_folder_and_hints(tmp_path: Path) -> None:
    root = tmp_path / "c"
    _write_fixture(root, layout="root")
    with pytest.raises(
        DatasetError, match=r"missing PNG folder .*annotations/panoptic_val2017.*did you mean layout='root'"
    ):
        COCOPanopticDataset(root, "val", layout="annotations")
    shutil.rmtree(root / "val2017")
    with pytest.raises(DatasetError, match=r"missing image folder .*val2017"):
        COCOPanopticDataset(root, "val", layout="root")


def test_missing_image_file(coco: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco
    (root / "val2017" / "b.jpg").unlink()
    ds = COCOPanopticDataset(root, "val")
    with pytest.raises(DatasetError, match=r"val2017/b\.jpg: image file not found"):
        ds[1]


def test_missing_png(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    (fx["png_dir"] / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"panoptic_val2017/a\.png: panoptic PNG not found"):
        COCOPanopticDataset(root, "val")[0]


def test_png_size_mismatch(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    Image.fromarray(id2rgb(np.full((10, 20), 42, np.uint32))).save(fx["png_dir"] / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png: PNG size 20x10 \(WxH\) differs from the image b\.jpg size 20x16"):
        COCOPanopticDataset(root, "val")[1]


def test_image_size_disagrees_with_json(coco: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco
    _rewrite_json(root, lambda d: d["images"][0].update(width=33))
    with pytest.raises(DatasetError, match=r"a\.png: image is 32x24 \(WxH\) but .*panoptic_val2017\.json says 33x24"):
        COCOPanopticDataset(root, "val")[0]


def test_segment_absent_from_png(coco: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco
    _rewrite_json(root, lambda d: d["annotations"][1]["segments_info"].append({"id": 777, "category_id": 12}))
    msg = r"b\.png: segment id\(s\) \[777\] listed in panoptic_val2017\.json .*absent from the PNG"
    with pytest.raises(DatasetError, match=msg):
        COCOPanopticDataset(root, "val")[1]


def test_unknown_category(coco: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco
    _rewrite_json(root, lambda d: d["annotations"][0]["segments_info"][1].update(category_id=99))
    msg = r"panoptic_val2017\.json: annotations\[0\] .*segment 769: unknown category id 99"
    with pytest.raises(DatasetError, match=msg):
        COCOPanopticDataset(root, "val")


def test_corrupt_image_and_png(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    (root / "val2017" / "a.png").write_bytes(b"definitely not a png")
    png = (fx["png_dir"] / "b.png").read_bytes()
    (fx["png_dir"] / "b.png").write_bytes(png[: len(png) // 2])  # truncated
    ds = COCOPanopticDataset(root, "val")
    with pytest.raises(DatasetError, match=r"val2017/a\.png: cannot decode image file"):
        ds[0]
    with pytest.raises(DatasetError, match=r"panoptic_val2017/b\.png: cannot decode panoptic PNG"):
        ds[1]


def test_grayscale_png_rejected(coco: tuple[Path, dict[str, Any]]) -> None:
    root, fx = coco
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(fx["png_dir"] / "c.png")
    with pytest.raises(DatasetError, match=r"c\.png: panoptic PNG must be RGB .* mode 'L'"):
        COCOPanopticDataset(root, "val")[2]


def test_malformed_json(coco: tuple[Path, dict[str, Any]]) -> None:
    root, _ = coco
    path = root / "annotations" / "panoptic_val2017.json"
    path.write_text(path.read_text()[:-5])
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json: malformed JSON"):
        COCOPanopticDataset(root, "val")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), r"top level is missing key 'categories'"),
        (lambda d: d["images"][1].pop("height"), r"images\[1\] is missing key 'height'"),
        (lambda d: d["annotations"][0].pop("segments_info"), r"annotations\[0\] is missing key 'segments_info'"),
        (
            lambda d: d["annotations"][0]["segments_info"][2].pop("category_id"),
            r"annotations\[0\]\['segments_info'\]\[2\] is missing key 'category_id'",
        ),
        (lambda d: d["categories"][2].pop("isthing"), r"categories\[2\] is missing key 'isthing'"),
        (lambda d: d["annotations"][2].update(image_id=4), r"annotations\[2\] refers to image_id 4"),
    ],
)
def test_missing_json_keys(coco: tuple[Path, dict[str, Any]], edit: Any, message: str) -> None:
    root, _ = coco
    _rewrite_json(root, edit)
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json: " + message):
        COCOPanopticDataset(root, "val")


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped(tmp_path: Path) -> None:
    from knet_lightning.data.io import read_rgb_image

    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # what PIL gives for a 16-bit grayscale PNG
    rgb = read_rgb_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[..., 0].tolist() == [[0, 1, 128], [255, 4, 156]]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def _photo_turned_by_exif(path: Path, upright: np.ndarray, orientation: int) -> None:
    """Stores ``upright`` as a camera would with EXIF ``orientation`` 6 (stored turned 90 degrees
    counter-clockwise; shown turned clockwise) or 3 (stored upside down)."""
    stored = {6: np.rot90(upright, 1), 3: np.rot90(upright, 2)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif)


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_orientation_is_applied_in_training_evaluation_and_predict(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path, orientation: int
) -> None:
    """The camera's stored pixels are turned as a viewer shows them, so that the image matches
    its annotation (size checked against the JSON) in the readers and in predict."""
    from knet_lightning.data.io import read_rgb_image
    from knet_lightning.inference.predict import collect_inputs
    from knet_lightning.inference.segmenter import read_input

    root, fx = coco
    _photo_turned_by_exif(root / "val2017" / "a.png", fx["img_a"], orientation)
    assert read_rgb_image(root / "val2017" / "a.png").tolist() == fx["img_a"].tolist()
    # the reader of training and evaluation: the size check passes and the pixels are upright
    image, target = COCOPanopticDataset(root, "val")[0]
    assert torch.equal(image, torch.from_numpy(fx["img_a"]).permute(2, 0, 1))
    # predict
    folder = tmp_path / "inputs"
    folder.mkdir()
    _photo_turned_by_exif(folder / "photo.png", fx["img_a"], orientation)
    (item,) = collect_inputs(folder)
    rgb, _ = read_input(item.path, 0)
    assert rgb.shape[:2] == (24, 32) and rgb.tolist() == fx["img_a"].tolist()
