"""Cityscapes semantic segmentation (the 19 evaluated classes, trainId order): its reader and data module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.cityscapes.folder import (
    CROP_DEFAULTS,
    CityscapesDataModule,
    CityscapesFolderDataset,
    Transforms,
    read_label_png,
)
from knet_lightning.data.cityscapes.labels import (
    _MAX_LABEL_ID,
    _NUM_TRAIN_IDS,
    _train_id_lut,
    cityscapes_semantic_class_info,
)
from knet_lightning.data.meta import ClassInfo, DatasetError

__all__ = ["CityscapesSemanticDataModule", "CityscapesSemanticDataset"]


class CityscapesSemanticDataset(CityscapesFolderDataset):
    """Cityscapes semantic segmentation (19 classes) as ``(image, target)`` pairs.

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transforms: ``(image, target) -> (image, target)`` (``transforms.v2`` style).
        label_type: ``"trainIds"`` reads ``*_gtFine_labelTrainIds.png`` (values 0..18, 255 =
            ignore, as ``createTrainIdLabelImgs`` writes them); ``"labelIds"`` reads the official
            ``*_gtFine_labelIds.png`` (values 0..33) and maps them to trainIds with the label
            table, so that the preparation step is not needed.

    ``__getitem__`` returns ``image`` (``tv_tensors.Image`` uint8 ``(3, H, W)``) and ``target``:
    ``masks`` (``tv_tensors.Mask`` bool ``(K, H, W)``, one per class present, ascending),
    ``labels`` (int64 ``(K,)`` = trainIds), ``iscrowd`` (bool ``(K,)``, all False), ``sem_seg``
    (``tv_tensors.Mask`` int64 ``(H, W)``, 255 = ignore), ``sem_seg_orig`` (plain int64
    ``(H, W)`` copy that transforms leave at the original size, for evaluation), ``image_id``,
    ``file_name`` and ``orig_size``.

    Raises:
        DatasetError: at construction for a missing root/folder, no images, or images without
            ground truth; at ``__getitem__`` for undecodable files, a label PNG whose size
            differs from the image's, or label values outside the class range.
    """

    kind = "semantic"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transforms | None = None,
        label_type: str = "trainIds",
    ) -> None:
        if label_type not in ("trainIds", "labelIds"):
            raise DatasetError(f"Cityscapes semantic: label_type must be 'trainIds' or 'labelIds', got {label_type!r}")
        self.label_type = label_type
        self.gt_suffix = f"_gtFine_{'labelTrainIds' if label_type == 'trainIds' else 'labelIds'}.png"
        self.class_info = cityscapes_semantic_class_info()
        self._lut = _train_id_lut()
        super().__init__(root, split, transforms)

    def _missing_hint(self) -> str:
        if self.label_type == "trainIds":
            return (
                " (create the labelTrainIds PNGs with cityscapesscripts' createTrainIdLabelImgs, "
                "or pass label_type='labelIds' to read the official *_gtFine_labelIds.png)"
            )
        return ""

    def _read_gt(self, path: Path) -> np.ndarray:
        values = read_label_png(path, f"label PNG ({self.label_type})", ("L", "P"))
        if self.label_type == "labelIds":
            bad = np.unique(values[self._lut[values] < 0])
            if bad.size:
                raise DatasetError(
                    f"{path}: labelIds value(s) {bad.tolist()} are not Cityscapes label ids (expected 0..{_MAX_LABEL_ID})"
                )
            return self._lut[values]
        bad = np.unique(values[(values >= _NUM_TRAIN_IDS) & (values != IGNORE_INDEX)])
        if bad.size:
            raise DatasetError(
                f"{path}: labelTrainIds value(s) {bad.tolist()} outside the class range "
                f"(expected 0..{_NUM_TRAIN_IDS - 1} or {IGNORE_INDEX} = ignore)"
            )
        return values

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        rgb, sem, item = self._load(index)
        classes = np.unique(sem)
        classes = classes[classes != IGNORE_INDEX]
        masks = sem[None] == classes[:, None, None]
        target: dict[str, Any] = {
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.from_numpy(classes.astype(np.int64)),
            "iscrowd": torch.zeros(len(classes), dtype=torch.bool),
            "sem_seg": tv_tensors.Mask(torch.from_numpy(sem.copy())),
            "sem_seg_orig": torch.from_numpy(sem),
        }
        return self._finish(rgb, item, target)


class CityscapesSemanticDataModule(CityscapesDataModule):
    """Cityscapes semantic (19 classes) with :class:`CityscapesSemanticDataset`.

    Defaults follow mmseg's 512x1024 Cityscapes pipeline (see ``CROP_DEFAULTS``); any
    :class:`SegmentationDataModule` setting passed overrides them.

    Args:
        root: folder with ``leftImg8bit/`` and ``gtFine/``.
        train_split, val_split, test_split: split names (``test`` also serves predict).
        label_type: ``"trainIds"`` or ``"labelIds"`` (see the data set).
        **kwargs: :class:`SegmentationDataModule` settings.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        label_type: str = "trainIds",
        **kwargs: Any,
    ) -> None:
        super().__init__(root, train_split, val_split, test_split, **{**CROP_DEFAULTS, **kwargs})
        self.label_type = label_type

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return CityscapesSemanticDataset(self.root, self.splits[role], transforms, label_type=self.label_type)

    def read_class_info(self) -> ClassInfo:
        return cityscapes_semantic_class_info()
