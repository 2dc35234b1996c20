"""ADE20K (ADEChallengeData2016, SceneParsing 150 classes): reader, mmseg pipeline, data module.

On-disk layout (``ADEChallengeData2016.zip`` unpacked); ``root`` may be the
``ADEChallengeData2016`` folder itself or its parent::

    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   single channel uint8

Label files hold 0 = "other" (not annotated) and 1..150 = the classes. With
``reduce_zero_label=True`` (mmseg, the K-Net ADE20K configs) 0 becomes 255 (ignore) and
the others are shifted down by one, so contiguous class ``c`` is file value ``c + 1``.
With ``reduce_zero_label=False`` the files must already hold 0..149 (and 255).

Every class is treated as stuff (``num_things = 0``, ``num_stuff = 150``): the semantic
task has one kernel per class and no instances.

The training pipeline is mmseg's ``ade20k.py`` (the K-Net semantic configs)::

    Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio)  -> RatioRangeResize
    RandomCrop(512x512, cat_max_ratio=0.75)                             -> RandomCropCatMax
    RandomFlip(0.5)                                                     -> v2.RandomHorizontalFlip
    PhotoMetricDistortion                                               -> PhotoMetricDistortion
    Normalize, Pad(512x512, pad_val=0, seg_pad_val=255)                 -> ToDtype, Normalize, PadToSize

Evaluation resizes to (2048, 512) keep-ratio; ``sem_seg_orig`` keeps the label at the
original size for the mIoU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from knet_lightning.data.coco import decode_image, read_rgb_image
from knet_lightning.data.datamodule import SegmentationDataModule
from knet_lightning.data.meta import ClassInfo, DatasetError, default_palette
from knet_lightning.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DropEmptySegments,
    ResizeShortestEdge,
    _pad_fill,
    keep_ratio_size,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KDataModule",
    "ADE20KDataset",
    "PadToSize",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RatioRangeResize",
    "ade20k_class_info",
    "build_ade20k_transforms",
    "resolve_ade20k_root",
]

Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]

# The 150 SceneParsing classes in label order (file value i + 1), names as in mmseg.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

NUM_ADE20K_CLASSES = 150
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def ade20k_class_info(reduce_zero_label: bool = True) -> ClassInfo:
    """The 150 classes, all stuff; ``dataset_ids`` are the label-file values (``c + 1`` when
    ``reduce_zero_label``, else ``c``), which is what an exporter must write back."""
    offset = 1 if reduce_zero_label else 0
    return ClassInfo(
        names=ADE20K_CLASSES,
        isthing=(False,) * NUM_ADE20K_CLASSES,
        colors=default_palette(NUM_ADE20K_CLASSES),
        dataset_ids=tuple(range(offset, NUM_ADE20K_CLASSES + offset)),
    )


def resolve_ade20k_root(root: str | Path, split: str) -> Path:
    """The ``ADEChallengeData2016`` folder: ``root`` itself or ``root/ADEChallengeData2016``.

    Raises:
        DatasetError: neither holds ``images/<split>`` and ``annotations/<split>``.
    """
    root = Path(root)
    for base in (root, root / "ADEChallengeData2016"):
        if (base / "images" / split).is_dir() and (base / "annotations" / split).is_dir():
            return base
    raise DatasetError(
        f"ADE20K split {split!r} not found under {root}: expected either {root}/images/{split} and "
        f"{root}/annotations/{split} (root = the ADEChallengeData2016 folder) or "
        f"{root}/ADEChallengeData2016/images/{split} and {root}/ADEChallengeData2016/annotations/{split} "
        "(root = its parent)"
    )


class ADE20KDataset(Dataset):
    """ADE20K semantic segmentation samples as ``(image, target)`` pairs.

    Args:
        root: ``ADEChallengeData2016`` or the folder holding it.
        split: ``"training"`` or ``"validation"`` (the sub-folder names).
        transforms: ``transforms.v2``-style callable ``(image, target) -> (image, target)``.
        reduce_zero_label: map file value 0 to 255 and ``v`` to ``v - 1`` (mmseg).

    Attributes:
        class_info: :func:`ade20k_class_info`.
        base: the resolved ``ADEChallengeData2016`` folder.

    ``__getitem__`` returns ``image``: ``tv_tensors.Image`` uint8 ``(3, H, W)`` RGB and a
    ``target`` dict with ``sem_seg`` (``tv_tensors.Mask`` int64 ``(H, W)``, 0..149 or 255),
    ``sem_seg_orig`` (plain int64 ``(H, W)``, the same map, left at the original size by the
    transforms), ``masks`` (``tv_tensors.Mask`` bool ``(K, H, W)``: one per class present, in
    increasing class order), ``labels`` (int64 ``(K,)``), ``iscrowd`` (all False), ``image_id``
    (the sample index), ``file_name`` (image file name) and ``orig_size`` (``(H, W)``).

    Raises:
        DatasetError: at construction for a missing split folder, an empty split or an image
            without its label PNG; at ``__getitem__`` for a corrupt file, a label PNG that is
            not single channel, an image/label size mismatch or label values out of range.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Transforms | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.reduce_zero_label = bool(reduce_zero_label)
        self.base = resolve_ade20k_root(self.root, split)
        self.image_dir = self.base / "images" / split
        self.label_dir = self.base / "annotations" / split
        self.class_info = ade20k_class_info(self.reduce_zero_label)
        images = sorted(p for p in self.image_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"{self.image_dir}: no images ({', '.join(_IMAGE_SUFFIXES)}) in the {split!r} split")
        missing = [p.name for p in images if not (self.label_dir / f"{p.stem}.png").is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DatasetError(
                f"{self.label_dir}: missing label PNG for {len(missing)} image(s) of {self.image_dir}: {shown} "
                "(expected <image stem>.png)"
            )
        self._items: list[tuple[Path, Path]] = [(p, self.label_dir / f"{p.stem}.png") for p in images]

    def __len__(self) -> int:
        return len(self._items)

    def load_label(self, path: Path) -> np.ndarray:
        """Label PNG -> ``(H, W)`` int64 in 0..149 / 255, after the zero-label reduction.

        Raises:
            DatasetError: undecodable, not single channel, or values out of range.
        """
        im = decode_image(path, "label PNG")
        # 'P' (palette) PNGs store class indices too; anything with colour channels does not.
        if im.mode not in ("L", "P"):
            raise DatasetError(f"{path}: label PNG must be single channel 8-bit (PIL mode 'L'), got mode {im.mode!r}")
        raw = np.asarray(im, dtype=np.uint8)
        label = raw.astype(np.int64)
        if self.reduce_zero_label:
            # mmseg: 0 -> 255, v -> v - 1, and 255 stays ignore (255 - 1 = 254 -> 255).
            label = np.where(raw == 0, IGNORE_INDEX, label - 1)
            label[raw == 255] = IGNORE_INDEX
        bad = (label >= NUM_ADE20K_CLASSES) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(raw[bad]).tolist()
            allowed = "0..150 (0 = unlabelled) or 255" if self.reduce_zero_label else "0..149 or 255"
            raise DatasetError(
                f"{path}: label values {values[:10]} out of range; expected {allowed} "
                f"(reduce_zero_label={self.reduce_zero_label})"
            )
        return label

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_path, label_path = self._items[index]
        rgb = read_rgb_image(image_path)
        h, w = rgb.shape[:2]
        label = self.load_label(label_path)
        if label.shape != (h, w):
            raise DatasetError(
                f"{label_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from the image "
                f"{image_path.name} size {w}x{h}"
            )
        classes = np.unique(label)
        classes = classes[classes != IGNORE_INDEX]
        masks = label[None] == classes[:, None, None]

        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        sem_seg = torch.from_numpy(label)
        target: dict[str, Any] = {
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.from_numpy(classes.astype(np.int64)),
            "iscrowd": torch.zeros(len(classes), dtype=torch.bool),
            "sem_seg": tv_tensors.Mask(sem_seg),
            "sem_seg_orig": sem_seg.clone(),  # plain tensor: the transforms leave it as is
            "image_id": index,
            "file_name": image_path.name,
            "orig_size": (h, w),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# --------------------------------------------------------------------------- transforms


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
    """

    def __init__(
        self, img_scale: Sequence[int], ratio_range: Sequence[float] | None = (0.5, 2.0), antialias: bool = True
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
        self.antialias = antialias

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
        return self._call_kernel(F.resize, inpt, params["size"], antialias=self.antialias)

    _get_params = make_params
    _transform = transform

    def extra_repr(self) -> str:
        return f"img_scale={self.img_scale}, ratio_range={self.ratio_range}"


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


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


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
        return v2.Compose([ResizeShortestEdge(min(scale), max(scale)), *normalize])
    crop = _pair(crop_size, "build_ade20k_transforms.crop_size")
    ops: list[Any] = [RatioRangeResize(scale, ratio_range), RandomCropCatMax(crop, cat_max_ratio)]
    if flip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=flip_prob))
    if photometric:
        ops.append(PhotoMetricDistortion())
    ops.append(DropEmptySegments())
    # Pad after Normalize, as mmseg: image padding 0 is then the mean colour.
    return v2.Compose([*ops, *normalize, PadToSize(crop)])


# --------------------------------------------------------------------------- data module

# SegmentationDataModule settings of the COCO-style pipeline that this pipeline replaces.
_REPLACED_KWARGS = (
    "train_kind",
    "train_short_edge",
    "train_max_size",
    "scale_range",
    "eval_short_edge",
    "eval_max_size",
)


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K read with :class:`ADE20KDataset` and the mmseg pipeline (:func:`build_ade20k_transforms`).

    Args:
        root: ``ADEChallengeData2016`` or its parent.
        train_split, val_split, test_split: sub-folder names (``test`` also serves predict).
        reduce_zero_label: see :class:`ADE20KDataset`.
        crop_size, img_scale, ratio_range, cat_max_ratio, photometric, flip_prob, mean, std:
            see :func:`build_ade20k_transforms`.
        **kwargs: other :class:`SegmentationDataModule` settings (batch sizes, workers,
            ``size_divisor``, ...). Its resize settings (``train_kind``, ``train_short_edge``,
            ``train_max_size``, ``scale_range``, ``eval_short_edge``, ``eval_max_size``) do
            not apply and are rejected.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "training",
        val_split: str = "validation",
        test_split: str = "validation",
        reduce_zero_label: bool = True,
        crop_size: int | Sequence[int] = 512,
        img_scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        photometric: bool = True,
        flip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        replaced = [k for k in _REPLACED_KWARGS if k in kwargs]
        if replaced:
            raise ValueError(
                f"ADE20KDataModule uses the mmseg ADE20K pipeline; {replaced} do not apply "
                "(set img_scale, ratio_range and crop_size instead)"
            )
        # The base pipelines are replaced below; no resize keeps building them cheap.
        super().__init__(
            train_short_edge=None, eval_short_edge=None, flip_prob=flip_prob, mean=mean, std=std, **kwargs
        )
        self.root = Path(root)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.splits = {"train": train_split, "val": val_split, "test": test_split, "predict": test_split}
        common = {"img_scale": tuple(img_scale), "mean": tuple(mean), "std": tuple(std)}
        self.train_transforms = build_ade20k_transforms(
            True,
            crop_size=crop_size if isinstance(crop_size, int) else tuple(crop_size),
            ratio_range=None if ratio_range is None else tuple(ratio_range),
            cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob,
            photometric=photometric,
            **common,
        )
        self.eval_transforms = build_ade20k_transforms(False, **common)

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return ADE20KDataset(
            self.root, split=self.splits[role], transforms=transforms, reduce_zero_label=self.reduce_zero_label
        )

    def read_class_info(self) -> ClassInfo:
        # Fixed classes: known without touching the disk.
        return ade20k_class_info(self.reduce_zero_label)
