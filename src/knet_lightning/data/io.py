"""Shared file reading of the data set readers: images, COCO panoptic id PNGs and COCO-style
JSON, every failure raised as a :class:`DatasetError` that names the file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from knet_lightning.data.meta import DatasetError

__all__ = [
    "decode_image",
    "id2rgb",
    "load_coco_json",
    "load_panoptic_png",
    "read_image_size",
    "read_rgb_image",
    "require_keys",
    "rgb2id",
]


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic id decoding: ``(H, W, 3)`` uint8 → ``(H, W)`` uint32, id = R + 256 G + 256² B."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + (rgb[..., 1] << 8) + (rgb[..., 2] << 16)


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: ``(H, W)`` ids → ``(H, W, 3)`` uint8."""
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def decode_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a DatasetError."""
    if path.is_dir():
        raise DatasetError(f"{path}: expected {what}, found a folder")
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    try:
        with Image.open(path) as im:
            im.load()  # PIL decodes lazily; force it so truncation is caught here
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode {what} (corrupt or not an image): {e}") from e


# EXIF 0x0112: 1 = as stored, 2-8 = mirrored and/or rotated by multiples of 90 degrees
ORIENTATION_TAG = 0x0112

# PIL's modes of 16-bit (and 32-bit integer) grayscale: convert("RGB") clips them at 255
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of any PIL image: 16-bit grayscale is scaled to 8 bits (v / 257,
    the inverse of 8 -> 16 bit replication) instead of clipped to white; palette, RGBA and
    8-bit grayscale go through PIL's conversion."""
    if im.mode in _WIDE_GRAY_MODES:
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned by its EXIF orientation tag (camera photos store pixels unrotated and say
    how to show them); images without the tag are returned as they are."""
    if im.getexif().get(ORIENTATION_TAG, 1) == 1:
        return im
    return ImageOps.exif_transpose(im)


# EXIF orientations that turn the stored pixels by 90 degrees (5-8: transpose, rotate 90 / 270, transverse)
_QUARTER_TURNS = (5, 6, 7, 8)


def read_image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file as :func:`read_rgb_image` returns it (EXIF orientation
    applied), from its header: PIL reads the pixels only when asked, so nothing is decoded."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(ORIENTATION_TAG, 1) in _QUARTER_TURNS
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read the image size (missing, corrupt or not an image): {e}") from e
    return (width, height) if turned else (height, width)


def read_rgb_image(path: Path, expected_size: tuple[int, int] | None = None, source: Path | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB array of an image file (a writable copy, as torch.from_numpy
    wants). With ``expected_size`` ``(H, W)``, a different size is an error naming ``source``
    (the annotation file that gave the size).

    The EXIF orientation is applied (as cv2.imread, which MMDetection reads with, and
    detectron2's ``read_image`` do): the array is the image as a viewer shows it, which is what
    annotations are drawn on, in training, evaluation and predict alike.
    """
    rgb = to_rgb_array(upright(decode_image(path, "image file")))
    h, w = rgb.shape[:2]
    if expected_size is not None and (h, w) != tuple(expected_size):
        raise DatasetError(f"{path}: image is {w}x{h} (WxH) but {source} says {expected_size[1]}x{expected_size[0]}")
    return rgb


def load_panoptic_png(path: str | Path) -> np.ndarray:
    """Read a COCO panoptic PNG into ``(H, W)`` uint32 segment ids.

    Raises:
        DatasetError: missing file, undecodable file, or not an RGB(A) PNG.
    """
    path = Path(path)
    im = decode_image(path, "panoptic PNG")
    if im.mode not in ("RGB", "RGBA"):
        raise DatasetError(f"{path}: panoptic PNG must be RGB (id = R + 256 G + 256^2 B), got PIL mode {im.mode!r}")
    return rgb2id(np.asarray(im.convert("RGB")))


def require_keys(obj: Any, keys: tuple[str, ...], where: str, source: Path) -> None:
    """``obj`` must be a JSON object holding ``keys``; the error names the file and the place."""
    if not isinstance(obj, Mapping):
        raise DatasetError(f"{source}: {where} must be a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise DatasetError(f"{source}: {where} is missing key '{key}'")


def load_coco_json(src: Path) -> dict[str, Any]:
    """A COCO-style JSON (panoptic or instance) with its ``images``, ``annotations`` and
    ``categories`` lists checked; errors name the file and the problem."""
    try:
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{src}: malformed JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{src}: not a UTF-8 JSON file: {e}") from e
    require_keys(data, ("images", "annotations", "categories"), "top level", src)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{src}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data
