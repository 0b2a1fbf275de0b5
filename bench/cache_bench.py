#!/usr/bin/env python3
"""Cache-hit scenario: Sluicegate's native cache against nginx `proxy_cache`, serving the same hits.

Started by `bash bench/run.sh --cache` (which installs nginx and wrk and builds the host), or
directly once those exist. One nginx backend answers `200 hello world` with
`Cache-Control: public, max-age=3600` and logs every request it gets; in front of it, each with one
worker:

  sluicegate   `[[route]] cache = true` (in-memory store)
  nginx        `proxy_cache` (keys_zone + cache files under bench/out/cache/work, page cache),
               upstream keepalive, proxy_http_version 1.1

Both are verified first: the second request must be a hit (`Cache-Status: sluicegate; hit` /
`X-Cache-Status: HIT`). Then interleaved rounds of `wrk -t1 -c50 --latency` on `GET /`, alternating
which goes first, and the ratio sluicegate/nginx of requests per second per round and of the
medians. Afterwards the backend's log must show (almost) no requests during the measurement: the
numbers are cache hits, not proxying. Results: bench/out/cache/results.{md,json}.

`--range`: the same, on a 10 MB object (`/big.bin`, a static file of the backend with
`max-age=3600`), each request `Range: bytes=1048576-1114111` (64 KiB from 1 MiB); both must answer
`206` from the store. Results: bench/out/cache-range/.

`--disk`: disk-tier hits. A 1 MiB object (`/mid.bin`, a static file of the backend), whole `GET`s.
Sluicegate runs with a memory store too small to hold it (`max_object_bytes` 64 KiB) and
`[cache.disk]` (1 GiB under the work directory), so every hit streams from its disk tier (checked:
`GET /cache` `disk.hits` grows by the rounds' requests); nginx's `proxy_cache` is its disk cache
(files, page-cached) as always. Results: bench/out/cache-disk/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (the main harness: process management, wrk parsing)


def backend_conf(work: Path, port: int) -> str:
    return B.nginx_common(work, "backend") + f"""
http {{
{B.nginx_http_common(work, "backend")}
    access_log {work / 'backend' / 'access.log'};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/(big|mid)[.]bin$ {{
            root {work / 'backend'};
            add_header Cache-Control "public, max-age=3600" always;
        }}
        location / {{
            default_type text/plain;
            add_header Cache-Control "public, max-age=3600" always;
            return 200 "hello world\\n";
        }}
    }}
}}
"""


def nginx_cache_conf(work: Path, port: int, backend: int) -> str:
    cache = work / "nginx" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    return B.nginx_common(work, "nginx") + f"""
http {{
{B.nginx_http_common(work, "nginx")}
    proxy_cache_path {cache} levels=1:2 keys_zone=hits:10m max_size=64m inactive=1h use_temp_path=off;
    upstream app {{
        server 127.0.0.1:{backend};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache hits;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""


def sluicegate_conf(port: int, admin: int, backend: int, disk: Path | None = None) -> str:
    if disk is not None:
        return f"""[proxy]
listen = ["127.0.0.1:{port}"]
workers = 1
admin = "127.0.0.1:{admin}"

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:{backend}"]

[[route]]
path_prefix = "/"
upstream = "app"
cache = true

[cache]
max_bytes = 4194304
max_object_bytes = 65536

[cache.disk]
path = "{disk}"
max_size_mb = 1024
max_object_mb = 16
"""
    return f"""[proxy]
listen = ["127.0.0.1:{port}"]
workers = 1
admin = "127.0.0.1:{admin}"

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:{backend}"]

[[route]]
path_prefix = "/"
upstream = "app"
cache = true

[cache]
max_bytes = 67108864
max_object_bytes = 16777216
"""


def is_hit(key: str, hdrs: dict) -> bool:
    if key == "sluicegate":
        return hdrs.get("cache-status", "").startswith("sluicegate; hit")
    return hdrs.get("x-cache-status") == "HIT"


RANGE = "bytes=1048576-1114111"
BIG = 10 * 1024 * 1024


def big_body() -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(BIG))


def verify_range_hits(t: B.Target, body: bytes) -> dict:
    """The second and later range requests must be 206 hits with the right bytes."""
    import http.client
    hdrs: dict = {}
    c = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
    for i in range(3):
        c.request("GET", "/big.bin", headers={"Range": RANGE, "User-Agent": "sluicegate-bench-verify"})
        r = c.getresponse()
        got = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if r.status != 206 or got != body[1048576:1114112]:
            raise B.BenchError(f"{t.label}: range request {i}: status {r.status}, {len(got)} bytes")
        if i > 0 and not is_hit(t.key, hdrs):
            # nginx's proxy_cache takes a moment to commit a 10 MB file.
            time.sleep(0.5)
    c.close()
    if not is_hit(t.key, hdrs):
        raise B.BenchError(f"{t.label}: range requests were not cache hits: {hdrs}")
    return hdrs


MID = 1024 * 1024


def verify_disk_hits(t: B.Target, body: bytes) -> dict:
    """Whole GETs of /mid.bin: the second and later must be hits with the right bytes."""
    import http.client
    hdrs: dict = {}
    c = http.client.HTTPConnection("127.0.0.1", t.port, timeout=10)
    for i in range(4):
        c.request("GET", "/mid.bin", headers={"User-Agent": "sluicegate-bench-verify"})
        r = c.getresponse()
        got = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        if r.status != 200 or got != body:
            raise B.BenchError(f"{t.label}: request {i}: status {r.status}, {len(got)} bytes")
        if not is_hit(t.key, hdrs):
            time.sleep(0.5)  # the disk write (either) takes a moment
    c.close()
    if not is_hit(t.key, hdrs):
        raise B.BenchError(f"{t.label}: requests were not cache hits: {hdrs}")
    return hdrs


def sluicegate_disk_hits(admin: int) -> int:
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    c.request("GET", "/cache")
    doc = json.loads(c.getresponse().read())
    c.close()
    return int((doc.get("disk") or {}).get("hits", 0))


def verify_hits(t: B.Target) -> dict:
    """The second and later requests must be hits with the backend's body."""
    conn = None
    hdrs = {}
    for i in range(3):
        conn, status, hdrs, body = B.http_get(t.port, conn)
        if status != 200 or body != B.BODY:
            raise B.BenchError(f"{t.label}: request {i}: status {status}, body {body[:60]!r}")
        if i > 0 and not is_hit(t.key, hdrs):
            raise B.BenchError(f"{t.label}: request {i} was not a cache hit: {hdrs}")
    if conn is not None:
        conn.close()
    return hdrs


def backend_requests(work: Path) -> int:
    try:
        return sum(1 for _ in (work / "backend" / "access.log").open())
    except OSError:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3 s")
    ap.add_argument("--sluicegate", default=str(B.ROOT / "target/release/sluicegate"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--range", action="store_true", help="64 KiB range hits of a 10 MB object")
    ap.add_argument("--disk", action="store_true", help="1 MiB hits from sluicegate's disk tier vs nginx's disk cache")
    args, unknown = ap.parse_known_args()
    if args.out is None:
        args.out = str(B.BENCH / "out" / ("cache-range" if args.range else "cache-disk" if args.disk else "cache"))
    if unknown:
        B.log(f"ignoring options for the main harness: {' '.join(unknown)}")
    rounds, duration = (3, 3) if args.quick else (args.rounds, args.duration)

    out = Path(args.out)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    (work / "backend").mkdir(parents=True)
    body = big_body() if args.range else b""
    if args.range:
        (work / "backend" / "big.bin").write_bytes(body)
    if args.disk:
        body = big_body()[:MID]
        (work / "backend" / "mid.bin").write_bytes(body)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not shutil.which("wrk"):
        raise B.BenchError("wrk not found (bench/run.sh --cache installs it)")
    exe = Path(args.sluicegate)
    if not exe.is_file():
        raise B.BenchError(f"{exe} missing: cargo build --release -p sluicegate")

    procs = B.Processes(work / "pids")  # run.sh's EXIT trap reads it in --cache mode

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    backend_port, sg_port, sg_admin, ng_port = B.free_ports(4)
    conf = work / "backend" / "nginx.conf"
    conf.write_text(backend_conf(work, backend_port))
    be = B.Target("direct", "backend", backend_port)
    be.procs.append(procs.spawn("backend nginx", [nginx, "-e", str(work / "backend" / "error.log"),
                                                  "-p", str(work / "backend"), "-c", str(conf)],
                                work / "backend" / "stdout.log", match="nginx"))
    B.wait_ready(procs, be, 15)

    targets = {}
    (work / "sluicegate").mkdir()
    cfg = work / "sluicegate" / "sluicegate.toml"
    cfg.write_text(sluicegate_conf(sg_port, sg_admin, backend_port,
                                   work / "sluicegate" / "disk" if args.disk else None))
    t = B.Target("sluicegate", "sluicegate (cache)", sg_port)
    t.procs.append(procs.spawn("sluicegate", [str(exe), "run", "--config", str(cfg)],
                               work / "sluicegate" / "sluicegate.log", match="sluicegate"))
    targets["sluicegate"] = t
    (work / "nginx").mkdir()
    cfg = work / "nginx" / "nginx.conf"
    cfg.write_text(nginx_cache_conf(work, ng_port, backend_port))
    t = B.Target("nginx", "nginx proxy_cache", ng_port)
    t.procs.append(procs.spawn("nginx cache", [nginx, "-e", str(work / "nginx" / "error.log"),
                                               "-p", str(work / "nginx"), "-c", str(cfg)],
                               work / "nginx" / "stdout.log", match="nginx"))
    targets["nginx"] = t
    if args.range:
        verify = lambda t: verify_range_hits(t, body)  # noqa: E731
    elif args.disk:
        verify = lambda t: verify_disk_hits(t, body)  # noqa: E731
    else:
        verify = verify_hits
    wrk_extra = ["-H", f"Range: {RANGE}"] if args.range else []
    path = "/big.bin" if args.range else "/mid.bin" if args.disk else ""
    url = (lambda t: t.url.rstrip("/") + path) if path else (lambda t: t.url)
    for t in targets.values():
        B.wait_ready(procs, t, 60)
        verify(t)
        B.log(f"verified {t.label}: hits")

    for t in targets.values():  # warm-up
        subprocess.run(["wrk", "-t1", f"-c{args.connections}", "-d1s", *wrk_extra, url(t)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before = backend_requests(work)
    disk_before = sluicegate_disk_hits(sg_admin) if args.disk else 0
    results: dict[str, list[dict]] = {k: [] for k in targets}
    order = list(targets)
    for rnd in range(rounds):
        for key in (order if rnd % 2 == 0 else order[::-1]):
            argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{duration}s", "--latency", *wrk_extra,
                    url(targets[key])]
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60)
            o = p.stdout.decode(errors="replace")
            (work / f"r{rnd + 1}-{key}.wrk.txt").write_text(" ".join(argv) + "\n" + o)
            r = B.parse_wrk(o)
            if r["non_2xx_3xx"] or sum(r["socket_errors"].values()):
                raise B.BenchError(f"{key}: errors during round {rnd + 1}:\n{o}")
            results[key].append(r)
            B.log(f"round {rnd + 1}/{rounds} {targets[key].label:<20} {r['rps']:>10,.0f} rps  "
                  f"p99 {r['p99_ms']:6.2f} ms")
            time.sleep(0.5)
    origin_during = backend_requests(work) - before
    disk_hits = sluicegate_disk_hits(sg_admin) - disk_before if args.disk else None
    for t in targets.values():
        verify(t)

    per_round = [s["rps"] / n["rps"] for s, n in zip(results["sluicegate"], results["nginx"])]
    med = {k: statistics.median(r["rps"] for r in v) for k, v in results.items()}
    p99 = {k: statistics.median(r["p99_ms"] for r in v) for k, v in results.items()}
    ratio = med["sluicegate"] / med["nginx"]
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": rounds, "duration_s": duration, "connections": args.connections,
        "median_rps": med, "median_p99_ms": p99, "ratio_sluicegate_over_nginx": ratio,
        "per_round_ratio": per_round, "backend_requests_during_rounds": origin_during,
        "sluicegate_disk_hits_during_rounds": disk_hits,
        "raw": results,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    md = [
        f"# Cache hits: Sluicegate vs nginx proxy_cache ({doc['date']})", "",
        f"{rounds} interleaved rounds x {duration} s, `wrk -t1 -c{args.connections}`, one worker each, "
        + (f"`GET /big.bin` with `Range: {RANGE}` (64 KiB of a 10 MB object, `206`)." if args.range
           else "`GET /mid.bin` (1 MiB, whole; sluicegate from its disk tier, nginx from its cache files)."
           if args.disk else "`GET /` (12-byte body, `max-age=3600`).") + "", "",
        "| target | median rps | median p99 ms |", "|---|---:|---:|",
        *(f"| {targets[k].label} | {med[k]:,.0f} | {p99[k]:.2f} |" for k in targets), "",
        f"**sluicegate / nginx = {ratio:.2f}x** (per round: {', '.join(f'{x:.2f}' for x in per_round)}; "
        f"goal >= 1.2x). Backend requests during the rounds: {origin_during}."
        + (f" Sluicegate disk-tier hits during the rounds: {disk_hits:,}." if args.disk else ""), "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    B.run(main)
