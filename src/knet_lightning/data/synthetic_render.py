"""Rendering of the synthetic shapes images: coloured shapes over textured stuff regions.

Classes (data-set ids are deliberately non-contiguous to exercise the id mapping):
things ``circle`` (1), ``square`` (2), ``triangle`` (3), ``ring`` (4); stuff ``sky`` (101,
smooth gradient), ``grass`` (102, per-pixel noise), ``water`` (103, wavy stripes).
The thing class is told by SHAPE only: each instance gets a random colour. Later shapes
occlude earlier ones; a shape is only placed if every shape keeps at least
``_MIN_VISIBLE_FRACTION`` of its area visible, so no segment is a sliver.

:mod:`knet_lightning.data.synthetic` writes the images and their COCO annotations.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SYNTHETIC_CATEGORIES", "THINGS", "bbox_xywh", "render_image"]

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
THINGS = [c for c in SYNTHETIC_CATEGORIES if c["isthing"]]
_STUFF = [c for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
# Mean colours of the stuff textures; thing colours are kept away from them.
_STUFF_BASE = np.array([[135.0, 190.0, 235.0], [60.0, 150.0, 50.0], [30.0, 90.0, 160.0]])


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


def render_image(
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
        cat = THINGS[int(rng.integers(len(THINGS)))]
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


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """COCO panoptic bbox of a mask: integer ``[x, y, w, h]`` with inclusive extents."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
