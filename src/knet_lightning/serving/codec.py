"""What crosses the wire: an upload's bytes -> an RGB image, a result -> the response body.

Every refusal is a :class:`RequestError` with the HTTP status a client should get and a reason
that says what was expected; the server answers it and goes on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from knet_lightning.data.io import to_rgb_array, upright

__all__ = ["FORMATS", "ImageLimits", "RequestError", "decode_image", "image_size", "result_body", "to_base64"]

# ?format=: the JSON body (segments and the task's official result) or the overlay PNG
FORMATS = ("json", "overlay")


class RequestError(Exception):
    """A request the server refuses: ``status`` (400, 413, 415, ...) and ``detail``, the reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "status": self.status}


@dataclass(frozen=True)
class ImageLimits:
    """What one request may hold: ``max_bytes`` of upload, ``max_pixels`` (width x height)."""

    max_bytes: int
    max_pixels: int


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_base64(text: Any, field: str) -> bytes:
    """The bytes of a base64 string (``field`` names it in the error)."""
    if not isinstance(text, str):
        raise RequestError(400, f"{field}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{field}: not valid base64 ({err})") from None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise RequestError(400, "the request holds no image (0 bytes); send a JPEG, PNG, BMP, WebP or TIFF file")
    try:
        with warnings.catch_warnings():
            # PIL warns before it refuses (DecompressionBombError): the limit here is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"the image has too many pixels to open ({err})") from None
    except UnidentifiedImageError:
        raise RequestError(
            400, f"not an image: its {len(data)} bytes are no JPEG, PNG, BMP, WebP or TIFF file"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # a header cut short, a malformed one
        raise RequestError(
            400, f"not a readable image: its {len(data)} bytes stop or break in the header ({err})"
        ) from None


def image_size(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """``(width, height)`` from the file's header only (no decoding), checked against ``limits``."""
    return _checked_size(_open(data), limits)


def _checked_size(image: Image.Image, limits: ImageLimits) -> tuple[int, int]:
    width, height = image.size
    if width < 1 or height < 1:
        raise RequestError(400, f"the image is empty ({width}x{height} WxH)")
    if width * height > limits.max_pixels:
        raise RequestError(
            413, f"the image is {width}x{height} (WxH) = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} (serve.max_pixels)"
        )  # fmt: skip
    return width, height


def decode_image(data: bytes, limits: ImageLimits) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB of an uploaded file, upright by its EXIF orientation, as
    ``Segmenter`` reads a file. A truncated or corrupt file is a 400, never a partial image."""
    if len(data) > limits.max_bytes:
        raise RequestError(
            413, f"the image is {len(data)} bytes, over the limit of {limits.max_bytes} (serve.max_bytes)"
        )
    image = _open(data)
    _checked_size(image, limits)  # from the header, before the pixels are decoded
    try:
        image.load()
        return to_rgb_array(upright(image))
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise RequestError(400, f"the image is truncated or corrupt: {err}") from None


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jsonable(value: Any) -> Any:
    """The task's official result as JSON: PNG images as base64, RLE counts as text."""
    if isinstance(value, Image.Image):
        return to_base64(_png(value))
    if isinstance(value, bytes):
        return value.decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def result_body(result: Any, name: str | None = None) -> dict[str, Any]:
    """The JSON body of one :class:`~knet_lightning.postprocess.results.SegmentationResult`.

    ``segments``: ``id``, ``label``, ``class_name``, ``score``, ``area``, ``is_thing``; ``result``:
    the task's official format (:meth:`SegmentationResult.to_coco`): panoptic ``png`` (base64 COCO
    panoptic PNG) + ``segments_info``; instance: COCO results entries; semantic: ``png`` (base64
    label PNG of the data set's ids).
    """
    height, width = result.size
    official = result.to_coco(image_id=0, file_name=name or "image.png")
    return {
        "task": result.task,
        "height": height,
        "width": width,
        "segments": [
            {
                "id": s.id,
                "label": s.label,
                "class_name": s.class_name,
                "score": s.score,
                "area": s.area,
                "is_thing": s.is_thing,
            }  # fmt: skip
            for s in result.segments
        ],
        "result": _jsonable(official),
    }


def overlay_png(result: Any) -> bytes:
    """The overlay with its legend, as ``mode=predict`` writes it, encoded as PNG."""
    return _png(result.overlay())


def json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
