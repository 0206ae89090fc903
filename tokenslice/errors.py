"""The OpenAI-style error body every part returns to a client: one shape, one place.

``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API and vLLM send it. ``type`` names the
error class the way vLLM's server does (``BadRequestError``, ``RateLimitError``, ...), so a client cannot
tell whether the engine, a sidecar or the picker refused it; ``code`` is a short machine-readable reason
where the part has one (``queue_full``), else the HTTP status, as vLLM sets it.
"""

from __future__ import annotations

import json
from typing import Any

TYPE_BY_STATUS: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "TimeoutError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


def error_type(status: int) -> str:
    """The error class for an HTTP status (4xx default: BadRequestError, 5xx: InternalServerError)."""
    return TYPE_BY_STATUS.get(status, "BadRequestError" if status < 500 else "InternalServerError")


def openai_error(status: int, message: str, *, code: str | int | None = None, err_type: str | None = None,
                 param: str | None = None) -> dict[str, Any]:
    """The error object (a dict, for JSON responses and SSE ``data:`` events)."""
    return {"error": {"message": message, "type": err_type or error_type(status), "param": param,
                      "code": status if code is None else code}}


def openai_error_bytes(status: int, message: str, **kwargs: Any) -> bytes:
    """``openai_error`` serialised, for bodies built outside a web framework (the picker's replies)."""
    return json.dumps(openai_error(status, message, **kwargs)).encode()
