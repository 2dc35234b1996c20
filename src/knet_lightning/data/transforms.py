"""Joint image/target transforms and the batch collate.

Every transform is called as ``transforms(image, target)`` on a sample of the reader
contract (``image``: ``tv_tensors.Image`` uint8 ``(3, H, W)``; ``target["masks"]``:
``tv_tensors.Mask`` bool ``(K, H, W)``; ``target["sem_seg"]``: ``tv_tensors.Mask``
int64 ``(H, W)`` with 255 = void) and returns the pair transformed together, so the
segment masks and the semantic map stay pixel-aligned with the image.

The geometric transforms are ``torchvision.transforms.v2`` transforms: they dispatch
per tv_tensor type (images bilinear, masks nearest) and pass plain tensors, ints and
strings through untouched while an ``Image`` is present. That is what keeps
``target["panoptic"]`` (a plain tensor at the original size, for evaluation) as is.

Augmentations follow the official K-Net configs (mmdet 2.x):

* ``resize``: ``Resize(img_scale=(1333, 800), keep_ratio=True)`` + flip 0.5 (1x schedule).
* ``multiscale``: short side uniform in ``[640, 800]`` (``multiscale_mode='range'``),
  long side at most 1333, + flip (ms-3x schedule).
* ``lsj``: large-scale jitter (Detectron2 / Mask2Former ``ResizeScale`` +
  ``FixedSizeCrop``), not in the K-Net paper, offered for longer schedules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.resize import check_backend, resize_image, resize_label_map, scale_size

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DropEmptySegments",
    "LargeScaleJitter",
    "ResizeShortestEdge",
    "build_transforms",
    "collate_batch",
    "keep_ratio_size",
]

# ImageNet statistics on the 0-1 scale, RGB: the torchvision backbones' convention.
# (mmdet's [123.675, 116.28, 103.53] / [58.395, 57.12, 57.375] are these times 255.)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Target keys that hold one entry per segment and must be filtered together.
PER_SEGMENT_KEYS: tuple[str, ...] = ("masks", "labels", "iscrowd", "boxes", "area", "segment_ids")

TRANSFORM_KINDS = ("resize", "multiscale", "lsj")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``int`` -> ``(v, v)``; a 2-sequence (also an OmegaConf ``ListConfig``) -> tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def keep_ratio_size(height: int, width: int, short_edge: float, max_size: float | None) -> tuple[int, int]:
    """Output ``(h, w)`` of a keep-ratio resize, with mmcv's ``rescale_size`` rounding.

    The scale is the largest one with ``short side <= short_edge`` and
    ``long side <= max_size``; each side is then rounded half up
    (``int(side * scale + 0.5)``). So 480x640 with (800, 1333) gives 800x1067,
    where torchvision's own ``Resize(800, max_size=1333)`` truncates to 800x1066.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"keep_ratio_size: image size must be positive, got {height}x{width}")
    scale = short_edge / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    h, w = scale_size(height, width, scale)
    return max(1, h), max(1, w)


def _pad_fill(inpt: Any, image_fill: float, seg_fill: int) -> float:
    """Padding value for one tv_tensor.

    Both segment masks and ``sem_seg`` are ``tv_tensors.Mask``; they are told apart by
    dtype: the bool segment masks get 0 (no segment), integer label maps get the
    ignore index so that padding never counts as a class.
    """
    if isinstance(inpt, tv_tensors.Mask):
        return 0 if inpt.dtype == torch.bool else seg_fill
    return image_fill


def resize_sample_part(inpt: Any, size: Sequence[int], backend: str) -> Any:
    """One input of a transform resized to ``size`` ``(h, w)``: an ``Image`` bilinear and a ``Mask``
    nearest with ``backend``'s arithmetic (:mod:`knet_lightning.data.resize`); boxes through
    torchvision; plain tensors and other values pass through untouched."""
    if isinstance(inpt, tv_tensors.Image):
        return tv_tensors.wrap(resize_image(inpt.as_subclass(Tensor), size, backend), like=inpt)
    if isinstance(inpt, tv_tensors.Mask):
        return tv_tensors.wrap(resize_label_map(inpt.as_subclass(Tensor), size, backend), like=inpt)
    if isinstance(inpt, tv_tensors.TVTensor):
        return F.resize(inpt, list(size))
    return inpt


class ResizeShortestEdge(v2.Transform):
    """Keep-ratio resize with mmdet ``Resize`` semantics (``keep_ratio=True``).

    The short side goes to ``short_edge`` unless the long side would then exceed
    ``max_size``, in which case the long side goes to ``max_size``.

    Args:
        short_edge: target short side, or an inclusive ``(low, high)`` range from which
            an integer is drawn uniformly per call (mmdet ``multiscale_mode='range'``).
        max_size: cap on the long side; ``None`` for no cap.
        backend: the pixel arithmetic (:mod:`knet_lightning.data.resize`): ``"cv2"`` (the
            references' ``mmcv.imrescale``: OpenCV bilinear images, nearest masks) or
            ``"torchvision"`` (antialiased bilinear images, nearest masks).
    """

    def __init__(self, short_edge: int | Sequence[int], max_size: int | None = 1333, backend: str = "cv2") -> None:
        super().__init__()
        self.short_edge = _pair(short_edge, "ResizeShortestEdge.short_edge")
        if not 0 < self.short_edge[0] <= self.short_edge[1]:
            raise ValueError(f"ResizeShortestEdge.short_edge must be positive with low <= high, got {short_edge!r}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"ResizeShortestEdge.max_size must be positive or None, got {max_size!r}")
        self.max_size = max_size
        self.backend = check_backend(backend, "ResizeShortestEdge.backend")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.short_edge
        short = low if low == high else int(torch.randint(low, high + 1, ()).item())
        return {"size": list(keep_ratio_size(height, width, short, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return resize_sample_part(inpt, params["size"], self.backend)

    def nominal_size(self, height: int, width: int) -> tuple[int, int]:
        """The output size of an ``height x width`` image at the middle of the short-edge range."""
        return keep_ratio_size(height, width, sum(self.short_edge) / 2, self.max_size)

    # torchvision < 0.21 calls the private names.
    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"short_edge={self.short_edge}, max_size={self.max_size}, backend={self.backend!r}"


class LargeScaleJitter(v2.Transform):
    """Large-scale jitter: random rescale, then a random crop / bottom-right pad to a fixed size.

    As Detectron2's ``ResizeScale`` + ``FixedSizeCrop``: a factor ``s ~ U(scale_range)``
    scales the image so that it fits in ``s * output_size`` (keep ratio); a random
    window of ``output_size`` is then cropped where the image is larger, and the
    image is padded bottom/right where it is smaller. The output is always
    ``output_size``. Segments cropped away are left as empty masks: follow with
    :class:`DropEmptySegments`.

    Args:
        output_size: ``(h, w)`` or a square side.
        scale_range: ``(min, max)`` of the random factor.
        image_fill: image padding value on the uint8 scale (Detectron2 pads with 128,
            close to the ImageNet mean that normalisation maps to 0).
        seg_fill: ``sem_seg`` padding value (ignore).
    """

    def __init__(
        self,
        output_size: int | Sequence[int],
        scale_range: Sequence[float] = (0.1, 2.0),
        image_fill: float = 128,
        seg_fill: int = IGNORE_INDEX,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size, "LargeScaleJitter.output_size")
        if min(self.output_size) <= 0:
            raise ValueError(f"LargeScaleJitter.output_size must be positive, got {output_size!r}")
        if not (isinstance(scale_range, Sequence) and len(scale_range) == 2):
            raise ValueError(f"LargeScaleJitter.scale_range must be (min, max), got {scale_range!r}")
        low, high = float(scale_range[0]), float(scale_range[1])
        if not 0 < low <= high:
            raise ValueError(f"LargeScaleJitter.scale_range must satisfy 0 < min <= max, got {scale_range!r}")
        self.scale_range = (low, high)
        self.image_fill = image_fill
        self.seg_fill = seg_fill
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        out_h, out_w = self.output_size
        low, high = self.scale_range
        factor = low + (high - low) * float(torch.rand(()).item())
        scale = min(factor * out_h / height, factor * out_w / width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top = int(torch.randint(0, max(new_h - out_h, 0) + 1, ()).item())
        left = int(torch.randint(0, max(new_w - out_w, 0) + 1, ()).item())
        crop_h, crop_w = min(new_h, out_h), min(new_w, out_w)
        return {
            "size": [new_h, new_w],
            "crop": (top, left, crop_h, crop_w),
            # [left, top, right, bottom]
            "padding": [0, 0, out_w - crop_w, out_h - crop_h],
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._call_kernel(F.resize, inpt, params["size"], antialias=self.antialias)
        out = self._call_kernel(F.crop, out, *params["crop"])
        if any(params["padding"]):
            out = self._call_kernel(F.pad, out, params["padding"], fill=_pad_fill(out, self.image_fill, self.seg_fill))
        return out

    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, scale_range={self.scale_range}"


class DropEmptySegments(nn.Module):
    """Removes segments whose mask has no pixel left (after a crop).

    A segment with an empty mask cannot be matched or scored; keeping it would give
    the matcher and the losses a target with no support. ``masks``, ``labels``,
    ``iscrowd`` (and ``boxes`` / ``area`` / ``segment_ids`` if present) are filtered
    together.

    Training only: the reader's ``panoptic`` map numbers pixels by the index of the
    unfiltered segment list (``k + 1``), which evaluation relies on, so the evaluation
    pipeline never drops segments.
    """

    def __init__(self, keys: Sequence[str] = PER_SEGMENT_KEYS) -> None:
        super().__init__()
        self.keys = tuple(keys)

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if not isinstance(target, dict) or "masks" not in target:
            raise KeyError("DropEmptySegments: the target dict needs a 'masks' entry of shape (K, H, W)")
        masks = target["masks"]
        if masks.ndim != 3:
            raise ValueError(f"DropEmptySegments: target['masks'] must be (K, H, W), got shape {tuple(masks.shape)}")
        keep = masks.flatten(1).any(dim=1)
        if bool(keep.all()):
            return image, target
        target = dict(target)
        num_segments = masks.shape[0]
        for key in self.keys:
            value = target.get(key)
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == num_segments:
                # Indexing unwraps a tv_tensor; re-wrap so later v2 transforms still dispatch on it.
                kept = value[keep]
                target[key] = tv_tensors.wrap(kept, like=value) if isinstance(value, tv_tensors.TVTensor) else kept
        return image, target


def build_transforms(
    train: bool,
    kind: str = "resize",
    short_edge: int | Sequence[int] | None = 800,
    max_size: int | None = 1333,
    crop_size: int | Sequence[int] = 1024,
    scale_range: Sequence[float] = (0.1, 2.0),
    flip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_backend: str = "cv2",
) -> v2.Compose:
    """The training or evaluation pipeline, ending in float32 normalised images.

    Args:
        train: training pipeline (``kind`` + flip; LSJ drops the segments its crop empties)
            or the evaluation one (single-scale keep-ratio resize, no flip).
        kind: ``"resize"`` (single scale, ``short_edge`` an int), ``"multiscale"``
            (``short_edge`` an inclusive ``(low, high)`` range) or ``"lsj"`` (large-scale
            jitter to ``crop_size`` with ``scale_range``). Ignored when ``train`` is False.
        short_edge: target short side; ``None`` keeps the image size (resize/eval only).
        max_size: cap on the long side; ``None`` for no cap.
        crop_size: LSJ output size, ``(h, w)`` or a square side.
        scale_range: LSJ random factor range.
        flip_prob: horizontal flip probability (training only).
        mean, std: per-channel normalisation on the 0-1 scale, RGB.
        resize_backend: the keep-ratio resizes' arithmetic, ``"cv2"`` (the references') or
            ``"torchvision"`` (:mod:`knet_lightning.data.resize`); LSJ resizes with torchvision.

    Returns:
        A ``v2.Compose`` called as ``pipeline(image, target) -> (image, target)``;
        the image comes out float32 ``(3, h, w)``, masks and ``sem_seg`` at ``(h, w)``.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"build_transforms: mean and std need 3 values (RGB), got mean={mean!r}, std={std!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"build_transforms: flip_prob must be in [0, 1], got {flip_prob!r}")
    ops: list[Any] = []
    if train:
        if kind not in TRANSFORM_KINDS:
            raise ValueError(f"build_transforms: kind must be one of {TRANSFORM_KINDS}, got {kind!r}")
        if kind == "lsj":
            # Not K-Net's: a crop empties whole segments, dropped as in Mask2Former's instance LSJ
            # mapper (filter_empty_instances in coco_instance_new_baseline_dataset_mapper.py)
            ops += [LargeScaleJitter(crop_size, scale_range), DropEmptySegments()]
        elif kind == "multiscale":
            if short_edge is None or isinstance(short_edge, int) or len(short_edge) != 2:
                raise ValueError(
                    f"build_transforms: kind='multiscale' needs short_edge=(low, high), got {short_edge!r}"
                )
            ops.append(ResizeShortestEdge(short_edge, max_size, resize_backend))
        elif short_edge is not None:
            if not isinstance(short_edge, int):
                raise ValueError(
                    f"build_transforms: kind='resize' needs an int short_edge, got {short_edge!r} "
                    "(use kind='multiscale' for a range)"
                )
            ops.append(ResizeShortestEdge(short_edge, max_size, resize_backend))
        # The K-Net resizes keep a segment they empty, as mmdet's Resize / RandomFlip / Pad do;
        # the criterion keeps such a thing as a target and drops such a stuff class.
        if flip_prob > 0:
            ops.append(v2.RandomHorizontalFlip(p=flip_prob))
    elif short_edge is not None:
        if not isinstance(short_edge, int):
            raise ValueError(f"build_transforms: evaluation needs an int short_edge (single scale), got {short_edge!r}")
        ops.append(ResizeShortestEdge(short_edge, max_size, resize_backend))
    # A single dtype converts only images (and videos): masks keep bool / int64.
    ops.append(v2.ToDtype(torch.float32, scale=True))
    ops.append(v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]))
    return v2.Compose(ops)


def eval_pipeline_settings(pipeline: Any, owner: str) -> dict[str, Any]:
    """What an evaluation pipeline of :func:`build_transforms` does to an image: ``short_edge`` /
    ``max_size`` of its keep-ratio resize (None: no resize) and ``mean`` / ``std`` of its
    normalisation (ImageNet's where it has none), as lists of floats.

    Raises:
        ValueError: naming ``owner``, when the resize is not single-scale.
    """
    short_edge: int | None = None
    max_size: int | None = None
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    for op in getattr(pipeline, "transforms", []):
        if isinstance(op, ResizeShortestEdge):
            low, high = op.short_edge
            if low != high:
                raise ValueError(f"{owner}: the evaluation resize must be single-scale, got {op.short_edge}")
            short_edge, max_size = int(low), None if op.max_size is None else int(op.max_size)
        elif isinstance(op, v2.Normalize):
            mean, std = [float(m) for m in op.mean], [float(v) for v in op.std]
    return {"short_edge": short_edge, "max_size": max_size, "mean": mean, "std": std}


def _plain(value: Any) -> Any:
    """tv_tensors -> plain tensors (the model and losses need no dispatch)."""
    if isinstance(value, tv_tensors.TVTensor):
        return value.as_subclass(Tensor)
    return value


def collate_batch(
    samples: Sequence[tuple[Tensor, dict[str, Any]]],
    size_divisor: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Pads the images of a batch to one size and keeps the targets as a list.

    Args:
        samples: ``(image, target)`` pairs, ``image`` float ``(3, h_i, w_i)`` (normalised),
            ``target`` a dict whose ``masks`` / ``sem_seg`` are at ``(h_i, w_i)``.
        size_divisor: the padded height and width are multiples of it (32: the
            backbone's coarsest stride).
        mean, std: the normalisation the images went through (0-1 scale, RGB), passed on in
            the batch so that consumers (overlays) can undo it; left out when not given.

    Returns:
        ``{"images": (B, 3, Hp, Wp) float, zero-padded bottom/right (0 is the mean colour
        after normalisation), "image_sizes": [(h_i, w_i)], "targets": [dict]}`` with the
        targets' tv_tensors unwrapped to plain tensors and nothing padded in them.
    """
    if size_divisor <= 0:
        raise ValueError(f"collate_batch: size_divisor must be positive, got {size_divisor!r}")
    if len(samples) == 0:
        raise ValueError("collate_batch: got an empty batch")
    images: list[Tensor] = []
    targets: list[dict[str, Any]] = []
    for i, sample in enumerate(samples):
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict)):
            raise TypeError(f"collate_batch: sample {i} must be an (image, target dict) pair, got {type(sample)}")
        image, target = sample
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image)
            raise ValueError(f"collate_batch: sample {i} image must be a (3, H, W) tensor, got {shape}")
        if not image.is_floating_point():
            raise ValueError(
                f"collate_batch: sample {i} image has dtype {image.dtype}; expected a float, normalised image "
                "(end the transforms with ToDtype(float32, scale=True) + Normalize, e.g. build_transforms)"
            )
        for key in ("masks", "sem_seg"):
            value = target.get(key)
            if isinstance(value, Tensor) and tuple(value.shape[-2:]) != tuple(image.shape[-2:]):
                raise ValueError(
                    f"collate_batch: sample {i} target['{key}'] is {tuple(value.shape[-2:])} but the image is "
                    f"{tuple(image.shape[-2:])}; transforms must act on image and target together"
                )
        images.append(_plain(image))
        targets.append({key: _plain(value) for key, value in target.items()})

    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    pad_h = math.ceil(max_h / size_divisor) * size_divisor
    pad_w = math.ceil(max_w / size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), 3, pad_h, pad_w))
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]].copy_(img)
    out: dict[str, Any] = {
        "images": batch,
        "image_sizes": [(int(img.shape[1]), int(img.shape[2])) for img in images],
        "targets": targets,
    }
    if mean is not None and std is not None:
        out["mean"], out["std"] = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return out
