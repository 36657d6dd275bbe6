"""The one error type of the HTTP API: a status code and a message naming the field to fix.

Raised anywhere below the routes (request checks, auth, the queue) and answered by api.py in the
OpenAI error shape, which the ``openai`` client turns into its own exceptions
(``BadRequestError``, ``AuthenticationError``, ``NotFoundError``, ``RateLimitError``, ...)::

    raise ApiError(400, "size=65x48: width and height must be multiples of 16", param="size")
    # -> 400 {"error": {"message": "...", "type": "invalid_request_error", "param": "size", "code": "invalid_value"}}
"""

from __future__ import annotations

# The OpenAI error "type" of each status the server answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               409: "conflict_error", 411: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
