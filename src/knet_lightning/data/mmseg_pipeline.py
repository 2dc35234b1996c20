"""MMSegmentation's semantic training and test pipeline as ``torchvision.transforms.v2``
transforms (the ADE20K and Cityscapes semantic experiments): ratio-range resize, crop with
``cat_max_ratio``, photometric distortion, padding to the crop size.

Each follows its mmseg 0.x counterpart (``mmseg/datasets/pipelines/transforms.py``:
``Resize``, ``RandomCrop``, ``PhotoMetricDistortion``, ``Pad``), which the official K-Net
semantic configs use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.resize import check_backend
from knet_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DropEmptySegments,
    ResizeShortestEdge,
    _pad_fill,
    _pair,
    keep_ratio_size,
    resize_sample_part,
)

__all__ = ["PadToSize", "PhotoMetricDistortion", "RandomCropCatMax", "RatioRangeResize", "build_ade20k_transforms"]


def _semantic_map(flat_inputs: list[Any]) -> Tensor | None:
    """The ``sem_seg`` among the inputs: the integer (non-bool) ``tv_tensors.Mask``."""
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.Mask) and inpt.dtype != torch.bool and inpt.ndim == 2:
            return inpt.as_subclass(Tensor)
    return None


class RatioRangeResize(v2.Transform):
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``.

    A ratio ``r ~ U(ratio_range)`` scales ``img_scale`` to ``(int(L r), int(S r))``; the image
    is then rescaled, keeping its aspect, to the largest size with long side ``<= L r`` and
    short side ``<= S r`` (mmcv ``rescale_size`` rounding). Masks are resized nearest.

    Args:
        img_scale: ``(long, short)`` base scale, e.g. ``(2048, 512)``; order does not matter.
        ratio_range: ``(low, high)`` or ``None`` for the fixed ``img_scale``.
        backend: the pixel arithmetic, ``"cv2"`` (mmcv's) or ``"torchvision"``
            (:mod:`knet_lightning.data.resize`).
    """

    def __init__(
        self, img_scale: Sequence[int], ratio_range: Sequence[float] | None = (0.5, 2.0), backend: str = "cv2"
    ) -> None:
        super().__init__()
        if len(img_scale) != 2 or min(img_scale) <= 0:
            raise ValueError(f"RatioRangeResize.img_scale must be two positive ints, got {img_scale!r}")
        self.img_scale = (int(max(img_scale)), int(min(img_scale)))
        if ratio_range is not None:
            if len(ratio_range) != 2 or not 0 < float(ratio_range[0]) <= float(ratio_range[1]):
                raise ValueError(
                    f"RatioRangeResize.ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}"
                )
            ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        self.ratio_range = ratio_range
        self.backend = check_backend(backend, "RatioRangeResize.backend")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = 1.0
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = low + (high - low) * float(torch.rand(()).item())
        long_side = max(1, int(self.img_scale[0] * ratio))
        short_side = max(1, int(self.img_scale[1] * ratio))
        return {"size": list(keep_ratio_size(height, width, short_side, long_side))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return resize_sample_part(inpt, params["size"], self.backend)

    def nominal_size(self, height: int, width: int) -> tuple[int, int]:
        """The output size of an ``height x width`` image at ratio 1 (``img_scale`` itself)."""
        return keep_ratio_size(height, width, self.img_scale[1], self.img_scale[0])

    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"img_scale={self.img_scale}, ratio_range={self.ratio_range}, backend={self.backend!r}"


class RandomCropCatMax(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a random window of at most ``crop_size``.

    With ``cat_max_ratio < 1`` up to ``max_tries`` windows are drawn until one shows at least
    two classes and no class covers ``cat_max_ratio`` or more of its labelled (non-ignore)
    pixels, so that crops of a single dominant class (sky, wall) are rarer; if none qualifies
    the next window is taken as is (as mmseg). The ``sem_seg`` map (the integer
    ``tv_tensors.Mask``) decides; without one the first window is used. An image smaller
    than ``crop_size`` is cropped to its own size along that side (pad afterwards).

    Args:
        crop_size: ``(h, w)`` or a square side.
        cat_max_ratio: maximum share of one class in the crop; ``1.0`` disables the check.
        ignore_index: label value not counted.
        max_tries: windows tested before giving up.
    """

    def __init__(
        self,
        crop_size: int | Sequence[int],
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ) -> None:
        super().__init__()
        size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(int(v) for v in crop_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"RandomCropCatMax.crop_size must be a positive int or (h, w), got {crop_size!r}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"RandomCropCatMax.cat_max_ratio must be in (0, 1], got {cat_max_ratio!r}")
        self.crop_size = size
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _window(self, height: int, width: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.crop_size[0], height), min(self.crop_size[1], width)
        top = int(torch.randint(0, height - ch + 1, ()).item())
        left = int(torch.randint(0, width - cw + 1, ()).item())
        return top, left, ch, cw

    def _balanced(self, seg: Tensor, window: tuple[int, int, int, int]) -> bool:
        top, left, ch, cw = window
        values = seg[top : top + ch, left : left + cw]
        values = values[values != self.ignore_index]
        if values.numel() == 0:
            return False
        counts = torch.unique(values, return_counts=True)[1]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        window = self._window(height, width)
        seg = _semantic_map(flat_inputs)
        if seg is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self._balanced(seg, window):
                    break
                window = self._window(height, width)
        return {"crop": window}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, *params["crop"])

    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio}"


def scale_saturation(image: Tensor, factor: float) -> Tensor:
    """Multiplies the HSV saturation of RGB pixels by ``factor`` (clipped at 1), keeping H and V.

    In HSV -> RGB every channel is ``V (1 - S f_c(H))``, so scaling S by ``k`` moves each
    channel to ``V - k (V - c)``; clipping S at 1 caps ``k`` at ``V / (V - min)``. This is the
    exact HSV operation of mmseg (``cv2`` HSV round trip) without the conversion.

    Args:
        image: float ``(..., 3, H, W)`` RGB, any non-negative scale.
        factor: non-negative saturation multiplier.
    """
    vmax = image.amax(dim=-3, keepdim=True)
    vmin = image.amin(dim=-3, keepdim=True)
    spread = vmax - vmin
    k = torch.where(spread > 0, torch.clamp(vmax / spread.clamp_min(1e-12), max=float(factor)), torch.ones_like(spread))
    return vmax - k * (vmax - image)


class PhotoMetricDistortion(v2.Transform):
    """mmseg ``PhotoMetricDistortion`` on uint8 RGB images; masks pass through.

    Each step happens with probability 1/2, in this order: brightness (add
    ``U(-brightness_delta, brightness_delta)``), contrast (multiply by ``U(contrast_range)``)
    either here or last (coin flip), saturation (HSV S times ``U(saturation_range)``), hue
    (HSV H shifted by an integer in ``[-hue_delta, hue_delta]`` on OpenCV's 0..180 scale).
    Like mmseg, brightness and contrast clip to 0..255 and truncate to integers.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        super().__init__()
        if brightness_delta < 0 or hue_delta < 0 or hue_delta > 90:
            raise ValueError(
                f"PhotoMetricDistortion: need brightness_delta >= 0 and 0 <= hue_delta <= 90, got "
                f"{brightness_delta!r}, {hue_delta!r}"
            )
        for name, rng in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if len(rng) != 2 or not 0 <= float(rng[0]) <= float(rng[1]):
                raise ValueError(f"PhotoMetricDistortion.{name} must be (low, high) with 0 <= low <= high, got {rng!r}")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()).item())

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()).item())

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        d = self.brightness_delta
        return {
            "brightness": self._uniform(-d, d) if self._coin() else None,
            "contrast_first": self._coin(),
            "contrast": self._uniform(*self.contrast_range) if self._coin() else None,
            "saturation": self._uniform(*self.saturation_range) if self._coin() else None,
            "hue": int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()).item()) if self._coin() else None,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        if inpt.dtype != torch.uint8:
            raise TypeError(
                f"PhotoMetricDistortion expects a uint8 image (0..255 scale), got {inpt.dtype}; "
                "place it before ToDtype / Normalize"
            )
        img = inpt.as_subclass(Tensor).float()

        def convert(x: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
            return (x * alpha + beta).clamp(0, 255).floor()

        if params["brightness"] is not None:
            img = convert(img, beta=params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            img = convert(img, alpha=params["contrast"])
        if params["saturation"] is not None:
            img = scale_saturation(img, params["saturation"]).clamp(0, 255).round()
        if params["hue"] is not None:
            # OpenCV's uint8 hue spans 0..180 for a full turn; adjust_hue takes a fraction of a turn.
            img = (F.adjust_hue(img / 255.0, params["hue"] / 180.0) * 255.0).clamp(0, 255).round()
        if not params["contrast_first"] and params["contrast"] is not None:
            img = convert(img, alpha=params["contrast"])
        return tv_tensors.wrap(img.to(torch.uint8), like=inpt)

    _get_params = make_params
    _transform = transform


class PadToSize(v2.Transform):
    """Pads bottom/right up to at least ``size`` (mmseg ``Pad(size=...)``).

    Images get ``image_fill`` (0: the mean colour once normalised, so place it after
    ``Normalize`` as mmseg does), bool segment masks 0 and the ``sem_seg`` map ``seg_fill``.
    Sides already at least ``size`` are left alone.
    """

    def __init__(self, size: int | Sequence[int], image_fill: float = 0.0, seg_fill: int = IGNORE_INDEX) -> None:
        super().__init__()
        s = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if len(s) != 2 or min(s) <= 0:
            raise ValueError(f"PadToSize.size must be a positive int or (h, w), got {size!r}")
        self.size = s
        self.image_fill = image_fill
        self.seg_fill = seg_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        # [left, top, right, bottom]
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        return self._call_kernel(F.pad, inpt, params["padding"], fill=_pad_fill(inpt, self.image_fill, self.seg_fill))

    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_ade20k_transforms(
    train: bool,
    crop_size: int | Sequence[int] = 512,
    img_scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] | None = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize_backend: str = "cv2",
) -> v2.Compose:
    """mmseg's ADE20K pipeline (training) or its single-scale test resize (evaluation).

    Args:
        train: training (random resize, cat-max crop, flip, photometric distortion, drop of
            classes cropped away, normalise, pad to ``crop_size``) or evaluation (keep-ratio
            resize to ``img_scale``, normalise).
        crop_size: training crop and pad size, ``(h, w)`` or a square side.
        img_scale: ``(long, short)`` base scale.
        ratio_range: training scale jitter of ``img_scale`` (``None``: fixed).
        cat_max_ratio: see :class:`RandomCropCatMax`.
        flip_prob: horizontal flip probability.
        photometric: apply :class:`PhotoMetricDistortion`.
        mean, std: normalisation on the 0-1 scale, RGB.
        resize_backend: the resizes' arithmetic, ``"cv2"`` (mmcv's) or ``"torchvision"``.

    Returns:
        ``pipeline(image, target) -> (image, target)``; the image comes out float32; in
        training image, masks and ``sem_seg`` are at least ``crop_size`` (exactly, for
        images larger than the crop), padding 0 / False / 255.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"build_ade20k_transforms: mean and std need 3 values (RGB), got {mean!r}, {std!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"build_ade20k_transforms: flip_prob must be in [0, 1], got {flip_prob!r}")
    scale = _pair(img_scale, "build_ade20k_transforms.img_scale")
    normalize = [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
    ]
    if not train:
        return v2.Compose([ResizeShortestEdge(min(scale), max(scale), resize_backend), *normalize])
    crop = _pair(crop_size, "build_ade20k_transforms.crop_size")
    ops: list[Any] = [RatioRangeResize(scale, ratio_range, resize_backend), RandomCropCatMax(crop, cat_max_ratio)]
    if flip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=flip_prob))
    if photometric:
        ops.append(PhotoMetricDistortion())
    ops.append(DropEmptySegments())
    # Pad after Normalize, as mmseg: image padding 0 is then the mean colour.
    return v2.Compose([*ops, *normalize, PadToSize(crop)])


# --------------------------------------------------------------------------- data module

# SegmentationDataModule settings of the COCO-style pipeline that this pipeline replaces.
