#!/usr/bin/env python3
"""Memory scenario: resident memory of Sluicegate and its peers idle, and holding 10,000 idle
keep-alive client connections.

    python3 bench/memory.py [--connections 10000] [--rounds 3] [--only sluicegate,nginx]

Started by `bash bench/run.sh --all` (bench/all.sh), or directly once nginx, haproxy, wrk and
target/release/sluicegate exist. Stdlib only. Each target runs with one worker in front of the same
nginx backend as bench.py (same configs, with room for the connections: nginx
`worker_connections`/`worker_rlimit_nofile`, HAProxy `maxconn`; Sluicegate needs no setting):

  sluicegate               no filters
  sluicegate + add-header  the filter runtime (wasmtime engine, one compiled component) loaded
  nginx, haproxy           bench.py's proxy configs

Measured, per target (RSS: resident set; PSS: shared pages split between the processes sharing them,
so nginx's master + worker are not double-counted; both summed over the target's processes):

  1. idle at start: 1 s after it answered its first request;
  2. idle after load: after 1 s of `wrk -c50` and a quiet pause (buffers, pools and allocator
     caches are then at their working size);
  3. then R interleaved rounds: open N connections, send one `GET /` on each and read the answer
     (in batches of 200, so the proxy never sees more than 200 requests at once), leave them open,
     wait, measure; then send a second request on every connection (all must still be open and
     answer 200: they are real keep-alive connections), close them all (RST, so no TIME_WAIT
     piles up) and measure again.

The load script raises its RLIMIT_NOFILE soft limit to the hard limit (the proxies inherit it); if
the hard limit is below N + 512 the connection count is lowered to fit, and the results say so.

Goals (docs/benchmarks.md): Sluicegate idle within nginx's + 20 MB; 10,000 idle connections within
100 MB RSS. Results: bench/out/memory/results.{md,json}.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: sluicegate-bench-memory\r\n\r\n"
BATCH = 200
ALL = ["sluicegate", "sluicegate-filter", "nginx", "haproxy"]
LABELS = {"sluicegate": "sluicegate", "sluicegate-filter": "sluicegate + add-header",
          "nginx": "nginx", "haproxy": "haproxy"}


def read_response(s: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; returns the status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the body")
        rest += chunk
    return status


def request_all(socks: list[socket.socket]) -> int:
    """One request on every socket, BATCH at a time; returns how many failed."""
    failed = 0
    for i in range(0, len(socks), BATCH):
        group = socks[i:i + BATCH]
        for s in group:
            try:
                s.sendall(REQ)
            except OSError:
                failed += 1
        for s in group:
            try:
                if read_response(s) != 200:
                    failed += 1
            except (OSError, ValueError, IndexError):
                failed += 1
    return failed


def open_conns(port: int, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            socks.append(s)
    except OSError as e:
        close_all(socks)
        raise B.BenchError(f"127.0.0.1:{port}: opening connection {len(socks) + 1} of {n} failed: {e}")
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each measurement")
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(ALL)}")
    ap.add_argument("--sluicegate", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--add-header-wasm", default=str(S.ROOT / "target/filters/add-header.wasm"))
    ap.add_argument("--out", default=str(S.BENCH / "out" / "memory"))
    args, unknown = ap.parse_known_args()
    if unknown:
        B.log(f"memory: ignoring options meant for other scenarios: {' '.join(unknown)}")
    rounds = 2 if args.quick else args.rounds
    keys = ALL if not args.only else [k.strip() for k in args.only.split(",") if k.strip()]
    for k in keys:
        if k not in ALL:
            ap.error(f"unknown target {k!r}; known: {', '.join(ALL)}")
    if "haproxy" in keys and not (S.shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        B.log("haproxy not installed: skipped")
        keys = [k for k in keys if k != "haproxy"]

    # 10,000 client sockets here plus 10,000 in the proxy (which inherits the limit).
    soft = S.raise_nofile(args.connections + 512)
    n = args.connections
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if soft < n + 512:
        n = max(100, soft - 512)
        B.log(f"RLIMIT_NOFILE hard limit is {hard}: measuring {n} connections instead of {args.connections}")

    out = Path(args.out)
    work = S.fresh_dir(out / "work")
    for name in ("results.md", "results.json"):
        (out / name).unlink(missing_ok=True)
    procs = B.Processes(work / "pids")
    S.on_signals()
    busy_before = B.cpu_busy(1.0)
    exe = Path(args.sluicegate)

    ports = iter(B.free_ports(2 + 2 * len(keys)))
    backend_port = next(ports)
    S.start_backend(procs, work, backend_port)
    targets: dict[str, B.Target] = {}
    idle_start: dict[str, dict] = {}
    for key in keys:
        port = next(ports)
        if key in ("sluicegate", "sluicegate-filter"):
            filter_dir = None
            if key == "sluicegate-filter":
                wasm = Path(args.add_header_wasm)
                if not wasm.is_file():
                    raise B.BenchError(f"{wasm} missing: build it with `bash scripts/build-filters.sh`")
                filter_dir = work / key / "filters"
                filter_dir.mkdir(parents=True)
                S.shutil.copy2(wasm, filter_dir / "add-header.wasm")
            toml = S.sluicegate_toml(port, next(ports), backend_port, filter_dir)
            t = S.start_sluicegate(procs, work, key, LABELS[key], port, exe, toml)
            t.filtered = filter_dir is not None
        elif key == "nginx":
            t = S.start_nginx_proxy(procs, work, "nginx", "nginx", port, backend_port, connections=n)
        else:
            t = S.start_haproxy(procs, work, "haproxy", port, backend_port, connections=n)
        targets[key] = t
        time.sleep(1.0)
        idle_start[key] = S.target_mem_mb(t)
        B.log(f"{t.label}: idle at start {idle_start[key]['rss_mb']:.1f} MB RSS, "
              f"{idle_start[key]['pss_mb']:.1f} MB PSS ({idle_start[key]['processes']} processes)")

    for t in targets.values():
        B.verify(t)

    idle_load: dict[str, dict] = {}
    if S.shutil.which("wrk"):
        for t in targets.values():
            subprocess.run(["wrk", "-t1", "-c50", "-d1s", t.url], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
    else:
        B.log("wrk not found: 'idle after load' is after 500 requests from this script instead")
        for t in targets.values():
            socks = open_conns(t.port, 50)
            for _ in range(10):
                request_all(socks)
            close_all(socks)
    time.sleep(args.settle)
    for key, t in targets.items():
        idle_load[key] = S.target_mem_mb(t)
        B.log(f"{t.label}: idle after load {idle_load[key]['rss_mb']:.1f} MB RSS")

    # HAProxy needs two descriptors per client connection: with a low hard limit it cannot hold n.
    skipped = {}
    if "haproxy" in targets and (soft - 200) // 2 < n + 100:
        skipped["haproxy"] = (f"holds at most {(soft - 200) // 2} connections under RLIMIT_NOFILE {soft} "
                              "(two descriptors per connection): idle figures only")
        B.log(f"haproxy: {skipped['haproxy']}")
    runs: dict[str, list[dict]] = {k: [] for k in targets if k not in skipped}
    order0 = list(runs)
    pgids = {p.pid for t in targets.values() for p in t.procs}
    B.log(f"{rounds} rounds x {len(targets)} targets x {n} connections")
    for rnd in range(rounds):
        order = order0[rnd % len(order0):] + order0[:rnd % len(order0)]
        for key in order:
            t = targets[key]
            before = S.target_mem_mb(t)
            with B.CpuWatch(pgids) as cw:
                t0 = time.monotonic()
                socks = open_conns(t.port, n)
                try:
                    failed_first = request_all(socks)
                    opened_s = time.monotonic() - t0
                    time.sleep(args.settle)
                    held = S.target_mem_mb(t)
                    failed_second = request_all(socks)
                finally:
                    close_all(socks)
            time.sleep(args.settle)
            after = S.target_mem_mb(t)
            for pr in t.procs:
                if not procs.alive(pr):
                    raise B.BenchError(f"{t.label}: {pr.name} died holding {n} connections\n{B.tail(pr.log)}")
            r = {"round": rnd + 1, "before_rss_mb": before["rss_mb"], "held_rss_mb": held["rss_mb"],
                 "held_pss_mb": held["pss_mb"], "after_close_rss_mb": after["rss_mb"],
                 # against the idle-after-load baseline: freed memory the allocator kept from an
                 # earlier round would otherwise hide the cost
                 "per_conn_kb": (held["rss_mb"] - idle_load[key]["rss_mb"]) * 1024 / n,
                 "failed_first": failed_first, "failed_second": failed_second,
                 "open_and_request_s": round(opened_s, 2), "foreign_cpu_pct": round(cw.foreign_pct, 1)}
            runs[key].append(r)
            B.log(f"round {rnd + 1}/{rounds} {t.label:<24} {n} conns: {held['rss_mb']:7.1f} MB RSS "
                  f"(+{r['per_conn_kb']:.2f} KB/conn), after close {after['rss_mb']:.1f} MB"
                  + (f"  FAILED requests {failed_first}+{failed_second}" if failed_first or failed_second else ""))

    summary = {}
    for key in targets:
        if key in skipped:
            summary[key] = {"label": targets[key].label, "idle_start": idle_start[key],
                            "idle_after_load": idle_load[key], "skipped": skipped[key]}
    for key, rs in runs.items():
        summary[key] = {
            "label": targets[key].label,
            "idle_start": idle_start[key],
            "idle_after_load": idle_load[key],
            "held_rss_mb": S.median_spread([r["held_rss_mb"] for r in rs]),
            "held_pss_mb": S.median_spread([r["held_pss_mb"] for r in rs]),
            "after_close_rss_mb": S.median_spread([r["after_close_rss_mb"] for r in rs]),
            "per_conn_kb": S.median_spread([r["per_conn_kb"] for r in rs]),
            "failed_requests": sum(r["failed_first"] + r["failed_second"] for r in rs),
            # 500s from filter calls over the filter time limit (a starved machine), logged by the host
            "filter_timeouts": sum(B.tail(p.log, 100000).count("timed out after") for p in targets[key].procs)
            if key.startswith("sluicegate") else 0,
            "foreign_cpu_pct": S.median_spread([r["foreign_cpu_pct"] for r in rs]),
        }

    def ratio(a: str, b: str, field: str) -> dict | None:
        if a not in runs or b not in runs:
            return None
        ra = {r["round"]: r[field] for r in runs[a]}
        rb = {r["round"]: r[field] for r in runs[b]}
        pr = [ra[i] / rb[i] for i in ra if rb.get(i)]
        return {"ratio_of_medians": summary[a]["held_rss_mb"]["median"] / summary[b]["held_rss_mb"]["median"],
                "per_round": S.median_spread(pr)}

    goals = {}
    if "sluicegate" in summary and "nginx" in summary:
        sg, ng = summary["sluicegate"], summary["nginx"]
        goals["idle_vs_nginx_mb"] = {
            "start": sg["idle_start"]["rss_mb"] - ng["idle_start"]["rss_mb"],
            "after_load": sg["idle_after_load"]["rss_mb"] - ng["idle_after_load"]["rss_mb"],
            "goal": "<= 20", "met": sg["idle_after_load"]["rss_mb"] - ng["idle_after_load"]["rss_mb"] <= 20,
        }
        goals["held_ratio_vs_nginx"] = ratio("sluicegate", "nginx", "held_rss_mb")
    if "sluicegate" in summary:
        goals["held_rss_mb"] = {"value": summary["sluicegate"]["held_rss_mb"]["median"], "goal": "<= 100",
                                "met": summary["sluicegate"]["held_rss_mb"]["max"] <= 100,
                                "connections": n}

    doc = {"scenario": "memory",
           "meta": S.meta(exe, busy_before, rounds=rounds, connections=n, connections_asked=args.connections,
                          nofile_soft=soft, nofile_hard=hard, settle_s=args.settle, batch=BATCH),
           "targets": summary, "goals": goals, "runs": runs}
    S.write_results(out, doc, render_md(doc))
    bad = [s["label"] for s in summary.values() if s.get("failed_requests")]
    if bad:
        B.log(f"WARNING: failed requests on held connections: {', '.join(bad)}")
    return 0


def render_md(doc: dict) -> str:
    m, n = doc["meta"], doc["meta"]["connections"]
    L = [f"# Memory: idle, and {n:,} idle keep-alive connections\n",
         f"{m['date']} · {m['nproc']} CPUs · {m['rounds']} interleaved rounds · one worker each · "
         "RSS and PSS summed over each target's processes, MB (MiB)\n",
         f"| target | idle at start RSS | idle after load RSS | idle after load PSS | {n:,} conns RSS "
         f"| spread | KB per conn | after close RSS | failed requests |",
         "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in doc["targets"].values():
        if "skipped" in s:
            L.append(f"| {s['label']} | {s['idle_start']['rss_mb']:.1f} | {s['idle_after_load']['rss_mb']:.1f} | "
                     f"{s['idle_after_load']['pss_mb']:.1f} | — | | | | ({s['skipped']}) |")
            continue
        h = s["held_rss_mb"]
        L.append(f"| {s['label']} | {s['idle_start']['rss_mb']:.1f} | {s['idle_after_load']['rss_mb']:.1f} | "
                 f"{s['idle_after_load']['pss_mb']:.1f} | {h['median']:.1f} | {h['min']:.1f}–{h['max']:.1f} | "
                 f"{s['per_conn_kb']['median']:.2f} | {s['after_close_rss_mb']['median']:.1f} | "
                 f"{s['failed_requests']}{' ⚠' if s['failed_requests'] else ''} |")
    L.append("")
    g = doc["goals"]
    if "idle_vs_nginx_mb" in g:
        d = g["idle_vs_nginx_mb"]
        L.append(f"- Sluicegate idle − nginx idle: {d['start']:+.1f} MB at start, {d['after_load']:+.1f} MB "
                 f"after load (goal ≤ +20 MB: {'met' if d['met'] else 'NOT met'})")
    if g.get("held_ratio_vs_nginx"):
        r = g["held_ratio_vs_nginx"]
        L.append(f"- Sluicegate / nginx RSS with {n:,} connections: {r['ratio_of_medians']:.2f} "
                 f"(per round {r['per_round']['min']:.2f}–{r['per_round']['max']:.2f})")
    if "held_rss_mb" in g:
        d = g["held_rss_mb"]
        L.append(f"- Sluicegate with {n:,} connections: {d['value']:.1f} MB RSS "
                 f"(goal ≤ 100 MB: {'met' if d['met'] else 'NOT met'})")
    if m["connections"] != m["connections_asked"]:
        L.append(f"- ⚠ {m['connections_asked']:,} connections were asked for; the file-descriptor hard limit "
                 f"({m['nofile_hard']}) allowed {n:,}.")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    B.run(main)
