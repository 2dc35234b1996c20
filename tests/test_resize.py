"""The resize arithmetic (knet_lightning.data.resize) against mmcv's own functions."""

from __future__ import annotations

import mmseg_peer as peer
import numpy as np
import pytest
import torch

from knet_lightning.data.resize import rescale_size, resize_image, resize_label_map, scale_size


def _mmcv():  # type: ignore[no-untyped-def]
    peer.import_mmseg()
    import mmcv

    return mmcv


@pytest.mark.parametrize("scale", [(1333, 800), (2048, 512), (512, 2048), 0.5, 1.75, 2])
@pytest.mark.parametrize("size", [(480, 640), (1500, 2000), (333, 500), (97, 75), (1, 7)])
def test_sizes_equal_mmcvs(size: tuple[int, int], scale) -> None:  # type: ignore[no-untyped-def]
    h, w = size
    new_w, new_h = _mmcv().rescale_size((w, h), scale)
    assert rescale_size(h, w, scale) == (new_h, new_w)
    if isinstance(scale, float):
        from mmcv.image.geometric import _scale_size

        assert scale_size(h, w, scale) == _scale_size((w, h), scale)[::-1]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cv2_images_equal_mmcv_imresize_and_keep_dtype(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (2, 37, 53, 3)).astype(np.uint8 if dtype == torch.uint8 else np.float32)
    batch = torch.from_numpy(array).permute(0, 3, 1, 2)  # (B, 3, H, W): each image resized as mmcv does one
    out = resize_image(batch, (61, 29), "cv2")
    assert out.dtype == dtype and out.shape == (2, 3, 61, 29)
    for b in range(2):
        expected = _mmcv().imresize(array[b], (29, 61))
        np.testing.assert_array_equal(out[b].permute(1, 2, 0).numpy(), expected)


def test_cv2_label_maps_and_masks_equal_mmcv_nearest() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 300, (45, 61))
    out = resize_label_map(torch.from_numpy(labels), (100, 20), "cv2")
    assert out.dtype == torch.int64
    expected = _mmcv().imresize(labels.astype(np.int32), (20, 100), interpolation="nearest")
    np.testing.assert_array_equal(out.numpy(), expected)
    masks = torch.from_numpy(rng.integers(0, 2, (300, 45, 61)).astype(bool))  # more than one OpenCV call holds
    out = resize_label_map(masks, (30, 40), "cv2")
    assert out.dtype == torch.bool and out.shape == (300, 30, 40)
    for k in (0, 127, 128, 299):
        expected = _mmcv().imresize(masks[k].numpy().astype(np.uint8), (40, 30), interpolation="nearest")
        np.testing.assert_array_equal(out[k].numpy(), expected.astype(bool))
    empty = resize_label_map(torch.zeros(0, 45, 61, dtype=torch.bool), (30, 40), "cv2")  # an image without segments
    assert empty.shape == (0, 30, 40) and empty.dtype == torch.bool


def test_torchvision_backend_is_the_antialiased_resize() -> None:
    from torchvision.transforms.v2 import functional as F

    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8)
    assert torch.equal(resize_image(image, (45, 60), "torchvision"), F.resize(image, [45, 60], antialias=True))
    assert not torch.equal(resize_image(image, (45, 60), "cv2"), F.resize(image, [45, 60], antialias=True))


def test_bad_backend_and_sizes_are_clear_errors() -> None:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"resize_backend must be one of \('cv2', 'torchvision'\), got 'pil'"):
        resize_image(image, (4, 4), "pil")
    with pytest.raises(ValueError, match="output size must be positive"):
        resize_image(image, (0, 4))
    with pytest.raises(ValueError, match="image size must be positive"):
        rescale_size(0, 4, (1333, 800))
    with pytest.raises(ValueError, match="beyond int32"):
        resize_label_map(torch.tensor([[2**40]]), (2, 2))
