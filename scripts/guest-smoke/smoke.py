#!/usr/bin/env python3
"""Smoke-tests the built filter components (target/filters/*.wasm) against
the Python stand-in host in harness.py. Needs `pip install wasmtime` (>= 40,
for the component API) and scripts/build-filters.sh to have run.

    python3 scripts/guest-smoke/smoke.py
"""
import base64, hashlib, hmac, json, os, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Host  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F = os.path.join(ROOT, "target", "filters")
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def host(name, config="{}"):
    h = Host(os.path.join(F, name + ".wasm"))
    caps = h.init(config)
    return h, caps


def caps_of(c):
    return tuple(getattr(c, k) for k in ("request-phase", "response-phase", "request-body", "response-body"))


def probe():
    h, caps = host("probe")
    check("probe caps", caps_of(caps) == (True, True, False, False))
    r = h.request("POST", "/a?b=1", headers=[
        ("accept", "x"), ("x-probe-set-path", "/new"), ("x-probe-remove", "accept"),
        ("x-probe-append", "x-multi=two"), ("x-multi", "one"), ("x-probe-all", "x-multi"),
        ("x-probe-kv", "k1"), ("x-probe-time", "")])
    check("probe continue", h.on_request(r) is None)
    g = lambda n: h.hdr(r, n)
    check("probe method", g("x-probe-method") == "POST")
    check("probe path", g("x-probe-path") == "/a?b=1" and h.reqs[r]["path"] == "/new")
    check("probe authority", g("x-probe-authority") == "example.test")
    check("probe client", g("x-probe-client") == "10.1.2.3:5555")
    check("probe names", g("x-probe-names").split(",")[0] == "accept")
    check("probe remove", g("accept") is None)
    check("probe all", g("x-probe-all-values") == "one|two", g("x-probe-all-values"))
    check("probe kv", g("x-probe-count") == "1" and g("x-probe-kv-ok") == "true")
    check("probe time", g("x-probe-now-ms").isdigit() and g("x-probe-random").isdigit())
    check("probe log", h.logs == [("info", "probe saw /a?b=1")] and h.counters == {"requests": 1})
    r = h.request(headers=[("x-probe-kv", "k1"), ("x-probe-action", "respond"), ("x-probe-status", "418")])
    a = h.on_request(r)
    check("probe respond", a.status == 418 and a.body == b"local response from probe\n"
          and a.headers == [("x-probe-local", "yes"), ("content-type", "text/plain")])
    check("probe count 2", h.hdr(r, "x-probe-count") == "2")
    r = h.request(authority=None, headers=[("x-probe-action", "route=blue"), ("x-probe-set-path", "nope")])
    check("probe route", h.on_request(r) == "blue")
    check("probe no authority", h.hdr(r, "x-probe-authority") == "")
    check("probe error", (h.hdr(r, "x-probe-error") or "").startswith("set-path: "))
    r = h.request(headers=[("x-probe-resp-status", "201"), ("x-probe-resp-remove", "server")])
    s = h.response(502, headers=[("server", "x")])
    check("probe on-response", h.on_response(r, s) is None and h.resps[s] == {
        "status": 201, "headers": [("x-probe-response", "1"), ("x-probe-status-seen", "502")]})
    r = h.request(headers=[("x-probe-resp-action", "respond")])
    a = h.on_response(r, h.response())
    check("probe resp respond", a.status == 200 and a.body == b"replaced by probe\n")
    h, caps = host("probe", '{"bodies": true}')
    check("probe body caps", caps_of(caps) == (True, True, True, True))
    r = h.request(headers=[("x-probe-body", "upper"), ("x-probe-resp-body", "upper")])
    check("probe bodies", h.on_request_body(r, b"hi") == b"HI" and h.on_response_body(r, h.response(), b"yo") == b"YO")
    r = h.request(headers=[("x-probe-body", "reject")])
    a = h.on_request_body(r, b"x")
    check("probe reject", a.status == 413 and a.body == b"rejected by probe\n")
    r = h.request()
    check("probe body continue", h.on_request_body(r, b"x") is None and h.on_response_body(r, h.response(), b"x") is None)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(payload, secret=b"s3cret"):
    h = b64(b'{"alg":"HS256","typ":"JWT"}')
    p = b64(json.dumps(payload).encode())
    return f"{h}.{p}." + b64(hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest())


def auth():
    h, _ = host("auth", '{"api_keys": ["k1"], "jwt_hs256_secret": "s3cret", "jwt_issuer": "me"}')
    now = int(time.time())
    r = h.request(headers=[("x-api-key", "k1"), ("x-auth-subject", "spoof")])
    check("auth key", h.on_request(r) is None and h.hdr(r, "x-auth-subject") == "api-key" and h.hdr(r, "x-api-key") is None)
    r = h.request(headers=[("authorization", "Bearer " + jwt({"sub": "alice", "exp": now + 60, "iss": "me"}))])
    check("auth jwt", h.on_request(r) is None and h.hdr(r, "x-auth-subject") == "alice")
    for name, hdrs, reason in [
        ("none", [], b"missing credentials"), ("bad key", [("x-api-key", "no")], b"invalid api key"),
        ("expired", [("authorization", "Bearer " + jwt({"exp": now - 1, "iss": "me"}))], b"token expired"),
        ("issuer", [("authorization", "Bearer " + jwt({"exp": now + 60}))], b"wrong token issuer"),
        ("sig", [("authorization", "Bearer " + jwt({"exp": now + 60, "iss": "me"}, b"x"))], b"bad token signature")]:
        a = h.on_request(h.request(headers=hdrs))
        check(f"auth 401 {name}", a is not None and a.status == 401 and reason in a.body
              and any(k == "www-authenticate" for k, _ in a.headers))
    check("auth bad config", isinstance(Host(os.path.join(F, "auth.wasm")).init("{}"), str))


def rate_limit():
    h, caps = host("rate-limit", '{"requests": 2, "window_ms": 60000}')
    check("rl caps", caps_of(caps) == (True, False, False, False))
    acts = [h.on_request(h.request(client="[::1]:4000")) for _ in range(3)]
    check("rl allow", acts[0] is None and acts[1] is None)
    a = acts[2]
    hd = dict(a.headers) if a else {}
    check("rl 429", a is not None and a.status == 429 and int(hd["retry-after"]) >= 1
          and hd["x-ratelimit-limit"] == "2" and hd["x-ratelimit-remaining"] == "0")
    check("rl other client", h.on_request(h.request(client="10.0.0.9:1")) is None)


def canary():
    h, _ = host("canary", '{"weight_percent": 0, "upstream": "green"}')
    r = h.request(headers=[("x-canary", "1")])
    check("canary forced", h.on_request(r) == "green" and h.hdr(r, "x-canary") == "routed")
    check("canary cookie", h.on_request(h.request(headers=[("cookie", "a=b; canary=1")])) == "green")
    check("canary weight 0", h.on_request(h.request()) is None)
    h, _ = host("canary", '{"weight_percent": 100}')
    check("canary weight 100", h.on_request(h.request()) == "canary")
    check("canary forced off", h.on_request(h.request(headers=[("x-canary", "0")])) is None)


def security_headers():
    h, caps = host("security-headers", '{"cors_allow_origins": ["https://a.example"]}')
    check("sh caps", caps_of(caps) == (True, True, False, False))
    r = h.request("OPTIONS", headers=[("origin", "https://a.example"), ("access-control-request-method", "PUT")])
    a = h.on_request(r)
    check("sh preflight", a is not None and a.status == 204
          and dict(a.headers).get("access-control-allow-origin") == "https://a.example")
    r = h.request(headers=[("origin", "https://a.example")])
    s = h.response(headers=[("vary", "accept-encoding")])
    h.on_response(r, s)
    hd = h.resps[s]["headers"]
    check("sh headers", ("x-content-type-options", "nosniff") in hd and ("x-frame-options", "DENY") in hd
          and ("strict-transport-security", "max-age=31536000") in hd)
    check("sh cors", ("access-control-allow-origin", "https://a.example") in hd and ("vary", "origin") in hd)
    r = h.request(headers=[("origin", "https://evil.example")])
    s = h.response()
    h.on_response(r, s)
    check("sh evil", all(k != "access-control-allow-origin" for k, _ in h.resps[s]["headers"]))


def fixtures():
    check("bad-init", Host(os.path.join(F, "bad-init.wasm")).init("{}").startswith("bad-init refuses to start: "))
    for name, kw in (("hostile-trap", {}), ("hostile-loop", {"fuel": 10**8})):
        h = Host(os.path.join(F, name + ".wasm"), **kw)
        h.init("{}")
        try:
            h.on_request(h.request())
            check(name, False, "did not trap")
        except Exception:
            check(name, True)
    h = Host(os.path.join(F, "hostile-memory.wasm"))
    h.init("{}")
    h.store.set_limits(memory_size=64 << 20)
    try:
        h.on_request(h.request())
        check("hostile-memory", False, "did not stop")
    except Exception:
        check("hostile-memory", True)
    h, _ = host("hostile-huge-header")
    r = h.request()
    check("hostile-huge-header", h.on_request(r) is None and len(h.reqs[r]["headers"]) >= 10_000)
    h, caps = host("add-header", '{"request_headers": {"x-a": "1"}}')
    r = h.request(headers=[("x-a", "old")])
    h.on_request(r)
    check("add-header", caps_of(caps) == (True, False, False, False) and h.reqs[r]["headers"] == [("x-a", "1")])


for t in (probe, auth, rate_limit, canary, security_headers, fixtures):
    t()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
