"""The ADE20K reader, the mmseg-style transforms and the data module on a tiny fixture
written in the ADEChallengeData2016 layout."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from knet_lightning.data.ade20k import ADE20K_CLASSES, ADE20KDataModule, ADE20KDataset, ade20k_class_info
from knet_lightning.data.meta import DatasetError
from knet_lightning.data.mmseg_pipeline import (
    PadToSize,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RatioRangeResize,
    build_ade20k_transforms,
    scale_saturation,
)


def _raw_label_a() -> np.ndarray:
    """Image A's label file: 0 (unlabelled), 1 (wall), 5 (tree), 150 (flag, the max) and a 255 strip."""
    raw = np.ones((24, 32), np.uint8)
    raw[0:6] = 0
    raw[10:20, 4:12] = 5
    raw[12:22, 20:30] = 150
    raw[23] = 255
    return raw


def _write_split(base: Path, split: str, items: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    (base / "images" / split).mkdir(parents=True, exist_ok=True)
    (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for stem, (rgb, raw) in items.items():
        # PNG images keep the pixels exact; the reader accepts .jpg/.jpeg/.png image files.
        Image.fromarray(rgb).save(base / "images" / split / f"{stem}.png")
        Image.fromarray(raw, mode="L").save(base / "annotations" / split / f"{stem}.png")


def _write_fixture(root: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016"
    rgb_a = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    raw_a = _raw_label_a()
    raw_b = np.full((16, 20), 3, np.uint8)
    raw_b[:, 10:] = 2
    _write_split(base, "training", {
        "ADE_train_00000001": (rgb_a, raw_a),
        "ADE_train_00000002": (rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), raw_b),
    })  # fmt: skip
    rgb_val = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
    _write_split(base, "validation", {"ADE_val_00000001": (rgb_val, raw_b.T.copy())})
    # A real JPEG too, as in the data set.
    Image.fromarray(rgb_a).save(base / "images" / "training" / "ADE_train_00000003.jpg", quality=95)
    Image.fromarray(raw_a, mode="L").save(base / "annotations" / "training" / "ADE_train_00000003.png")
    return {"root": root, "base": base, "rgb_a": rgb_a, "raw_a": raw_a}


@pytest.fixture
def fixture(tmp_path: Path) -> dict[str, Any]:
    return _write_fixture(tmp_path)


# ----------------------------------------------------------------------------- classes and reader


def test_class_info() -> None:
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    info = ade20k_class_info()
    assert (info.num_things, info.num_stuff, info.num_classes) == (0, 150, 150)
    assert info.contiguous_id(1) == 0 and info.dataset_id(149) == 150  # file value = class + 1
    assert ade20k_class_info(reduce_zero_label=False).dataset_id(149) == 149


def test_reads_pixel_exact_with_zero_label_reduced(fixture: dict[str, Any]) -> None:
    ds = ADE20KDataset(fixture["root"], split="training")
    assert len(ds) == 3 and ds.base == fixture["base"]
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy(fixture["rgb_a"]).permute(2, 0, 1))

    raw = fixture["raw_a"]
    expected = np.full(raw.shape, 255, np.int64)  # raw 0 and raw 255: ignore
    expected[raw == 1] = 0
    expected[raw == 5] = 4
    expected[raw == 150] = 149
    sem = target["sem_seg"]
    assert isinstance(sem, tv_tensors.Mask) and sem.dtype == torch.int64
    np.testing.assert_array_equal(sem.numpy(), expected)
    orig = target["sem_seg_orig"]
    assert type(orig) is Tensor and orig.dtype == torch.int64  # plain: transforms leave it alone
    np.testing.assert_array_equal(orig.numpy(), expected)

    assert target["labels"].tolist() == [0, 4, 149] and target["labels"].dtype == torch.int64
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.bool and masks.shape == (3, 24, 32)
    for mask, raw_value in zip(masks.numpy(), (1, 5, 150)):
        np.testing.assert_array_equal(mask, raw == raw_value)
    assert target["iscrowd"].tolist() == [False, False, False]
    assert (target["image_id"], target["file_name"], target["orig_size"]) == (0, "ADE_train_00000001.png", (24, 32))

    _, target_jpg = ds[2]  # same label behind a JPEG image
    assert target_jpg["file_name"] == "ADE_train_00000003.jpg"
    np.testing.assert_array_equal(target_jpg["sem_seg"].numpy(), expected)


def test_root_may_be_the_challenge_folder(fixture: dict[str, Any]) -> None:
    ds = ADE20KDataset(fixture["base"], split="validation")
    assert ds.base == fixture["base"] and len(ds) == 1
    image, target = ds[0]
    assert image.shape == (3, 20, 16) and target["labels"].tolist() == [1, 2]
    with pytest.raises(DatasetError, match=r"root = the ADEChallengeData2016 folder.*root = its parent"):
        ADE20KDataset(fixture["root"] / "elsewhere", split="training")
    with pytest.raises(DatasetError, match=r"split 'testing' not found"):
        ADE20KDataset(fixture["root"], split="testing")


def test_without_zero_label_reduction(tmp_path: Path) -> None:
    raw = np.zeros((8, 8), np.uint8)
    raw[:, 4:] = 149
    raw[0] = 255
    _write_split(tmp_path, "validation", {"x": (np.zeros((8, 8, 3), np.uint8), raw)})
    _, target = ADE20KDataset(tmp_path, split="validation", reduce_zero_label=False)[0]
    np.testing.assert_array_equal(target["sem_seg"].numpy(), raw.astype(np.int64))
    assert target["labels"].tolist() == [0, 149]
    raw[1, 1] = 150
    Image.fromarray(raw, mode="L").save(tmp_path / "annotations" / "validation" / "x.png")
    with pytest.raises(DatasetError, match=r"x\.png: label values \[150\] out of range; expected 0\.\.149 or 255"):
        ADE20KDataset(tmp_path, split="validation", reduce_zero_label=False)[0]


# ----------------------------------------------------------------------------- bad inputs


def _label_path(fixture: dict[str, Any], stem: str = "ADE_train_00000001") -> Path:
    return fixture["base"] / "annotations" / "training" / f"{stem}.png"


def test_label_out_of_range(fixture: dict[str, Any]) -> None:
    raw = fixture["raw_a"].copy()
    raw[0, 0], raw[1, 1] = 151, 200
    Image.fromarray(raw, mode="L").save(_label_path(fixture))
    with pytest.raises(DatasetError, match=r"ADE_train_00000001\.png: label values \[151, 200\] out of range; "
                       r"expected 0\.\.150 \(0 = unlabelled\) or 255"):  # fmt: skip
        ADE20KDataset(fixture["root"], split="training")[0]


def test_size_mismatch(fixture: dict[str, Any]) -> None:
    Image.fromarray(np.ones((24, 31), np.uint8), mode="L").save(_label_path(fixture))
    with pytest.raises(DatasetError, match=r"label size 31x24 \(WxH\) differs from the image .* size 32x24"):
        ADE20KDataset(fixture["root"], split="training")[0]


def test_missing_label(fixture: dict[str, Any]) -> None:
    _label_path(fixture, "ADE_train_00000002").unlink()
    with pytest.raises(DatasetError, match=r"missing label file for 1 image\(s\) .*ADE_train_00000002\.png"):
        ADE20KDataset(fixture["root"], split="training")


def test_empty_split(tmp_path: Path) -> None:
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images .* in the 'training' split"):
        ADE20KDataset(tmp_path, split="training")


def test_corrupt_and_multichannel_files(fixture: dict[str, Any]) -> None:
    ds = ADE20KDataset(fixture["root"], split="training")
    (fixture["base"] / "images" / "training" / "ADE_train_00000003.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DatasetError, match=r"ADE_train_00000003\.jpg: cannot decode image file"):
        ds[2]
    _label_path(fixture, "ADE_train_00000002").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    with pytest.raises(DatasetError, match=r"ADE_train_00000002\.png: cannot decode label PNG"):
        ds[1]
    Image.fromarray(np.ones((24, 32, 3), np.uint8)).save(_label_path(fixture))
    with pytest.raises(DatasetError, match=r"label PNG must be single channel .* got mode 'RGB'"):
        ds[0]


# ----------------------------------------------------------------------------- transforms


def test_ratio_range_resize_follows_mmcv_rescale() -> None:
    image = tv_tensors.Image(torch.zeros(3, 24, 32, dtype=torch.uint8))
    seg = tv_tensors.Mask(torch.zeros(24, 32, dtype=torch.int64))
    out_img, out_seg = RatioRangeResize((128, 32), ratio_range=None)(image, seg)
    # scale = min(128 / 32, 32 / 24) = 4/3 -> 32 x int(32 * 4/3 + 0.5) = 43
    assert out_img.shape == (3, 32, 43) and out_seg.shape == (32, 43)
    out_img, _ = RatioRangeResize((128, 32), ratio_range=(0.5, 0.5))(image, seg)
    assert out_img.shape == (3, 16, 21)  # scale (64, 16): 2/3 -> 16 x int(21.33 + 0.5)
    sizes = {RatioRangeResize((128, 32), ratio_range=(0.5, 2.0))(image)[0].shape[-2] for _ in range(40)}
    assert min(sizes) >= 16 and max(sizes) <= 64 and len(sizes) > 5


def _crop_sample() -> tuple[tv_tensors.Image, dict[str, Any]]:
    seg = torch.zeros(20, 20, dtype=torch.int64)
    seg[:, 10:] = 1
    # The image encodes each pixel's column, so the crop's alignment can be read back.
    cols = torch.arange(20, dtype=torch.uint8).expand(20, 20)
    image = tv_tensors.Image(cols.expand(3, 20, 20).clone())
    return image, {"sem_seg": tv_tensors.Mask(seg), "masks": tv_tensors.Mask(torch.stack([seg == 0, seg == 1]))}


def _balanced(seg: Tensor, ratio: float = 0.75) -> bool:
    counts = torch.unique(seg, return_counts=True)[1]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < ratio


def test_random_crop_cat_max_prefers_mixed_windows() -> None:
    image, target = _crop_sample()
    results = {}
    for ratio in (0.75, 1.0):
        crop = RandomCropCatMax(8, cat_max_ratio=ratio)
        balanced = 0
        for seed in range(40):
            torch.manual_seed(seed)
            out_img, out = crop(image, target)
            assert out_img.shape == (3, 8, 8) and out["sem_seg"].shape == (8, 8) and out["masks"].shape == (2, 8, 8)
            # image, sem_seg and masks are cut by the same window
            assert torch.equal(out["sem_seg"], (out_img[0] >= 10).long())
            assert torch.equal(out["masks"][1], out["sem_seg"] == 1)
            balanced += _balanced(out["sem_seg"])
        results[ratio] = balanced / 40
    # a random 8-wide window is mixed enough 3 times in 13; 11 tries make it ~94 %
    assert results[0.75] >= 0.8 and results[1.0] <= 0.5


def test_random_crop_smaller_image_and_no_semantic_map() -> None:
    image = tv_tensors.Image(torch.zeros(3, 6, 30, dtype=torch.uint8))
    out = RandomCropCatMax((8, 8))(image)
    assert out.shape == (3, 6, 8)


def test_scale_saturation_is_the_hsv_operation() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.random((3, 1, 50))
    pixels[:, 0, 0] = 0.4  # grey: saturation 0 stays 0
    pixels[:, 0, 1] = 0.0  # black
    for factor in (0.0, 0.5, 1.3, 4.0):
        out = scale_saturation(torch.from_numpy(pixels), factor).numpy()
        for i in range(pixels.shape[-1]):
            h, s, v = colorsys.rgb_to_hsv(*pixels[:, 0, i])
            np.testing.assert_allclose(out[:, 0, i], colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v), atol=1e-9)


def test_photometric_distortion_steps() -> None:
    t = PhotoMetricDistortion()
    rng = np.random.default_rng(4)
    pixels = torch.from_numpy(rng.integers(0, 256, (3, 4, 5), dtype=np.uint8))
    image = tv_tensors.Image(pixels)
    none = {"brightness": None, "contrast_first": True, "contrast": None, "saturation": None, "hue": None}
    assert torch.equal(t.transform(image, none), image)

    out = t.transform(image, {**none, "brightness": 20.5, "contrast": 1.2, "contrast_first": False})
    step = (pixels.float() + 20.5).clamp(0, 255).floor()
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.uint8
    assert torch.equal(out, (step * 1.2).clamp(0, 255).floor().to(torch.uint8))

    red = tv_tensors.Image(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).clone())
    # +60 on OpenCV's 0..180 hue scale is +120 degrees: red becomes green
    green = t.transform(red, {**none, "hue": 60})
    assert green[:, 0, 0].tolist() == [0, 255, 0]

    mask = tv_tensors.Mask(torch.ones(2, 4, 5, dtype=torch.bool))
    seg = tv_tensors.Mask(torch.full((4, 5), 7))
    for seed in range(5):
        torch.manual_seed(seed)
        _, out_mask, out_seg = t(image, mask, seg)
        assert torch.equal(out_mask, mask) and torch.equal(out_seg, seg)
    with pytest.raises(TypeError, match="uint8"):
        t(tv_tensors.Image(torch.zeros(3, 2, 2)))


def test_pad_to_size_fills() -> None:
    image = tv_tensors.Image(torch.ones(3, 5, 7))
    masks = tv_tensors.Mask(torch.ones(2, 5, 7, dtype=torch.bool))
    seg = tv_tensors.Mask(torch.zeros(5, 7, dtype=torch.int64))
    plain = torch.arange(4)
    out_img, out_masks, out_seg, out_plain = PadToSize((8, 9))(image, masks, seg, plain)
    assert out_img.shape == (3, 8, 9) and out_masks.shape == (2, 8, 9) and out_seg.shape == (8, 9)
    assert bool((out_img[:, 5:] == 0).all()) and bool((out_img[:, :, 7:] == 0).all())
    assert bool(out_masks[:, :5, :7].all()) and not bool(out_masks[:, 5:].any())
    assert bool((out_seg[5:] == 255).all()) and bool((out_seg[:, 7:] == 255).all())
    assert bool((out_seg[:5, :7] == 0).all())
    assert torch.equal(out_plain, plain)
    big = tv_tensors.Image(torch.ones(3, 10, 10))
    assert PadToSize(8)(big).shape == (3, 10, 10)


def test_training_pipeline_on_a_sample(fixture: dict[str, Any]) -> None:
    train = build_ade20k_transforms(True, crop_size=16, img_scale=(64, 16))
    ds = ADE20KDataset(fixture["root"], split="training", transforms=train)
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = ds[0]
        assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
        sem = target["sem_seg"]
        assert sem.shape == (16, 16) and target["masks"].shape[1:] == (16, 16)
        assert set(torch.unique(sem).tolist()) <= {0, 4, 149, 255}
        # one mask per class still present, equal to that class's pixels (crops drop the others)
        assert target["labels"].tolist() == [c for c in (0, 4, 149) if bool((sem == c).any())]
        for mask, label in zip(target["masks"], target["labels"]):
            assert torch.equal(mask, sem == label)
        assert target["sem_seg_orig"].shape == (24, 32)  # untouched, for evaluation


def test_eval_pipeline_resizes_keep_ratio(fixture: dict[str, Any]) -> None:
    ds = ADE20KDataset(fixture["root"], split="training", transforms=build_ade20k_transforms(False, img_scale=(64, 16)))
    image, target = ds[0]
    assert image.shape == (3, 16, 21) and target["sem_seg"].shape == (16, 21)  # 24x32 * 2/3, rounded
    assert target["sem_seg_orig"].shape == (24, 32) and target["masks"].shape == (3, 16, 21)


# ----------------------------------------------------------------------------- data module


def test_datamodule_batches(fixture: dict[str, Any]) -> None:
    dm = ADE20KDataModule(
        fixture["root"], batch_size=2, val_batch_size=2, num_workers=0, crop_size=16, img_scale=(64, 16)
    )
    assert dm.class_info == ade20k_class_info()  # no disk access needed
    assert (dm.num_things, dm.num_stuff) == (0, 150)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["targets"]) for b in batches] == [2, 1]
    for batch in batches:
        assert batch["images"].shape[1:] == (3, 32, 32)  # padded to 16, then to /32 by collate
        assert batch["image_sizes"] == [(16, 16)] * len(batch["targets"])
        for t in batch["targets"]:
            assert type(t["sem_seg"]) is Tensor and t["sem_seg"].shape == (16, 16)
    (val,) = list(dm.val_dataloader())
    assert val["image_sizes"] == [(20, 16)]  # short side already 16: unchanged
    assert val["targets"][0]["sem_seg_orig"].shape == (20, 16)


def test_datamodule_rejects_coco_resize_settings(fixture: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"\['train_short_edge'\] do not apply"):
        ADE20KDataModule(fixture["root"], train_short_edge=800)


def test_v2_flip_keeps_sem_seg_orig(fixture: dict[str, Any]) -> None:
    ds = ADE20KDataset(fixture["root"], split="training", transforms=v2.RandomHorizontalFlip(p=1.0))
    _, target = ds[0]
    assert torch.equal(target["sem_seg"], target["sem_seg_orig"].flip(-1))
