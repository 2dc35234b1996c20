"""What the Cityscapes readers share: the on-disk layout's checks, the scan of
``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` with the matching gtFine files
(:class:`CityscapesFolderDataset`), and the base data module with the training crops of the
Cityscapes recipes (:class:`CityscapesDataModule`, :data:`CROP_DEFAULTS`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from knet_lightning.data.datamodule import SegmentationDataModule, role_splits
from knet_lightning.data.io import decode_image, read_image_size, read_rgb_image
from knet_lightning.data.meta import DatasetError

__all__ = ["CROP_DEFAULTS", "LAYOUT_HELP", "CityscapesDataModule", "CityscapesFolderDataset", "Transforms"]

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[tv_tensors.Image, dict[str, Any]]]


LAYOUT_HELP = (
    "expected root/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_<kind>.png"
)


def check_root(root: Path, what: str, extra: str = "") -> None:
    """Raises a :class:`DatasetError` naming the expected layout when ``root`` is not a folder."""
    if not root.is_dir():
        raise DatasetError(f"Cityscapes root {root} does not exist or is not a folder ({what}: {LAYOUT_HELP}{extra})")


def read_label_png(path: Path, what: str, modes: Sequence[str]) -> np.ndarray:
    """Decode a single-channel label PNG to int64 ``(H, W)``, rejecting other PIL modes."""
    im = decode_image(path, what)
    if im.mode not in modes:
        raise DatasetError(
            f"{path}: {what} must be a single-channel PNG (PIL mode one of {list(modes)}), got mode {im.mode!r}"
        )
    return np.asarray(im).astype(np.int64)


def stem_of(image_name: str) -> str:
    """``<city>_<seq>_<frame>`` of ``<city>_<seq>_<frame>_leftImg8bit.png``."""
    return image_name[: -len("_leftImg8bit.png")]


class CityscapesFolderDataset(Dataset):
    """Shared scan of ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` and the matching gtFine files.

    Missing ground truth is found here, at construction, so a broken download fails before
    training starts; decoding and value checks happen in ``__getitem__``.
    """

    gt_suffix: str  # e.g. "_gtFine_labelTrainIds.png"; set by subclasses
    kind: str  # for messages

    def __init__(self, root: str | Path, split: str, transforms: Transforms | None) -> None:
        super().__init__()
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.image_dir = self.root / "leftImg8bit" / split
        self.gt_dir = self.root / "gtFine" / split
        check_root(self.root, f"Cityscapes {self.kind}")
        for folder in (self.image_dir, self.gt_dir):
            if not folder.is_dir():
                raise DatasetError(
                    f"Cityscapes {self.kind} under {self.root}: folder {folder} is missing ({LAYOUT_HELP})"
                )
        images = sorted(self.image_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DatasetError(
                f"Cityscapes {self.kind}: no images matching {self.image_dir}/<city>/*_leftImg8bit.png ({LAYOUT_HELP})"
            )
        self._items: list[dict[str, Any]] = []
        missing: list[Path] = []
        for path in images:
            city, stem = path.parent.name, stem_of(path.name)
            gt = self.gt_dir / city / f"{stem}{self.gt_suffix}"
            if not gt.is_file():
                missing.append(gt)
            self._items.append({"image_path": path, "gt_path": gt, "city": city, "stem": stem})
        self._sizes: list[tuple[int, int]] | None = None
        if missing:
            raise DatasetError(
                f"Cityscapes {self.kind}: {len(missing)} of {len(images)} images in {self.image_dir} have no "
                f"ground truth *{self.gt_suffix}, e.g. {missing[0]}{self._missing_hint()}"
            )

    def _missing_hint(self) -> str:
        return ""

    def __len__(self) -> int:
        return len(self._items)

    def image_info(self, index: int) -> dict[str, Any]:
        """``image_id`` (stem), ``file_name``, ``image_path`` and ``gt_path`` of a sample without decoding it."""
        item = self._items[index]
        return {
            "image_id": item["stem"],
            "file_name": f"{item['city']}/{item['stem']}_leftImg8bit.png",
            "image_path": item["image_path"],
            "gt_path": item["gt_path"],
        }

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every sample, before any transform, from the image files' headers
        (nothing decoded; read once, as no annotation file lists the sizes): the training sampler's
        aspect-ratio groups."""
        if self._sizes is None:
            self._sizes = [read_image_size(item["image_path"]) for item in self._items]
        return self._sizes

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Image ``(H, W, 3)`` uint8, raw ground-truth PNG values ``(H, W)`` int64, and the item."""
        item = self._items[index]
        rgb = read_rgb_image(item["image_path"])
        gt = self._read_gt(item["gt_path"])
        if gt.shape != rgb.shape[:2]:
            raise DatasetError(
                f"{item['gt_path']}: ground truth is {gt.shape[1]}x{gt.shape[0]} (WxH) but the image "
                f"{item['image_path'].name} is {rgb.shape[1]}x{rgb.shape[0]}"
            )
        return rgb, gt, item

    def _read_gt(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def _finish(
        self, rgb: np.ndarray, item: dict[str, Any], target: dict[str, Any]
    ) -> tuple[tv_tensors.Image, dict[str, Any]]:
        h, w = rgb.shape[:2]
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        target.update(
            {
                "image_id": item["stem"],
                "file_name": f"{item['city']}/{item['stem']}_leftImg8bit.png",
                "orig_size": (h, w),
            }
        )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# Cityscapes training crops (mmseg's cityscapes 512x1024 pipeline, also Detectron2's
# Panoptic-DeepLab / Mask2Former): RandomResize of the 2048x1024 image by a ratio in [0.5, 2.0],
# then a random 512x1024 crop, then flip. The package's LSJ transform does exactly that for
# 1024x2048 images: it scales by min(s*512/1024, s*1024/2048) = s/2, so s in [1, 4] gives the
# ratio [0.5, 2], and the crop never needs padding. Evaluation keeps the full 2048x1024 image.
CROP_DEFAULTS: dict[str, Any] = {
    "train_kind": "lsj",
    "crop_size": (512, 1024),
    "scale_range": (1.0, 4.0),
    "train_short_edge": None,
    "train_max_size": None,
    "eval_short_edge": None,
    "eval_max_size": None,
}


class CityscapesDataModule(SegmentationDataModule):
    """The Cityscapes data modules' base: ``root`` and the split each role reads.

    Args:
        root: folder with ``leftImg8bit/`` and ``gtFine/``.
        train_split, val_split, test_split: split names (``test`` also serves predict).
        **kwargs: :class:`SegmentationDataModule` settings.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        # The test split has no public labels, so "test" (and predict) default to val.
        self.splits = role_splits(train_split, val_split, test_split)
