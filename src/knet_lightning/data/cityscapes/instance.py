"""Cityscapes instance segmentation (the 8 classes with instances): its reader and data module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.cityscapes.folder import (
    CityscapesDataModule,
    CityscapesFolderDataset,
    Transforms,
    read_label_png,
)
from knet_lightning.data.cityscapes.labels import (
    _INSTANCE_OFFSET,
    _LABEL_BY_ID,
    _MAX_LABEL_ID,
    cityscapes_instance_class_info,
)
from knet_lightning.data.meta import ClassInfo, DatasetError

__all__ = ["CityscapesInstanceDataModule", "CityscapesInstanceDataset"]


class CityscapesInstanceDataset(CityscapesFolderDataset):
    """Cityscapes instance segmentation (8 classes) from ``*_gtFine_instanceIds.png``.

    Decoding of a pixel value ``v`` (as ``cityscapesscripts`` and mmdet's converter do):
    ``v >= 1000``: instance ``v % 1000`` of labelId ``v // 1000``; ``v < 1000``: plain labelId
    (stuff, void, or a crowd "group" region of a thing class, e.g. a row of parked cars).
    Kept: instances of the 8 classes with ``hasInstances`` and not ``ignoreInEval`` (caravan
    and trailer instances are dropped, as in the official evaluation), plus one ``iscrowd``
    segment per such class with group pixels. All other pixels are background.

    Args:
        root, split, transforms: as :class:`CityscapesSemanticDataset`.

    ``__getitem__`` returns ``image`` and ``target``: ``masks`` (bool ``(K, H, W)``; instances
    in increasing pixel-value order, then the crowd regions), ``labels`` (int64 ``(K,)`` in
    ``[0, 8)``), ``iscrowd`` (bool ``(K,)``), ``sem_seg`` (int64 ``(H, W)``: the class of each
    non-crowd instance pixel, 255 on crowd and background pixels — the instance task has no
    background class), ``eval_gt`` (``rles``: COCO RLE dicts with ``str`` counts at the
    original size, ``labels``, ``iscrowd``, ``area``: float pixel counts, all aligned with the
    reader's segment order and untouched by transforms), ``image_id``, ``file_name``,
    ``orig_size``.

    Raises:
        DatasetError: as the semantic reader; value errors for ids whose labelId is not a
            Cityscapes label or for instance ids (``>= 1000``) of a label without instances.
    """

    kind = "instance"
    gt_suffix = "_gtFine_instanceIds.png"

    def __init__(self, root: str | Path, split: str = "train", transforms: Transforms | None = None) -> None:
        self.class_info = cityscapes_instance_class_info()
        super().__init__(root, split, transforms)

    def _read_gt(self, path: Path) -> np.ndarray:
        # Official files are 16-bit grayscale: Pillow opens them as "I;16" (or "I" before 10.x).
        values = read_label_png(path, "instanceIds PNG", ("I;16", "I;16B", "I;16L", "I", "L"))
        label_ids = np.unique(np.where(values >= _INSTANCE_OFFSET, values // _INSTANCE_OFFSET, values))
        bad = label_ids[(label_ids < 0) | (label_ids > _MAX_LABEL_ID)]
        if bad.size:
            raise DatasetError(
                f"{path}: instanceIds value(s) encode label id(s) {bad.tolist()} outside the Cityscapes "
                f"range 0..{_MAX_LABEL_ID} (expected labelId or labelId * 1000 + instance)"
            )
        inst_labels = np.unique(values[values >= _INSTANCE_OFFSET] // _INSTANCE_OFFSET)
        no_inst = [int(i) for i in inst_labels if not _LABEL_BY_ID[int(i)].has_instances]
        if no_inst:
            raise DatasetError(
                f"{path}: instanceIds has instance ids (>= {_INSTANCE_OFFSET}) for label(s) "
                f"{[f'{_LABEL_BY_ID[i].name} ({i})' for i in no_inst]}, which have no instances"
            )
        return values

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        from pycocotools import mask as mask_utils  # only this reader needs it

        rgb, values, item = self._load(index)
        h, w = values.shape
        info = self.class_info
        known = set(info.dataset_ids)
        seg_values: list[int] = []
        labels: list[int] = []
        crowd: list[bool] = []
        uniq = np.unique(values)
        for v in uniq[uniq >= _INSTANCE_OFFSET]:
            label_id = int(v) // _INSTANCE_OFFSET
            if label_id in known:
                seg_values.append(int(v))
                labels.append(info.contiguous_id(label_id))
                crowd.append(False)
        for v in uniq[uniq < _INSTANCE_OFFSET]:
            if int(v) in known:  # a group region of a thing class
                seg_values.append(int(v))
                labels.append(info.contiguous_id(int(v)))
                crowd.append(True)
        masks = values[None] == np.asarray(seg_values, dtype=np.int64)[:, None, None]
        sem = np.full((h, w), IGNORE_INDEX, dtype=np.int64)
        for k in range(len(seg_values)):
            if not crowd[k]:
                sem[masks[k]] = labels[k]
        rles = []
        for k in range(len(seg_values)):
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-friendly, as COCO files store them
            rles.append(rle)
        labels_t = torch.as_tensor(labels, dtype=torch.int64)
        crowd_t = torch.as_tensor(crowd, dtype=torch.bool)
        target: dict[str, Any] = {
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": labels_t,
            "iscrowd": crowd_t,
            "sem_seg": tv_tensors.Mask(torch.from_numpy(sem)),
            "eval_gt": {
                "rles": rles,
                "labels": labels_t.clone(),
                "iscrowd": crowd_t.clone(),
                "area": torch.from_numpy(masks.sum(axis=(1, 2)).astype(np.float32)),
            },
        }
        return self._finish(rgb, item, target)


class CityscapesInstanceDataModule(CityscapesDataModule):
    """Cityscapes instance segmentation (8 classes) with :class:`CityscapesInstanceDataset`.

    Defaults follow mmdet's Cityscapes Mask R-CNN pipeline: short side drawn in [800, 1024]
    with the long side at most 2048 (``img_scale=[(2048, 800), (2048, 1024)]``), flip; evaluation
    at 2048x1024.

    Args:
        root, train_split, val_split, test_split: as :class:`CityscapesSemanticDataModule`.
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
        defaults = {
            "train_kind": "multiscale",
            "train_short_edge": (800, 1024),
            "train_max_size": 2048,
            "eval_short_edge": 1024,
            "eval_max_size": 2048,
        }
        super().__init__(root, train_split, val_split, test_split, **{**defaults, **kwargs})

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return CityscapesInstanceDataset(self.root, self.splits[role], transforms)

    def read_class_info(self) -> ClassInfo:
        return cityscapes_instance_class_info()
