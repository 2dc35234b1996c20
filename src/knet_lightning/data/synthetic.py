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
:class:`SyntheticPanopticDataModule` generates the data set and reads it as COCO panoptic.

Classes (data-set ids are deliberately non-contiguous to exercise the id mapping):
things ``circle`` (1), ``square`` (2), ``triangle`` (3), ``ring`` (4); stuff ``sky`` (101,
smooth gradient), ``grass`` (102, per-pixel noise), ``water`` (103, wavy stripes).
The thing class is told by SHAPE only: each instance gets a random colour. Later shapes
occlude earlier ones; a shape is only placed if every shape keeps at least
``_MIN_VISIBLE_FRACTION`` of its area visible, so no segment is a sliver.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from knet_lightning.data.coco import COCOPanopticDataModule
from knet_lightning.data.io import id2rgb
from knet_lightning.data.meta import ClassInfo, DatasetError

log = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_CATEGORIES", "SyntheticPanopticDataModule", "generate_synthetic_panoptic"]

# Bump when the generator's output changes so that old folders are regenerated.
_FORMAT_VERSION = 1
_STAMP = "done"
_VAL_ID_OFFSET = 1_000_000
_MIN_VISIBLE_FRACTION = 0.6
_PLACEMENT_TRIES = 30

SYNTHETIC_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1, "color": [0, 0, 230]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [250, 170, 30]},
    {"id": 4, "name": "ring", "supercategory": "shape", "isthing": 1, "color": [160, 32, 240]},
    {"id": 101, "name": "sky", "supercategory": "background", "isthing": 0, "color": [70, 130, 180]},
    {"id": 102, "name": "grass", "supercategory": "background", "isthing": 0, "color": [107, 142, 35]},
    {"id": 103, "name": "water", "supercategory": "background", "isthing": 0, "color": [0, 80, 100]},
)
_THINGS = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
_STUFF = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
# Mean colours of the stuff textures; thing colours are kept away from them.
_STUFF_BASE = np.array([[135.0, 190.0, 235.0], [60.0, 150.0, 50.0], [30.0, 90.0, 160.0]])


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


# --------------------------------------------------------------------------- rendering


def _stuff_layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[int]]:
    """Split the image into 1–3 bands with wavy borders.

    Returns:
        band map ``(size, size)`` int64 holding the index into ``_STUFF`` of each pixel, and
        the stuff indices used (each class at most once, so one segment per stuff class).
    """
    num_bands = int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35]))
    classes = [int(c) for c in rng.permutation(len(_STUFF))[:num_bands]]
    coord = np.arange(size, dtype=np.float64)
    # Borders sit in disjoint ranges so that every band keeps a sizeable height.
    ranges = {1: [], 2: [(0.3, 0.7)], 3: [(0.2, 0.4), (0.6, 0.8)]}[num_bands]
    along = np.zeros((size, size), dtype=np.int64)
    pos = coord[:, None].repeat(size, axis=1)  # row index of every pixel
    for lo, hi in ranges:
        base = rng.uniform(lo, hi) * size
        amp = rng.uniform(0.0, 0.06) * size
        freq = rng.uniform(0.5, 2.0)
        phase = rng.uniform(0.0, 2 * math.pi)
        border = base + amp * np.sin(2 * math.pi * freq * coord / size + phase)
        along += (pos >= border[None, :]).astype(np.int64)
    if rng.random() < 0.25:
        along = along.T.copy()  # vertical bands for variety
    band_map = np.asarray(classes, dtype=np.int64)[along]
    return band_map, classes


def _stuff_texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Full-image ``(size, size, 3)`` float texture of one stuff class."""
    y = np.arange(size, dtype=np.float64)[:, None, None] / size
    x = np.arange(size, dtype=np.float64)[None, :, None] / size
    if kind == "sky":
        base = _STUFF_BASE[0] + rng.normal(0.0, 8.0, 3)
        tex = base * (0.85 + 0.25 * (1.0 - y)) + rng.normal(0.0, 3.0, (size, size, 3))
    elif kind == "grass":
        base = _STUFF_BASE[1] + rng.normal(0.0, 8.0, 3)
        tex = base + rng.normal(0.0, 30.0, (size, size, 1)) + rng.normal(0.0, 10.0, (size, size, 3))
    elif kind == "water":
        base = _STUFF_BASE[2] + rng.normal(0.0, 8.0, 3)
        period = rng.uniform(5.0, 9.0) / size
        wobble = 0.5 * np.sin(2 * math.pi * x * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3))
        stripes = np.sin(2 * math.pi * y / period + wobble)
        tex = base + 35.0 * stripes + rng.normal(0.0, 4.0, (size, size, 3))
    else:  # pragma: no cover - the category table is fixed above
        raise ValueError(kind)
    return np.broadcast_to(tex, (size, size, 3))


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Binary ``(size, size)`` mask of one shape, fully inside the image.

    The circumscribed circle's diameter is 20–40 % of the image side: large enough to
    span several cells of the stride-8 features at the default 96 px.
    """
    lo = 0.25 if kind == "ring" else 0.20  # a ring's hole must stay visible
    extent = rng.uniform(lo, 0.40) * size
    r = extent / 2
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif kind == "square":
        # Circumradius r: corners touch the extent circle at every rotation.
        theta = rng.uniform(0.0, math.pi / 2)
        pts = [
            (cx + r * math.cos(theta + k * math.pi / 2), cy + r * math.sin(theta + k * math.pi / 2)) for k in range(4)
        ]
        draw.polygon(pts, fill=255)
    elif kind == "triangle":
        theta = rng.uniform(0.0, 2 * math.pi / 3)
        pts = [
            (cx + r * math.cos(theta + k * 2 * math.pi / 3), cy + r * math.sin(theta + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(pts, fill=255)
    else:  # pragma: no cover
        raise ValueError(kind)
    return np.asarray(img) > 0


def _thing_color(rng: np.random.Generator, stuff_used: list[int]) -> np.ndarray:
    """Random saturated colour, kept away from the mean colours of the image's stuff."""
    for _ in range(20):
        h, s, v = rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0)
        rgb = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0
        if all(np.linalg.norm(rgb - _STUFF_BASE[k]) > 70.0 for k in stuff_used):
            break
    return rgb


def _render_image(
    rng: np.random.Generator, size: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One sample.

    Returns:
        image ``(size, size, 3)`` uint8 and the segments as ``(category_id, mask (size, size) bool)``,
        things first in drawing order, then the stuff classes present.
    """
    band_map, stuff_used = _stuff_layout(rng, size)
    canvas = np.zeros((size, size, 3), dtype=np.float64)
    for k in stuff_used:
        tex = _stuff_texture(_STUFF[k]["name"], rng, size)
        sel = band_map == k
        canvas[sel] = tex[sel]

    num_things = 0 if rng.random() < 0.1 else int(rng.integers(1, max_objects + 1))
    full: list[np.ndarray] = []  # unoccluded masks, for the visible-fraction test
    visible: list[np.ndarray] = []
    cats: list[int] = []
    min_area = (0.1 * size) ** 2
    for _ in range(num_things):
        cat = _THINGS[int(rng.integers(len(_THINGS)))]
        for _try in range(_PLACEMENT_TRIES):
            m = _shape_mask(cat["name"], rng, size)
            area = int(m.sum())
            if area < min_area:
                continue
            # The new shape is on top; every earlier one loses the overlap.
            if all(int((v & ~m).sum()) >= _MIN_VISIBLE_FRACTION * int(f.sum()) for v, f in zip(visible, full)):
                break
        else:
            continue  # no room: drop this instance rather than leave a sliver
        visible = [v & ~m for v in visible]
        visible.append(m)
        full.append(m)
        cats.append(int(cat["id"]))
        color = _thing_color(rng, stuff_used)
        canvas[m] = color + rng.normal(0.0, 4.0, (area, 3))

    covered = np.zeros((size, size), dtype=bool)
    for v in visible:
        covered |= v
    segments = list(zip(cats, visible))
    for k in stuff_used:
        m = (band_map == k) & ~covered
        if m.any():
            segments.append((int(_STUFF[k]["id"]), m))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, segments


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    """COCO panoptic bbox of a mask: integer ``[x, y, w, h]`` with inclusive extents."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


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
        image, segments = _render_image(rng, size, max_objects)
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
                    "bbox": _bbox_xywh(m),
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
        "categories": [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]} for c in _THINGS],
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
    if root.exists():
        stamp = _read_stamp(root)
        if stamp == params:
            return root
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
    log.info("generating the synthetic data set (%d train + %d val images of %d px) in %s",
             num_train, num_val, image_size, root)  # fmt: skip
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
                return root
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return root


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
