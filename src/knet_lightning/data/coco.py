"""COCO panoptic reader (PNG segment maps + JSON) and its data module, also used for the synthetic
default; the base that the COCO-format readers share (:class:`COCOImages`).

Two on-disk layouts are common for the panoptic PNG folder:

- ``layout="annotations"`` (the official ``panoptic_annotations_trainval2017.zip`` unpacked
  in place)::

      root/train2017/*.jpg
      root/annotations/panoptic_train2017.json
      root/annotations/panoptic_train2017/*.png

- ``layout="root"`` (detectron2's ``datasets/coco``)::

      root/train2017/*.jpg
      root/annotations/panoptic_train2017.json
      root/panoptic_train2017/*.png

Conventions of the target (see "Contracts" in the README's Architecture):

- Crowd segments are kept in ``masks``/``labels`` with ``iscrowd=True`` (the criterion drops
  them, the PQ evaluator needs them), but their pixels are 255 (ignore) in ``sem_seg``:
  a crowd region is an unreliable label and K-Net ignores crowds in training. The panoptic
  task's mIoU counts them with their class, as the references do (``PanopticTask.ground_truth``).
- PNG pixels with id 0 are void: 255 in ``sem_seg`` and 0 in ``panoptic``.
- PNG pixels with an id that ``segments_info`` does not list are 255 in ``sem_seg`` (as in
  mmdet's ``LoadPanopticAnnotations``, mmdet/datasets/pipelines/loading.py, whose map starts
  at 255 and receives the listed segments only) but -1 in ``panoptic``, not void: the official
  ``pq_compute_single_core`` (panopticapi/evaluation.py) never matches them nor counts them as
  false negatives, yet keeps them in a prediction's union and in the share of an unmatched
  prediction that makes it a false positive; ``PanopticQuality`` scores -1 that way.
- ``panoptic`` is a plain ``torch.Tensor`` (not a ``tv_tensor``) so that ``transforms.v2``
  passes it through untouched: it stays at the original resolution for evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from knet_lightning.data.datamodule import SegmentationDataModule, role_splits
from knet_lightning.data.io import load_coco_json, load_panoptic_png, read_rgb_image, require_keys
from knet_lightning.data.meta import ClassInfo, DatasetError, UnknownCategoryError

__all__ = ["COCOImages", "COCOPanopticDataModule", "COCOPanopticDataset", "filter_training_images"]

log = logging.getLogger(__name__)

_LAYOUTS = ("annotations", "root")

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[tv_tensors.Image, dict[str, Any]]]


def filter_training_images(
    items: list[dict[str, Any]],
    source: Path,
    *,
    filter_empty: bool,
    min_size: int,
    is_empty: Callable[[dict[str, Any]], bool],
    empty_what: str,
) -> list[dict[str, Any]]:
    """mmdet's ``_filter_imgs`` for a training split (mmdet/datasets/coco.py, coco_panoptic.py):
    with ``filter_empty``, drop the items ``is_empty`` says have no ground truth; drop items whose
    JSON ``width`` or ``height`` is below ``min_size`` (0 keeps all). Logs what went.

    Raises:
        DatasetError: naming ``source`` when the filter leaves no image (an empty training split
            would let Lightning "train" without a single step).
    """
    if not filter_empty and min_size == 0:
        return items
    kept, empty, small = [], 0, 0
    for item in items:
        if filter_empty and is_empty(item):
            empty += 1
        elif min(item["height"], item["width"]) < min_size:
            small += 1
        else:
            kept.append(item)
    if items and not kept:
        raise DatasetError(
            f"{source}: no image left for training out of {len(items)}: {empty} {empty_what} (filter_empty), "
            f"{small} with a side below min_size={min_size} px"
        )
    log.info(
        "%s: kept %d of %d images; dropped %d %s (filter_empty=%s) and %d with a side below min_size=%d px",
        source.name, len(kept), len(items), empty, empty_what, filter_empty, small, min_size,
    )  # fmt: skip
    return kept


class COCOImages(Dataset):
    """What the COCO-format readers (panoptic: :class:`COCOPanopticDataset`, instance:
    :class:`knet_lightning.data.coco_instance.COCOInstanceDataset`) share: the settings every
    one takes, and access to the images a JSON lists without decoding any.

    A subclass parses its JSON into ``self._items``, one dict per kept image in JSON order
    with at least ``image_id``, ``file_name`` (under ``image_dir``), ``height`` and ``width``
    (the JSON's), and sets ``json_path`` and ``image_dir``.

    Args:
        root: data set folder (``data.root``).
        split: the split name (``X`` of the ``X2017`` folders).
        transforms: ``transforms.v2``-style callable ``(image, target) -> (image, target)``.
        filter_empty: drop images without ground truth (each reader says which); for training.
        min_size: drop images whose JSON width or height is below it; 0 keeps all.

    Raises:
        DatasetError: ``min_size`` is negative.
    """

    kind: str  # for messages: "COCO panoptic", "COCO instance"
    json_path: Path
    image_dir: Path
    _items: list[dict[str, Any]]

    def __init__(
        self, root: str | Path, split: str, transforms: Transforms | None, filter_empty: bool, min_size: int
    ) -> None:
        super().__init__()
        if min_size < 0:
            raise DatasetError(f"{self.kind}: min_size must be >= 0, got {min_size}")
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.filter_empty = bool(filter_empty)
        self.min_size = int(min_size)

    def __len__(self) -> int:
        return len(self._items)

    def image_info(self, index: int) -> dict[str, Any]:
        """``image_id``, ``file_name``, ``height``, ``width`` of a sample without decoding it."""
        item = self._items[index]
        return {k: item[k] for k in ("image_id", "file_name", "height", "width")}

    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every sample from the JSON, before any transform (no decoding):
        the training sampler's aspect-ratio groups."""
        return [(item["height"], item["width"]) for item in self._items]

    def _read_image(self, item: dict[str, Any]) -> np.ndarray:
        """The item's image, ``(H, W, 3)`` uint8 RGB, checked against the JSON's size."""
        return read_rgb_image(self.image_dir / item["file_name"], (item["height"], item["width"]), self.json_path)


class COCOPanopticDataset(COCOImages):
    """COCO panoptic segmentation samples as ``(image, target)`` pairs.

    Args:
        root: data set folder (``data.root``).
        split: ``"train"`` or ``"val"`` (any name ``X`` with ``X2017`` folders works).
        layout: ``"annotations"`` or ``"root"``: where the panoptic PNG folder lives.
        transforms: ``transforms.v2``-style callable ``(image, target) -> (image, target)``.
        json_file, image_dir, png_dir: explicit paths overriding the layout; relative
            paths are taken relative to ``root``.
        filter_empty: drop images without any thing segment (crowd ones count), as mmdet's
            ``CocoPanopticDataset._filter_imgs`` (mmdet/datasets/coco_panoptic.py) with
            ``filter_empty_gt=True``; for training only.
        min_size: drop images whose JSON width or height is below it (that function's
            ``min_size=32``); 0 keeps all. For training only: mmdet filters only outside
            ``test_mode``, evaluation scores every image.

    Attributes:
        class_info: contiguous classes (things first) built from the JSON ``categories``.
        json_path, image_dir, png_dir: the resolved paths.
        categories: the raw JSON categories (for exporters and the official PQ evaluation).

    ``__getitem__`` returns ``image``: ``tv_tensors.Image`` uint8 ``(3, H, W)`` RGB and a
    ``target`` dict with ``masks`` (``tv_tensors.Mask`` bool ``(K, H, W)``), ``labels``
    (int64 ``(K,)`` contiguous), ``iscrowd`` (bool ``(K,)``), ``sem_seg`` (``tv_tensors.Mask``
    int64 ``(H, W)``, 255 = void or crowd), ``panoptic`` (plain int32 ``(H, W)``: ``k + 1``
    on the pixels of segment ``k``, 0 = void, -1 = an id not in ``segments_info``),
    ``image_id`` (int), ``file_name`` (str, the image's name in the JSON) and ``orig_size``
    (``(H, W)``).

    Raises:
        DatasetError: at construction for missing folders or a malformed JSON; at
            ``__getitem__`` for missing/corrupt/mismatched image and PNG files.
    """

    kind = "COCO panoptic"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        layout: str = "annotations",
        transforms: Transforms | None = None,
        json_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        png_dir: str | Path | None = None,
        filter_empty: bool = False,
        min_size: int = 0,
    ) -> None:
        super().__init__(root, split, transforms, filter_empty, min_size)
        if layout not in _LAYOUTS:
            raise DatasetError(f"COCO panoptic: layout must be one of {_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.json_path = self.root / (json_file or Path("annotations") / f"panoptic_{split}2017.json")
        self.image_dir = self.root / (image_dir or f"{split}2017")
        default_png = (
            Path("annotations") / f"panoptic_{split}2017" if layout == "annotations" else Path(f"panoptic_{split}2017")
        )
        self.png_dir = self.root / (png_dir or default_png)
        self._check_paths()
        self._load_json()

    # ------------------------------------------------------------------ set-up

    def _check_paths(self) -> None:
        wanted = {"panoptic JSON": self.json_path, "image folder": self.image_dir, "PNG folder": self.png_dir}
        listing = "; ".join(f"{k}: {v}" for k, v in wanted.items())
        if not self.root.is_dir():
            raise DatasetError(
                f"COCO panoptic root {self.root} does not exist or is not a folder "
                f"(layout={self.layout!r} looks for {listing})"
            )
        missing = [f"{k} {v}" for k, v in wanted.items() if not (v.is_file() if k == "panoptic JSON" else v.is_dir())]
        if missing:
            hint = ""
            other = "root" if self.layout == "annotations" else "annotations"
            other_png = (
                self.root / f"panoptic_{self.split}2017"
                if other == "root"
                else self.root / "annotations" / f"panoptic_{self.split}2017"
            )
            if not self.png_dir.is_dir() and other_png.is_dir():
                hint = f"; {other_png} exists: did you mean layout={other!r}?"
            raise DatasetError(
                f"COCO panoptic under {self.root} (layout={self.layout!r}): missing "
                f"{', '.join(missing)} (looked for {listing}){hint}"
            )

    def _load_json(self) -> None:
        src = self.json_path
        data = load_coco_json(src)

        self.categories: list[dict[str, Any]] = data["categories"]
        self.class_info = ClassInfo.from_coco_categories(self.categories, source=str(src))

        images: dict[Any, dict[str, Any]] = {}
        for i, img in enumerate(data["images"]):
            require_keys(img, ("id", "file_name", "width", "height"), f"images[{i}]", src)
            images[self._image_key(img["id"])] = img

        self._items = []
        for i, ann in enumerate(data["annotations"]):
            require_keys(ann, ("image_id", "file_name", "segments_info"), f"annotations[{i}]", src)
            image_id = self._image_key(ann["image_id"])
            if image_id not in images:
                raise DatasetError(f"{src}: annotations[{i}] refers to image_id {image_id!r}, which is not in 'images'")
            self._check_image_id(image_id, f"{src}: annotations[{i}]")
            if not isinstance(ann["segments_info"], list):
                raise DatasetError(f"{src}: annotations[{i}]['segments_info'] must be a list")
            seg_ids, labels, crowd = [], [], []
            for j, seg in enumerate(ann["segments_info"]):
                require_keys(seg, ("id", "category_id"), f"annotations[{i}]['segments_info'][{j}]", src)
                try:
                    labels.append(self.class_info.contiguous_id(seg["category_id"]))
                except UnknownCategoryError as e:
                    raise DatasetError(
                        f"{src}: annotations[{i}] (image {image_id}, {ann['file_name']}) segment {seg['id']}: {e}"
                    ) from None
                seg_ids.append(int(seg["id"]))
                crowd.append(bool(seg.get("iscrowd", 0)))
            if len(set(seg_ids)) != len(seg_ids):
                raise DatasetError(f"{src}: annotations[{i}] ({ann['file_name']}) lists a segment id twice: {seg_ids}")
            img = images[image_id]
            try:
                height, width = int(img["height"]), int(img["width"])
            except (TypeError, ValueError):
                raise DatasetError(f"{src}: images entry {image_id!r} has non-integer width/height") from None
            self._items.append(
                {
                    "image_id": image_id,
                    "file_name": self._image_file(image_id, img),
                    "height": height,
                    "width": width,
                    "png_name": str(ann["file_name"]),
                    "segment_ids": np.asarray(seg_ids, dtype=np.uint32),
                    "labels": np.asarray(labels, dtype=np.int64),
                    "iscrowd": np.asarray(crowd, dtype=bool),
                }
            )

        self._filter_items()

    def _filter_items(self) -> None:
        """Apply ``filter_empty`` and ``min_size`` to the parsed items, logging what went."""
        num_things = self.class_info.num_things
        # mmdet's rule: any segment of a thing category, crowd or not, keeps the image
        self._items = filter_training_images(
            self._items, self.json_path, filter_empty=self.filter_empty, min_size=self.min_size,
            is_empty=lambda item: not bool((item["labels"] < num_things).any()), empty_what="without a thing segment",
        )  # fmt: skip

    def _image_key(self, raw_id: Any) -> Any:
        """The key that ties an annotation to its ``images`` entry (COCO: an int)."""
        return int(raw_id)

    def _check_image_id(self, image_id: Any, where: str) -> None:
        """Further checks of an annotation's image id; COCO needs none."""

    def _image_file(self, image_id: Any, img: dict[str, Any]) -> str:
        """The image's path under ``image_dir`` (COCO: the JSON's ``file_name``)."""
        return str(img["file_name"])

    # ------------------------------------------------------------------ access

    def max_things_per_image(self) -> int:
        """The most non-crowd thing segments in one image, from the JSON alone (no decoding):
        the criterion matches each to its own proposal kernel."""
        num_things = self.class_info.num_things
        return max((int(((it["labels"] < num_things) & ~it["iscrowd"]).sum()) for it in self._items), default=0)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        item = self._items[index]
        image_path = self.image_dir / item["file_name"]
        png_path = self.png_dir / item["png_name"]

        rgb = self._read_image(item)
        h, w = rgb.shape[:2]
        ids = load_panoptic_png(png_path)
        if ids.shape != (h, w):
            raise DatasetError(
                f"{png_path}: PNG size {ids.shape[1]}x{ids.shape[0]} (WxH) differs from the image "
                f"{image_path.name} size {w}x{h}"
            )

        seg_ids = item["segment_ids"]
        labels = item["labels"]
        iscrowd = item["iscrowd"]
        # One pass over the pixels: map every distinct PNG id to its segment index.
        uniq, inverse = np.unique(ids, return_inverse=True)
        inverse = inverse.reshape(h, w)
        pos = np.searchsorted(uniq, seg_ids)
        present = (pos < len(uniq)) & (uniq[np.minimum(pos, len(uniq) - 1)] == seg_ids)
        if not present.all():
            raise DatasetError(
                f"{png_path}: segment id(s) {seg_ids[~present].tolist()} listed in {self.json_path.name} "
                f"for image {item['image_id']} are absent from the PNG"
            )
        sem_lut = np.full(len(uniq), 255, dtype=np.int64)
        sem_lut[pos[~iscrowd]] = labels[~iscrowd]
        # -1 (not 0) on ids missing from segments_info: the official PQ does not treat them as void
        pan_lut = np.where(uniq == 0, 0, -1).astype(np.int32)
        pan_lut[pos] = np.arange(1, len(seg_ids) + 1, dtype=np.int32)
        masks = inverse[None] == pos[:, None, None]

        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        target: dict[str, Any] = {
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.from_numpy(labels.copy()),
            "iscrowd": torch.from_numpy(iscrowd.copy()),
            "sem_seg": tv_tensors.Mask(torch.from_numpy(sem_lut[inverse])),
            "panoptic": torch.from_numpy(pan_lut[inverse]),
            "image_id": item["image_id"],
            "file_name": item["file_name"],
            "orig_size": (h, w),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class COCOPanopticDataModule(SegmentationDataModule):
    """COCO panoptic (PNG + JSON) read with :class:`COCOPanopticDataset`.

    Args:
        root: folder with ``annotations/panoptic_{split}2017.json`` and ``{split}2017/``.
        layout: ``"annotations"`` (PNG folders under ``annotations/``) or ``"root"``.
        train_split, val_split, test_split: split names (``test`` also serves predict).
        filter_empty_train: drop training images without a thing segment (mmdet's
            ``filter_empty_gt=True``, which the official K-Net training used).
        filter_min_size_train: drop training images with a side below it (mmdet's
            ``_filter_imgs(min_size=32)``); 0 keeps all. Evaluation splits keep every image.
        **kwargs: :class:`SegmentationDataModule` settings.
    """

    def __init__(
        self,
        root: str | Path,
        layout: str = "annotations",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        filter_empty_train: bool = True,
        filter_min_size_train: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.layout = layout
        self.splits = role_splits(train_split, val_split, test_split)
        self.filter_empty_train = bool(filter_empty_train)
        self.filter_min_size_train = int(filter_min_size_train)

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        train = role == "train"
        return COCOPanopticDataset(
            self.root,
            split=self.splits[role],
            layout=self.layout,
            transforms=transforms,
            filter_empty=self.filter_empty_train and train,
            min_size=self.filter_min_size_train if train else 0,
        )
