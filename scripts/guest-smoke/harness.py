"""A minimal stand-in for the Sluicegate host, in Python (PyPI `wasmtime`).

It implements the imports of wit/filter.wit (types, log, kv, metrics, env)
over plain dicts and calls a component's handler directly, so a filter's
behaviour can be checked without building the Rust host. WASI imports are
defined as traps. Not a model of the host's limits or policies.

Note for wasmtime-py: a borrowed resource handed to a host function must be
lifted (`to_host`) exactly once per call, or the call fails.
"""
import time, random
import wasmtime
from wasmtime import component as c

T = "sluicegate:filter/types@0.1.0"
H = "sluicegate:filter/handler@0.1.0"
REQ_TY, RESP_TY = 1, 2

class Host:
    def __init__(self, path, fuel=None):
        cfg = wasmtime.Config()
        if fuel: cfg.consume_fuel = True
        self.engine = wasmtime.Engine(cfg)
        self.component = c.Component.from_file(self.engine, path)
        self.fuel = fuel
        self.logs, self.counters, self.kv = [], {}, {}
        self.reqs, self.resps = {}, {}
        self.next = 1
        linker = c.Linker(self.engine)
        with linker.root() as root:
            self._define(root)
        linker.define_unknown_imports_as_traps(self.component)
        self.linker = linker
        self.new_instance()

    def _define(self, root):
        with root.add_instance(T) as t:
            t.add_resource("request-head", c.ResourceType.host(REQ_TY), lambda s, rep: None)
            t.add_resource("response-head", c.ResourceType.host(RESP_TY), lambda s, rep: None)
            self._req_methods(t)
            self._resp_methods(t)
        with root.add_instance("sluicegate:filter/log@0.1.0") as i:
            i.add_func("write", lambda s, lvl, msg: self.logs.append((lvl, msg)))
        with root.add_instance("sluicegate:filter/metrics@0.1.0") as i:
            def add(s, name, d): self.counters[name] = self.counters.get(name, 0) + d
            i.add_func("counter-add", add)
        with root.add_instance("sluicegate:filter/env@0.1.0") as i:
            i.add_func("now-ms", lambda s: int(time.time() * 1000))
            i.add_func("monotonic-ns", lambda s: time.monotonic_ns())
            i.add_func("random-u64", lambda s: random.getrandbits(64))
        with root.add_instance("sluicegate:filter/kv@0.1.0") as i:
            i.add_func("get", lambda s, k: self.kv.get(k))
            def kset(s, k, v, ttl): self.kv[k] = bytes(v)
            i.add_func("set", kset)
            i.add_func("delete", lambda s, k: self.kv.pop(k, None) is not None)
            def inc(s, k, d, ttl):
                try: n = int(self.kv.get(k, b"0")) + d
                except ValueError: return "not an integer"
                self.kv[k] = str(n).encode(); return n
            i.add_func("increment", inc)
            def cas(s, k, exp, v, ttl):
                cur = self.kv.get(k)
                if (None if exp is None else bytes(exp)) != cur: return False
                self.kv[k] = bytes(v); return True
            i.add_func("compare-and-swap", cas)

    def new_instance(self):
        self.store = wasmtime.Store(self.engine)
        if self.fuel: self.store.set_fuel(self.fuel)
        self.instance = self.linker.instantiate(self.store, self.component)
        hidx = self.instance.get_export_index(self.store, H)
        self.f = {n: self.instance.get_func(self.store, self.instance.get_export_index(self.store, n, hidx))
                  for n in ["init", "on-request", "on-request-body", "on-response", "on-response-body"]}

    def call(self, name, *args):
        f = self.f[name]
        r = f(self.store, *args)
        f.post_return(self.store)
        return r

    def _hdrs(self, store, obj, kind):
        return self.reqs[obj.to_host(store).rep] if kind == "req" else self.resps[obj.to_host(store).rep]

    def _common(self, t, res, table):
        def g(s, o): return table[o.to_host(s).rep]
        def header(s, o, n):
            for k, v in g(s, o)["headers"]:
                if k == n.lower(): return v
            return None
        t.add_func(f"[method]{res}.header", header)
        t.add_func(f"[method]{res}.header-all", lambda s, o, n: [v for k, v in g(s, o)["headers"] if k == n.lower()])
        def names(s, o):
            out = []
            for k, _ in g(s, o)["headers"]:
                if k not in out: out.append(k)
            return out
        t.add_func(f"[method]{res}.header-names", names)
        def valid(n, v):
            if not n or n != n.lower() or " " in n: return f"invalid header name {n!r}"
            if "\n" in v or len(v) > 65536: return "invalid header value"
            return None
        def set_h(s, o, n, v):
            h = g(s, o)["headers"]
            e = valid(n, v)
            if e: return e
            h[:] = [(k, x) for k, x in h if k != n]; h.append((n, v))
        def app_h(s, o, n, v):
            h = g(s, o)["headers"]
            e = valid(n, v)
            if e: return e
            h.append((n, v))
        def rm_h(s, o, n):
            h = g(s, o)["headers"]; h[:] = [(k, x) for k, x in h if k != n.lower()]
        t.add_func(f"[method]{res}.set-header", set_h)
        t.add_func(f"[method]{res}.append-header", app_h)
        t.add_func(f"[method]{res}.remove-header", rm_h)
        return g

    def _req_methods(self, t):
        g = self._common(t, "request-head", self.reqs)
        for f in ["method", "path", "scheme"]:
            t.add_func(f"[method]request-head.{f}", (lambda f: lambda s, o: g(s, o)[f])(f))
        t.add_func("[method]request-head.authority", lambda s, o: g(s, o)["authority"])
        t.add_func("[method]request-head.client-addr", lambda s, o: g(s, o)["client"])
        def set_path(s, o, p):
            obj = g(s, o)
            if not p.startswith("/"): return "path must start with /"
            obj["path"] = p
        t.add_func("[method]request-head.set-path", set_path)

    def _resp_methods(self, t):
        g = self._common(t, "response-head", self.resps)
        t.add_func("[method]response-head.status", lambda s, o: g(s, o)["status"])
        def set_status(s, o, n):
            obj = g(s, o)
            if not 100 <= n <= 999: return "bad status"
            obj["status"] = n
        t.add_func("[method]response-head.set-status", set_status)

    def request(self, method="GET", path="/", headers=(), authority="example.test", scheme="http", client="10.1.2.3:5555"):
        rep = self.next; self.next += 1
        self.reqs[rep] = dict(method=method, path=path, authority=authority, scheme=scheme, client=client,
                              headers=[(k.lower(), v) for k, v in headers])
        return rep

    def response(self, status=200, headers=()):
        rep = self.next; self.next += 1
        self.resps[rep] = dict(status=status, headers=[(k.lower(), v) for k, v in headers])
        return rep

    def own(self, rep, ty): return c.ResourceHost.own(rep, ty)
    def init(self, config="{}"): return self.call("init", config)
    def on_request(self, rep): return self.call("on-request", self.own(rep, REQ_TY))
    def on_request_body(self, rep, body): return self.call("on-request-body", self.own(rep, REQ_TY), body)
    def on_response(self, rq, rs): return self.call("on-response", self.own(rq, REQ_TY), self.own(rs, RESP_TY))
    def on_response_body(self, rq, rs, body): return self.call("on-response-body", self.own(rq, REQ_TY), self.own(rs, RESP_TY), body)

    def hdr(self, rep, name, table=None):
        t = table or self.reqs
        vals = [v for k, v in t[rep]["headers"] if k == name]
        return vals[0] if vals else None
