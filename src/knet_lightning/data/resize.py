"""The pixel arithmetic of an image resize: the references' (OpenCV) or torchvision's.

The official K-Net code (mmdet 2.x) and MMSegmentation resize with ``mmcv.imresize`` /
``mmcv.imrescale``, which call ``cv2.resize`` with ``INTER_LINEAR`` for images and
``INTER_NEAREST`` for label maps and masks: OpenCV's fixed-point bilinear, without
antialiasing. torchvision's ``resize(antialias=True)`` differs from it by a grey level on
about a fifth of the values when enlarging and by up to 22 levels when shrinking, which is
enough to move a published model's labels. So every keep-ratio resize of the data pipelines,
the :class:`~knet_lightning.inference.segmenter.Segmenter` and test-time augmentation goes through
:func:`resize_image` / :func:`resize_label_map`, with ``backend="cv2"`` (the default) calling
OpenCV itself: identical by construction, on every CPU OpenCV supports, to what the references
computed (``scripts/bench_resize.py`` measures why it is not ported: speed and the bits that
depend on OpenCV's vector paths).

``backend="torchvision"`` is the resize of checkpoints written before the choice existed:
antialiased bilinear images, nearest masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = ["RESIZE_BACKENDS", "check_backend", "rescale_size", "resize_image", "resize_label_map", "scale_size"]

RESIZE_BACKENDS = ("cv2", "torchvision")
# the resize of checkpoints whose knet_inference predates `resize_backend`
LEGACY_BACKEND = "torchvision"
# OpenCV's Python binding takes at most 128 channels: masks are resized in chunks of it
_CV2_CHANNELS = 128


def check_backend(backend: str, what: str = "resize_backend") -> str:
    """``backend`` if it is one of :data:`RESIZE_BACKENDS`, else a ``ValueError`` naming ``what``."""
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"{what} must be one of {RESIZE_BACKENDS}, got {backend!r}")
    return backend


def scale_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """``(h, w)`` scaled by ``factor``, each side rounded half up (mmcv ``_scale_size``)."""
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def rescale_size(height: int, width: int, scale: float | Sequence[int]) -> tuple[int, int]:
    """Output ``(h, w)`` of mmcv's ``imrescale(img, scale)`` for an ``height x width`` image.

    Args:
        scale: a factor, or a pair of edge limits (in any order): the image is then scaled as
            large as possible with its long side at most the larger limit and its short side at
            most the smaller one (``Resize(scale=(2048, 512), keep_ratio=True)``).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"rescale_size: image size must be positive, got {height}x{width}")
    if isinstance(scale, (int, float)):
        if scale <= 0:
            raise ValueError(f"rescale_size: the scale factor must be positive, got {scale!r}")
        factor = float(scale)
    else:
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return scale_size(height, width, factor)


def _cv2():
    import cv2

    return cv2


def _cv2_resize(planes: np.ndarray, size: tuple[int, int], interpolation: int, chunk: int) -> np.ndarray:
    """``cv2.resize`` of ``(H, W, C)`` planes to ``(h, w, C)``, ``chunk`` channels a call."""
    cv2 = _cv2()
    height, width = size
    chunks = []
    for start in range(0, planes.shape[2], chunk):
        out = cv2.resize(np.ascontiguousarray(planes[:, :, start : start + chunk]), (width, height),
                         interpolation=interpolation)  # fmt: skip
        chunks.append(out.reshape(height, width, -1))  # one channel comes back 2-D
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=2)


def resize_image(image: Tensor, size: Sequence[int], backend: str = "cv2") -> Tensor:
    """Bilinear resize of an image ``(..., C, H, W)`` (uint8 or float) to ``(..., C, h, w)``.

    ``cv2``: ``cv2.resize(INTER_LINEAR)`` as ``mmcv.imresize`` calls it (no antialiasing);
    ``torchvision``: ``resize(antialias=True)``. The dtype is kept.
    """
    check_backend(backend)
    size = (int(size[0]), int(size[1]))
    if min(size) <= 0:
        raise ValueError(f"resize_image: the output size must be positive, got {size}")
    if backend == "torchvision":
        return F.resize(image, list(size), antialias=True)
    if tuple(image.shape[-2:]) == size:
        return image.clone()
    if image.dim() < 3:
        raise ValueError(f"resize_image: expected an image (..., C, H, W), got shape {tuple(image.shape)}")
    # one image's channels a call, as mmcv resizes an (H, W, 3) array: OpenCV's vector paths
    # depend on the channel count
    return _resize_planes(image, size, _cv2().INTER_LINEAR, chunk=image.shape[-3])


def resize_label_map(labels: Tensor, size: Sequence[int], backend: str = "cv2") -> Tensor:
    """Nearest resize of masks or label maps ``(..., H, W)`` (bool or integer) to ``(..., h, w)``.

    ``cv2``: ``cv2.resize(INTER_NEAREST)`` (``mmcv.imrescale(..., interpolation='nearest')``
    of mmdet's masks and mmseg's label maps); ``torchvision``: its nearest resize.
    """
    check_backend(backend)
    size = (int(size[0]), int(size[1]))
    if backend == "torchvision":
        return F.resize(labels, list(size), interpolation=InterpolationMode.NEAREST)
    if tuple(labels.shape[-2:]) == size:
        return labels.clone()
    dtype = labels.dtype
    work = labels
    if dtype == torch.bool:
        work = labels.to(torch.uint8)
    elif dtype == torch.int64:
        if labels.numel() and (
            int(labels.min()) < torch.iinfo(torch.int32).min or int(labels.max()) > torch.iinfo(torch.int32).max
        ):
            raise ValueError("resize_label_map: OpenCV resizes int32 label maps at most; got values beyond int32")
        work = labels.to(torch.int32)
    return _resize_planes(work, size, _cv2().INTER_NEAREST, chunk=_CV2_CHANNELS).to(dtype)


def _resize_planes(x: Tensor, size: tuple[int, int], interpolation: int, chunk: int) -> Tensor:
    """``(..., H, W)`` through ``cv2.resize`` as ``(H, W, prod(...))`` planes."""
    lead = x.shape[:-2]
    height, width = x.shape[-2:]
    if x.numel() == 0:  # e.g. an image without segments: (0, H, W) masks
        return x.new_zeros(*lead, *size)
    planes = x.detach().cpu().reshape(-1, height, width).permute(1, 2, 0).numpy()
    out = torch.from_numpy(_cv2_resize(planes, size, interpolation, chunk)).permute(2, 0, 1)
    return out.reshape(*lead, *size).contiguous().to(x.device)
