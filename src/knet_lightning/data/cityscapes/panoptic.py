"""Cityscapes panoptic segmentation (8 things + 11 stuff) from ``createPanopticImgs``' COCO-format
files: its reader (a :class:`~knet_lightning.data.coco.COCOPanopticDataset`) and data module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from knet_lightning.data.cityscapes.folder import CROP_DEFAULTS, CityscapesDataModule, Transforms, check_root
from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.data.meta import DatasetError

__all__ = ["CityscapesPanopticDataModule", "CityscapesPanopticDataset"]


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
        check_root(self.root, "Cityscapes panoptic", hint)
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


class CityscapesPanopticDataModule(CityscapesDataModule):
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
        super().__init__(root, train_split, val_split, test_split, **{**CROP_DEFAULTS, **kwargs})
        self.use_train_id = bool(use_train_id)

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return CityscapesPanopticDataset(self.root, self.splits[role], transforms, use_train_id=self.use_train_id)
