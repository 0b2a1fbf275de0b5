"""py-quota: asks a quota service about each request, written in Python.

A callout example (contract 0.2, world `callout-filter`: the folder's WORLD
file says so to scripts/build-lang-filters.sh). componentize-py imports the
whole world, so this component imports `upstream-client` and needs a grant:

    [[upstream]]
    name = "quota"
    endpoints = ["127.0.0.1:9003"]

    [filters.policy.py-quota]
    callouts = ["quota"]

    [filters.config.py-quota]            # every key optional
    upstream = "quota"                   # the quota service's upstream
    path = "/quota"                      # the check's path
    key_header = "x-api-key"             # the client's key; its IP when absent
    on_unavailable = "allow"             # or "deny" (503)
    timeout_ms = 200                     # default: the policy's callout_timeout_ms

For each request the filter sends `GET <path>?key=<key>` (the key
URL-encoded) to the service. A 2xx answer lets the request through; a 429
is passed on to the client with the service's `retry-after` and body, and
the upstream is not asked. Any other answer, or no answer, follows
`on_unavailable`. The service's `x-ratelimit-remaining`, if any, is copied
onto the response (a deferred edit: no response phase). Counter
`quota_decisions_total{result="allow|limited|error"}`.

Built with componentize-py (see scripts/build-lang-filters.sh):

    componentize-py -d wit/v0.2 -w callout-filter componentize app -p filters/py-quota -o py-quota.wasm
"""

import json
from urllib.parse import quote

from wit_world.exports import Handler as HandlerBase
from wit_world.exports import TickHandler as TickHandlerBase
from wit_world.imports import log, metrics, upstream_client
from wit_world.imports.types import (
    BodyAction_Continue,
    ChunkAction_Continue,
    HeaderEdit_Set,
    LocalResponse,
    LogLevel,
    Phases,
    RequestAction_Continue,
    RequestAction_Respond,
    ResponseAction_Continue,
)
from componentize_py_types import Err

_KEYS = {"upstream", "path", "key_header", "on_unavailable", "timeout_ms"}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_TOKEN_CHARS = _NAME_CHARS | set("!#$%&'*+^`|~")


class Quota:
    """The parsed config and the decision, kept apart from the WIT glue."""

    def __init__(self, config: dict):
        unknown = set(config) - _KEYS
        if unknown:
            raise Err(f"unknown config key(s): {', '.join(sorted(unknown))}")
        self.upstream = config.get("upstream", "quota")
        if not isinstance(self.upstream, str) or not self.upstream or not set(self.upstream) <= _NAME_CHARS:
            raise Err(f"upstream: {self.upstream!r} is not an upstream name")
        self.path = config.get("path", "/quota")
        if not isinstance(self.path, str) or not self.path.startswith("/") or "?" in self.path \
                or any(c.isspace() or ord(c) < 32 for c in self.path):
            raise Err(f"path: {self.path!r} must start with '/' and have no query or spaces")
        key_header = config.get("key_header", "x-api-key")
        if not isinstance(key_header, str) or not key_header or not set(key_header) <= _TOKEN_CHARS:
            raise Err(f"key_header: {key_header!r} is not a header name")
        self.key_header = key_header.lower()
        on_unavailable = config.get("on_unavailable", "allow")
        if on_unavailable not in ("allow", "deny"):
            raise Err(f"on_unavailable: {on_unavailable!r} is not \"allow\" or \"deny\"")
        self.deny_when_unavailable = on_unavailable == "deny"
        timeout = config.get("timeout_ms")
        if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)
                                    or not 1 <= timeout <= 0xFFFFFFFF):
            raise Err(f"timeout_ms: {timeout!r} is not a positive integer")
        self.timeout_ms = timeout

    def check_request(self, key: str) -> upstream_client.OutgoingRequest:
        return upstream_client.OutgoingRequest(
            method="GET",
            path=f"{self.path}?key={quote(key, safe='')}",
            headers=[("accept", b"application/json")],
            body=b"",
            timeout_ms=self.timeout_ms,
        )


def _header(headers, name: str):
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _count(result: str):
    metrics.counter_add("quota_decisions_total", [("result", result)], 1)


# Set by `init`, before any request reaches this instance.
_quota = None


class Handler(HandlerBase):
    def init(self, config: str) -> Phases:
        global _quota
        try:
            parsed = json.loads(config) if config.strip() else {}
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        if not isinstance(parsed, dict):
            raise Err("config must be a table")
        _quota = Quota(parsed)
        return Phases.REQUEST

    def on_request(self, cx, req):
        with req.headers() as headers:
            value = headers.get(_quota.key_header)
        key = value.decode("utf-8", "replace") if value else cx.request_info().client_ip
        try:
            resp = upstream_client.call(_quota.upstream, _quota.check_request(key))
        except Err as e:
            return self._unavailable(f"call to {_quota.upstream!r} failed: {e.value}")
        if 200 <= resp.status < 300:
            _count("allow")
            remaining = _header(resp.headers, "x-ratelimit-remaining")
            if remaining is not None:
                cx.defer_response_header(HeaderEdit_Set(("x-ratelimit-remaining", remaining)))
            return RequestAction_Continue()
        if resp.status == 429:
            _count("limited")
            headers = [("content-type", _header(resp.headers, "content-type") or b"text/plain; charset=utf-8")]
            retry_after = _header(resp.headers, "retry-after")
            if retry_after is not None:
                headers.append(("retry-after", retry_after))
            body = resp.body or b"quota exceeded\n"
            return RequestAction_Respond(LocalResponse(status=429, headers=headers, body=body))
        return self._unavailable(f"quota service answered {resp.status}")

    def _unavailable(self, why: str):
        _count("error")
        log.write(LogLevel.WARN, f"py-quota: no decision: {why}")
        if _quota.deny_when_unavailable:
            return RequestAction_Respond(LocalResponse(
                status=503,
                headers=[("content-type", b"text/plain; charset=utf-8")],
                body=b"quota service unavailable\n",
            ))
        return RequestAction_Continue()

    # The phases below are never called (init asks for the request phase
    # only), but the world exports them.
    def on_request_body(self, cx, req, body):
        return BodyAction_Continue()

    def on_request_chunk(self, cx, chunk, end):
        return ChunkAction_Continue()

    def on_response(self, cx, req, resp):
        return ResponseAction_Continue()

    def on_response_body(self, cx, req, resp, body):
        return BodyAction_Continue()

    def on_response_chunk(self, cx, chunk, end):
        return ChunkAction_Continue()

    def on_log(self, cx, entry):
        pass


class TickHandler(TickHandlerBase):
    # No tick asked for in init: the host never calls this.
    def on_tick(self) -> None:
        pass
