"""The ASGI middleware in front of ``POST /predict``: the HTTP side of a request, in the API server.

LitServe queues a request's JSON for its inference workers, and one refused input in a batch
would fail the whole batch there; so everything about the transport is settled here, before the
queue, with a 4xx the client can act on:

- over ``max_bytes`` (``Content-Length`` or the bytes read): 413;
- a content type other than multipart/form-data (a file in field ``image``), ``image/*``,
  ``application/octet-stream`` (raw bytes) or ``application/json`` (``{"image": "<base64>"}``): 415;
- no bytes, no file field, bad base64, an unknown ``?format=``, a ``url`` instead of an image (the
  server never fetches what a client names): 400;
- not an image, or over ``max_pixels`` (read from the header, nothing decoded): 400 / 413.

What passes goes on as ``{"image": <base64>, "format": ..., "name": ...}``. The worker decodes
the pixels (a truncated file is found there, and answered alone: :mod:`knet_lightning.serving.api`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse

from knet_lightning.serving.codec import FORMATS, ImageLimits, RequestError, from_base64, image_size, to_base64

__all__ = ["ImageUploadMiddleware", "RAW_TYPES"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RAW_TYPES = ("image/", "application/octet-stream")
_ACCEPTED = ("multipart/form-data (the file in field 'image'), image/* or application/octet-stream (the raw bytes), "
             "or application/json ({\"image\": \"<base64>\"})")  # fmt: skip
# a body this much over the limit is refused without reading it (below it, it is read and dropped,
# so that a client sending it sees the 413 rather than a reset connection)
_DRAIN_FACTOR = 4


class ImageUploadMiddleware:
    """Validates and normalises ``POST <path>`` bodies (see the module); other routes pass through."""

    def __init__(self, app: Callable[..., Awaitable[None]], path: str, limits: ImageLimits) -> None:
        self.app = app
        self.path = path
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            payload = await self._payload(scope, receive)
        except RequestError as err:
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
            return
        body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        # then the client's own messages: its disconnect, when it goes
        await self.app({**scope, "headers": headers}, _receive_once(body, receive), send)

    async def _payload(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        fmt = query.get("format", ["json"])[-1]
        if fmt not in FORMATS:
            raise RequestError(400, f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
        if not (content_type.startswith(RAW_TYPES) or content_type in ("multipart/form-data", "application/json")):
            raise RequestError(415, f"Content-Type {content_type!r} is not accepted: send {_ACCEPTED}")
        body = await self._body(headers, receive)
        name = None
        if content_type == "multipart/form-data":
            data, name = await _multipart_file(scope, body)
        elif content_type == "application/json":
            data = _json_image(body)
        else:
            data = body
        image_size(data, self.limits)  # not an image, too many pixels: refused before the queue
        return {"image": to_base64(data), "format": fmt, "name": name}

    async def _body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self.limits.max_bytes
        declared = headers.get("content-length", "")
        too_large = RequestError(413, f"the request is over the limit of {limit} bytes (serve.max_bytes)")
        if declared.isdigit() and int(declared) > limit * _DRAIN_FACTOR:
            raise too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError(400, "the client closed the connection before the body ended")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit * _DRAIN_FACTOR:
                raise too_large
            more = message.get("more_body", False)
        if size > limit:
            raise too_large
        return b"".join(chunks)


def _receive_once(body: bytes, then: Receive | None = None) -> Receive:
    """An ASGI ``receive`` that gives ``body`` as the whole request, then ``then``'s messages
    (None: a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive


async def _multipart_file(scope: Scope, body: bytes) -> tuple[bytes, str | None]:
    """The bytes and file name of the form's ``image`` field (else its only file)."""
    try:
        form = await Request(scope, _receive_once(body)).form(max_files=4, max_fields=16)
    except Exception as err:  # starlette raises its own and python-multipart's errors alike
        raise RequestError(400, f"the multipart body could not be read: {err}") from None
    files = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
    chosen = [value for key, value in files if key == "image"] or [value for _, value in files]
    if "url" in form and not files:
        raise _url_refused()
    if len(chosen) != 1:
        found = ", ".join(key for key, _ in files) or "none"
        raise RequestError(400, f"expected one file in the form field 'image', found file fields: {found}")
    upload = chosen[0]
    data = await upload.read()
    await form.close()
    return data, upload.filename or None


def _url_refused() -> RequestError:
    return RequestError(400, "this server never fetches a URL a client sends; send the image's bytes instead")


def _json_image(body: bytes) -> bytes:
    try:
        document = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the JSON body could not be parsed: {err}") from None
    if not isinstance(document, dict):
        raise RequestError(400, 'expected a JSON object {"image": "<base64 of the file>"}')
    if "image" not in document:
        if "url" in document:
            raise _url_refused()
        raise RequestError(400, 'the JSON body has no "image" field (the base64 of the image file)')
    return from_base64(document["image"], "image")
