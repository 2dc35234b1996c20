"""The embedded default data set: coloured shapes over textured regions, in COCO panoptic format.

``generate_synthetic_panoptic`` writes, once and deterministically, a small data set that the
same reader as real COCO (:class:`knet_lightning.data.coco.COCOPanopticDataset`) loads::

    root/
      done                               stamp: the generator's parameters (JSON)
      train2017/000000000001.jpg ...     RGB images
      val2017/000001000001.jpg ...
      annotations/
        panoptic_train2017.json          COCO panoptic JSON (images, annotations, categories)
        panoptic_train2017/*.png         segment ids as RGB, id = R + 256 G + 256^2 B
        panoptic_val2017.json, panoptic_val2017/
        instances_train2017.json         COCO instance JSON for the things (RLE masks)
        instances_val2017.json

Images are JPEG (quality 95, no chroma subsampling) like COCO's ``.jpg`` files, so the
synthetic default goes through exactly the decoding path real COCO does; at this quality
the artefacts are a few grey levels and do not move any boundary the PNG defines.

The images, their classes and shapes are drawn by :mod:`knet_lightning.data.synthetic_render`;
:class:`SyntheticPanopticDataModule` generates the data set and reads it as COCO panoptic.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from knet_lightning.data.coco import COCOPanopticDataModule
from knet_lightning.data.io import id2rgb
from knet_lightning.data.meta import ClassInfo, DatasetError
from knet_lightning.data.synthetic_render import SYNTHETIC_CATEGORIES, THINGS, bbox_xywh, render_image

log = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_CATEGORIES", "SyntheticPanopticDataModule", "generate_synthetic_panoptic"]

# Bump when the generator's output changes so that old folders are regenerated.
_FORMAT_VERSION = 1
_STAMP = "done"
_VAL_ID_OFFSET = 1_000_000


def _stamp_params(num_train: int, num_val: int, image_size: int, seed: int, max_objects: int) -> dict[str, int]:
    return {
        "format_version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "max_objects": max_objects,
    }


def _read_stamp(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / _STAMP).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- writing


def _write_split(root: Path, split: str, split_code: int, count: int, size: int, seed: int, max_objects: int) -> None:
    from pycocotools import mask as mask_util

    image_dir = root / f"{split}2017"
    png_dir = root / "annotations" / f"panoptic_{split}2017"
    image_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    offset = 0 if split_code == 0 else _VAL_ID_OFFSET
    images: list[dict[str, Any]] = []
    pan_anns: list[dict[str, Any]] = []
    inst_anns: list[dict[str, Any]] = []
    for i in range(count):
        # One generator per image: an image does not depend on how many came before it.
        rng = np.random.default_rng([seed, split_code, i])
        image, segments = render_image(rng, size, max_objects)
        image_id = offset + i + 1
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": size, "height": size})

        # Segment ids span all three channels so that readers must decode R + 256 G + 256² B.
        seg_ids: list[int] = []
        while len(seg_ids) < len(segments):
            cand = int(rng.integers(1, 256**3))
            if cand not in seg_ids:
                seg_ids.append(cand)
        pan = np.zeros((size, size), dtype=np.uint32)
        segments_info = []
        for sid, (cat_id, m) in zip(seg_ids, segments):
            pan[m] = sid
            segments_info.append(
                {
                    "id": sid,
                    "category_id": cat_id,
                    "area": int(m.sum()),
                    "bbox": bbox_xywh(m),
                    "iscrowd": 0,
                }
            )
            if cat_id < 100:
                rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                inst_anns.append(
                    {
                        "id": len(inst_anns) + 1 + offset,
                        "image_id": image_id,
                        "category_id": cat_id,
                        "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                        "area": int(mask_util.area(rle)),
                        "bbox": [float(v) for v in mask_util.toBbox(rle)],
                        "iscrowd": 0,
                    }
                )
        Image.fromarray(id2rgb(pan)).save(png_dir / f"{stem}.png")
        pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info})

    info = {
        "description": "knet-lightning synthetic shapes (generated)",
        "version": str(_FORMAT_VERSION),
        "seed": seed,
    }
    panoptic = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": pan_anns,
        "categories": [dict(c) for c in SYNTHETIC_CATEGORIES],
    }
    instances = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": inst_anns,
        "categories": [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]} for c in THINGS],
    }
    ann_dir = root / "annotations"
    (ann_dir / f"panoptic_{split}2017.json").write_text(json.dumps(panoptic))
    (ann_dir / f"instances_{split}2017.json").write_text(json.dumps(instances))


def generate_synthetic_panoptic(
    root: str | Path,
    num_train: int = 300,
    num_val: int = 50,
    image_size: int = 96,
    seed: int = 0,
    max_objects: int = 4,
) -> Path:
    """Write the synthetic shapes data set in COCO panoptic layout under ``root`` (once).

    Deterministic: the same arguments give byte-identical files. Idempotent: a ``done``
    stamp holding the arguments makes a repeated call a no-op; a stamp with other
    arguments makes it regenerate. The files are written to a temporary sibling folder
    which is renamed to ``root`` at the end, so an interrupted run never leaves a partial
    data set, and concurrent callers (e.g. DDP ranks) end with the same folder.

    Args:
        root: output folder; must be absent, empty, or a folder this function wrote.
        num_train, num_val: number of images per split.
        image_size: side of the square images in pixels (at least 32).
        seed: data-set seed.
        max_objects: most thing instances per image.

    Returns:
        ``root`` as a :class:`Path`.

    Raises:
        DatasetError: ``root`` holds something else, or an argument is out of range.
    """
    root = Path(root)
    if image_size < 32:
        raise DatasetError(f"synthetic data set: image_size must be >= 32, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise DatasetError(f"synthetic data set: num_train/num_val must be >= 0, got {num_train}/{num_val}")
    if max_objects < 0:
        raise DatasetError(f"synthetic data set: max_objects must be >= 0, got {max_objects}")
    params = _stamp_params(num_train, num_val, image_size, seed, max_objects)
    if _is_written(root, params):
        return root
    log.info("generating the synthetic data set (%d train + %d val images of %d px) in %s",
             num_train, num_val, image_size, root)  # fmt: skip
    _write_in_place(root, params)
    return root


def _is_written(root: Path, params: dict[str, int]) -> bool:
    """Whether ``root`` holds the data set of ``params`` already (its stamp says so).

    Raises:
        DatasetError: ``root`` holds something else, or the folder that would hold it is missing.
    """
    if root.exists():
        stamp = _read_stamp(root)
        if stamp == params:
            return True
        if stamp is None and (not root.is_dir() or any(root.iterdir())):
            raise DatasetError(
                f"{root}: exists and is not a synthetic data set (no '{_STAMP}' stamp); "
                "refusing to overwrite it; pick another data.root"
            )
    if not root.parent.is_dir():
        # a typo in data.root must not create a tree of folders somewhere unexpected
        raise DatasetError(
            f"{root}: the folder that would hold the synthetic data set, {root.parent}, does not exist; "
            "create it or point data.root elsewhere"
        )
    return False


def _write_in_place(root: Path, params: dict[str, int]) -> None:
    """Writes the data set of ``params`` into a temporary sibling of ``root``, stamps it, and
    renames it to ``root`` (replacing a data set of other parameters there)."""
    num_train, num_val, image_size = params["num_train"], params["num_val"], params["image_size"]
    seed, max_objects = params["seed"], params["max_objects"]
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
    old: Path | None = None
    try:
        _write_split(tmp, "train", 0, num_train, image_size, seed, max_objects)
        _write_split(tmp, "val", 1, num_val, image_size, seed, max_objects)
        # The stamp goes last: a folder with a stamp is complete.
        (tmp / _STAMP).write_text(json.dumps(params, sort_keys=True))
        if root.exists() and _read_stamp(root) not in (None, params):
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
        try:
            os.rename(tmp, root)
            log.info("wrote the synthetic data set in %.1f s: %s", time.perf_counter() - start, root)
        except OSError:
            # Another process finished first; its folder is identical.
            if _read_stamp(root) == params:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class SyntheticPanopticDataModule(COCOPanopticDataModule):
    """The embedded shapes data set: generated once under ``root``, then read as COCO panoptic.

    Its images are ``image_size`` squares, so by default nothing is resized
    (``train_short_edge = eval_short_edge = None``) and LSJ crops to ``image_size``.

    Args:
        root: output folder of :func:`generate_synthetic_panoptic`.
        num_train, num_val, image_size, seed, max_objects: generator settings.
        **kwargs: :class:`COCOPanopticDataModule` settings (``filter_empty_train`` defaults to
            False here); the test split is ``val``.
    """

    def __init__(
        self,
        root: str | Path,
        num_train: int = 300,
        num_val: int = 50,
        image_size: int = 96,
        seed: int = 0,
        max_objects: int = 4,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_short_edge", None)
        kwargs.setdefault("eval_short_edge", None)
        # the generated split is trained on whole: about one image in ten has no shape
        kwargs.setdefault("filter_empty_train", False)
        kwargs.setdefault("crop_size", image_size)
        super().__init__(root, layout="annotations", train_split="train", val_split="val", test_split="val", **kwargs)
        self.generator_args = {
            "num_train": int(num_train),
            "num_val": int(num_val),
            "image_size": int(image_size),
            "seed": int(seed),
            "max_objects": int(max_objects),
        }

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node; the generator is idempotent.
        generate_synthetic_panoptic(self.root, **self.generator_args)

    def setup(self, stage: str | None = None) -> None:
        # Also here: a run that skips prepare_data (e.g. plain loaders in a script) still
        # finds the data; a finished data set makes this a stamp check.
        generate_synthetic_panoptic(self.root, **self.generator_args)
        super().setup(stage)

    def read_class_info(self) -> ClassInfo:
        # Known without writing any file: the generator's fixed categories.
        return ClassInfo.from_coco_categories(SYNTHETIC_CATEGORIES, source="synthetic data set categories")
