#!/usr/bin/env python3
"""Smoke-tests the callout example filters (ext-authz, jwks-auth, py-quota)
and checks that plain 0.2 filters neither import `upstream-client` nor
export `tick-handler`, against the Python stand-in host in harness_v2.py.
Needs `pip install wasmtime` (>= 40), `openssl` on PATH (jwks-auth's keys
and tokens), and the components built (scripts/build-filters.sh, and
scripts/build-lang-filters.sh py-quota).

    python3 scripts/guest-smoke/callout_smoke.py [ext-authz jwks-auth py-quota plain]
"""
import base64, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness_v2 import CallFailed, Host  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F = os.path.join(ROOT, "target", "filters")
FIXTURES = os.path.join(ROOT, "target", "test-filters")
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def status(action):
    """The status of a `respond` action, None for `continue`."""
    return None if action is None else action.status


def header(action, name):
    return next((bytes(v).decode() for k, v in action.headers if k == name), None)


# ------------------------------------------------------------------ plain
def plain():
    client = "sluicegate:filter/upstream-client@0.2.0"
    tick = "sluicegate:filter/tick-handler@0.2.0"
    for path in [os.path.join(F, "add-header-v2.wasm"), os.path.join(FIXTURES, "v2-probe.wasm")]:
        name = os.path.basename(path)
        h = Host(path, callouts=False)
        check(f"{name} imports no upstream-client", client not in h.imports(), repr(h.imports()))
        check(f"{name} exports no tick-handler", tick not in h.exports() and not h.exports_tick(), repr(h.exports()))
    # The callout filters do (ext-authz calls but asks for no tick: no timer).
    for name, timer in [("ext-authz", False), ("jwks-auth", True)]:
        h = Host(os.path.join(F, f"{name}.wasm"))
        check(f"{name} imports upstream-client", client in h.imports(), repr(h.imports()))
        check(f"{name} timer import", ("sluicegate:filter/timer@0.2.0" in h.imports()) == timer, repr(h.imports()))
        check(f"{name} exports tick-handler", tick in h.exports())


# ------------------------------------------------------------------ ext-authz
def auth_service(r):
    auth = dict(r["headers"]).get("authorization", b"").decode()
    if auth == "Bearer good":
        return 200, [("X-Auth-User", b"alice"), ("x-other", b"no")], b""
    if auth == "Bearer forbidden":
        return 403, [("content-type", b"text/plain")], b"forbidden by policy\n"
    if auth == "Bearer boom":
        return 500, [], b""
    if auth == "Bearer slow":
        raise CallFailed("timeout")
    return 401, [("www-authenticate", b'Bearer realm="t"')], b"who?\n"


def ext_authz():
    h = Host(os.path.join(F, "ext-authz.wasm"))
    check("ext-authz exports tick-handler", h.exports_tick())
    h.upstreams["authz"] = auth_service
    phases = h.init('{"timeout_ms": 150}')
    check("ext-authz phases", phases == {"request"}, repr(phases))
    x = h.request("POST", "/api/x?y=1", headers=[("authorization", "Bearer good"), ("x-auth-user", "mallory"),
                                                   ("cookie", "a=1"), ("cookie", "b=2")], request_id="rid-9")
    check("ext-authz allow", h.on_request(x) is None)
    check("ext-authz identity", h.hdr_all(x, "x-auth-user") == ["alice"], h.hdr_all(x, "x-auth-user"))
    up, call = h.calls[0]
    hd = [(k, v.decode()) for k, v in call["headers"]]
    check("ext-authz call", up == "authz" and call["method"] == "GET" and call["path"] == "/check"
          and call["timeout_ms"] == 150, repr(call))
    check("ext-authz call headers", ("x-original-method", "POST") in hd and ("x-original-uri", "/api/x?y=1") in hd
          and ("x-request-id", "rid-9") in hd and ("authorization", "Bearer good") in hd
          and [v for k, v in hd if k == "cookie"] == ["a=1", "b=2"], repr(hd))
    # Cached: the same identity again asks nobody (cookies are part of the key).
    x = h.request(headers=[("authorization", "Bearer good"), ("cookie", "a=1"), ("cookie", "b=2")])
    check("ext-authz cached allow", h.on_request(x) is None and len(h.calls) == 1 and h.hdr(x, "x-auth-user") == "alice")
    key = next(iter(h.kv))
    check("ext-authz cache ttl", h.kv_ttl[key] == 5000 and key.startswith("authz:"), repr(h.kv_ttl))
    a = h.on_request(h.request(headers=[("authorization", "Bearer nope")]))
    check("ext-authz 401", status(a) == 401 and header(a, "www-authenticate") == 'Bearer realm="t"'
          and bytes(a.body) == b"who?\n", repr(a and a.__dict__))
    for _ in range(2):
        a = h.on_request(h.request(headers=[("authorization", "Bearer forbidden")]))
        check("ext-authz 403", status(a) == 403 and bytes(a.body) == b"forbidden by policy\n"
              and header(a, "content-type") == "text/plain")
    check("ext-authz deny cached", len(h.calls) == 3, len(h.calls))
    for tok in ["Bearer boom", "Bearer slow", "Bearer boom"]:
        a = h.on_request(h.request(headers=[("authorization", tok)]))
        check(f"ext-authz unavailable {tok}", status(a) == 503)
    check("ext-authz unavailable not cached", len(h.calls) == 6, len(h.calls))
    check("ext-authz metrics", h.metric("ext_authz_decisions_total", result="allow", cached="true") == 1
          and h.metric("ext_authz_decisions_total", result="deny", cached="true") == 1
          and h.metric("ext_authz_decisions_total", result="deny", cached="false") == 2
          and h.metric("ext_authz_decisions_total", result="error") == 3, repr(h.metrics))
    # Fail open, no cache, the service unknown.
    h = Host(os.path.join(F, "ext-authz.wasm"))
    h.init('{"on_unavailable": "allow", "cache_ttl_ms": 0, "upstream": "gone"}')
    x = h.request(headers=[("authorization", "Bearer good"), ("x-auth-user", "mallory")])
    check("ext-authz fail open", h.on_request(x) is None and h.hdr(x, "x-auth-user") is None)
    check("ext-authz no cache", h.kv == {})
    err = h.init('{"on_unavailable": "maybe"}')
    check("ext-authz bad config", isinstance(err, str) and "on_unavailable" in err, repr(err))


# ------------------------------------------------------------------ jwks-auth
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Key:
    """A key made by openssl: RSA 2048 (RS256) or P-256 (ES256)."""

    def __init__(self, kind, kid):
        self.dir = tempfile.mkdtemp(prefix="sg-smoke-")
        self.kind, self.kid = kind, kid
        opt = "rsa_keygen_bits:2048" if kind == "RSA" else "ec_paramgen_curve:P-256"
        self.ssl("genpkey", "-algorithm", "RSA" if kind == "RSA" else "EC", "-pkeyopt", opt, "-out", "k.pem")

    def ssl(self, *args, data=None):
        return subprocess.run(["openssl", *args], cwd=self.dir, input=data, capture_output=True, check=True).stdout

    def jwk(self):
        if self.kind == "RSA":
            n = bytes.fromhex(self.ssl("rsa", "-in", "k.pem", "-noout", "-modulus").decode().strip().split("=")[1])
            return {"kty": "RSA", "kid": self.kid, "n": b64(n), "e": "AQAB"}
        point = self.ssl("pkey", "-in", "k.pem", "-pubout", "-outform", "DER")[-64:]
        return {"kty": "EC", "crv": "P-256", "kid": self.kid, "x": b64(point[:32]), "y": b64(point[32:])}

    def sign(self, claims, alg=None):
        alg = alg or ("RS256" if self.kind == "RSA" else "ES256")
        head = {"alg": alg, "kid": self.kid, "typ": "JWT"}
        inp = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
        sig = self.ssl("dgst", "-sha256", "-sign", "k.pem", data=inp.encode())
        if self.kind == "EC":  # DER SEQUENCE { INTEGER r, INTEGER s } -> r || s
            at, out = 2, b""
            for _ in range(2):
                n = sig[at + 1]
                out += sig[at + 2:at + 2 + n][-32:].rjust(32, b"\0")
                at += 2 + n
            sig = out
        return f"{inp}.{b64(sig)}"


def jwks_auth():
    rsa, ec, new = Key("RSA", "r1"), Key("EC", "e1"), Key("EC", "e2")
    doc = {"keys": [rsa.jwk(), ec.jwk()]}
    fetches = []

    def idp(r):
        fetches.append(r["path"])
        if r["path"] != "/.well-known/jwks.json":
            return 404, [], b""
        return 200, [("content-type", b"application/json")], json.dumps(doc).encode()

    h = Host(os.path.join(F, "jwks-auth.wasm"))
    h.upstreams["idp"] = idp
    phases = h.init('{"jwks_upstream": "idp", "refresh_ms": 250, "issuer": "https://idp.test", "audience": "api"}')
    check("jwks phases and tick", phases == {"request"} and h.ticks == [250], repr((phases, h.ticks)))
    now = int(time.time())
    claims = {"sub": "alice", "iss": "https://idp.test", "aud": "api", "exp": now + 600}

    def req(token, **kw):
        hs = [("x-jwt-sub", "mallory")] + ([("authorization", f"Bearer {token}")] if token else [])
        x = h.request(headers=hs)
        return x, h.on_request(x)

    x, a = req(rsa.sign(claims))
    check("jwks RS256 valid (fetched on request)", a is None and h.hdr_all(x, "x-jwt-sub") == ["alice"]
          and len(fetches) == 1, repr((a and a.__dict__, fetches)))
    x, a = req(ec.sign(dict(claims, sub="bob")))
    check("jwks ES256 valid (from KV)", a is None and h.hdr(x, "x-jwt-sub") == "bob" and len(fetches) == 1)
    x, a = req(None)
    check("jwks no token", status(a) == 401 and header(a, "www-authenticate") == 'Bearer error="invalid_token"')
    for what, tok in [
        ("expired", rsa.sign(dict(claims, exp=now - 60))),
        ("wrong aud", ec.sign(dict(claims, aud="other"))),
        ("wrong iss", rsa.sign(dict(claims, iss="x"))),
        ("alg none", b64(b'{"alg":"none"}') + "." + b64(json.dumps(claims).encode()) + "."),
        ("alg/key mismatch", rsa.sign(claims, alg="ES256")),
        ("unknown kid", new.sign(claims)),
        ("bad signature", rsa.sign(claims)[:-6] + "AAAAAA"),
    ]:
        x, a = req(tok)
        check(f"jwks {what}", status(a) == 401 and h.hdr(x, "x-jwt-sub") is None, repr(a and a.__dict__))
    # Rotation: a tick stores the new document; every instance reads KV.
    doc["keys"] = [new.jwk()]
    h.tick()
    x, a = req(new.sign(claims))
    check("jwks rotated key", a is None and len(fetches) == 2, repr((a and a.__dict__, fetches)))
    x, a = req(rsa.sign(claims))
    check("jwks retired key", status(a) == 401)
    # A failed refresh keeps the keys.
    h.upstreams["idp"] = lambda r: (_ for _ in ()).throw(CallFailed("unavailable", "refused"))
    h.tick()
    x, a = req(new.sign(claims))
    check("jwks keeps keys", a is None)
    check("jwks metrics", h.metric("jwks_refresh_total", result="ok") == 1
          and h.metric("jwks_refresh_total", result="error") == 1
          and h.metric("jwt_requests_total", result="valid") == 4, repr(h.metrics))
    # No keys at all: 503.
    h2 = Host(os.path.join(F, "jwks-auth.wasm"))
    h2.init('{"jwks_upstream": "idp"}')
    x = h2.request(headers=[("authorization", f"Bearer {rsa.sign(claims)}")])
    check("jwks no keys", status(h2.on_request(x)) == 503)
    err = h2.init('{"jwks_upstream": "idp", "refresh_ms": 50}')
    check("jwks bad config", isinstance(err, str) and "refresh_ms" in err, repr(err))


# ------------------------------------------------------------------ py-quota
def py_quota():
    h = Host(os.path.join(F, "py-quota.wasm"))
    seen = []

    def quota(r):
        seen.append(r["path"])
        if r["path"].endswith("=blocked"):
            return 429, [("Retry-After", b"7")], b"slow down\n"
        if r["path"].endswith("=boom"):
            raise CallFailed("unavailable", "refused")
        return 200, [("x-ratelimit-remaining", b"41")], b""

    h.upstreams["quota"] = quota
    phases = h.init('{"timeout_ms": 200}')
    check("py-quota phases", phases == {"request"}, repr(phases))
    x = h.request(headers=[("x-api-key", "alice")])
    check("py-quota allow", h.on_request(x) is None)
    check("py-quota deferred", h.deferred(x) == [("set", ("x-ratelimit-remaining", b"41"))], repr(h.deferred(x)))
    a = h.on_request(h.request(headers=[("x-api-key", "blocked")]))
    check("py-quota 429", status(a) == 429 and header(a, "retry-after") == "7" and bytes(a.body) == b"slow down\n",
          repr(a and a.__dict__))
    check("py-quota no key", h.on_request(h.request(client_ip="10.9.8.7")) is None)
    check("py-quota encoded", h.on_request(h.request(headers=[("x-api-key", "a b&c")])) is None)
    check("py-quota fail open", h.on_request(h.request(headers=[("x-api-key", "boom")])) is None)
    check("py-quota keys", seen == ["/quota?key=alice", "/quota?key=blocked", "/quota?key=10.9.8.7",
                                    "/quota?key=a%20b%26c", "/quota?key=boom"], repr(seen))
    check("py-quota call", h.calls[0][1]["timeout_ms"] == 200 and h.calls[0][1]["method"] == "GET")
    check("py-quota metrics", h.metric("quota_decisions_total", result="allow") == 3
          and h.metric("quota_decisions_total", result="limited") == 1, repr(h.metrics))
    h = Host(os.path.join(F, "py-quota.wasm"))
    h.init('{"on_unavailable": "deny", "upstream": "nowhere"}')
    check("py-quota fail closed", status(h.on_request(h.request(headers=[("x-api-key", "a")]))) == 503)
    err = h.init('{"bogus": 1}')
    check("py-quota bad config", isinstance(err, str) and "bogus" in err, repr(err))


SUITES = {"plain": plain, "ext-authz": ext_authz, "jwks-auth": jwks_auth, "py-quota": py_quota}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(SUITES):
        t = time.time()
        try:
            SUITES[name]()
        except Exception as e:
            check(f"{name} ran", False, f"{type(e).__name__}: {e}")
            import traceback
            traceback.print_exc()
        print(f"{name}: done in {time.time() - t:.1f} s")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
