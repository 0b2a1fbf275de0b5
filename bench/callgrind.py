#!/usr/bin/env python3
"""Count the instructions Sluicegate's worker spends per proxied request, with callgrind.

    python3 bench/callgrind.py [--requests 10000] [--sluicegate PATH] [--cache | --filter] [--tracing]

Timings on two shared cores move by 10% between runs; instruction counts do not. This starts
bench.py's nginx backend and Sluicegate (one worker, one route, no filters) under
`valgrind --tool=callgrind`, warms it up with `h2load --h1` (50 keep-alive connections), zeroes
the counters, proxies exactly --requests requests, and dumps. The figure is user-space
instructions (Ir) of the whole process divided by the requests: kernel work (the syscalls) is
not in it, and neither is the backend's. Needs `valgrind` (Debian) and `h2load`
(nghttp2-client). With --filter, the route runs bench.py's add-header filter; wasmtime's pooling
allocator reserves terabytes of address space, which valgrind refuses, so the proxy then runs with
SLUICEGATE_WASM_ON_DEMAND set (the on-demand allocator; same limits, a profiling switch only).

With --tracing, the proxy also has a `[tracing]` table (sampling_ratio 1.0, batch_delay_ms 200)
exporting to a small OTLP/HTTP sink in this script (it answers 200 to every POST), so every
request is traced and every span exported: the count then includes building the spans on the
worker and encoding and sending them on the exporter's threads (callgrind counts every thread).
Writes callgrind-tracing/ (or callgrind-filter-tracing/).

With --cache, the backend and the proxy are cache_bench.py's (`cache = true`, `max-age=3600`) and
the count is of cache hits. Writes bench/out/callgrind/ (callgrind-cache/ with --cache,
callgrind-filter/ with --filter): callgrind.out (open it with callgrind_annotate or kcachegrind),
results.json and results.md (Ir per request, the top functions by self and by inclusive cost).
"""

from __future__ import annotations

import argparse
import http.server
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402

REGISTRY = re.compile(r"/root/\.cargo/registry/src/[^/]+/|/rustc/[0-9a-f]+/library/|\s*\[[^\]]*\]$")


def annotate(data: Path, inclusive: bool) -> list[tuple[int, str]]:
    p = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100",
                        str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600)
    rows = []
    for line in p.stdout.decode(errors="replace").splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*\S)", line)
        if m and "PROGRAM TOTALS" not in line:
            rows.append((int(m.group(1).replace(",", "")), REGISTRY.sub("", m.group(2)).strip()))
    return rows


def total(data: Path) -> int:
    p = subprocess.run(["callgrind_annotate", str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       timeout=600)
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", p.stdout.decode(errors="replace"))
    if not m:
        raise B.BenchError(f"no totals in {data}")
    return int(m.group(1).replace(",", ""))


class OtlpSink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and counts them (bodies are read, not decoded)."""
    exports = 0
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("content-length", "0")))
        OtlpSink.exports += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def start_sink() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def h2load(url: str, n: int) -> dict:
    p = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "50", url], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=900)
    text = p.stdout.decode(errors="replace")
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
    if not m or int(m.group(2)) != n:
        raise B.BenchError(f"h2load: not every request succeeded:\n{text[-600:]}")
    return {"done": int(m.group(1)), "succeeded": int(m.group(2))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=3000)
    ap.add_argument("--sluicegate", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--cache", action="store_true",
                    help="count cache hits (cache_bench.py's config: `cache = true`, a cacheable backend)")
    ap.add_argument("--filter", action="store_true",
                    help="count requests through the add-header filter (bench.py's filtered config; the "
                         "proxy runs with SLUICEGATE_WASM_ON_DEMAND, as valgrind refuses the pooling allocator)")
    ap.add_argument("--add-header-wasm", default=str(S.ROOT / "target/filters/add-header.wasm"))
    ap.add_argument("--tracing", action="store_true",
                    help="trace every request (sampling_ratio 1.0) and export to an OTLP sink in this script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cache and args.filter:
        raise B.BenchError("--cache and --filter are separate scenarios")
    if args.out is None:
        args.out = str(S.BENCH / "out" / (("callgrind-cache" if args.cache else
                                           "callgrind-filter" if args.filter else "callgrind")
                                          + ("-tracing" if args.tracing else "")))
    for tool, pkg in (("valgrind", "valgrind"), ("callgrind_control", "valgrind"), ("h2load", "nghttp2-client")):
        if not shutil.which(tool):
            raise B.BenchError(f"{tool} not found: apt-get install {pkg}")
    out = Path(args.out)
    work = S.fresh_dir(out / "work")
    procs = B.Processes(work / "pids")
    S.on_signals()
    exe = Path(args.sluicegate).resolve()
    data = out / "callgrind.out"
    data.unlink(missing_ok=True)
    # The proxy runs under valgrind through a wrapper, so the usual start-up (and its readiness
    # check) is unchanged; only the first dump (after the counters were zeroed) is kept.
    wrapper = work / "sluicegate-under-callgrind"
    env = "SLUICEGATE_WASM_ON_DEMAND=1 " if args.filter else ""
    wrapper.write_text(f"#!/bin/sh\n{env}exec valgrind --tool=callgrind --dump-instr=no "
                       f"--callgrind-out-file={work}/callgrind.%p {exe} \"$@\"\n")
    wrapper.chmod(0o755)

    backend, port, admin = B.free_ports(3)
    if args.cache:
        import cache_bench as C
        (work / "backend").mkdir()
        conf = work / "backend" / "nginx.conf"
        conf.write_text(C.backend_conf(work, backend))
        be = B.Target("direct", "backend", backend)
        be.procs.append(procs.spawn("backend nginx", [S.nginx_bin(), "-e", str(work / "backend" / "error.log"),
                                                      "-p", str(work / "backend"), "-c", str(conf)],
                                    work / "backend" / "stdout.log", match="nginx"))
        B.wait_ready(procs, be, 15)
        toml = C.sluicegate_conf(port, admin, backend)
    else:
        S.start_backend(procs, work, backend)
        filter_dir = None
        if args.filter:
            filter_dir = S.add_header_dir(Path(args.add_header_wasm), work / "filters")
        toml = S.sluicegate_toml(port, admin, backend, filter_dir)
    if args.tracing:
        toml += (f"\n[tracing]\nendpoint = \"http://127.0.0.1:{start_sink()}\"\n"
                 "sampling_ratio = 1.0\nbatch_delay_ms = 200\n")
    t = S.start_sluicegate(procs, work, "sluicegate", "sluicegate", port, wrapper, toml, timeout=180)
    t.filtered = args.filter
    B.verify(t)
    pid = t.procs[0].pid
    h2load(t.url, args.warmup)
    subprocess.run(["callgrind_control", "-z", str(pid)], stdout=subprocess.DEVNULL, check=True, timeout=60)
    started = time.monotonic()
    load = h2load(t.url, args.requests)
    seconds = time.monotonic() - started
    subprocess.run(["callgrind_control", "-d", str(pid)], stdout=subprocess.DEVNULL, check=True, timeout=120)
    dumps = []
    for _ in range(60):
        dumps = sorted(work.glob("callgrind.*.1"))
        if dumps and dumps[0].stat().st_size > 0:
            break
        time.sleep(1)
    if not dumps:
        raise B.BenchError("callgrind wrote no dump")
    time.sleep(1)
    shutil.copy(dumps[0], data)
    procs.stop_all()

    ir = total(data)
    per_request = ir / args.requests
    # callgrind_annotate also lists the thread's entry frames (clone, block_on, the worker loop)
    # with the whole cost: they are not self time, so rows over half the total are dropped.
    by_self = [r for r in annotate(data, inclusive=False) if r[0] < ir / 2]
    by_incl = [r for r in annotate(data, inclusive=True)
               if "sluicegate::" in r[1] and r[0] < ir * 0.6 and not r[1].startswith(("std/", "core/", "alloc/"))]
    what = "cache hit" if args.cache else "one filter (add-header)" if args.filter else "plain proxy"
    scenario = "callgrind-cache" if args.cache else "callgrind-filter" if args.filter else "callgrind"
    if args.tracing:
        what += f", traced at ratio 1.0 ({OtlpSink.exports} OTLP exports received)"
        scenario += "-tracing"
    doc = {"scenario": scenario, "what": what,
           "meta": S.meta(exe, B.cpu_busy(0.5), requests=args.requests),
           "requests": args.requests, "ir_total": ir, "ir_per_request": round(per_request),
           "h2load": load, "seconds_under_valgrind": round(seconds, 1),
           "top_self": [(round(n / args.requests), name) for n, name in by_self[:40]],
           "top_inclusive": [(round(n / args.requests), name) for n, name in by_incl[:40]]}
    md = [f"# Instructions per request (callgrind, {what})\n",
          f"{per_request:,.0f} instructions per request (user space, whole process, "
          f"{args.requests:,} requests over 50 keep-alive connections)\n",
          "| Ir/request | function (self) |", "|--:|---|",
          *(f"| {n:,} | `{name}` |" for n, name in doc["top_self"][:25]), ""]
    S.write_results(out, doc, "\n".join(md))
    B.log(f"{per_request:,.0f} instructions per request ({what})")
    return 0


if __name__ == "__main__":
    B.run(main)
