""":class:`SegmentationAPI`: the ``LitAPI`` each inference worker runs.

A worker builds its own :class:`~knet_lightning.Segmenter` (``setup``), decodes the payloads that
:class:`~knet_lightning.serving.upload.ImageUploadMiddleware` queued, and segments a batch that
LitServe gathered (up to ``max_batch_size`` requests, waiting at most ``batch_timeout``).

A response never depends on the other requests of its batch: images are run together only with
images of the same size (the padding of a batch would otherwise differ from the image's own), so a
result equals ``Segmenter(image)``'s. A request refused here (a truncated file) is answered alone:
LitServe fails a whole batch on an exception, so refusals travel as values to ``encode_response``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import litserve as ls
import numpy as np
import torch
from starlette.responses import JSONResponse, Response

from knet_lightning.serving.codec import ImageLimits, RequestError, decode_image, from_base64, overlay_png, result_body
from knet_lightning.serving.codec import json_bytes as _json_bytes

__all__ = ["BATCH_HEADER", "DecodedRequest", "SegmentationAPI", "SegmenterSpec"]

log = logging.getLogger(__name__)

BATCH_HEADER = "X-Batch-Size"


@dataclass(frozen=True)
class SegmenterSpec:
    """How a worker builds its :class:`~knet_lightning.Segmenter` (``Segmenter.from_checkpoint``'s
    arguments; plain data, pickled into each spawned worker)."""

    path: str
    backend: str = "torch"
    precision: str = "auto"
    stage: int = -1
    trusted: bool = False
    config: dict[str, Any] | None = None
    overrides: tuple[str, ...] = ()
    threads: int | None = None  # torch threads per worker; None: the cores shared among the workers

    def build(self, device: str) -> Any:
        from knet_lightning.inference.segmenter import Segmenter

        return Segmenter.from_checkpoint(
            self.path, device=device, stage=self.stage, trusted=self.trusted, precision=self.precision,
            backend=self.backend, config=self.config, overrides=self.overrides,
        )  # fmt: skip


@dataclass(frozen=True)
class DecodedRequest:
    """One request, decoded: the RGB ``image (H, W, 3)``, the ``format`` asked for and the file name."""

    image: np.ndarray
    format: str
    name: str | None


class SegmentationAPI(ls.LitAPI):
    """The K-Net of ``spec`` behind ``POST /predict`` (see the module).

    Args:
        spec: how each worker builds its Segmenter.
        limits: the byte and pixel limits (checked again here, as the middleware checked them).
        workers: the inference workers on this machine (to share its cores among them).
        max_batch_size / batch_timeout: LitServe's dynamic batching.
    """

    def __init__(self, spec: SegmenterSpec, limits: ImageLimits, workers: int = 1, max_batch_size: int = 1,
                 batch_timeout: float = 0.0) -> None:  # fmt: skip
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.segmenter_spec = spec
        self.limits = limits
        self.workers = workers
        self.segmenter: Any = None

    def setup(self, device: str) -> None:
        threads = self.segmenter_spec.threads or max(1, (os.cpu_count() or 1) // max(1, self.workers))
        torch.set_num_threads(threads)
        self.segmenter = self.segmenter_spec.build(device)
        log.info("worker ready: %s on %s (%s, %d thread(s))", self.segmenter_spec.path, device, self.segmenter.precision,
                 threads)  # fmt: skip

    # no annotation on ``request`` nor on encode_response's return: LitServe reads them as the HTTP
    # endpoint's types, and without one it takes the raw Request (the middleware made it JSON)
    def decode_request(self, request):
        """The middleware's payload -> a :class:`DecodedRequest`, or the :class:`RequestError`."""
        try:
            data = from_base64(request.get("image"), "image")
            return DecodedRequest(decode_image(data, self.limits), request.get("format", "json"), request.get("name"))
        except RequestError as err:
            return err

    def predict(self, requests: list[Any]) -> list[Any]:
        """The result (or the refusal) of each request, in order; same-size images run as one batch.
        (LitServe's own ``batch`` and ``unbatch`` pass these lists through: they stack tensors and
        arrays only.)"""
        # LitServe hands a single request unbatched where max_batch_size is 1
        single = not isinstance(requests, list)
        requests = [requests] if single else requests
        out: list[Any] = list(requests)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, request in enumerate(requests):
            if isinstance(request, DecodedRequest):
                by_size.setdefault(request.image.shape, []).append(k)
        for slots in by_size.values():
            results = self.segmenter([requests[k].image for k in slots], batch_size=len(slots), progress=False)
            for k, result in zip(slots, results):
                out[k] = (requests[k], result, len(slots))
        return out[0] if single else out

    def encode_response(self, output):
        """A result -> the JSON body or the overlay PNG; a refusal -> its 4xx."""
        if isinstance(output, RequestError):
            return JSONResponse(output.body(), status_code=output.status)
        request, result, batch = output
        if not hasattr(result, "segments"):  # a SkippedInput: Segmenter could not read the pixels
            return JSONResponse(RequestError(400, result.reason).body(), status_code=400)
        # how many images the network ran together with this one (same size; see the module)
        headers = {BATCH_HEADER: str(batch)}
        if request.format == "overlay":
            return Response(overlay_png(result), media_type="image/png", headers=headers)
        return Response(_json_bytes(result_body(result, request.name)), media_type="application/json", headers=headers)
