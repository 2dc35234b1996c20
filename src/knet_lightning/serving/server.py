""":func:`build_server`: the LitServer of a trained K-Net, and :func:`serve`, which runs it.

Routes: ``POST /predict`` (:mod:`knet_lightning.serving.api`), ``GET /health`` (LitServe's: ``ok``
once every worker has built its model, else 503), ``GET /info`` (task, classes, test time,
precision, batching and limits) and ``GET /`` (the web page, ``static/index.html``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

__all__ = ["ServeOptions", "build_server", "model_info", "serve", "serve_checkpoint"]

log = logging.getLogger(__name__)

PAGE = "index.html"


@dataclass(frozen=True)
class ServeOptions:
    """The server's side of ``serve.*``; the defaults are :class:`~knet_lightning.configs.ServeSettings`'s
    alone (``accelerator`` is the resolved ``serve.device``)."""

    host: str
    port: int
    accelerator: str
    max_batch_size: int
    batch_timeout: float
    workers_per_device: int
    api_servers: int
    timeout: float
    max_bytes: int
    max_pixels: int


def model_info(segmenter: Any) -> dict[str, Any]:
    """What ``GET /info`` says of the model: task, classes, test time, precision, backend."""
    return {
        "task": segmenter.task,
        "classes": [
            {"label": k, "name": name, "is_thing": bool(thing), "color": list(color), "dataset_id": int(dataset_id)}
            for k, (name, thing, color, dataset_id) in enumerate(
                zip(segmenter.class_names, segmenter.isthing, segmenter.colors, segmenter.dataset_ids)
            )
        ],
        "test_time": segmenter.test_time.to_dict(),
        "postprocess": segmenter.module.task.settings.to_dict(),
        "precision": segmenter.precision,
        "backend": segmenter.backend,
        "device": str(segmenter.device),
        "stage": segmenter.stage,
        "resize": {key: segmenter.settings.get(key) for key in ("short_edge", "max_size", "size_divisor")},
    }


def build_server(spec: Any, options: ServeOptions) -> tuple[Any, dict[str, Any]]:
    """The LitServer for ``spec`` (a :class:`~knet_lightning.serving.api.SegmenterSpec`) and the
    ``/info`` document. The model is built once here first, so that a bad checkpoint or override
    fails before any worker starts, with the same error ``mode=predict`` gives."""
    import litserve as ls
    from fastapi.responses import HTMLResponse, JSONResponse

    from knet_lightning.serving.api import SegmentationAPI
    from knet_lightning.serving.codec import ImageLimits
    from knet_lightning.serving.upload import ImageUploadMiddleware

    checked = spec.build(_device(options.accelerator))
    info = {"model": model_info(checked), "server": asdict(options) | {"checkpoint": spec.path}}
    del checked
    gc.collect()
    limits = ImageLimits(max_bytes=options.max_bytes, max_pixels=options.max_pixels)
    api = SegmentationAPI(spec, limits, workers=options.workers_per_device, max_batch_size=options.max_batch_size,
                          batch_timeout=options.batch_timeout)  # fmt: skip
    server = ls.LitServer(
        api, accelerator=options.accelerator, devices=1 if options.accelerator == "cpu" else "auto",
        workers_per_device=options.workers_per_device, timeout=options.timeout,
        middlewares=[(ImageUploadMiddleware, {"path": "/predict", "limits": limits})],
    )  # fmt: skip
    app = server.app
    # LitServe's own "/" (a text line) and "/info" give way to the page and the model's info
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ("/", "/info")]
    page = resources.files("knet_lightning.serving").joinpath("static", PAGE).read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/info")
    async def info_route() -> JSONResponse:
        return JSONResponse(info)

    return server, info


def _device(accelerator: str) -> str:
    return "cuda" if accelerator == "cuda" else "cpu"


def serve(spec: Any, options: ServeOptions) -> None:
    """Build the server and run it until interrupted (Ctrl+C, SIGTERM)."""
    server, info = build_server(spec, options)

    main_pid = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt  # LitServe's graceful shutdown: the API servers and workers end too
        # a forked HTTP server inherited this handler: it ends as SIGTERM ends it by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)  # a scheduler's or container's stop, as Ctrl+C
    model = info["model"]
    log.info("serving %s (%s, %d classes, %s) on http://%s:%d: POST /predict, GET /health, GET /info, page at /",
             spec.path, model["task"], len(model["classes"]), model["precision"], options.host,
             options.port)  # fmt: skip
    server.run(host=options.host, port=options.port, num_api_servers=options.api_servers,
               generate_client_file=False, log_level="warning")  # fmt: skip


def serve_checkpoint(path: str, settings: Mapping[str, Any], model_config: Any = None, overrides: Sequence[str] = (),
                     trusted: bool = False) -> None:  # fmt: skip
    """``mode=serve``: ``path`` served with the ``serve.*`` ``settings``
    (:class:`~knet_lightning.configs.ServeSettings`); ``model_config`` and ``overrides`` are the
    run's ``model`` config and command line, checked against the checkpoint as ``mode=predict``
    checks them."""
    from knet_lightning.inference.segmenter import run_device
    from knet_lightning.serving import check_installed

    check_installed()  # before the modules that import LitServe
    from knet_lightning.serving.api import SegmenterSpec

    device = run_device(str(settings["device"]), str(settings["backend"]))
    spec = SegmenterSpec(path, backend=str(settings["backend"]), precision=str(settings["precision"]),
                         stage=int(settings["stage"]), trusted=trusted, config=model_config,
                         overrides=tuple(overrides), threads=settings["threads"])  # fmt: skip
    fields = {f.name for f in dataclasses.fields(ServeOptions)} - {"accelerator"}
    serve(spec, ServeOptions(accelerator=device, **{k: v for k, v in settings.items() if k in fields}))
