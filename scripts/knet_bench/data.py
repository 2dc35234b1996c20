"""The data section: per-worker time of the training input pipeline (decode, and decode +
training transforms) on COCO panoptic files written to a temporary folder.

:func:`write_coco_panoptic` also feeds ``scripts/bench_train.py``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knet_lightning.data.coco import COCOPanopticDataset
from knet_lightning.data.io import id2rgb
from knet_lightning.data.transforms import build_transforms

from .common import NUM_CLASSES, NUM_THINGS, Context, Size, make_scene


def write_coco_panoptic(root: Path, num_images: int, size: Size, scene: tuple[int, int], seed: int) -> None:
    """COCO panoptic files (JPEG images, RGB-id PNGs, JSON with the 133 COCO-like categories)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    (root / "train2017").mkdir(parents=True)
    png_dir = root / "annotations" / "panoptic_train2017"
    png_dir.mkdir(parents=True)
    categories = [
        {"id": c + 1, "name": f"class{c}", "isthing": int(c < NUM_THINGS), "supercategory": "x"}
        for c in range(NUM_CLASSES)
    ]
    images, annotations = [], []
    for i in range(num_images):
        seg, labels = make_scene(rng, h, w, *scene)
        colors = rng.integers(0, 256, size=(len(labels) + 1, 3))
        noise = rng.normal(0.0, 20.0, size=(h, w, 3))
        rgb = np.clip(colors[seg] + noise, 0, 255).astype(np.uint8)
        name = f"{i:012d}"
        Image.fromarray(rgb).save(root / "train2017" / f"{name}.jpg", quality=90)
        # COCO ids are arbitrary; make them large so the R + 256 G + 256^2 B coding matters.
        seg_ids = 1000 * (np.arange(len(labels)) + 1) + i
        id_map = np.zeros(len(labels) + 1, dtype=np.uint32)
        id_map[1:] = seg_ids
        Image.fromarray(id2rgb(id_map[seg])).save(png_dir / f"{name}.png")
        areas = np.bincount(seg.ravel(), minlength=len(labels) + 1)[1:]
        images.append({"id": i, "file_name": f"{name}.jpg", "height": h, "width": w})
        annotations.append(
            {
                "image_id": i,
                "file_name": f"{name}.png",
                "segments_info": [
                    {"id": int(sid), "category_id": int(lab) + 1, "iscrowd": 0, "area": int(a), "bbox": [0, 0, 1, 1]}
                    for sid, lab, a in zip(seg_ids, labels, areas)
                ],
            }
        )
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "panoptic_train2017.json").write_text(json.dumps(payload))


def section_data(ctx: Context) -> dict[str, Any]:
    """Per-sample time of the reader alone and of reader + training transforms, one process."""
    p = ctx.profile
    tmp = Path(tempfile.mkdtemp(prefix="knet-bench-data-"))
    try:
        write_coco_panoptic(tmp, p.data_images, p.data_size, p.scene, ctx.seed)
        train_tf = build_transforms(
            train=True, kind="multiscale", short_edge=p.data_short_edge, max_size=p.data_max_size
        )
        rows = []
        torch.manual_seed(ctx.seed)
        for name, transforms in (("decode (reader only)", None), ("decode + train transforms", train_tf)):
            ds = COCOPanopticDataset(tmp, "train", transforms=transforms)
            for i in range(min(2, len(ds))):  # warm-up: page cache, lazy imports
                ds[i]
            times = []
            for _ in range(p.data_passes):
                for i in range(len(ds)):
                    start = time.perf_counter()
                    ds[i]
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            rows.append(
                {
                    "pipeline": name,
                    "samples": len(times),
                    "median_ms": median * 1e3,
                    "mean_ms": statistics.fmean(times) * 1e3,
                    "samples_per_s_per_worker": 1.0 / median,
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rows": rows,
        "notes": [
            f"{p.data_images} JPEG images of {p.data_size[1]}x{p.data_size[0]} (WxH) in COCO panoptic format, "
            f"{p.scene[0]} things + {p.scene[1]} stuff segments each, {p.data_passes} pass(es)",
            f"train transforms: build_transforms(train=True, kind='multiscale', short_edge={p.data_short_edge}, "
            f"max_size={p.data_max_size}) = resize + flip + drop empty + normalize",
            "per worker: one process, torch threads as set; a DataLoader with k workers scales up to k times this",
        ],
    }
