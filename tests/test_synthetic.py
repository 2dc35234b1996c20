"""The embedded synthetic data set: determinism, idempotence, valid COCO panoptic output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.data.io import rgb2id
from knet_lightning.data.meta import DatasetError
from knet_lightning.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_panoptic

# pycocotools' decode trips a numpy-2 deprecation inside the library; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = {"num_train": 24, "num_val": 6, "image_size": 48, "seed": 3, "max_objects": 4}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_panoptic(tmp_path_factory.mktemp("syn") / "shapes", **SMALL)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(small_root: Path) -> None:
    ann = small_root / "annotations"
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        assert len(list((small_root / f"{split}2017").glob("*.jpg"))) == n
        assert len(list((ann / f"panoptic_{split}2017").glob("*.png"))) == n
        pan = json.loads((ann / f"panoptic_{split}2017.json").read_text())
        assert set(pan) == {"info", "licenses", "images", "annotations", "categories"}
        assert len(pan["images"]) == len(pan["annotations"]) == n
        assert (ann / f"instances_{split}2017.json").is_file()
    assert json.loads((small_root / "done").read_text())["num_train"] == SMALL["num_train"]


def test_deterministic_byte_identical(small_root: Path, tmp_path: Path) -> None:
    other = generate_synthetic_panoptic(tmp_path / "again", **SMALL)
    a, b = _tree(small_root), _tree(other)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    different = generate_synthetic_panoptic(tmp_path / "seed4", **{**SMALL, "seed": 4})
    c = _tree(different)
    assert any(a[k] != c[k] for k in a if k.endswith(".png"))


def test_stamp_makes_second_call_noop_and_other_params_regenerate(tmp_path: Path) -> None:
    params = {"num_train": 3, "num_val": 2, "image_size": 32, "seed": 0}
    root = generate_synthetic_panoptic(tmp_path / "d", **params)
    probe = root / "annotations" / "panoptic_train2017.json"
    before = probe.stat().st_mtime_ns, probe.stat().st_ino
    (root / "train2017" / "marker.txt").write_text("kept if nothing is rewritten")
    assert generate_synthetic_panoptic(tmp_path / "d", **params) == root
    assert (probe.stat().st_mtime_ns, probe.stat().st_ino) == before
    assert (root / "train2017" / "marker.txt").exists()

    generate_synthetic_panoptic(tmp_path / "d", **{**params, "num_train": 5})
    assert len(list((root / "train2017").glob("*.jpg"))) == 5
    assert not (root / "train2017" / "marker.txt").exists()
    assert json.loads((root / "done").read_text())["num_train"] == 5
    # No temporary or old folders left next to the data set.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match=r"mine.*not a synthetic data set.*refusing to overwrite"):
        generate_synthetic_panoptic(tmp_path / "mine", num_train=1, num_val=1, image_size=32)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(DatasetError, match="image_size must be >= 32"):
        generate_synthetic_panoptic(tmp_path / "x", image_size=16)


@pytest.mark.parametrize("split", ["train", "val"])
def test_pngs_agree_with_json(small_root: Path, split: str) -> None:
    ann = small_root / "annotations"
    pan = json.loads((ann / f"panoptic_{split}2017.json").read_text())
    cats = {c["id"]: c for c in pan["categories"]}
    assert {c["id"] for c in SYNTHETIC_CATEGORIES} == set(cats)
    assert all(set(c) >= {"id", "name", "supercategory", "isthing", "color"} for c in cats.values())
    assert sorted(cid for cid, c in cats.items() if c["isthing"]) == [1, 2, 3, 4]
    assert sorted(cid for cid, c in cats.items() if not c["isthing"]) == [101, 102, 103]
    images = {im["id"]: im for im in pan["images"]}
    assert len(images) == len(pan["images"])

    inst = json.loads((ann / f"instances_{split}2017.json").read_text())
    assert {c["id"] for c in inst["categories"]} == {1, 2, 3, 4}
    inst_by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        inst_by_image.setdefault(a["image_id"], []).append(a)

    for a in pan["annotations"]:
        im = images[a["image_id"]]
        assert a["file_name"] == Path(im["file_name"]).with_suffix(".png").name
        with Image.open(small_root / f"{split}2017" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
        with Image.open(ann / f"panoptic_{split}2017" / a["file_name"]) as f:
            assert f.mode == "RGB"
            ids = rgb2id(np.asarray(f))
        assert ids.shape == (im["height"], im["width"])
        segs = a["segments_info"]
        seg_ids = [s["id"] for s in segs]
        # Clean data set: every pixel belongs to exactly one listed segment.
        assert set(np.unique(ids).tolist()) == set(seg_ids)
        assert len(set(seg_ids)) == len(seg_ids)
        stuff = [s["category_id"] for s in segs if not cats[s["category_id"]]["isthing"]]
        assert len(stuff) == len(set(stuff)) >= 1
        thing_masks = []
        for s in segs:
            m = ids == s["id"]
            ys, xs = np.nonzero(m)
            assert s["area"] == m.sum()
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert s["iscrowd"] == 0 and s["category_id"] in cats
            if cats[s["category_id"]]["isthing"]:
                thing_masks.append((s["category_id"], m))
        # The instance JSON holds the same thing masks, as RLE.
        inst_anns = inst_by_image.get(a["image_id"], [])
        assert len(inst_anns) == len(thing_masks)
        for ia, (cat, m) in zip(inst_anns, thing_masks):
            assert ia["category_id"] == cat and ia["iscrowd"] == 0 and ia["area"] == m.sum()
            assert np.array_equal(mask_util.decode(ia["segmentation"]).astype(bool), m)


def test_content_variety(small_root: Path, tmp_path: Path) -> None:
    root = generate_synthetic_panoptic(tmp_path / "v", num_train=60, num_val=0, image_size=64, seed=0)
    pan = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    things_per_image, stuff_per_image, thing_cats, stuff_cats = [], [], set(), set()
    overlap = False
    for a in pan["annotations"]:
        th = [s for s in a["segments_info"] if s["category_id"] < 100]
        st = [s for s in a["segments_info"] if s["category_id"] > 100]
        things_per_image.append(len(th))
        stuff_per_image.append(len(st))
        thing_cats |= {s["category_id"] for s in th}
        stuff_cats |= {s["category_id"] for s in st}
        for s in th:
            # Shapes are 20-40 % of the side; occluded ones keep at least 60 % of themselves.
            assert s["area"] >= (0.1 * 64) ** 2
            assert max(s["bbox"][2:]) >= 0.15 * 64
        for i, s in enumerate(th):
            for t in th[i + 1 :]:
                x0, y0 = max(s["bbox"][0], t["bbox"][0]), max(s["bbox"][1], t["bbox"][1])
                x1 = min(s["bbox"][0] + s["bbox"][2], t["bbox"][0] + t["bbox"][2])
                y1 = min(s["bbox"][1] + s["bbox"][3], t["bbox"][1] + t["bbox"][3])
                overlap |= x1 > x0 and y1 > y0
    assert thing_cats == {1, 2, 3, 4} and stuff_cats == {101, 102, 103}
    assert 0 in things_per_image and max(things_per_image) >= 3
    assert 1 in stuff_per_image and 3 in stuff_per_image
    assert overlap


def test_reader_loads_synthetic_with_things_first_mapping(small_root: Path) -> None:
    ds = COCOPanopticDataset(small_root, split="val")
    info = ds.class_info
    assert info.names == ("circle", "square", "triangle", "ring", "sky", "grass", "water")
    assert info.dataset_ids == (1, 2, 3, 4, 101, 102, 103)
    assert (info.num_things, info.num_stuff) == (4, 3)
    assert len(ds) == SMALL["num_val"]
    image, target = ds[0]
    assert tuple(image.shape) == (3, 48, 48)
    assert (target["sem_seg"] != 255).all()  # no void in the synthetic set
    assert target["masks"].sum(0).eq(1).all()  # the segments tile the image
    for k in range(len(target["labels"])):
        assert (target["sem_seg"][target["masks"][k]] == target["labels"][k]).all()


def test_generation_is_announced_and_needs_an_existing_parent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DatasetError, match=r"missing.*does not exist; create it or point data.root elsewhere"):
        generate_synthetic_panoptic(tmp_path / "missing" / "deeper" / "shapes", **SMALL)
    assert not (tmp_path / "missing").exists()
    with caplog.at_level(logging.INFO, logger="knet_lightning.data.synthetic"):
        generate_synthetic_panoptic(tmp_path / "shapes", **SMALL)
    messages = [r.getMessage() for r in caplog.records]
    assert any("generating the synthetic data set" in m and str(tmp_path / "shapes") in m for m in messages)
    assert any(m.startswith("wrote the synthetic data set in") for m in messages)
