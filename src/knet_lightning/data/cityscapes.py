"""Cityscapes (gtFine) readers for the semantic, panoptic and instance tasks, and their data modules.

On-disk layout (the official ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpacked into one folder, plus the files that ``cityscapesscripts`` generates)::

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       (official)
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png    (official)
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (createTrainIdLabelImgs)
    root/gtFine/cityscapes_panoptic_{split}.json                              (createPanopticImgs)
    root/gtFine/cityscapes_panoptic_{split}/<stem>_gtFine_panoptic.png        (createPanopticImgs)

Readers and their classes (contiguous ids, things first: the README's Architecture, "Contracts"):

- :class:`CityscapesSemanticDataset`: the 19 evaluated classes in trainId order, all treated as
  "stuff" (``isthing=False``): the semantic task has no instances, so thing/stuff does not
  matter and the model's class ``k`` is trainId ``k``. Reads ``labelTrainIds`` (or, with
  ``label_type="labelIds"``, the official ``labelIds`` mapped through the label table).
- :class:`CityscapesPanopticDataset`: the COCO-format panoptic files of ``createPanopticImgs``;
  categories (ids = Cityscapes labelIds, ``isthing`` from the JSON) → 8 things then 11 stuff.
  Note that this contiguous order differs from the trainId order of the semantic reader.
- :class:`CityscapesInstanceDataset`: ``instanceIds`` maps (``labelId * 1000 + k`` for an
  instance, the plain ``labelId`` for stuff and for crowd "group" regions) → the 8 classes
  with ``hasInstances`` and not ``ignoreInEval``.

Every reader's ``image_id`` is the Cityscapes image stem ``<city>_<seq>_<frame>`` (a string:
that is the ``image_id`` of ``createPanopticImgs``' JSON, which the official panoptic
evaluation matches on) and its ``file_name`` is ``<city>/<stem>_leftImg8bit.png``, relative to
``leftImg8bit/{split}``.

The label table and the class metadata are in :mod:`knet_lightning.data.cityscapes_labels`.
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
from knet_lightning.data.cityscapes_labels import (
    _INSTANCE_OFFSET,
    _LABEL_BY_ID,
    _MAX_LABEL_ID,
    _NUM_TRAIN_IDS,
    CITYSCAPES_LABELS,
    CityscapesLabel,
    _train_id_lut,
    cityscapes_instance_class_info,
    cityscapes_panoptic_categories,
    cityscapes_semantic_class_info,
)
from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.data.datamodule import SegmentationDataModule, role_splits
from knet_lightning.data.io import decode_image, read_image_size, read_rgb_image
from knet_lightning.data.meta import ClassInfo, DatasetError

__all__ = [
    "CITYSCAPES_LABELS",
    "CityscapesInstanceDataModule",
    "CityscapesInstanceDataset",
    "CityscapesLabel",
    "CityscapesPanopticDataModule",
    "CityscapesPanopticDataset",
    "CityscapesSemanticDataModule",
    "CityscapesSemanticDataset",
    "cityscapes_instance_class_info",
    "cityscapes_panoptic_categories",
    "cityscapes_semantic_class_info",
]

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[tv_tensors.Image, dict[str, Any]]]


_LAYOUT_HELP = (
    "expected root/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_<kind>.png"
)


def _check_root(root: Path, what: str, extra: str = "") -> None:
    if not root.is_dir():
        raise DatasetError(f"Cityscapes root {root} does not exist or is not a folder ({what}: {_LAYOUT_HELP}{extra})")


def _read_label_png(path: Path, what: str, modes: Sequence[str]) -> np.ndarray:
    """Decode a single-channel label PNG to int64 ``(H, W)``, rejecting other PIL modes."""
    im = decode_image(path, what)
    if im.mode not in modes:
        raise DatasetError(
            f"{path}: {what} must be a single-channel PNG (PIL mode one of {list(modes)}), got mode {im.mode!r}"
        )
    return np.asarray(im).astype(np.int64)


def _stem_of(image_name: str) -> str:
    return image_name[: -len("_leftImg8bit.png")]


class _CityscapesFolderDataset(Dataset):
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
        _check_root(self.root, f"Cityscapes {self.kind}")
        for folder in (self.image_dir, self.gt_dir):
            if not folder.is_dir():
                raise DatasetError(
                    f"Cityscapes {self.kind} under {self.root}: folder {folder} is missing ({_LAYOUT_HELP})"
                )
        images = sorted(self.image_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DatasetError(
                f"Cityscapes {self.kind}: no images matching {self.image_dir}/<city>/*_leftImg8bit.png ({_LAYOUT_HELP})"
            )
        self._items: list[dict[str, Any]] = []
        missing: list[Path] = []
        for path in images:
            city, stem = path.parent.name, _stem_of(path.name)
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


class CityscapesSemanticDataset(_CityscapesFolderDataset):
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
        values = _read_label_png(path, f"label PNG ({self.label_type})", ("L", "P"))
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


class CityscapesInstanceDataset(_CityscapesFolderDataset):
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
        values = _read_label_png(path, "instanceIds PNG", ("I;16", "I;16B", "I;16L", "I", "L"))
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


class CityscapesPanopticDataset(COCOPanopticDataset):
    """Cityscapes panoptic segmentation from the files of ``cityscapesscripts``' ``createPanopticImgs``.

    That tool writes COCO panoptic format with two Cityscapes twists, both handled here:
    ``image_id`` is the string stem ``<city>_<seq>_<frame>`` (kept as the target's
    ``image_id``), and the images' ``file_name`` is ``<stem>_gtFine_leftImg8bit.png``, a file
    that does not exist: images are read from ``leftImg8bit/{split}/<city>/<stem>_leftImg8bit.png``
    (as Detectron2's ``cityscapes_panoptic`` loader does). Crowd segments (thing group regions)
    have ``iscrowd=1``; labels with ``ignoreInEval`` are absent from the PNG (void).

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transforms: ``(image, target) -> (image, target)``.
        use_train_id: read ``cityscapes_panoptic_{split}_trainId.json`` and its PNG folder
            (``createPanopticImgs --use-train-id``: category ids are trainIds).

    Targets are those of :class:`COCOPanopticDataset` (``masks``, ``labels``, ``iscrowd``,
    ``sem_seg``, ``panoptic`` plain int32 at original size, ``image_id``, ``file_name``,
    ``orig_size``); classes: 8 things then 11 stuff, ``isthing`` from the JSON.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transforms | None = None,
        use_train_id: bool = False,
    ) -> None:
        base = f"cityscapes_panoptic_{split}{'_trainId' if use_train_id else ''}"
        super().__init__(
            root,
            split=split,
            transforms=transforms,
            json_file=Path("gtFine") / f"{base}.json",
            image_dir=Path("leftImg8bit") / split,
            png_dir=Path("gtFine") / base,
        )

    def _check_paths(self) -> None:
        hint = (
            f" (Cityscapes panoptic expects {self.json_path.relative_to(self.root)} and "
            f"{self.png_dir.relative_to(self.root)}/ from cityscapesscripts' createPanopticImgs, and "
            f"{self.image_dir.relative_to(self.root)}/<city>/<stem>_leftImg8bit.png)"
        )
        _check_root(self.root, "Cityscapes panoptic", hint)
        wanted = {"panoptic JSON": self.json_path, "image folder": self.image_dir, "PNG folder": self.png_dir}
        missing = [f"{k} {v}" for k, v in wanted.items() if not (v.is_file() if k == "panoptic JSON" else v.is_dir())]
        if missing:
            raise DatasetError(f"Cityscapes panoptic under {self.root}: missing {', '.join(missing)}{hint}")

    # Cityscapes' ids are the file stems <city>_<seq>_<frame> (strings), and createPanopticImgs
    # names a non-existent "<stem>_gtFine_leftImg8bit.png" as the image: the image is found at
    # leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png instead, as detectron2 does.
    def _image_key(self, raw_id: Any) -> Any:
        return str(raw_id)

    def _check_image_id(self, image_id: Any, where: str) -> None:
        parts = image_id.rsplit("_", 2)
        if len(parts) != 3 or not all(parts):
            raise DatasetError(f"{where} image_id {image_id!r} is not a Cityscapes stem <city>_<seq>_<frame>")

    def _image_file(self, image_id: Any, img: dict[str, Any]) -> str:
        return f"{image_id.rsplit('_', 2)[0]}/{image_id}_leftImg8bit.png"


# ---------------------------------------------------------------------------- data modules

# Cityscapes training crops (mmseg's cityscapes 512x1024 pipeline, also Detectron2's
# Panoptic-DeepLab / Mask2Former): RandomResize of the 2048x1024 image by a ratio in [0.5, 2.0],
# then a random 512x1024 crop, then flip. The package's LSJ transform does exactly that for
# 1024x2048 images: it scales by min(s*512/1024, s*1024/2048) = s/2, so s in [1, 4] gives the
# ratio [0.5, 2], and the crop never needs padding. Evaluation keeps the full 2048x1024 image.
_CROP_DEFAULTS: dict[str, Any] = {
    "train_kind": "lsj",
    "crop_size": (512, 1024),
    "scale_range": (1.0, 4.0),
    "train_short_edge": None,
    "train_max_size": None,
    "eval_short_edge": None,
    "eval_max_size": None,
}


class _CityscapesDataModule(SegmentationDataModule):
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


class CityscapesSemanticDataModule(_CityscapesDataModule):
    """Cityscapes semantic (19 classes) with :class:`CityscapesSemanticDataset`.

    Defaults follow mmseg's 512x1024 Cityscapes pipeline (see ``_CROP_DEFAULTS``); any
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
        super().__init__(root, train_split, val_split, test_split, **{**_CROP_DEFAULTS, **kwargs})
        self.label_type = label_type

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return CityscapesSemanticDataset(self.root, self.splits[role], transforms, label_type=self.label_type)

    def read_class_info(self) -> ClassInfo:
        return cityscapes_semantic_class_info()


class CityscapesPanopticDataModule(_CityscapesDataModule):
    """Cityscapes panoptic (8 things + 11 stuff) with :class:`CityscapesPanopticDataset`.

    Same training defaults as the semantic module (512x1024 crops of the 0.5-2.0x rescaled image).
    The classes are read from the validation JSON (``isthing`` from the file).

    Args:
        root, train_split, val_split, test_split: as :class:`CityscapesSemanticDataModule`.
        use_train_id: read the ``--use-train-id`` variant of the panoptic files.
        **kwargs: :class:`SegmentationDataModule` settings.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        use_train_id: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, train_split, val_split, test_split, **{**_CROP_DEFAULTS, **kwargs})
        self.use_train_id = bool(use_train_id)

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return CityscapesPanopticDataset(self.root, self.splits[role], transforms, use_train_id=self.use_train_id)


class CityscapesInstanceDataModule(_CityscapesDataModule):
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
