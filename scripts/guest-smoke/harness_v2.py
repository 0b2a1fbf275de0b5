"""A minimal stand-in for the Sluicegate host of contract 0.2, in Python
(PyPI `wasmtime`), with the callout world's imports.

It implements wit/v0.2/filter.wit's imports (types: fields, request,
response, exchange; log, kv, metrics, env) and, if asked, `upstream-client`
(calls answered by Python functions standing in for upstreams) and `timer`,
over plain dicts, and calls a component's `handler` and `tick-handler`
directly, so a filter can be checked without building the Rust host. Of
WASI it gives an empty environment, clocks and random; the rest traps. Not a model of the host's limits, grants or
budgets: it only records what the filter asked for.

`Host.imports()` and `Host.exports()` list the component's sluicegate
interfaces (from its type, not from what it happens to call).
"""
import time, random
import wasmtime
from wasmtime import component as c

V = "@0.2.0"
T = "sluicegate:filter/types" + V
H = "sluicegate:filter/handler" + V
TICK = "sluicegate:filter/tick-handler" + V
FIELDS_TY, REQ_TY, RESP_TY, EXCH_TY = 11, 12, 13, 14

_engines = {}


def _record(**fields):
    r = c.Record()
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def call_error(tag, reason=None):
    """A `call-error` for an upstream stand-in to raise: `timeout`,
    `unavailable` (with a reason), ..."""
    return c.Variant(tag, reason)


class CallFailed(Exception):
    """Raised by an upstream stand-in: the call gets this `call-error`."""

    def __init__(self, tag, reason=None):
        super().__init__(tag)
        self.error = call_error(tag, reason)


class Host:
    def __init__(self, path, callouts=True):
        if path not in _engines:
            engine = wasmtime.Engine()
            _engines[path] = (engine, c.Component.from_file(engine, path))
        self.engine, self.component = _engines[path]
        self.logs, self.metrics, self.kv = [], {}, {}
        self.upstreams = {}  # name -> fn(request dict) -> (status, headers, body)
        self.calls = []  # (upstream, request dict) in order
        self.ticks = []  # intervals asked for
        self.fields, self.reqs, self.resps, self.exchanges = {}, {}, {}, {}
        self.next = 1
        linker = c.Linker(self.engine)
        with linker.root() as root:
            self._types(root)
            self._services(root, callouts)
            self._wasi(root)
        linker.define_unknown_imports_as_traps(self.component)
        self.linker = linker
        self.new_instance()

    # ------------------------------------------------------------ imports
    def _new(self, table, value):
        rep = self.next
        self.next += 1
        table[rep] = value
        return rep

    def _types(self, root):
        with root.add_instance(T) as t:
            t.add_resource("fields", c.ResourceType.host(FIELDS_TY), lambda s, rep: self.fields.pop(rep, None))
            t.add_resource("request", c.ResourceType.host(REQ_TY), lambda s, rep: None)
            t.add_resource("response", c.ResourceType.host(RESP_TY), lambda s, rep: None)
            t.add_resource("exchange", c.ResourceType.host(EXCH_TY), lambda s, rep: None)
            self._fields(t)
            self._request(t)
            self._response(t)
            self._exchange(t)

    def _fields(self, t):
        # A fields handle points at the header list of a request or response.
        def h(s, o):
            return self.fields[o.to_host(s).rep]

        def valid(n, v):
            if not n or n != n.lower() or any(ch in n for ch in " :\r\n"):
                return c.Variant("invalid-name")
            if any(b in bytes(v) for b in b"\r\n\0"):
                return c.Variant("invalid-value")
            return None

        def get(s, o, n):
            return next((v for k, v in h(s, o) if k == n.lower()), None)

        def set_(s, o, n, v):
            hs = h(s, o)
            e = valid(n, v)
            if e:
                return e
            hs[:] = [(k, x) for k, x in hs if k != n] + [(n, bytes(v))]

        def append(s, o, n, v):
            hs = h(s, o)
            e = valid(n, v)
            if e:
                return e
            hs.append((n, bytes(v)))

        def remove(s, o, n):
            hs = h(s, o)
            hs[:] = [(k, x) for k, x in hs if k != n.lower()]

        def names(s, o):
            out = []
            for k, _ in h(s, o):
                if k not in out:
                    out.append(k)
            return out

        t.add_func("[method]fields.get", get)
        t.add_func("[method]fields.get-all", lambda s, o, n: [v for k, v in h(s, o) if k == n.lower()])
        t.add_func("[method]fields.has", lambda s, o, n: any(k == n.lower() for k, _ in h(s, o)))
        t.add_func("[method]fields.names", names)
        t.add_func("[method]fields.set", set_)
        t.add_func("[method]fields.append", append)
        t.add_func("[method]fields.remove", remove)

    def _request(self, t):
        def g(s, o):
            return self.reqs[o.to_host(s).rep]

        for f in ["method", "path", "scheme", "authority"]:
            t.add_func(f"[method]request.{f}", (lambda f: lambda s, o: g(s, o)[f])(f))

        def setter(f, check):
            def set_(s, o, v):
                r = g(s, o)
                if not check(v):
                    return c.Variant("invalid-value")
                r[f] = v
            return set_

        t.add_func("[method]request.set-method", setter("method", lambda v: v.isalpha()))
        t.add_func("[method]request.set-path", setter("path", lambda v: v.startswith("/")))
        t.add_func("[method]request.set-authority", setter("authority", lambda v: bool(v)))
        t.add_func("[method]request.headers",
                   lambda s, o: c.ResourceHost.own(self._new(self.fields, g(s, o)["headers"]), FIELDS_TY))

    def _response(self, t):
        def g(s, o):
            return self.resps[o.to_host(s).rep]

        t.add_func("[method]response.status", lambda s, o: g(s, o)["status"])

        def set_status(s, o, n):
            r = g(s, o)
            if not 100 <= n <= 999:
                return c.Variant("invalid-value")
            r["status"] = n

        t.add_func("[method]response.set-status", set_status)
        t.add_func("[method]response.headers",
                   lambda s, o: c.ResourceHost.own(self._new(self.fields, g(s, o)["headers"]), FIELDS_TY))

    def _exchange(self, t):
        def g(s, o):
            return self.exchanges[o.to_host(s).rep]

        t.add_func("[method]exchange.request-id", lambda s, o: g(s, o)["id"])
        t.add_func("[method]exchange.get-local", lambda s, o, k: g(s, o)["locals"].get(k))

        def set_local(s, o, k, v):
            g(s, o)["locals"][k] = bytes(v)

        t.add_func("[method]exchange.set-local", set_local)

        def info(s, o):
            x = g(s, o)
            return _record(**{"route": "r", "upstream": "app", "protocol": "HTTP/1.1",
                              "client-ip": x["client_ip"], "client-port": 40000,
                              "tls-sni": None, "tls-alpn": None, "start-ms": int(time.time() * 1000)})

        t.add_func("[method]exchange.request-info", info)
        t.add_func("[method]exchange.upstream-info", lambda s, o: None)

        def defer(s, o, edit):
            g(s, o)["deferred"].append((edit.tag, edit.payload))

        t.add_func("[method]exchange.defer-response-header", defer)

    def _services(self, root, callouts):
        with root.add_instance("sluicegate:filter/log" + V) as i:
            i.add_func("write", lambda s, lvl, msg: self.logs.append((lvl, msg)))
        with root.add_instance("sluicegate:filter/metrics" + V) as i:
            def add(s, name, labels, d):
                key = (name, tuple(sorted(tuple(x) for x in labels)))
                self.metrics[key] = self.metrics.get(key, 0) + d
            i.add_func("counter-add", add)
            i.add_func("gauge-set", lambda s, n, l, v: None)
            i.add_func("gauge-add", lambda s, n, l, v: None)
            i.add_func("histogram-record", lambda s, n, l, v: None)
        with root.add_instance("sluicegate:filter/env" + V) as i:
            i.add_func("now-ms", lambda s: int(time.time() * 1000))
            i.add_func("monotonic-ns", lambda s: time.monotonic_ns())
            i.add_func("random-u64", lambda s: random.getrandbits(64))
        with root.add_instance("sluicegate:filter/kv" + V) as i:
            i.add_func("get", lambda s, k: self.kv.get(k))

            def kset(s, k, v, ttl):
                self.kv[k] = bytes(v)
                self.kv_ttl = getattr(self, "kv_ttl", {})
                self.kv_ttl[k] = ttl

            i.add_func("set", kset)
            i.add_func("delete", lambda s, k: self.kv.pop(k, None) is not None)

            def inc(s, k, d, ttl):
                try:
                    n = int(self.kv.get(k, b"0")) + d
                except ValueError:
                    return "not an integer"
                self.kv[k] = str(n).encode()
                return n

            i.add_func("increment", inc)

            def cas(s, k, exp, v, ttl):
                if (None if exp is None else bytes(exp)) != self.kv.get(k):
                    return False
                self.kv[k] = bytes(v)
                return True

            i.add_func("compare-and-swap", cas)
        if not callouts:
            return
        with root.add_instance("sluicegate:filter/upstream-client" + V) as i:
            i.add_func("call", self._call)
        with root.add_instance("sluicegate:filter/timer" + V) as i:
            def tick(s, ms):
                if ms < 100:
                    return "interval below 100 ms"
                self.ticks.append(ms)
            i.add_func("request-tick", tick)

    def _wasi(self, root):
        # The little of WASI an interpreter's runtime calls outside of what
        # a filter does (componentize-py reads its environment at start);
        # an empty environment, as the host gives. Everything else traps.
        imports = self.component.type.imports(self.engine)
        for name in imports:
            if name.startswith("wasi:cli/environment@"):
                with root.add_instance(name) as i:
                    i.add_func("get-environment", lambda s: [])
                    i.add_func("get-arguments", lambda s: [])
                    i.add_func("initial-cwd", lambda s: None)
            elif name.startswith("wasi:random/random@"):
                with root.add_instance(name) as i:
                    i.add_func("get-random-bytes", lambda s, n: bytes(random.getrandbits(8) for _ in range(n)))
                    i.add_func("get-random-u64", lambda s: random.getrandbits(64))
            elif name.startswith("wasi:clocks/monotonic-clock@"):
                with root.add_instance(name) as i:
                    i.add_func("now", lambda s: time.monotonic_ns())
                    i.add_func("resolution", lambda s: 1)
            elif name.startswith("wasi:clocks/wall-clock@"):
                with root.add_instance(name) as i:
                    def now(s):
                        t = time.time_ns()
                        return _record(seconds=t // 10**9, nanoseconds=t % 10**9)
                    i.add_func("now", now)
                    i.add_func("resolution", lambda s: _record(seconds=0, nanoseconds=1))

    def _call(self, s, upstream, req):
        r = {"method": req.method, "path": req.path,
             "headers": [(k, bytes(v)) for k, v in req.headers],
             "body": bytes(req.body), "timeout_ms": getattr(req, "timeout-ms")}
        self.calls.append((upstream, r))
        fn = self.upstreams.get(upstream)
        if fn is None:
            return call_error("unknown-upstream")
        try:
            status, headers, body = fn(r)
        except CallFailed as e:
            return e.error
        return _record(status=status, headers=[(k, bytes(v)) for k, v in headers], body=bytes(body))

    # ------------------------------------------------------------ calls
    def new_instance(self):
        self.store = wasmtime.Store(self.engine)
        self.instance = self.linker.instantiate(self.store, self.component)
        hidx = self.instance.get_export_index(self.store, H)
        names = ["init", "on-request", "on-request-body", "on-request-chunk", "on-response",
                 "on-response-body", "on-response-chunk", "on-log"]
        self.f = {n: self.instance.get_func(self.store, self.instance.get_export_index(self.store, n, hidx))
                  for n in names}
        tidx = self.instance.get_export_index(self.store, TICK)
        if tidx is not None:
            self.f["on-tick"] = self.instance.get_func(
                self.store, self.instance.get_export_index(self.store, "on-tick", tidx))

    def exports_tick(self):
        return "on-tick" in self.f

    def imports(self):
        return [k for k in self.component.type.imports(self.engine) if k.startswith("sluicegate:")]

    def exports(self):
        return [k for k in self.component.type.exports(self.engine) if k.startswith("sluicegate:")]

    def call(self, name, *args):
        f = self.f[name]
        r = f(self.store, *args)
        f.post_return(self.store)
        return r

    def init(self, config="{}"):
        return self.call("init", config)

    def tick(self):
        return self.call("on-tick")

    def request(self, method="GET", path="/", headers=(), authority="example.test", client_ip="10.1.2.3",
                request_id="rid-1"):
        """A request and its exchange: (exchange rep, request rep)."""
        rq = self._new(self.reqs, dict(method=method, path=path, authority=authority, scheme="http",
                                       headers=[(k.lower(), v.encode() if isinstance(v, str) else v)
                                                for k, v in headers]))
        x = self._new(self.exchanges, dict(id=request_id, locals={}, deferred=[], client_ip=client_ip))
        return x, rq

    def on_request(self, xr):
        x, rq = xr
        return self.call("on-request", c.ResourceHost.own(x, EXCH_TY), c.ResourceHost.own(rq, REQ_TY))

    def hdr(self, xr, name):
        vals = [v for k, v in self.reqs[xr[1]]["headers"] if k == name]
        return vals[0].decode() if vals else None

    def hdr_all(self, xr, name):
        return [v.decode() for k, v in self.reqs[xr[1]]["headers"] if k == name]

    def deferred(self, xr):
        return self.exchanges[xr[0]]["deferred"]

    def metric(self, name, **labels):
        want = tuple(sorted(labels.items()))
        return sum(v for (n, ls), v in self.metrics.items() if n == name and all(x in ls for x in want))
