"""Transforms and collate on hand-built samples with a known coloured square."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from knet_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DropEmptySegments,
    LargeScaleJitter,
    ResizeShortestEdge,
    build_transforms,
    collate_batch,
    keep_ratio_size,
)

H, W = 48, 64
SQUARE = (8, 24, 40, 56)  # rows [8, 24), cols [40, 56)
GRAY, RED = (50, 50, 50), (200, 20, 20)


def make_sample(height: int = H, width: int = W) -> tuple[tv_tensors.Image, dict]:
    """A gray image with a red square: segment 0 = the square (thing 0), segment 1 = the rest (stuff 1).

    The bottom row is void in ``sem_seg`` and belongs to no segment.
    """
    top, bottom, left, right = SQUARE
    image = torch.empty(3, height, width, dtype=torch.uint8)
    image[:] = torch.tensor(GRAY, dtype=torch.uint8)[:, None, None]
    image[:, top:bottom, left:right] = torch.tensor(RED, dtype=torch.uint8)[:, None, None]
    square = torch.zeros(height, width, dtype=torch.bool)
    square[top:bottom, left:right] = True
    rest = ~square
    rest[-1] = False
    sem_seg = torch.full((height, width), 1, dtype=torch.int64)
    sem_seg[square] = 0
    sem_seg[-1] = 255
    panoptic = torch.arange(height * width, dtype=torch.int32).reshape(height, width)
    target = {
        "masks": tv_tensors.Mask(torch.stack([square, rest])),
        "labels": torch.tensor([0, 1]),
        "iscrowd": torch.tensor([False, False]),
        "sem_seg": tv_tensors.Mask(sem_seg),
        "panoptic": panoptic,
        "image_id": 7,
        "file_name": "x.jpg",
        "orig_size": (height, width),
    }
    return tv_tensors.Image(image), target


def red_region(image: Tensor) -> Tensor:
    """Pixels closer to red than to gray (midpoint threshold on the red channel), ``(H, W)`` bool."""
    if image.is_floating_point():  # undo Normalize
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        image = (image * std + mean) * 255
    return image[0].float() > (GRAY[0] + RED[0]) / 2


def iou(a: Tensor, b: Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (800, 1067)),  # mmcv rounds half up: 640 * 800/480 = 1066.67 -> 1067
        ((640, 480), (1067, 800)),
        ((400, 1200), (444, 1333)),  # long side capped: scale 1333/1200
        ((800, 1333), (800, 1333)),
        ((427, 640), (800, 1199)),  # 640 * 800/427 = 1199.06
    ],
)
def test_keep_ratio_size_matches_mmdet_rounding(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert keep_ratio_size(*size, 800, 1333) == expected


def test_resize_shortest_edge_output_size_and_no_cap() -> None:
    image = tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8))
    masks = tv_tensors.Mask(torch.zeros(1, 480, 640, dtype=torch.bool))
    out_image, out_masks = ResizeShortestEdge(800, 1333)(image, masks)
    assert out_image.shape == (3, 800, 1067)
    assert out_masks.shape == (1, 800, 1067) and out_masks.dtype == torch.bool
    assert keep_ratio_size(100, 1000, 200, None) == (200, 2000)


def test_multiscale_short_edge_within_range() -> None:
    image, target = make_sample()
    resize = ResizeShortestEdge((50, 70), max_size=90)
    allowed = {keep_ratio_size(H, W, short, 90) for short in range(50, 71)}
    sizes = set()
    for _ in range(40):
        out_image, out_target = resize(image, target)
        h, w = out_image.shape[-2:]
        assert out_target["masks"].shape[-2:] == (h, w) and out_target["sem_seg"].shape == (h, w)
        assert (h, w) in allowed
        # 48x64: short 50 -> 50x67; the long cap 90 stops the short side at 68.
        assert 50 <= h <= 68 and w <= 90
        sizes.add((h, w))
    assert len(sizes) > 5


# ----------------------------------------------------------------------- alignment


def test_resize_keeps_image_masks_and_sem_seg_aligned() -> None:
    image, target = make_sample()
    out_image, out = ResizeShortestEdge(96, 1000)(image, target)  # exactly x2
    assert out_image.shape == (3, 96, 128)
    square = out["masks"][0]
    expected = torch.zeros(96, 128, dtype=torch.bool)
    expected[16:48, 80:112] = True
    assert torch.equal(square, expected)
    assert torch.equal(red_region(out_image), square)
    assert torch.equal(out["sem_seg"] == 0, square)
    assert torch.equal(out["sem_seg"][-2:], torch.full((2, 128), 255))  # void row stays void, nearest


def test_non_integer_resize_stays_aligned() -> None:
    image, target = make_sample()
    out_image, out = ResizeShortestEdge(70, 1000)(image, target)
    assert out_image.shape[-2:] == keep_ratio_size(H, W, 70, 1000)
    assert iou(red_region(out_image), out["masks"][0]) > 0.9
    assert torch.equal(out["sem_seg"] == 0, out["masks"][0])
    assert set(out["sem_seg"].unique().tolist()) == {0, 1, 255}


def test_flip_mirrors_image_masks_and_sem_seg_together() -> None:
    image, target = make_sample()
    out_image, out = v2.Compose([ResizeShortestEdge(H, 1000), v2.RandomHorizontalFlip(p=1.0)])(image, target)
    top, bottom, left, right = SQUARE
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[top:bottom, W - right : W - left] = True
    assert torch.equal(out["masks"][0], expected)
    assert torch.equal(red_region(out_image), expected)
    assert torch.equal(out["sem_seg"] == 0, expected)


def test_lsj_crop_is_aligned_and_drops_cropped_out_segments() -> None:
    # factor 2 with output 32x32 gives scale min(64/48, 64/64) = 1: a pure 32x32 crop.
    pipeline = v2.Compose([LargeScaleJitter(32, scale_range=(2.0, 2.0)), DropEmptySegments()])
    dropped = kept = 0
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = make_sample()
        out_image, out = pipeline(image, target)
        assert out_image.shape == (3, 32, 32)
        n = out["masks"].shape[0]
        assert out["labels"].shape == (n,) and out["iscrowd"].shape == (n,)
        assert bool(out["masks"].flatten(1).any(1).all())
        assert isinstance(out["masks"], tv_tensors.Mask)
        if 0 in out["labels"].tolist():
            kept += 1
            square = out["masks"][out["labels"].tolist().index(0)]
            assert torch.equal(red_region(out_image), square)
        else:
            dropped += 1
            assert not bool(red_region(out_image).any())
        assert torch.equal(out["sem_seg"] == 0, red_region(out_image))
    assert kept > 0 and dropped > 0


def test_lsj_downscale_pads_bottom_right_with_fills() -> None:
    image, target = make_sample()
    # scale = min(0.5 * 64 / 48, 0.5 * 64 / 64) = 0.5 -> 24x32 content in a 64x64 canvas
    out_image, out = LargeScaleJitter(64, scale_range=(0.5, 0.5))(image, target)
    assert out_image.shape == (3, 64, 64) and out["masks"].shape == (2, 64, 64)
    assert out["sem_seg"].shape == (64, 64)
    assert bool((out_image[:, 24:, :] == 128).all()) and bool((out_image[:, :, 32:] == 128).all())
    assert bool((out["sem_seg"][24:, :] == 255).all()) and bool((out["sem_seg"][:, 32:] == 255).all())
    assert not bool(out["masks"][:, 24:, :].any()) and not bool(out["masks"][:, :, 32:].any())
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[4:12, 20:28] = True
    assert torch.equal(out["masks"][0], expected)
    # the 128 fill is above the red threshold: compare inside the content only
    assert iou(red_region(out_image[:, :24, :32]), expected[:24, :32]) > 0.8


def test_lsj_random_scale_output_size_and_alignment() -> None:
    pipeline = build_transforms(train=True, kind="lsj", crop_size=(40, 56), scale_range=(0.3, 2.0))
    for seed in range(10):
        torch.manual_seed(seed)
        image, target = make_sample()
        out_image, out = pipeline(image, target)
        assert out_image.shape == (3, 40, 56) and out_image.dtype == torch.float32
        assert out["masks"].shape[1:] == (40, 56) and out["sem_seg"].shape == (40, 56)
        assert bool(out["masks"].flatten(1).any(1).all())
        assert torch.equal(out["sem_seg"] == 0, out["masks"][out["labels"] == 0].any(0))
        if bool((out["labels"] == 0).any()) and int(out["masks"][0].sum()) > 30:
            assert iou(red_region(out_image), out["masks"][0]) > 0.7


def test_drop_empty_segments_keeps_fields_in_sync() -> None:
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[2, 1:3, 1:3] = True
    target = {
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([4, 5, 6]),
        "iscrowd": torch.tensor([False, True, True]),
        "sem_seg": tv_tensors.Mask(torch.zeros(4, 4, dtype=torch.int64)),
        "image_id": 3,
    }
    image = tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8))
    _, out = DropEmptySegments()(image, target)
    assert out["labels"].tolist() == [4, 6]
    assert out["iscrowd"].tolist() == [False, True]
    assert torch.equal(out["masks"], masks[[0, 2]]) and isinstance(out["masks"], tv_tensors.Mask)
    assert out["sem_seg"].shape == (4, 4) and out["image_id"] == 3
    assert target["labels"].tolist() == [4, 5, 6]  # input left alone


@pytest.mark.parametrize("kind", ["resize", "multiscale"])
def test_k_net_resizes_keep_a_segment_they_empty(kind: str) -> None:
    # mmdet's Resize / RandomFlip / Pad (the official K-Net pipelines) drop no mask
    image, target = make_sample()
    dot = torch.zeros(H, W, dtype=torch.bool)
    dot[1, 1] = True  # a one-pixel thing: a nearest ×1/4 downscale samples rows/cols 0, 4, ...
    masks = target["masks"].clone()
    masks[1, 1, 1] = False
    target.update(masks=tv_tensors.Mask(torch.cat([masks, dot[None]])), labels=torch.tensor([0, 1, 0]),
                  iscrowd=torch.zeros(3, dtype=torch.bool))  # fmt: skip
    short_edge = 12 if kind == "resize" else (12, 12)
    _, out = build_transforms(True, kind=kind, short_edge=short_edge, max_size=None, flip_prob=0.0)(image, target)
    assert out["labels"].tolist() == [0, 1, 0] and tuple(out["masks"].shape) == (3, 12, 16)
    assert not bool(out["masks"][2].any())


# ------------------------------------------------------------------ full pipelines


@pytest.mark.parametrize("kind", ["resize", "multiscale", "lsj"])
def test_train_pipeline_leaves_panoptic_and_metadata_untouched(kind: str) -> None:
    short_edge = (40, 60) if kind == "multiscale" else 56
    pipeline = build_transforms(True, kind=kind, short_edge=short_edge, max_size=100, crop_size=48)
    image, target = make_sample()
    panoptic = target["panoptic"].clone()
    out_image, out = pipeline(image, target)
    assert type(out["panoptic"]) is Tensor and torch.equal(out["panoptic"], panoptic)
    assert out["image_id"] == 7 and out["file_name"] == "x.jpg" and out["orig_size"] == (H, W)
    assert out_image.dtype == torch.float32
    assert out["masks"].dtype == torch.bool and out["sem_seg"].dtype == torch.int64
    assert out["masks"].shape[1:] == out_image.shape[1:] == out["sem_seg"].shape


def test_eval_pipeline_is_deterministic_and_normalises() -> None:
    pipeline = build_transforms(False, short_edge=96, max_size=1000)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in pipeline.transforms)
    image, target = make_sample()
    out_a, tgt_a = pipeline(image, target)
    out_b, _ = pipeline(image, target)
    assert torch.equal(out_a, out_b)
    assert out_a.shape == (3, 96, 128)
    expected = (torch.tensor(GRAY) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out_a[:, 0, 0], expected)
    assert torch.equal(red_region(out_a), tgt_a["masks"][0])


def test_eval_without_short_edge_keeps_size() -> None:
    image, target = make_sample()
    out_image, out = build_transforms(False, short_edge=None)(image, target)
    assert out_image.shape == (3, H, W)
    assert torch.equal(out["masks"], target["masks"])


def test_build_transforms_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_transforms(True, kind="mosaic")
    with pytest.raises(ValueError, match="multiscale"):
        build_transforms(True, kind="multiscale", short_edge=800)
    with pytest.raises(ValueError, match="resize"):
        build_transforms(True, kind="resize", short_edge=(640, 800))
    with pytest.raises(ValueError, match="single scale"):
        build_transforms(False, short_edge=(640, 800))
    with pytest.raises(ValueError, match="scale_range"):
        LargeScaleJitter(64, scale_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="short_edge"):
        ResizeShortestEdge((800, 640))


# ------------------------------------------------------------------------- collate


def test_collate_pads_to_multiple_of_32_and_keeps_sizes() -> None:
    pipeline = build_transforms(False, short_edge=None)
    samples = [pipeline(*make_sample(40, 70)), pipeline(*make_sample(65, 60))]
    batch = collate_batch(samples)
    assert batch["images"].shape == (2, 3, 96, 96)
    assert batch["image_sizes"] == [(40, 70), (65, 60)]
    assert torch.equal(batch["images"][0, :, :40, :70], samples[0][0])
    assert torch.equal(batch["images"][1, :, :65, :60], samples[1][0])
    assert bool((batch["images"][0, :, 40:] == 0).all()) and bool((batch["images"][0, :, :, 70:] == 0).all())
    assert bool((batch["images"][1, :, 65:] == 0).all()) and bool((batch["images"][1, :, :, 60:] == 0).all())
    assert type(batch["images"]) is Tensor
    assert len(batch["targets"]) == 2
    for target, (h, w) in zip(batch["targets"], batch["image_sizes"]):
        assert type(target["masks"]) is Tensor and target["masks"].shape == (2, h, w)
        assert type(target["sem_seg"]) is Tensor and target["sem_seg"].shape == (h, w)
        assert target["labels"].tolist() == [0, 1]


def test_collate_exact_multiple_and_other_divisor() -> None:
    pipeline = build_transforms(False, short_edge=None)
    batch = collate_batch([pipeline(*make_sample(64, 32))])
    assert batch["images"].shape == (1, 3, 64, 32)
    batch = collate_batch([pipeline(*make_sample(33, 20))], size_divisor=16)
    assert batch["images"].shape == (1, 3, 48, 32)


def test_collate_rejects_bad_samples() -> None:
    image, target = make_sample()
    with pytest.raises(ValueError, match="float"):
        collate_batch([(image, target)])
    float_image = image.float()
    bad = dict(target, masks=torch.zeros(2, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        collate_batch([(float_image, bad)])
    with pytest.raises(ValueError, match="empty"):
        collate_batch([])
    with pytest.raises(TypeError, match="pair"):
        collate_batch([float_image])
