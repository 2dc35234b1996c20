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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from knet_lightning.data.meta import ClassInfo, DatasetError
from knet_lightning.data.semantic_folder import SemanticFolderDataModule, SemanticFolderDataset, semantic_class_info

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

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def ade20k_class_info(reduce_zero_label: bool = True) -> ClassInfo:
    """The 150 classes, all stuff; ``dataset_ids`` are the label-file values (``c + 1`` when
    ``reduce_zero_label``, else ``c``), which is what an exporter must write back."""
    return semantic_class_info(ADE20K_CLASSES, None, reduce_zero_label, "ADE20K")


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


class ADE20KDataset(SemanticFolderDataset):
    """ADE20K semantic segmentation samples as ``(image, target)`` pairs: a
    :class:`~knet_lightning.data.semantic_folder.SemanticFolderDataset` with ADE20K's layout and
    its 150 classes.

    Args:
        root: ``ADEChallengeData2016`` or the folder holding it.
        split: ``"training"`` or ``"validation"`` (the sub-folder names).
        transforms: ``transforms.v2``-style callable ``(image, target) -> (image, target)``.
        reduce_zero_label: map file value 0 to 255 and ``v`` to ``v - 1`` (mmseg).

    Attributes:
        class_info: :func:`ade20k_class_info`.
        base: the resolved ``ADEChallengeData2016`` folder.

    Samples and errors are :class:`SemanticFolderDataset`'s (file value ``c + 1`` is class ``c``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transforms: Transforms | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.base = resolve_ade20k_root(self.root, split)
        super().__init__(self.base / "images" / split, self.base / "annotations" / split,
                         ade20k_class_info(reduce_zero_label), transforms, reduce_zero_label=reduce_zero_label,
                         img_suffix=_IMAGE_SUFFIXES, seg_map_suffix=".png")  # fmt: skip


class ADE20KDataModule(SemanticFolderDataModule):
    """ADE20K read with :class:`ADE20KDataset` and the mmseg pipeline (:func:`build_ade20k_transforms`).

    Args:
        root: ``ADEChallengeData2016`` or its parent.
        train_split, val_split, test_split: sub-folder names (``test`` also serves predict).
        reduce_zero_label: see :class:`ADE20KDataset`.
        **kwargs: :class:`~knet_lightning.data.semantic_folder.SemanticFolderDataModule`'s pipeline
            settings (``crop_size``, ``img_scale``, ``ratio_range``, ``cat_max_ratio``,
            ``photometric``, ``flip_prob``, ``mean``, ``std``) and the other
            :class:`SegmentationDataModule` settings (batch sizes, workers, ``size_divisor``, ...);
            the base resize settings (``train_kind``, ``train_short_edge``, ...) do not apply and
            are rejected.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "training",
        val_split: str = "validation",
        test_split: str = "validation",
        reduce_zero_label: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, classes=list(ADE20K_CLASSES), img_dir="images", ann_dir="annotations",
                         train_split=train_split, val_split=val_split, test_split=test_split,
                         img_suffix=_IMAGE_SUFFIXES, reduce_zero_label=reduce_zero_label, **kwargs)  # fmt: skip

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return ADE20KDataset(self.root, split=self.splits[role], transforms=transforms,
                             reduce_zero_label=self.reduce_zero_label)  # fmt: skip

    def read_class_info(self) -> ClassInfo:
        # Fixed classes: known without touching the disk.
        return ade20k_class_info(self.reduce_zero_label)
