"""py-router: header-based routing to a named upstream, written in Python.

Config (the `[filters.config.py-router]` table, handed to `init` as JSON):

    [filters.config.py-router]
    header = "x-tenant"                  # request header to route on (default "x-route")
    routes = { beta = "beta-pool", gold = "gold-pool" }  # header value -> upstream name
    default = "main-pool"                # optional: upstream when the value is absent or unknown

A request whose header value is a key of `routes` goes to that upstream (the
host keeps balancing among the upstream's endpoints); otherwise to `default`
if set, else to the route's own upstream. The request gets
`x-sluicegate-route: <upstream>` so the backend can see the decision, and the
response phase echoes it to the client as `x-routed-to`. Counters `routed` and
`unrouted` are exported with the proxy's metrics.

Built with componentize-py (see scripts/build-lang-filters.sh):

    componentize-py -d wit -w filter componentize app -p filters/py-router -o py-router.wasm
"""

import json

from wit_world.exports import Handler as HandlerBase
from wit_world.imports import metrics
from wit_world.imports.types import (
    Capabilities,
    RequestAction_Continue,
    RequestAction_Route,
    RequestHead,
    ResponseAction_Continue,
    ResponseHead,
    BodyAction_Continue,
)
from componentize_py_types import Err

# Upstream names follow the proxy's config rules: ASCII letters, digits, '-', '_', '.'.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_name(what: str, name) -> str:
    if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
        raise Err(f"{what}: {name!r} is not a valid upstream name")
    return name


class Router:
    """The parsed config and the routing decision, kept apart from the WIT glue."""

    def __init__(self, config: dict):
        unknown = set(config) - {"header", "routes", "default"}
        if unknown:
            raise Err(f"unknown config key(s): {', '.join(sorted(unknown))}")
        header = config.get("header", "x-route")
        if not isinstance(header, str) or not header or not set(header.lower()) <= _NAME_CHARS:
            raise Err(f"header: {header!r} is not a header name")
        self.header = header.lower()
        routes = config.get("routes", {})
        if not isinstance(routes, dict) or not routes:
            raise Err("routes: a table of header value -> upstream name is required")
        self.routes = {str(k): _check_name(f"routes.{k}", v) for k, v in routes.items()}
        default = config.get("default")
        self.default = None if default is None else _check_name("default", default)

    def pick(self, value):
        if value is not None:
            upstream = self.routes.get(value.strip())
            if upstream is not None:
                return upstream
        return self.default


# One instance of the filter per wasm instance: `init` runs once, before any
# request, so the config is parsed once and reused by every call.
_router = None


class Handler(HandlerBase):
    def init(self, config: str) -> Capabilities:
        global _router
        try:
            parsed = json.loads(config)
        except ValueError as e:
            raise Err(f"config is not JSON: {e}")
        if not isinstance(parsed, dict):
            raise Err("config must be a table")
        _router = Router(parsed)
        # stdout reaches the proxy's log (info, tagged with the filter name).
        print(f"py-router: routing on {_router.header} over {len(_router.routes)} value(s)")
        return Capabilities(request_phase=True, response_phase=True, request_body=False, response_body=False)

    def on_request(self, req: RequestHead):
        upstream = _router.pick(req.header(_router.header))
        if upstream is None:
            metrics.counter_add("unrouted", 1)
            return RequestAction_Continue()
        req.set_header("x-sluicegate-route", upstream)
        metrics.counter_add("routed", 1)
        return RequestAction_Route(upstream)

    def on_request_body(self, req: RequestHead, body: bytes):
        return BodyAction_Continue()

    def on_response(self, req: RequestHead, resp: ResponseHead):
        upstream = _router.pick(req.header(_router.header))
        if upstream is not None:
            resp.set_header("x-routed-to", upstream)
        return ResponseAction_Continue()

    def on_response_body(self, req: RequestHead, resp: ResponseHead, body: bytes):
        return BodyAction_Continue()
