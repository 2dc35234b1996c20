"""Your own semantic segmentation data set: images and single-channel label PNGs in
MMSegmentation's ``BaseSegDataset`` layout (``img_dir`` / ``ann_dir`` per split, suffixes,
``reduce_zero_label``, 255 = ignore), with its classes (and optionally a palette) from a small file
or the command line. ADE20K (:mod:`knet_lightning.data.ade20k`) is this reader with its 150 fixed
classes.

On-disk layout, as MMSegmentation's custom-data-set tutorial writes it::

    <root>/<img_dir>/<split>/<name><img_suffix>        e.g. img_dir/train/0001.jpg
    <root>/<ann_dir>/<split>/<name><seg_map_suffix>    e.g. ann_dir/train/0001.png  (mode L or P)
    <root>/classes.txt                                  one class name per line, in label order

Label values: ``0 .. C-1`` are the classes and 255 is ignored; with ``reduce_zero_label`` (a set
whose 0 means "unlabelled", as ADE20K), 0 becomes 255 and ``v`` becomes ``v - 1``, so ``1 .. C``
are the classes. The class file may also be JSON or YAML, MMSegmentation's ``metainfo``:
``{"classes": [...], "palette": [[r, g, b], ...]}``.
"""

from __future__ import annotations

import json
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

__all__ = ["SemanticFolderDataModule", "SemanticFolderDataset", "read_class_file", "semantic_class_info"]

Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]
Suffixes = str | Sequence[str]


def read_class_file(path: str | Path) -> tuple[list[str], list[list[int]] | None]:
    """Class names (and a palette, or None) from ``path``: a text file of one name per line (blank
    lines skipped), or a JSON / YAML file with ``classes`` and an optional ``palette``.

    Raises:
        DatasetError: the file is missing, empty or malformed; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"{path}: no class file. Name the classes in a text file (one per line, in label order), a JSON/YAML "
            "file with 'classes' (and 'palette'), or on the command line: data.classes=[sky,road,car]"
        )
    text = path.read_text()
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        try:
            if path.suffix.lower() == ".json":
                meta = json.loads(text)
            else:
                from omegaconf import OmegaConf

                meta = OmegaConf.to_container(OmegaConf.create(text))
        except Exception as error:  # noqa: BLE001 - any parse error, named with the file
            raise DatasetError(f"{path}: cannot parse it: {error}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
            raise DatasetError(f"{path}: expected a mapping with a 'classes' list (and optionally 'palette')")
        return [str(c) for c in meta["classes"]], meta.get("palette")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: the class file names no class (one name per line expected)")
    return names, None


def semantic_class_info(
    classes: Sequence[str], palette: Sequence[Sequence[int]] | None = None, reduce_zero_label: bool = False,
    what: str = "data.classes",
) -> ClassInfo:  # fmt: skip
    """The classes of a semantic set, all stuff, in label order; ``dataset_ids`` are the label-file
    values (``c + 1`` with ``reduce_zero_label``, else ``c``), what the PNG writer writes back.

    Raises:
        DatasetError: no class, repeated names, more classes than the label values hold, or a palette
            of another length or with values outside 0..255; the message names ``what``.
    """
    names = [str(c) for c in classes]
    offset = 1 if reduce_zero_label else 0
    if not names:
        raise DatasetError(f"{what}: no class given")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"{what}: class names must be unique, {repeated} repeat")
    if len(names) + offset > IGNORE_INDEX:
        raise DatasetError(f"{what}: {len(names)} classes do not fit 8-bit labels with {IGNORE_INDEX} as ignore")
    if palette is None:
        colors = default_palette(len(names))
    else:
        colors = tuple(tuple(int(v) for v in c) for c in palette)
        if len(colors) != len(names) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
            raise DatasetError(f"{what}: the palette must give one [r, g, b] (0..255) per class: {len(names)} "
                               f"classes, palette {list(palette)[:4]}...")  # fmt: skip
    return ClassInfo(names=tuple(names), isthing=(False,) * len(names), colors=colors,
                     dataset_ids=tuple(range(offset, len(names) + offset)))  # fmt: skip


def _suffixes(value: Suffixes) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


class SemanticFolderDataset(Dataset):
    """Semantic segmentation samples ``(image, target)`` from an image folder and a label folder.

    Args:
        image_dir, label_dir: the split's folders (e.g. ``<root>/img_dir/train``, ``<root>/ann_dir/train``).
        class_info: the classes (:func:`semantic_class_info`); label values beyond them are errors.
        transforms: ``transforms.v2``-style callable ``(image, target) -> (image, target)``.
        reduce_zero_label: map file value 0 to 255 and ``v`` to ``v - 1`` (MMSegmentation's).
        img_suffix: the image files' suffix(es); label files are ``<image stem><seg_map_suffix>``.
        seg_map_suffix: the label files' suffix.

    ``__getitem__`` returns ``image``: ``tv_tensors.Image`` uint8 ``(3, H, W)`` RGB and a ``target``
    with ``sem_seg`` (``tv_tensors.Mask`` int64 ``(H, W)``, ``0..C-1`` or 255), ``sem_seg_orig``
    (plain int64 ``(H, W)``, left at the original size by the transforms), ``masks``
    (``tv_tensors.Mask`` bool ``(K, H, W)``, one per class present, in class order), ``labels``
    (int64 ``(K,)``), ``iscrowd`` (all False), ``image_id`` (the sample index), ``file_name`` and
    ``orig_size`` (``(H, W)``).

    Raises:
        DatasetError: at construction for a missing folder, an empty split or an image without its
            label file; at ``__getitem__`` for a corrupt file, a label file that is not single
            channel, an image/label size mismatch or label values outside the classes.
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        class_info: ClassInfo,
        transforms: Transforms | None = None,
        reduce_zero_label: bool = False,
        img_suffix: Suffixes = ".jpg",
        seg_map_suffix: str = ".png",
    ) -> None:
        super().__init__()
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        self.class_info = class_info
        self.transforms = transforms
        self.reduce_zero_label = bool(reduce_zero_label)
        self.seg_map_suffix = seg_map_suffix
        for folder, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not folder.is_dir():
                raise DatasetError(f"{folder}: the {what} folder of this split does not exist")
        suffixes = tuple(s.lower() for s in _suffixes(img_suffix))
        images = sorted(p for p in self.image_dir.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
        if not images:
            raise DatasetError(
                f"{self.image_dir}: no images ({', '.join(suffixes)}) in the {self.image_dir.name!r} split"
            )
        items = [(p, self.label_dir / f"{p.name[: len(p.name) - len(_suffix_of(p, suffixes))]}{seg_map_suffix}")
                 for p in images]  # fmt: skip
        missing = [image.name for image, label in items if not label.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DatasetError(f"{self.label_dir}: missing label file for {len(missing)} image(s) of {self.image_dir}: "
                               f"{shown} (expected <image stem>{seg_map_suffix})")  # fmt: skip
        self._items: list[tuple[Path, Path]] = items
        self._sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def image_info(self, index: int) -> dict[str, Any]:
        """``file_name`` (the image's) and ``label_file`` of sample ``index``, without reading them."""
        image, label = self._items[index]
        return {"file_name": image.name, "label_file": str(label)}

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of sample ``index``, from its image file's header."""
        if self._sizes is not None:
            return self._sizes[index]
        return read_image_size(self._items[index][0])

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every sample, before any transform, from the image files' headers
        (nothing decoded; read once): the training sampler's aspect-ratio groups."""
        if self._sizes is None:
            self._sizes = [read_image_size(image) for image, _ in self._items]
        return self._sizes

    def load_label(self, path: Path) -> np.ndarray:
        """Label file -> ``(H, W)`` int64 in ``0..C-1`` / 255, after the zero-label reduction.

        Raises:
            DatasetError: undecodable, not single channel, or values outside the classes.
        """
        im = decode_image(path, "label PNG")
        # 'P' (palette) PNGs store class indices too; anything with colour channels does not.
        if im.mode not in ("L", "P"):
            raise DatasetError(f"{path}: label PNG must be single channel 8-bit (PIL mode 'L'), got mode {im.mode!r}")
        raw = np.asarray(im, dtype=np.uint8)
        label = raw.astype(np.int64)
        if self.reduce_zero_label:
            # MMSegmentation: 0 -> 255, v -> v - 1, and 255 stays ignore (255 - 1 = 254 -> 255).
            label = np.where(raw == 0, IGNORE_INDEX, label - 1)
            label[raw == 255] = IGNORE_INDEX
        num_classes = self.class_info.num_classes
        bad = (label >= num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(raw[bad]).tolist()
            allowed = (f"0..{num_classes} (0 = unlabelled) or 255" if self.reduce_zero_label
                       else f"0..{num_classes - 1} or 255")  # fmt: skip
            raise DatasetError(f"{path}: label values {values[:10]} out of range; expected {allowed} for "
                               f"{num_classes} classes (reduce_zero_label={self.reduce_zero_label})")  # fmt: skip
        return label

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_path, label_path = self._items[index]
        rgb = read_rgb_image(image_path)
        h, w = rgb.shape[:2]
        label = self.load_label(label_path)
        if label.shape != (h, w):
            raise DatasetError(f"{label_path}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from the "
                               f"image {image_path.name} size {w}x{h}")  # fmt: skip
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


def _suffix_of(path: Path, suffixes: tuple[str, ...]) -> str:
    return next(s for s in suffixes if path.name.lower().endswith(s))


# the SegmentationDataModule resize settings that MMSegmentation's pipeline replaces
_REPLACED_KWARGS = (
    "train_kind",
    "train_short_edge",
    "train_max_size",
    "scale_range",
    "eval_short_edge",
    "eval_max_size",
)


class SemanticFolderDataModule(SegmentationDataModule):
    """A :class:`SemanticFolderDataset` per split with MMSegmentation's semantic pipeline
    (:func:`~knet_lightning.data.mmseg_pipeline.build_ade20k_transforms`: ratio-range resize,
    cat-max crop, flip, photometric distortion; keep-ratio test resize).

    Args:
        root: the data set's folder.
        classes: the class names in label order, or the path of a class file
            (:func:`read_class_file`; default ``<root>/classes.txt``).
        palette: one ``[r, g, b]`` per class (overlays); default a file's own, else generated.
        img_dir, ann_dir: the image and label folders under ``root``, each with one sub-folder per split.
        train_split, val_split, test_split: those sub-folders' names.
        img_suffix, seg_map_suffix: the files' suffixes.
        reduce_zero_label: label 0 means "unlabelled" (ignored) and ``1..C`` are the classes.
        crop_size, img_scale, ratio_range, cat_max_ratio, photometric, flip_prob, mean, std: see
            :func:`~knet_lightning.data.mmseg_pipeline.build_ade20k_transforms`.
        **kwargs: other :class:`SegmentationDataModule` settings (batch sizes, workers,
            ``size_divisor``, ``resize_backend``, ...); its resize settings do not apply.
    """

    def __init__(
        self,
        root: str | Path,
        classes: str | Path | Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        img_dir: str = "img_dir",
        ann_dir: str = "ann_dir",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        img_suffix: Suffixes = ".jpg",
        seg_map_suffix: str = ".png",
        reduce_zero_label: bool = False,
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
            raise ValueError(f"{type(self).__name__} uses MMSegmentation's semantic pipeline; {replaced} do not "
                             "apply (set img_scale, ratio_range and crop_size instead)")  # fmt: skip
        # the base pipelines are replaced below; no resize keeps building them cheap
        super().__init__(train_short_edge=None, eval_short_edge=None, flip_prob=flip_prob, mean=mean, std=std, **kwargs)
        self.root = Path(root)
        self.classes, self.palette = classes, palette
        self.img_dir, self.ann_dir = img_dir, ann_dir
        self.img_suffix, self.seg_map_suffix = img_suffix, seg_map_suffix
        self.reduce_zero_label = bool(reduce_zero_label)
        self.splits = role_splits(train_split, val_split, test_split)
        common = {"img_scale": tuple(img_scale), "mean": tuple(mean), "std": tuple(std),
                  "resize_backend": self.resize_backend}  # fmt: skip
        self.train_transforms = build_ade20k_transforms(
            True, crop_size=crop_size if isinstance(crop_size, int) else tuple(crop_size),
            ratio_range=None if ratio_range is None else tuple(ratio_range), cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob, photometric=photometric, **common,
        )  # fmt: skip
        self.eval_transforms = build_ade20k_transforms(False, **common)

    def keep_size_hint(self, short_side: int) -> str:
        side = max(32, 32 * round(short_side / 32))
        return f"data.img_scale=[{4 * side},{side}] data.crop_size={side}"

    def split_dirs(self, split: str) -> tuple[Path, Path]:
        """The image and label folders of ``split``."""
        return self.root / self.img_dir / split, self.root / self.ann_dir / split

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        image_dir, label_dir = self.split_dirs(self.splits[role])
        return SemanticFolderDataset(image_dir, label_dir, self.class_info, transforms,
                                     reduce_zero_label=self.reduce_zero_label, img_suffix=self.img_suffix,
                                     seg_map_suffix=self.seg_map_suffix)  # fmt: skip

    def read_class_info(self) -> ClassInfo:
        """The classes of ``classes`` (a list, or a class file; default ``<root>/classes.txt``)."""
        classes, palette, what = self.classes, self.palette, "data.classes"
        if classes is None or isinstance(classes, (str, Path)):
            path = Path(classes) if classes is not None else self.root / "classes.txt"
            classes, file_palette = read_class_file(path)
            palette, what = palette if palette is not None else file_palette, str(path)
        return semantic_class_info(list(classes), palette, self.reduce_zero_label, what)
