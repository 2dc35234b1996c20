"""``mode=serve``: a trained K-Net behind HTTP, on LitServe (Lightning's model server on FastAPI).

Layer: above :mod:`knet_lightning.inference` (it runs the :class:`~knet_lightning.Segmenter`),
beside :mod:`knet_lightning.module` and :mod:`knet_lightning.configs`; only :mod:`knet_lightning.cli`
imports it.

- ``codec.py``: an upload's bytes -> an RGB image, with the limits (:class:`RequestError` carries
  the HTTP status and reason); a result -> the JSON body or the overlay PNG.
- ``upload.py``: the ASGI middleware in front of ``POST /predict``: size limit (413), content type
  (415), multipart / raw bytes / JSON -> one JSON payload that LitServe queues for the workers.
- ``api.py``: :class:`SegmentationAPI`, the ``LitAPI`` run by each inference worker (batching).
- ``server.py``: :func:`build_server` (the LitServer, ``/``, ``/info``) and :func:`serve`.
- ``static/index.html``: the web page at ``/`` (plain HTML + JS, no build step).
"""

from importlib.util import find_spec

__all__ = ["check_installed"]


def check_installed() -> None:
    """Raises an ImportError naming the extra to install when ``mode=serve``'s packages are missing
    (before any module of this package that imports them is loaded)."""
    missing = [name for name in ("litserve", "multipart") if find_spec(name) is None]
    if missing:
        raise ImportError(f"mode=serve needs {', '.join(missing)}: pip install 'knet-lightning[serve]'")
