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


class OpenAIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(param, message):
    """400 naming the request field `param` (the message starts with it)."""
    return OpenAIError(400, f"{param}: {message}", param=param)


# The field a coordinator's INVALID_ARGUMENT message starts with ("top_p must be in (0, 1], got
# 7", "stop[0]: stop string of ...", "prompt (9000 tokens) + max_tokens ...").
_LEADING_FIELD = re.compile(r"([a-z_]+)(\[[0-9]+\])?[:\s]")


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
    if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in detail:
        # What gRPC reports when the server ends the TLS handshake (or a plaintext one).
        detail += (" (the coordinator closed the connection: if it uses TLS, start the gateway "
                   "with --tls-ca; if it requires a client certificate, with --tls-cert / "
                   "--tls-key)")
    # The coordinator's 401 carries the code the gateway's own token check answers with.
    code_ = "invalid_api_key" if status == 401 else None
    return OpenAIError(status, f"{detail} (coordinator: {code.name})", type_=type_, param=param,
                       code=code_)
