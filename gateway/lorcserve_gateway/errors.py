"""OpenAI's error shape, and the one mapping from gRPC status codes to HTTP statuses."""

import re

import grpc
from fastapi.responses import JSONResponse

# gRPC status -> (HTTP status, OpenAI error type).
_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


# Client input echoed in an error (a field name, a value): at most this many characters, then
# an ellipsis, so that a 5 MB field name does not come back as a 10 MB error body.
MAX_ECHO_CHARS = 100
# Any error message: at most this many characters (a safety net for texts the gateway does not
# write, such as a chat template's raise_exception or the coordinator's messages).
MAX_MESSAGE_CHARS = 2000


def clip(text, limit=MAX_ECHO_CHARS):
    """`text` (a str) cut to `limit` characters, the last one an ellipsis when cut."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`.
    `param` is clipped to MAX_ECHO_CHARS and `message` to MAX_MESSAGE_CHARS characters."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = None if param is None else clip(param)
        self.code = code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(param, message):
    """400 naming the request field `param` (the message starts with it, both clipped to
    MAX_ECHO_CHARS: a client's unknown field may be megabytes long)."""
    return OpenAIError(400, f"{clip(param)}: {message}", param=param)


# The field a coordinator's INVALID_ARGUMENT message starts with ("top_p must be in (0, 1], got
# 7", "stop[0]: stop string of ...", "prompt (9000 tokens) + max_tokens ...").
_LEADING_FIELD = re.compile(r"([a-z_]+)(\[[0-9]+\])?[:\s]")


# How gRPC words a connection the coordinator ended: "Socket closed" when it closed the socket,
# "recvmsg:Connection reset by peer" when the kernel reset it (a killed process with unread data;
# which of the two a client sees depends on timing), "Broken pipe" on a write.
_CONNECTION_LOST = ("Socket closed", "Connection reset by peer", "Broken pipe")


def from_grpc(error):
    """An OpenAIError for a failed gRPC call (grpc.aio.AioRpcError or grpc.RpcError). A 400
    whose message starts with a request field's name (SamplingOptions / GenerateRequest names
    are OpenAI's) gets it as `param`, like the gateway's own checks."""
    from .params import COMMON_FIELDS  # params imports this module

    code = error.code()
    status, type_ = _GRPC_TO_HTTP.get(code, (500, "internal_error"))
    detail = error.details() or code.name
    param = None
    m = _LEADING_FIELD.match(detail)
    if status == 400 and m and (m.group(1) in COMMON_FIELDS or m.group(1) == "prompt"):
        param = m.group(1) + (m.group(2) or "")
    if code == grpc.StatusCode.UNAVAILABLE and any(w in detail for w in _CONNECTION_LOST):
        # What gRPC reports when the coordinator stops (or restarts) with calls in flight, and
        # when it ends a TLS handshake the gateway cannot complete.
        detail += (" (the coordinator stopped or closed the connection; if this gateway never "
                   "reached it, it may use TLS: start the gateway with --tls-ca, and with "
                   "--tls-cert / --tls-key if it requires a client certificate)")
    # The coordinator's 401 carries the code the gateway's own token check answers with.
    code_ = "invalid_api_key" if status == 401 else None
    return OpenAIError(status, f"{detail} (coordinator: {code.name})", type_=type_, param=param,
                       code=code_)
