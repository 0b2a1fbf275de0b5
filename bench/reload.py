#!/usr/bin/env python3
"""Hot-reload scenario: how long from replacing a filter to the first response by the new version,
under a steady trickle of requests on keep-alive connections, and how many requests fail meanwhile.

    python3 bench/reload.py [--reloads 30] [--clients 4] [--interval-ms 5]

Started by `bash bench/run.sh --all` (bench/all.sh), or directly once nginx and
target/release/sluicegate and target/test-filters/versioned.wasm exist. Stdlib only.

Sluicegate: one worker, one route with the `versioned` test filter (filters/versioned: it stamps
`x-version: <10 digits>` on every response, the digits patched into its binary after the marker
`SGVERSION:`, exactly as tests/e2e/reload.rs does). Each reload writes a copy with new digits
(so a new content hash: the new component is compiled, as in a real deploy) beside the filter as
`.versioned.wasm.tmp` and renames it over `versioned.wasm`. The clock starts when rename() returns.

Peer, measured in the same run, alternating with Sluicegate: nginx (one worker, bench.py's proxy
config) with `add_header x-version <digits>`; each reload renames a new nginx.conf into place and
sends SIGHUP to the master (nginx's own graceful reload). The clock starts before the rename.

Meanwhile `--clients` threads each send `GET /` on a keep-alive connection every `--interval-ms`,
and check every answer: 200 with the backend's body. A poller on its own keep-alive connection
sends back-to-back requests until the new version answers; the latency is the earliest new-version
response seen by the poller or any client. Counted per target:

  failed      a non-200 answer, a wrong body, or an error on a fresh connection;
  reconnects  the proxy closed a kept-alive connection between requests (nginx's old workers do
              that on reload; a client then reconnects) — not a failure, but shown;
  stale       a response with the old version on a connection that had already seen the new one.

Results: bench/out/reload/results.{md,json}: p50, p99, max of the latency per target, ratio
sluicegate / nginx, failed/reconnects/stale.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402

MARKER = b"SGVERSION:"


def versioned_bytes(template: bytes, version: int) -> bytes:
    at = template.find(MARKER)
    if at < 0:
        raise B.BenchError("versioned.wasm has no SGVERSION: marker (rebuild filters/versioned)")
    at += len(MARKER)
    return template[:at] + f"{version:010}".encode() + template[at + 10:]


def install(path: Path, data: bytes) -> None:
    """Write aside, then rename over (what `mv`, editors and ConfigMap updates do)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Client(threading.Thread):
    """A keep-alive client sending GET / every `interval` seconds until stopped."""

    def __init__(self, port: int, interval: float, stop: threading.Event, watch: "Watch"):
        super().__init__(daemon=True)
        self.port, self.interval, self.stop, self.watch = port, interval, stop, watch
        self.requests = self.failed = self.reconnects = self.stale = 0
        self.errors: list[str] = []
        self.conn: http.client.HTTPConnection | None = None
        self.newest = -1

    def get(self) -> tuple[int, str | None, bytes]:
        fresh = self.conn is None
        if fresh:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            self.conn.request("GET", "/", headers={"User-Agent": "sluicegate-bench-reload"})
            r = self.conn.getresponse()
            body = r.read()
            if r.getheader("connection", "").lower() == "close":
                self.conn.close()
                self.conn = None
            return r.status, r.getheader("x-version"), body
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            self.conn = None
            if fresh:
                raise
            # The proxy closed an idle kept-alive connection under us: reconnect once.
            self.reconnects += 1
            return self.get()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                status, version, body = self.get()
                now = time.monotonic()
                self.requests += 1
                if status != 200 or body != B.BODY:
                    self.failed += 1
                    self.errors.append(f"status {status} body {body[:60]!r}")
                elif version is not None and version.isdigit():
                    v = int(version)
                    if v < self.newest:
                        self.stale += 1
                    self.newest = max(self.newest, v)
                    self.watch.seen(v, now)
            except (OSError, http.client.HTTPException) as e:
                self.requests += 1
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}")
            rest = self.interval - (time.monotonic() - t)
            if rest > 0:
                self.stop.wait(rest)
        if self.conn is not None:
            self.conn.close()


class Watch:
    """The first time each version was seen, by anyone."""

    def __init__(self):
        self.lock = threading.Lock()
        self.first: dict[int, float] = {}

    def seen(self, v: int, at: float) -> None:
        with self.lock:
            if v not in self.first or at < self.first[v]:
                self.first[v] = at


def nginx_versioned_conf(base: str, version: int) -> str:
    """bench.py's nginx proxy config plus `add_header x-version` in the proxying location."""
    needle = "proxy_pass http://app;"
    if needle not in base:
        raise B.BenchError("unexpected nginx proxy config: no `proxy_pass http://app;`")
    return base.replace(needle, f"{needle}\n            add_header x-version {version:010};", 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reloads", type=int, default=30, help="reloads per target")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--interval-ms", type=float, default=5.0, help="pause between a client's requests")
    ap.add_argument("--gap-ms", type=float, default=200.0, help="quiet time between reloads")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds a reload may take before it counts as lost")
    ap.add_argument("--quick", action="store_true", help="10 reloads per target")
    ap.add_argument("--no-nginx", action="store_true", help="Sluicegate only (no peer)")
    ap.add_argument("--sluicegate", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--versioned-wasm", default=str(S.ROOT / "target/test-filters/versioned.wasm"))
    ap.add_argument("--out", default=str(S.BENCH / "out" / "reload"))
    args, unknown = ap.parse_known_args()
    if unknown:
        B.log(f"reload: ignoring options meant for other scenarios: {' '.join(unknown)}")
    reloads = 10 if args.quick else args.reloads

    wasm = Path(args.versioned_wasm)
    if not wasm.is_file():
        raise B.BenchError(f"{wasm} missing: build it with `bash scripts/build-filters.sh`")
    template = wasm.read_bytes()
    exe = Path(args.sluicegate)

    out = Path(args.out)
    work = S.fresh_dir(out / "work")
    for name in ("results.md", "results.json"):
        (out / name).unlink(missing_ok=True)
    procs = B.Processes(work / "pids")
    S.on_signals()
    busy_before = B.cpu_busy(1.0)

    backend_port, sg_port, sg_admin, ng_port = B.free_ports(4)
    S.start_backend(procs, work, backend_port)

    # Sluicegate with the versioned filter (its own artifact cache, so every version compiles).
    fdir = work / "sluicegate" / "filters"
    fdir.mkdir(parents=True)
    install(fdir / "versioned.wasm", versioned_bytes(template, 0))
    toml = S.sluicegate_toml(sg_port, sg_admin, backend_port, None)
    toml = toml.replace('upstream = "app"\n', 'upstream = "app"\nfilters = ["versioned"]\n', 1)
    toml += f'\n[filters]\ndir = {B.toml_str(str(fdir))}\ncache_dir = {B.toml_str(str(work / "sluicegate" / "cache"))}\n'
    sg = S.start_sluicegate(procs, work, "sluicegate", "sluicegate (filter swap)", sg_port, exe, toml)

    targets: dict[str, dict] = {"sluicegate": {"t": sg}}
    if not args.no_nginx:
        ng = S.start_nginx_proxy(procs, work, "nginx", "nginx (config reload)", ng_port, backend_port)
        ng_cfg = work / "nginx" / "nginx.conf"
        ng_base = ng_cfg.read_text()
        install(ng_cfg, nginx_versioned_conf(ng_base, 0).encode())
        master = ng.procs[0].pid
        os.kill(master, signal.SIGHUP)
        targets["nginx"] = {"t": ng}

    def apply(key: str, v: int) -> float:
        """Make version v live; returns the monotonic time the change was made."""
        if key == "sluicegate":
            data = versioned_bytes(template, v)
            tmp = fdir / ".versioned.wasm.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, fdir / "versioned.wasm")
            return time.monotonic()
        t0 = time.monotonic()
        install(ng_cfg, nginx_versioned_conf(ng_base, v).encode())
        os.kill(master, signal.SIGHUP)
        return t0

    # Both answer version 0 before starting.
    for key, d in targets.items():
        t = d["t"]
        def at_zero(port=t.port) -> bool:
            try:
                c, _, hdrs, _ = B.http_get(port)
                c.close()
                return hdrs.get("x-version") == f"{0:010}"
            except (OSError, http.client.HTTPException):
                return False
        ok = S.wait_until(at_zero, 15, 0.1)
        if not ok:
            raise B.BenchError(f"{t.label}: never answered x-version 0000000000\n{B.tail(t.procs[0].log)}")
        B.verify(t)

    stop = threading.Event()
    for d in targets.values():
        d["watch"] = Watch()
        d["clients"] = [Client(d["t"].port, args.interval_ms / 1000, stop, d["watch"]) for _ in range(args.clients)]
        d["latencies"] = []
        d["lost"] = 0
        d["poller"] = http.client.HTTPConnection("127.0.0.1", d["t"].port, timeout=10)
        for c in d["clients"]:
            c.start()
    pgids = {p.pid for d in targets.values() for p in d["t"].procs}
    B.log(f"{reloads} reloads per target, {args.clients} clients x 1 request / {args.interval_ms:g} ms each")
    time.sleep(0.5)
    try:
        with B.CpuWatch(pgids) as cw:
            for i in range(1, reloads + 1):
                order = list(targets) if i % 2 else list(targets)[::-1]
                for key in order:
                    d = targets[key]
                    t0 = apply(key, i)
                    want = f"{i:010}"
                    got_at = None
                    while time.monotonic() - t0 < args.timeout:
                        try:
                            d["poller"].request("GET", "/", headers={"User-Agent": "sluicegate-bench-reload-poll"})
                            r = d["poller"].getresponse()
                            r.read()
                            if r.getheader("x-version") == want:
                                got_at = time.monotonic()
                                break
                        except (OSError, http.client.HTTPException):
                            d["poller"].close()  # reopened by the next request
                    seen = d["watch"].first.get(i)
                    if got_at is None and seen is None:
                        d["lost"] += 1
                        B.log(f"{key}: version {i} not live after {args.timeout:.0f}s")
                        continue
                    at = min(x for x in (got_at, seen) if x is not None)
                    d["latencies"].append((at - t0) * 1000)
                    time.sleep(args.gap_ms / 1000)
                if i % 10 == 0 or i == reloads:
                    B.log(f"reload {i}/{reloads}: " + ", ".join(
                        f"{k} p50 {statistics.median(d['latencies']):.1f} ms" for k, d in targets.items()
                        if d["latencies"]))
    finally:
        stop.set()
        for d in targets.values():
            for c in d["clients"]:
                c.join(timeout=15)
            d["poller"].close()
    for d in targets.values():
        B.verify(d["t"])

    summary = {}
    for key, d in targets.items():
        lat = sorted(d["latencies"])
        cl = d["clients"]
        summary[key] = {
            "label": d["t"].label,
            "reloads": reloads,
            "applied": len(lat),
            "lost": d["lost"],
            "p50_ms": percentile(lat, 0.50),
            "p99_ms": percentile(lat, 0.99),
            "min_ms": lat[0] if lat else None,
            "max_ms": lat[-1] if lat else None,
            "mean_ms": statistics.fmean(lat) if lat else None,
            "requests": sum(c.requests for c in cl),
            "failed": sum(c.failed for c in cl),
            "reconnects": sum(c.reconnects for c in cl),
            "stale": sum(c.stale for c in cl),
            "errors": [e for c in cl for e in c.errors][:10],
            "latencies_ms": d["latencies"],
        }
    # What the host itself reports per reload (hash, compile, instantiate, swap): the rest of the
    # latency is the file watch, the 10 ms debounce and the next request.
    work_ms = [int(m) for m in re.findall(r"filters reloaded ms=(\d+)", B.tail(sg.procs[0].log, 100000))
               if int(m) > 0]  # 0: a burst that changed nothing (the temp file alone)
    summary["sluicegate"]["host_reload_ms"] = S.median_spread(work_ms[-reloads:]) if work_ms else None
    # A filter call that overran its time limit answers 500 (fail_closed): on a starved machine that
    # happens without any reload; counted apart so a failure can be told from a reload problem.
    summary["sluicegate"]["filter_timeouts"] = len(re.findall(r"filter call failed .*timed out",
                                                              B.tail(sg.procs[0].log, 100000)))
    ratios = {}
    if "nginx" in summary and summary["nginx"]["p50_ms"] and summary["sluicegate"]["p50_ms"]:
        ratios = {"p50": summary["sluicegate"]["p50_ms"] / summary["nginx"]["p50_ms"],
                  "p99": summary["sluicegate"]["p99_ms"] / summary["nginx"]["p99_ms"]}
    doc = {"scenario": "reload",
           "meta": S.meta(exe, busy_before, reloads=reloads, clients=args.clients, interval_ms=args.interval_ms,
                          gap_ms=args.gap_ms, foreign_cpu_pct=round(cw.foreign_pct, 1),
                          cpu_busy_pct=round(cw.busy_pct, 1)),
           "targets": summary, "ratios_sluicegate_over_nginx": ratios}
    S.write_results(out, doc, render_md(doc))
    if summary["sluicegate"]["failed"] or summary["sluicegate"]["lost"]:
        B.log("WARNING: Sluicegate failed requests or lost reloads during hot reload (see the table)")
    return 0


def percentile(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[round((len(sorted_vals) - 1) * p)]


def render_md(doc: dict) -> str:
    m = doc["meta"]
    L = ["# Hot reload: change → first response by the new version\n",
         f"{m['date']} · {m['nproc']} CPUs · {m['reloads']} reloads per target, alternating · "
         f"{m['clients']} keep-alive clients × 1 request / {m['interval_ms']:g} ms each, plus a poller · "
         f"other CPU during the run {m['foreign_cpu_pct']:.0f}%\n",
         "| target | what changes | p50 ms | p99 ms | min–max ms | requests | failed | reconnects | stale | lost reloads |",
         "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    what = {"sluicegate": "filter .wasm renamed into the filter dir", "nginx": "nginx.conf renamed + SIGHUP"}
    for key, s in doc["targets"].items():
        f = (lambda v: f"{v:.1f}" if v is not None else "—")
        L.append(f"| {s['label']} | {what.get(key, '')} | {f(s['p50_ms'])} | {f(s['p99_ms'])} | "
                 f"{f(s['min_ms'])}–{f(s['max_ms'])} | {s['requests']:,} | {s['failed']}{' ⚠' if s['failed'] else ''} | "
                 f"{s['reconnects']} | {s['stale']} | {s['lost']}{' ⚠' if s['lost'] else ''} |")
    r = doc["ratios_sluicegate_over_nginx"]
    hw = doc["targets"]["sluicegate"].get("host_reload_ms")
    if hw:
        L.append(f"\nSluicegate's own log: a reload (hash, compile, instantiate, swap) took {hw['median']:.0f} ms "
                 f"median ({hw['min']:.0f}–{hw['max']:.0f}); the rest is the file watch, the debounce and the next request.")
    ft = doc["targets"]["sluicegate"].get("filter_timeouts")
    if ft:
        L.append(f"\n⚠ {ft} filter call(s) overran the filter time limit (logged `timed out`): those answer 500 "
                 "(fail_closed) whether or not a reload is happening; see the errors in results.json.")
    if r:
        L.append(f"\nsluicegate / nginx: p50 {r['p50']:.2f}, p99 {r['p99']:.2f} (lower is faster)")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    B.run(main)
