"""A Sluicegate filter in Python: copy this folder, rename it, edit.

It sets one request header (from its config) and adds `x-filter: python`
to every response. Config:

    [filters.config.my-filter]
    header = "x-hello"
    value = "world"
"""

import json

from wit_world.exports import Handler as HandlerBase
from wit_world.imports import log
from wit_world.imports.types import (
    BodyAction_Continue,
    Capabilities,
    LogLevel,
    RequestAction_Continue,
    RequestHead,
    ResponseAction_Continue,
    ResponseHead,
)
from componentize_py_types import Err

# Module globals live as long as the wasm instance: the host calls `init`
# once per instance, then reuses the instance for many requests.
settings = {}


class Handler(HandlerBase):
    def init(self, config: str) -> Capabilities:
        global settings
        settings = json.loads(config)
        if not isinstance(settings.get("header", "x-hello"), str):
            # An Err keeps this filter version from going live; the operator
            # sees the message.
            raise Err("header must be a string")
        log.write(LogLevel.INFO, "python filter ready")
        return Capabilities(request_phase=True, response_phase=True, request_body=False, response_body=False)

    def on_request(self, req: RequestHead):
        req.set_header(settings.get("header", "x-hello"), settings.get("value", "world"))
        return RequestAction_Continue()

    def on_request_body(self, req: RequestHead, body: bytes):
        return BodyAction_Continue()

    def on_response(self, req: RequestHead, resp: ResponseHead):
        resp.set_header("x-filter", "python")
        return ResponseAction_Continue()

    def on_response_body(self, req: RequestHead, resp: ResponseHead, body: bytes):
        return BodyAction_Continue()
