"""The ASGI guard in front of the routes: refuses what needs no routing (body size, API key, draining).

A body over the limit is refused with 413 whether its length is declared or it arrives chunked
(the guard reads it all before the app sees it, then replays it); a POST body must be UTF-8 and is
treated as JSON whatever content type the client declared (curl -d says form).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from dsv3.serve.api_errors import ApiError
from dsv3.serve.protocol import error_body

if TYPE_CHECKING:
    from dsv3.serve.app import AppState


class Guard:
    """Refuses before routing: a body over the limit (413), a missing or wrong key on the API
    routes (401), a new request while draining (503)."""

    def __init__(self, app, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, st = scope["path"], self.state
        protected = path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info")
        if protected and st.settings.api_key is not None:
            headers = dict(scope["headers"])
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {st.settings.api_key}":
                return await _send_error(
                    send, ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)")
                )
        if protected and st.draining and scope["method"] == "POST":
            st.metrics.reject()
            return await _send_error(send, ApiError(503, "server is shutting down"), st.settings.retry_after)
        limit = st.settings.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(
                send, ApiError(413, f"request body: {int(declared)} bytes, at most {limit}")
            )
        body, more = [], True
        size = 0
        while more:  # read the body here so that a chunked one over the limit is refused too
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, ApiError(413, f"request body: over {limit} bytes"))
            body.append(chunk)
            more = msg.get("more_body", False)
        data = b"".join(body)
        if scope["method"] == "POST":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                return await _send_error(
                    send, ApiError(400, f"request body: not valid UTF-8 (byte {e.start})")
                )
        replay = [{"type": "http.request", "body": data, "more_body": False}]
        if scope["method"] == "POST":  # the body is JSON whatever the client declared (curl -d says form)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


async def _send_error(send, err: ApiError, retry_after: int | None = None) -> None:
    payload = json.dumps(error_body(err.message, err.type, err.param, err.status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
