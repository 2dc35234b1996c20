"""COCO instance segmentation reader (JSON with polygons / RLE) and its data module.

On-disk layout (the official ``annotations_trainval2017.zip`` + ``{train,val}2017.zip``)::

    root/train2017/*.jpg
    root/annotations/instances_train2017.json

An annotation's ``segmentation`` comes in one of three COCO encodings, all decoded with
``pycocotools.mask`` exactly as ``pycocotools.coco.COCO.annToRLE`` does:

- polygons: a list of flat ``[x0, y0, x1, y1, ...]`` lists, one per *part* of the object
  (an occluded object split in two has two polygons). COCO polygons cannot describe holes:
  the parts are merged (union), and objects with holes are annotated as crowd RLE instead;
- uncompressed RLE ``{"size": [H, W], "counts": [int, ...]}`` (column-major run lengths,
  starting with background), used by COCO for ``iscrowd=1`` regions;
- compressed RLE ``{"size": [H, W], "counts": "<string>"}`` (LVIS, detectron2 exports).

Conventions of the target (see "Contracts" in the README's Architecture):

- All categories are things (``num_stuff = 0``); contiguous ids follow the JSON order.
- Crowd annotations stay in ``masks`` / ``labels`` with ``iscrowd=True`` (the criterion
  drops them; COCO mask AP needs them to ignore detections on crowds).
- ``sem_seg`` holds the non-crowd instances' classes; background and crowd pixels are 255
  (ignore). An instance data set has no stuff: background carries no class, so it is not
  a label to learn. Where non-crowd instances overlap, the later annotation in the JSON
  wins (an arbitrary but deterministic choice; COCO overlaps are rare and small).
- ``eval_gt`` keeps the JSON's ground truth at the original size for COCO mask AP:
  ``rles`` (compressed RLE dicts with ``str`` counts), ``labels``, ``iscrowd``, ``area``.
  It is a plain dict, so ``transforms.v2`` leaves it untouched, and it is *not* filtered
  when training transforms drop segments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors

from knet_lightning.constants import IGNORE_INDEX
from knet_lightning.data.coco import COCOImages, filter_training_images
from knet_lightning.data.datamodule import SegmentationDataModule, role_splits
from knet_lightning.data.io import load_coco_json, require_keys
from knet_lightning.data.meta import ClassInfo, DatasetError, UnknownCategoryError

__all__ = ["COCOInstanceDataModule", "COCOInstanceDataset", "rle_string_counts"]

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[tv_tensors.Image, dict[str, Any]]]


def rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (a port of ``rleFrString`` in maskApi.c).

    Each count is a little-endian base-32 varint of printable characters (offset 48, 5 data
    bits, 0x20 = "more", 0x10 = sign of the last chunk); counts after the second are stored as
    differences to the count two places before.

    Raises:
        ValueError: a character outside the 48..111 alphabet or a truncated varint.
    """
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string (a count's last chunk is missing)")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[p]!r} at position {p} of the RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


class COCOInstanceDataset(COCOImages):
    """COCO instance segmentation samples as ``(image, target)`` pairs.

    Args:
        root: data set folder (``data.root``).
        split: ``"train"`` or ``"val"`` (any ``X`` with ``instances_X2017.json`` and ``X2017/``).
        transforms: ``transforms.v2``-style callable ``(image, target) -> (image, target)``.
        json_file, image_dir: explicit paths overriding the defaults; relative paths are
            taken relative to ``root``.
        filter_empty: drop images without any annotation (crowd included, as mmdet's
            ``CocoDataset._filter_imgs`` with ``filter_empty_gt=True``); for training.
            Evaluation must keep them (COCO AP counts false positives on them).
        min_size: drop images whose JSON width or height is below it (that function's
            ``min_size=32``); 0 keeps all. For training only, as ``filter_empty``.

    Attributes:
        class_info: contiguous classes (all things, JSON order).
        categories: the raw JSON categories (for exporters and the official evaluation).
        json_path, image_dir: the resolved paths.

    ``__getitem__`` returns ``image``: ``tv_tensors.Image`` uint8 ``(3, H, W)`` RGB and a
    ``target`` dict with ``masks`` (``tv_tensors.Mask`` bool ``(K, H, W)``, one per
    annotation, crowd included), ``labels`` (int64 ``(K,)``), ``iscrowd`` (bool ``(K,)``),
    ``sem_seg`` (``tv_tensors.Mask`` int64 ``(H, W)``, 255 = background or crowd),
    ``eval_gt`` (plain dict, see the module docstring), ``image_id`` (int), ``file_name``
    (str) and ``orig_size`` (``(H, W)``). K may be 0.

    Raises:
        DatasetError: at construction for a missing JSON / image folder, a malformed JSON,
            an annotation for an unknown image or category, a missing or malformed
            ``segmentation`` (bbox-only annotations included) or an RLE whose size differs
            from its image; at ``__getitem__`` for a missing, corrupt or mis-sized image or
            polygon coordinates that are not numbers.
    """

    kind = "COCO instance"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Transforms | None = None,
        json_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        filter_empty: bool = False,
        min_size: int = 0,
    ) -> None:
        super().__init__(root, split, transforms, filter_empty, min_size)
        self.json_path = self.root / (json_file or Path("annotations") / f"instances_{split}2017.json")
        self.image_dir = self.root / (image_dir or f"{split}2017")
        self._check_paths()
        self._load_json()

    # ------------------------------------------------------------------ set-up

    def _check_paths(self) -> None:
        listing = f"instance JSON: {self.json_path}; image folder: {self.image_dir}"
        if not self.root.is_dir():
            raise DatasetError(
                f"COCO instance root {self.root} does not exist or is not a folder (looked for {listing})"
            )
        missing = []
        if not self.json_path.is_file():
            missing.append(f"instance JSON {self.json_path}")
        if not self.image_dir.is_dir():
            missing.append(f"image folder {self.image_dir}")
        if missing:
            raise DatasetError(f"COCO instance under {self.root}: missing {', '.join(missing)} (looked for {listing})")

    def _load_json(self) -> None:
        src = self.json_path
        data = load_coco_json(src)

        self.categories: list[dict[str, Any]] = data["categories"]
        # Instance JSONs have no 'isthing': every category is a thing.
        self.class_info = ClassInfo.from_coco_categories(self.categories, source=str(src), default_isthing=True)

        images: dict[int, dict[str, Any]] = {}
        for i, img in enumerate(data["images"]):
            require_keys(img, ("id", "file_name", "width", "height"), f"images[{i}]", src)
            image_id = int(img["id"])
            if image_id in images:
                raise DatasetError(f"{src}: images[{i}] repeats image id {image_id}")
            images[image_id] = {
                "image_id": image_id,
                "file_name": str(img["file_name"]),
                "height": int(img["height"]),
                "width": int(img["width"]),
                "anns": [],
            }

        for i, ann in enumerate(data["annotations"]):
            require_keys(ann, ("image_id", "category_id"), f"annotations[{i}]", src)
            where = f"annotations[{i}] (id {ann.get('id', '?')})"
            image_id = int(ann["image_id"])
            if image_id not in images:
                raise DatasetError(f"{src}: {where} refers to image_id {image_id}, which is not in 'images'")
            img = images[image_id]
            try:
                label = self.class_info.contiguous_id(ann["category_id"])
            except UnknownCategoryError as e:
                raise DatasetError(f"{src}: {where} (image {image_id}, {img['file_name']}): {e}") from None
            segm = self._check_segmentation(ann, where, img)
            area = ann.get("area")
            if area is not None and not (isinstance(area, Real) and not isinstance(area, bool)):
                raise DatasetError(f"{src}: {where}['area'] must be a number, got {area!r}")
            img["anns"].append(
                {
                    "segmentation": segm,
                    "label": label,
                    "iscrowd": bool(ann.get("iscrowd", 0)),
                    # None: computed from the mask in __getitem__ (some COCO-style exports omit it).
                    "area": None if area is None else float(area),
                    "where": where,
                }
            )

        # JSON order, as pycocotools' getImgIds and mmdet.
        self._items = filter_training_images(
            list(images.values()), src, filter_empty=self.filter_empty, min_size=self.min_size,
            is_empty=lambda img: not img["anns"], empty_what="without an annotation",
        )  # fmt: skip

    def _check_segmentation(self, ann: Mapping[str, Any], where: str, img: Mapping[str, Any]) -> Any:
        """Validates the structure of ``ann['segmentation']`` and returns it.

        The cheap checks run here for every annotation, so that a bad file fails at start-up;
        decoding (and number parsing inside polygons) happens per sample.
        """
        src = self.json_path
        h, w = img["height"], img["width"]
        ctx = f"{src}: {where} (image {img['image_id']}, {img['file_name']})"
        segm = ann.get("segmentation")
        if segm is None or (isinstance(segm, list) and len(segm) == 0):
            raise DatasetError(
                f"{ctx} has no 'segmentation' (a bbox-only / detection annotation?); instance "
                "segmentation needs polygons or RLE masks"
            )
        if isinstance(segm, list):
            for j, poly in enumerate(segm):
                if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                    got = f"{len(poly)} values" if isinstance(poly, list) else type(poly).__name__
                    raise DatasetError(
                        f"{ctx}: segmentation[{j}] must be a polygon [x0, y0, x1, y1, ...] with an even "
                        f"number (>= 6) of coordinates, got {got}"
                    )
            return segm
        if isinstance(segm, Mapping):
            if "size" not in segm or "counts" not in segm:
                raise DatasetError(f"{ctx}: RLE segmentation needs keys 'size' and 'counts', got {sorted(segm)}")
            size = segm["size"]
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                raise DatasetError(f"{ctx}: RLE 'size' must be [height, width], got {size!r}")
            if tuple(size) != (h, w):
                raise DatasetError(
                    f"{ctx}: RLE mask size {size[0]}x{size[1]} (HxW) differs from the image size {h}x{w} "
                    "given in 'images'"
                )
            counts = segm["counts"]
            if isinstance(counts, list):
                if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                    raise DatasetError(f"{ctx}: uncompressed RLE 'counts' must be non-negative integers")
                runs = counts
            elif isinstance(counts, str):
                try:
                    runs = rle_string_counts(counts)
                except ValueError as e:
                    raise DatasetError(f"{ctx}: compressed RLE 'counts' is not a valid COCO RLE string: {e}") from None
                if any(c < 0 for c in runs):
                    raise DatasetError(f"{ctx}: compressed RLE 'counts' decodes to negative run lengths")
            else:
                raise DatasetError(
                    f"{ctx}: RLE 'counts' must be a list of ints (uncompressed) or a string (compressed), "
                    f"got {type(counts).__name__}"
                )
            if sum(runs) != h * w:
                raise DatasetError(
                    f"{ctx}: RLE run lengths sum to {sum(runs)}, expected height*width = {h}*{w} = {h * w}"
                )
            return {"size": [h, w], "counts": counts}
        raise DatasetError(
            f"{ctx}: 'segmentation' must be a list of polygons or an RLE object, got {type(segm).__name__}"
        )

    # ------------------------------------------------------------------ access

    def _to_rle(self, ann: Mapping[str, Any], h: int, w: int, file_name: str) -> dict[str, Any]:
        """One compressed RLE (``counts`` bytes) for an annotation, as ``COCO.annToRLE``."""
        segm = ann["segmentation"]
        try:
            if isinstance(segm, list):
                # Several parts of one object: one RLE per polygon, merged by union.
                return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
            if isinstance(segm["counts"], list):
                return mask_utils.frPyObjects(segm, h, w)
            return {"size": [h, w], "counts": segm["counts"].encode("ascii")}
        except (TypeError, ValueError, OverflowError) as e:
            raise DatasetError(
                f"{self.json_path}: {ann['where']} (image {file_name}): cannot decode 'segmentation' "
                f"(polygon coordinates must be numbers): {e}"
            ) from e

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        item = self._items[index]
        rgb = self._read_image(item)
        h, w = rgb.shape[:2]

        anns = item["anns"]
        rles = [self._to_rle(ann, h, w, item["file_name"]) for ann in anns]
        if rles:
            # decode gives (H, W, K) Fortran order; the contract wants (K, H, W).
            masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).astype(bool)
        else:
            masks = np.zeros((0, h, w), dtype=bool)
        labels = np.asarray([a["label"] for a in anns], dtype=np.int64)
        iscrowd = np.asarray([a["iscrowd"] for a in anns], dtype=bool)
        areas = np.asarray(
            [a["area"] if a["area"] is not None else float(m.sum()) for a, m in zip(anns, masks)], dtype=np.float64
        )

        sem_seg = np.full((h, w), IGNORE_INDEX, dtype=np.int64)
        for k in np.flatnonzero(~iscrowd):  # JSON order: later annotations paint over earlier ones
            sem_seg[masks[k]] = labels[k]

        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        target: dict[str, Any] = {
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.from_numpy(iscrowd),
            "sem_seg": tv_tensors.Mask(torch.from_numpy(sem_seg)),
            "eval_gt": {
                "rles": [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in rles],
                "labels": torch.from_numpy(labels.copy()),
                "iscrowd": torch.from_numpy(iscrowd.copy()),
                "area": torch.from_numpy(areas),
            },
            "image_id": item["image_id"],
            "file_name": item["file_name"],
            "orig_size": (h, w),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class COCOInstanceDataModule(SegmentationDataModule):
    """COCO instance segmentation read with :class:`COCOInstanceDataset`.

    Args:
        root: folder with ``annotations/instances_{split}2017.json`` and ``{split}2017/``.
        train_split, val_split, test_split: split names (``test`` also serves predict).
        filter_empty_train: drop training images without annotations (mmdet's
            ``filter_empty_gt=True``); evaluation splits always keep every image.
        filter_min_size_train: drop training images with a side below it (mmdet's
            ``min_size=32``); 0 keeps all.
        **kwargs: :class:`SegmentationDataModule` settings.
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        filter_empty_train: bool = True,
        filter_min_size_train: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.filter_empty_train = bool(filter_empty_train)
        self.filter_min_size_train = int(filter_min_size_train)
        self.splits = role_splits(train_split, val_split, test_split)

    def make_dataset(self, role: str, transforms: Transforms) -> Dataset:
        return COCOInstanceDataset(
            self.root,
            split=self.splits[role],
            transforms=transforms,
            filter_empty=self.filter_empty_train and role == "train",
            min_size=self.filter_min_size_train if role == "train" else 0,
        )
