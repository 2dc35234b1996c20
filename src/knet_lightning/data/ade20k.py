"""ADE20K (ADEChallengeData2016, SceneParsing 150 classes): reader and data module.

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

The training pipeline is mmseg's ``ade20k.py`` (the K-Net semantic configs), in
:mod:`knet_lightning.data.mmseg_pipeline`::

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
from torch.utils.data import Dataset
from torchvision import tv_tensors

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.datamodule import SegmentationDataModule, role_splits
from knet_lightning.data.io import decode_image, read_image_size, read_rgb_image
from knet_lightning.data.meta import ClassInfo, DatasetError, default_palette
from knet_lightning.data.mmseg_pipeline import build_ade20k_transforms
from knet_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KDataModule",
    "ADE20KDataset",
    "ade20k_class_info",
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
        self._sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every sample, before any transform, from the image files' headers
        (nothing decoded; read once, as no annotation file lists the sizes): the training sampler's
        aspect-ratio groups."""
        if self._sizes is None:
            self._sizes = [read_image_size(image) for image, _ in self._items]
        return self._sizes

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
        self.splits = role_splits(train_split, val_split, test_split)
        common = {"img_scale": tuple(img_scale), "mean": tuple(mean), "std": tuple(std),
                  "resize_backend": self.resize_backend}  # fmt: skip
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
