"""Errors of the HTTP API as OpenAI reports them: a status, a message naming the field, the field.

`ApiError` is raised anywhere a request is checked; pydantic's validation errors and the engine's
own (`RequestError`, `SamplingError`) are turned into one here, so every 400 names its `param`.
"""

from __future__ import annotations

import re

FIELD_RE = re.compile(r"^(?:prompts\[\d+\]: )?([a-z_]+)(?:\[\d+\])?:")


class ApiError(Exception):
    """An error response: HTTP status, message naming the field, the field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")  # fmt: skip


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """The first pydantic error as (message naming the field and value, param)."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"request body: not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})", None
    param = _param(err.get("loc", ()))
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if err.get("type") == "missing":
        return f"{param}: field required", param
    return f"{param or 'request body'}: {err.get('msg')}, got {got}", param


def _param(loc) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union member tags ('str', 'list[int]',
    'function-after[...]') end the path."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", str(part)
        ):
            break
        else:
            out += f".{part}" if out else str(part)
    return out or None


def request_error(e: Exception) -> ApiError:
    """A RequestError of the engine (or SamplingError) -> 400 naming its field."""
    msg = str(e)
    m = FIELD_RE.match(msg)
    param = m.group(1) if m else None
    if param == "prompts":
        param = "prompt"
    return ApiError(400, msg, param)
