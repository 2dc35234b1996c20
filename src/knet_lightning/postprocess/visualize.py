"""Overlays of segmentations on images, for callbacks and ``predict``.

All images are uint8 ``(3, H, W)`` RGB tensors on any device; outputs match the input.
Only pixels that belong to a segment change: unlabelled/void pixels keep the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["overlay_instances", "overlay_panoptic", "overlay_semantic", "save_png"]

BOUNDARY_COLOR = (255, 255, 255)


def _check_image(image: Tensor, seg: Tensor, seg_name: str) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"visualize: image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    if seg.shape != image.shape[1:]:
        raise ValueError(f"visualize: {seg_name} must be (H, W) = {tuple(image.shape[1:])}, got {tuple(seg.shape)}")


def _palette_tensor(colors: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    pal = torch.tensor([tuple(c) for c in colors], dtype=torch.float32, device=device).reshape(-1, 3)
    if pal.numel() and (pal.min() < 0 or pal.max() > 255):
        raise ValueError("visualize: colors must be RGB triples in [0, 255]")
    return pal


def _boundaries(ids: Tensor) -> Tensor:
    """``(H, W)`` bool: labelled pixels with a 4-neighbour of a different id."""
    edge = torch.zeros_like(ids, dtype=torch.bool)
    dy = ids[1:, :] != ids[:-1, :]
    dx = ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def _blend(
    image: Tensor, ids: Tensor, class_of_id: Tensor, palette: Tensor, alpha: float, draw_boundaries: bool
) -> Tensor:
    """Blend colours of ``class_of_id[ids]`` into the image where ``ids > 0``.

    ``ids`` is ``(H, W)`` int64 in ``[0, len(class_of_id))``; ``class_of_id[0]`` is unused.
    """
    labelled = ids > 0
    color = palette[class_of_id[ids]].permute(2, 0, 1)  # (3, H, W)
    out = image.float()
    out = torch.where(labelled, (1 - alpha) * out + alpha * color, out)
    if draw_boundaries:
        edge = _boundaries(ids) & labelled
        white = torch.tensor(BOUNDARY_COLOR, dtype=out.dtype, device=out.device)[:, None, None]
        out = torch.where(edge, white, out)
    return out.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def overlay_panoptic(
    image: Tensor,
    pan_seg: Tensor,
    segments_info: Sequence[dict[str, Any]],
    colors: Sequence[Sequence[int]],
    alpha: float = 0.5,
    draw_boundaries: bool = True,
) -> Tensor:
    """Colour each panoptic segment by its class and outline the segments.

    Args:
        image: uint8 ``(3, H, W)`` RGB.
        pan_seg: ``(H, W)`` integer segment ids, 0 = void.
        segments_info: dicts with ``id`` and ``category_id`` (contiguous class id).
        colors: one RGB triple per contiguous class.
        alpha: weight of the class colour.
        draw_boundaries: draw segment borders (white), which separates touching instances
            of the same class.

    Returns:
        uint8 ``(3, H, W)``. Void pixels and ids missing from ``segments_info`` are unchanged.
    """
    _check_image(image, pan_seg, "pan_seg")
    palette = _palette_tensor(colors, image.device)
    seg = pan_seg.to(image.device, torch.long)
    # Compact the ids to 1..K so that arbitrary (e.g. RGB-encoded) ids index a small table.
    ids_list = [int(s["id"]) for s in segments_info]
    cats_list = [int(s["category_id"]) for s in segments_info]
    if any(c < 0 or c >= len(colors) for c in cats_list):
        raise ValueError(f"visualize: category ids {cats_list} need colors for [0, {len(colors)})")
    if not ids_list:
        return image.clone()
    ids = torch.tensor(ids_list, dtype=torch.long, device=image.device)
    sorted_ids, perm = ids.sort()
    pos = torch.searchsorted(sorted_ids, seg).clamp(max=len(ids_list) - 1)
    compact = torch.where((sorted_ids[pos] == seg) & (seg != 0), perm[pos] + 1, torch.zeros_like(seg))
    class_of_id = torch.tensor([0] + cats_list, dtype=torch.long, device=image.device)
    return _blend(image, compact, class_of_id, palette, alpha, draw_boundaries)


@torch.no_grad()
def overlay_semantic(
    image: Tensor,
    sem: Tensor,
    colors: Sequence[Sequence[int]],
    ignore_index: int = 255,
    alpha: float = 0.5,
    draw_boundaries: bool = False,
) -> Tensor:
    """Colour each pixel by its class.

    Args:
        image: uint8 ``(3, H, W)`` RGB.
        sem: ``(H, W)`` integer class ids; ``ignore_index`` pixels are left unchanged.
        colors: one RGB triple per class.
        alpha: weight of the class colour.
        draw_boundaries: outline class regions.

    Returns:
        uint8 ``(3, H, W)``.
    """
    _check_image(image, sem, "sem")
    palette = _palette_tensor(colors, image.device)
    sem = sem.to(image.device, torch.long)
    valid = sem != ignore_index
    if bool(((sem[valid] < 0) | (sem[valid] >= len(colors))).any()):
        raise ValueError(f"visualize: sem has class ids outside [0, {len(colors)}) other than ignore_index")
    ids = torch.where(valid, sem + 1, torch.zeros_like(sem))
    class_of_id = torch.arange(-1, len(colors), device=image.device).clamp(min=0)
    return _blend(image, ids, class_of_id, palette, alpha, draw_boundaries)


@torch.no_grad()
def overlay_instances(
    image: Tensor,
    masks: Tensor,
    labels: Tensor,
    colors: Sequence[Sequence[int]],
    alpha: float = 0.5,
    draw_boundaries: bool = True,
) -> Tensor:
    """Colour instance masks by class; earlier masks are drawn on top (pass them sorted by
    descending score, as ``instance_inference`` returns them).

    Args:
        image: uint8 ``(3, H, W)`` RGB.
        masks: bool ``(K, H, W)``.
        labels: int ``(K,)`` class ids.
        colors: one RGB triple per class.

    Returns:
        uint8 ``(3, H, W)``.
    """
    if masks.dim() != 3 or labels.shape != masks.shape[:1]:
        raise ValueError(
            f"visualize: masks must be (K, H, W) with labels (K,), got {tuple(masks.shape)} and {tuple(labels.shape)}"
        )
    _check_image(image, image[0], "image")
    if masks.shape[1:] != image.shape[1:]:
        raise ValueError(f"visualize: masks must be (K, {image.shape[1]}, {image.shape[2]}), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return image.clone()
    masks = masks.to(image.device).bool()
    covered = masks.any(0)
    first = masks.to(torch.uint8).argmax(0)  # first (= highest-score) mask at each pixel
    ids = torch.where(covered, first + 1, torch.zeros_like(first))
    labels_list = labels.tolist()
    if any(c < 0 or c >= len(colors) for c in labels_list):
        raise ValueError(f"visualize: labels {labels_list} need colors for [0, {len(colors)})")
    class_of_id = torch.tensor([0] + labels_list, dtype=torch.long, device=image.device)
    return _blend(image, ids, class_of_id, _palette_tensor(colors, image.device), alpha, draw_boundaries)


def denormalized_image(batch: dict[str, Any], b: int, out_size: tuple[int, int]) -> Tensor:
    """The network input of image ``b`` of a collated batch as uint8 RGB ``(3, H, W)`` at
    ``out_size``, its padding cropped (the batch carries the data module's ``mean`` and ``std``)."""
    images = batch["images"]
    mean = torch.as_tensor(batch["mean"], dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.as_tensor(batch["std"], dtype=images.dtype, device=images.device).view(3, 1, 1)
    h, w = batch["image_sizes"][b]
    img = (images[b, :, :h, :w] * std + mean).clamp(0, 1)
    img = torch.nn.functional.interpolate(img[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return (img * 255).round().to(torch.uint8).cpu()


def save_png(img: Tensor, path: str | Path) -> Path:
    """Write a uint8 ``(3, H, W)`` RGB tensor as PNG (parent folders are created)."""
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"save_png: img must be uint8 (3, H, W), got {img.dtype} {tuple(img.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(img.detach().cpu().permute(1, 2, 0).numpy())
    Image.fromarray(array).save(path, format="PNG")
    return path
