"""Overlays: shape/dtype, colours where segments are, untouched pixels elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from knet_lightning.data.meta import default_palette
from knet_lightning.postprocess.visualize import (
    overlay_instances,
    overlay_panoptic,
    overlay_semantic,
    save_png,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def _image(h: int = 6, w: int = 8) -> torch.Tensor:
    return torch.full((3, h, w), 100, dtype=torch.uint8)


def test_overlay_panoptic_colours_segments_and_draws_boundaries():
    image = _image()
    pan = torch.zeros(6, 8, dtype=torch.int32)
    pan[0:4, 0:4] = 5  # class 0
    pan[0:4, 4:8] = 9  # class 0 too: a touching instance of the same class
    segs = [{"id": 5, "category_id": 0}, {"id": 9, "category_id": 0}]
    out = overlay_panoptic(image, pan, segs, COLORS, alpha=0.5)
    assert out.dtype == torch.uint8 and out.shape == image.shape
    # Void rows are untouched.
    assert torch.equal(out[:, 4:], image[:, 4:])
    # Interior pixel: 0.5 * 100 + 0.5 * (255, 0, 0).
    assert out[:, 1, 1].tolist() == [178, 50, 50]
    # The border between the two instances (columns 3 and 4) is white.
    assert (out[:, 1:3, 3:5] == 255).all()
    # Without boundaries the two instances look the same.
    plain = overlay_panoptic(image, pan, segs, COLORS, alpha=0.5, draw_boundaries=False)
    assert (plain[:, :4] == torch.tensor([178, 50, 50], dtype=torch.uint8)[:, None, None]).all()


def test_overlay_panoptic_ignores_unknown_ids_and_checks_inputs():
    image = _image()
    pan = torch.zeros(6, 8, dtype=torch.int64)
    pan[2, 2] = 3  # not listed -> left as is
    out = overlay_panoptic(image, pan, [], COLORS)
    assert torch.equal(out, image)
    with pytest.raises(ValueError, match="uint8"):
        overlay_panoptic(image.float(), pan, [], COLORS)
    with pytest.raises(ValueError, match="pan_seg"):
        overlay_panoptic(image, pan[:3], [], COLORS)
    with pytest.raises(ValueError, match="colors"):
        overlay_panoptic(image, pan, [{"id": 3, "category_id": 7}], COLORS)


def test_overlay_semantic_leaves_ignore_pixels():
    image = _image()
    sem = torch.full((6, 8), 255, dtype=torch.int64)
    sem[:, :3] = 2
    sem[:, 3:5] = 1
    out = overlay_semantic(image, sem, COLORS, alpha=1.0)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, :, 5:], image[:, :, 5:])
    assert out[:, 0, 0].tolist() == [0, 0, 255]
    assert out[:, 0, 4].tolist() == [0, 255, 0]
    with pytest.raises(ValueError, match="class ids"):
        overlay_semantic(image, torch.full((6, 8), 4), COLORS)


def test_overlay_instances_highest_first_mask_on_top():
    image = _image()
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[1, :4, :4] = True
    out = overlay_instances(image, masks, torch.tensor([1, 2]), COLORS, alpha=1.0, draw_boundaries=False)
    assert out[:, 1, 1].tolist() == [0, 255, 0]  # mask 0 (class 1) on top
    assert out[:, 3, 3].tolist() == [0, 0, 255]
    assert torch.equal(out[:, 4:], image[:, 4:])


def test_save_png_roundtrip(tmp_path):
    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    path = save_png(img, tmp_path / "sub" / "x.png")
    back = np.asarray(Image.open(path).convert("RGB"))
    assert back.shape == (5, 7, 3)
    assert np.array_equal(back, img.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="uint8"):
        save_png(img.float(), tmp_path / "y.png")


def test_default_palette_distinct_colours():
    pal = default_palette(20)
    assert len(pal) == 20 and len(set(pal)) == 20
    assert all(0 <= v <= 255 for c in pal for v in c)
