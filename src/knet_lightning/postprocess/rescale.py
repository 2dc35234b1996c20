"""Maps at network scale back to the original image, as the official ``rescale_masks``
(``knet/det/kernel_update_head.py``): sigmoid at stride 4 -> bilinear to the padded network
input size -> crop to the unpadded input size -> bilinear to the original image size; and the
shape checks the three tasks' post-processing shares (:mod:`knet_lightning.postprocess.merge`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["RESCALE_CHUNK", "check_logits", "check_sizes", "rescale_maps", "rescale_probs_chunks"]

# Kernels are rescaled in chunks so that N x H x W float maps at padded size never exist
# all at once (153 kernels at 800x1216 would be ~600 MB). Bilinear resizing is
# per-channel, so chunking does not change any value.
RESCALE_CHUNK = 32


def _check_size(name: str, size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"postprocess: `{name}` must be (height, width) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


def check_sizes(
    image_size: Sequence[int], padded_size: Sequence[int], output_size: Sequence[int]
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    img = _check_size("image_size", image_size)
    pad = _check_size("padded_size", padded_size)
    out = _check_size("output_size", output_size)
    if img[0] > pad[0] or img[1] > pad[1]:
        raise ValueError(f"postprocess: `image_size` {img} must fit inside `padded_size` {pad}")
    return img, pad, out


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(C, h, w)`` to ``(C, *size)``; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False).squeeze(0)


def rescale_maps(
    maps: Tensor,
    image_size: Sequence[int],
    padded_size: Sequence[int],
    output_size: Sequence[int],
) -> Tensor:
    """Resize per-channel maps from network scale back to the original image.

    Args:
        maps: ``(C, h, w)`` maps covering the padded network input (any stride).
        image_size: ``(h_img, w_img)`` unpadded network input size.
        padded_size: ``(Hp, Wp)`` padded network input size.
        output_size: ``(H, W)`` original image size.

    Returns:
        ``(C, H, W)`` float32: bilinear to ``padded_size``, crop to ``image_size``, bilinear
        to ``output_size`` (the official ``rescale_masks``).
    """
    if maps.dim() != 3:
        raise ValueError(f"postprocess: maps must be (C, h, w), got shape {tuple(maps.shape)}")
    img, pad, out = check_sizes(image_size, padded_size, output_size)
    x = _resize(maps.float(), pad)[:, : img[0], : img[1]]
    return _resize(x, out)


def rescale_probs_chunks(
    mask_logits: Tensor,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    chunk_size: int = RESCALE_CHUNK,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, probs)`` with ``probs`` ``(n, H, W)`` rescaled sigmoid masks, ``n <=
    chunk_size`` kernels at a time."""
    for start in range(0, mask_logits.shape[0], chunk_size):
        chunk = mask_logits[start : start + chunk_size].float().sigmoid()
        yield start, rescale_maps(chunk, image_size, padded_size, output_size)


def check_logits(mask_logits: Tensor, cls_logits: Tensor) -> tuple[int, int]:
    if mask_logits.dim() != 3:
        raise ValueError(
            f"postprocess: `mask_logits` must be (N, h, w) for one image, got shape {tuple(mask_logits.shape)}"
        )
    if cls_logits.dim() != 2 or cls_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(
            f"postprocess: `cls_logits` must be (N, C) with N = {mask_logits.shape[0]} "
            f"(from mask_logits), got shape {tuple(cls_logits.shape)}"
        )
    return int(cls_logits.shape[0]), int(cls_logits.shape[1])
