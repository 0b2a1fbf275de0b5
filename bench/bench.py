#!/usr/bin/env python3
"""Sluicegate benchmark orchestrator (stdlib only).

Started by bench/run.sh, which installs and builds everything first. Starts one nginx backend and
the proxies in front of it on 127.0.0.1 (one worker each), checks that every target answers 200
with the expected headers, runs interleaved wrk rounds, and writes bench/out/results.{md,json}.

Every process it starts is killed on exit (normal exit, exception, SIGINT/SIGTERM/SIGHUP), and
its pid is also written to bench/out/work/pids so run.sh's EXIT trap can clean up after a crash.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BODY = b"hello world\n"
FOREIGN_WARN = 5.0  # percent of the machine used by other processes during a run: flagged
FOREIGN_RETRY = 10.0  # above this, the run is measured again (up to --retries times)

# ---------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A target is missing, misconfigured or died: the run fails loudly, with no numbers."""


def free_ports(n: int) -> list[int]:
    """Distinct free loopback ports (all sockets held open until every port is chosen)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(lines[-n:]) if lines else "(empty)"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def run_out(argv: list[str]) -> str:
    """Combined stdout+stderr of a short command, for version strings."""
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
                           stdin=subprocess.DEVNULL)
        return p.stdout.decode(errors="replace").strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def first_line(s: str) -> str:
    for line in s.splitlines():
        if line.strip():
            return line.strip()
    return s.strip()


# ---------------------------------------------------------------------------------------------
# process management


@dataclass
class Proc:
    name: str
    pid: int
    log: Path
    popen: subprocess.Popen | None = None


class Processes:
    def __init__(self, pidfile: Path):
        self.procs: list[Proc] = []
        self.pidfile = pidfile
        pidfile.write_text("")
        atexit.register(self.stop_all)

    def _record(self, p: Proc, match: str) -> None:
        self.procs.append(p)
        with self.pidfile.open("a") as f:
            f.write(f"{p.pid} {match}\n")

    def spawn(self, name: str, argv: list[str], logfile: Path, env: dict | None = None,
              match: str | None = None) -> Proc:
        """Start in a new session (own process group), output to logfile."""
        with logfile.open("ab") as lf:
            po = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env, cwd=logfile.parent)
        p = Proc(name, po.pid, logfile, po)
        self._record(p, match or Path(argv[0]).name)
        return p

    def spawn_setsid(self, name: str, argv: list[str], logfile: Path, pid_path: Path) -> Proc:
        """`setsid -f`: detached from our session entirely (Envoy dies with the shell otherwise).
        The child shell writes its pid and execs the program, so the recorded pid is the program's."""
        pid_path.unlink(missing_ok=True)
        script = 'echo $$ > "$0"; exec "$@"'
        with logfile.open("ab") as lf:
            subprocess.run(["setsid", "-f", "sh", "-c", script, str(pid_path), *argv],
                           stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, check=True,
                           cwd=logfile.parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                txt = pid_path.read_text().strip()
                if txt:
                    pid = int(txt)
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        else:
            raise BenchError(f"{name}: setsid'd process never wrote its pid to {pid_path}")
        p = Proc(name, pid, logfile)
        self._record(p, Path(argv[0]).name)
        return p

    def alive(self, p: Proc) -> bool:
        if p.popen is not None:
            return p.popen.poll() is None
        return pid_alive(p.pid)

    def stop_all(self) -> None:
        procs, self.procs = self.procs, []
        self.stop(procs, grace=5)

    def stop(self, procs: list[Proc], grace: float) -> None:
        """SIGTERM each process group, wait up to `grace` seconds for all of them, then SIGKILL
        what is left. `procs` are forgotten (stop_all passes every one; callgrind_peers one
        target's, whose valgrind needs a long grace to write its dump)."""
        self.procs = [p for p in self.procs if p not in procs]
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # every one leads its own session/process group
            except ProcessLookupError:
                pass
            except PermissionError:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in procs:
            while self.alive(p) and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.popen is not None:
                try:
                    p.popen.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
        if procs:
            log(f"stopped {len(procs)} processes")
        if not self.procs:
            try:
                self.pidfile.write_text("")
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    key: str                 # short id, used by --only
    label: str               # table label
    port: int
    filtered: bool = False   # expects x-hello: world and x-from forwarded upstream
    procs: list[Proc] = field(default_factory=list)
    h2_port: int | None = None   # h2c prior-knowledge port, if any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def http_get(port: int, conn: http.client.HTTPConnection | None = None, timeout: float = 3.0):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("GET", "/", headers={"User-Agent": "sluicegate-bench-verify"})
    r = c.getresponse()
    body = r.read()
    return c, r.status, {k.lower(): v for k, v in r.getheaders()}, body


def wait_ready(procs: Processes, t: Target, timeout: float = 60.0) -> float:
    """TCP connect succeeds AND GET / returns 200. Returns seconds taken."""
    start = time.monotonic()
    last = "no attempt"
    while time.monotonic() - start < timeout:
        for p in t.procs:
            if not procs.alive(p):
                raise BenchError(f"{t.label}: process {p.name} (pid {p.pid}) exited during startup.\n"
                                 f"--- {p.log} (tail) ---\n{tail(p.log)}")
        try:
            with socket.create_connection(("127.0.0.1", t.port), timeout=1):
                pass
            c, status, _, _ = http_get(t.port, timeout=2)
            c.close()
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        except http.client.HTTPException as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.log} (tail) ---\n{tail(p.log)}" for p in t.procs)
    raise BenchError(f"{t.label}: not ready after {timeout:.0f}s on 127.0.0.1:{t.port} "
                     f"(last: {last})\n{logs}")


def verify(t: Target) -> dict:
    """Three requests on one keep-alive connection plus one on a fresh connection; every one must be
    200 with the backend's body, and the filter's headers exactly where expected."""
    problems = []
    seen = {}
    conn = None
    for i in range(4):
        try:
            if i == 3 and conn is not None:
                conn.close()
                conn = None
            conn, status, hdrs, body = http_get(t.port, conn)
        except (OSError, http.client.HTTPException) as e:
            problems.append(f"request {i}: {type(e).__name__}: {e}")
            conn = None
            continue
        seen = hdrs
        if status != 200:
            problems.append(f"request {i}: status {status}, want 200")
        if body != BODY:
            problems.append(f"request {i}: body {body[:80]!r}, want {BODY!r}")
        if t.filtered:
            if hdrs.get("x-hello") != "world":
                problems.append(f"request {i}: response header x-hello={hdrs.get('x-hello')!r}, want 'world'")
            if hdrs.get("x-seen-from") != "sluicegate":
                problems.append(f"request {i}: backend saw request header x-from="
                                f"{hdrs.get('x-seen-from')!r}, want 'sluicegate'")
        else:
            if "x-hello" in hdrs or "x-seen-from" in hdrs:
                problems.append(f"request {i}: unfiltered target has filter headers "
                                f"x-hello={hdrs.get('x-hello')!r} x-seen-from={hdrs.get('x-seen-from')!r}")
    if conn is not None:
        conn.close()
    if problems:
        raise BenchError(f"{t.label} (127.0.0.1:{t.port}) failed verification:\n  " + "\n  ".join(problems)
                         + f"\n  last response headers: {seen}")
    return seen


# ---------------------------------------------------------------------------------------------
# configs


def nginx_common(work: Path, name: str) -> str:
    tmp = work / name / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o777)
    return f"""
worker_processes 1;
daemon off;
master_process on;
pid {work / name / 'nginx.pid'};
error_log {work / name / 'error.log'} warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; multi_accept on; }}
"""


def nginx_http_common(work: Path, name: str) -> str:
    tmp = work / name / "tmp"
    return f"""
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
"""


def backend_conf(work: Path, ports: list[int]) -> str:
    # x-seen-from echoes the request header x-from, so verification can see that a filter's
    # request-header change reached the backend (nginx omits the header when the value is empty).
    return nginx_common(work, "backend") + f"""
http {{
{nginx_http_common(work, "backend")}
    server {{
        {" ".join(f"listen 127.0.0.1:{p} backlog=4096;" for p in ports)}
        location / {{
            default_type text/plain;
            add_header x-seen-from $http_x_from;
            return 200 "hello world\\n";
        }}
    }}
}}
"""


def nginx_proxy_conf(work: Path, port: int, backends: list[int], h2_port: int | None) -> str:
    h2 = ""
    if h2_port:
        h2 = f"""
    server {{
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    return nginx_common(work, "nginx") + f"""
http {{
{nginx_http_common(work, "nginx")}
    upstream app {{
        {" ".join(f"server 127.0.0.1:{b};" for b in backends)}
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}{h2}
}}
"""


def haproxy_conf(port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server s{i} 127.0.0.1:{b}" for i, b in enumerate(backends))
    return f"""
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s

frontend fe
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
{servers}
"""


def envoy_conf(port: int, backends: list[int], wasm: Path | None) -> str:
    lb_endpoints = "".join(f"""
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {b} }}""" for b in backends)
    wasm_filter = ""
    if wasm is not None:
        wasm_filter = f"""
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: add_header
                root_id: add_header
                fail_open: false
                vm_config:
                  vm_id: add_header
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: "{wasm}"
"""
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
                route: {{ cluster: app }}
          http_filters:{wasm_filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:{lb_endpoints}
"""


PINGORA_DIR = BENCH / "pingora-peer"
PINGORA_TARGET = ROOT / "target" / "pingora"
PINGORA_BIN = PINGORA_TARGET / "release" / "bench-pingora-peer"


def ensure_pingora(exe: Path = PINGORA_BIN, build: bool = False) -> Path:
    """The Pingora peer (bench/pingora-peer: a minimal `ProxyHttp`, default keep-alive upstream pool,
    one worker thread), built on demand in its own workspace and target dir (target/pingora). Its
    zlib-ng dependency needs cmake (Debian `cmake`). The first build takes a few minutes; it runs
    niced with one job, so it does not starve a host build on the same cores."""
    exe = Path(exe)
    if exe.is_file() and not build:
        return exe
    if exe != PINGORA_BIN:
        raise BenchError(f"{exe} missing (only the default path {PINGORA_BIN} is built on demand)")
    if not shutil.which("cmake"):
        raise BenchError("the Pingora peer needs cmake to build (zlib-ng): apt-get install cmake")
    log(f"building the Pingora peer ({PINGORA_DIR}, --target-dir {PINGORA_TARGET})")
    env = dict(os.environ, CARGO_BUILD_JOBS=os.environ.get("CARGO_BUILD_JOBS", "1"))
    p = subprocess.run(["nice", "-n", "10", "cargo", "build", "--release", "--manifest-path",
                        str(PINGORA_DIR / "Cargo.toml"), "--target-dir", str(PINGORA_TARGET)], env=env)
    if p.returncode != 0 or not exe.is_file():
        raise BenchError(f"building the Pingora peer failed (cargo exit {p.returncode})")
    return exe


def pingora_version() -> str:
    """The `pingora` crate version the peer was locked to (bench/pingora-peer/Cargo.lock)."""
    try:
        m = re.search(r'name = "pingora"\nversion = "([^"]+)"', (PINGORA_DIR / "Cargo.lock").read_text())
    except OSError:
        return "n/a"
    return f"pingora {m.group(1)} (bench/pingora-peer)" if m else "n/a"


def pingora_argv(exe: Path, port: int, backends: list[int]) -> list[str]:
    """One worker thread (Pingora's default), every request to the first backend (the peer has no
    load balancing: `--backends` > 1 is refused for it)."""
    if len(backends) != 1:
        raise BenchError("the Pingora peer proxies to one backend only (no --backends N)")
    return [str(exe), str(port), str(backends[0]), "1"]


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string for these values


def sluicegate_conf(port: int, admin: int, backends: list[int], filter_dir: Path | None) -> str:
    endpoints = ", ".join(toml_str(f"127.0.0.1:{b}") for b in backends)
    s = f"""[proxy]
listen = [{toml_str(f"127.0.0.1:{port}")}]
workers = 1
admin = {toml_str(f"127.0.0.1:{admin}")}

[[upstream]]
name = "app"
endpoints = [{endpoints}]

[[route]]
path_prefix = "/"
upstream = "app"
"""
    if filter_dir is not None:
        s += f"""filters = ["add-header"]

[filters]
dir = {toml_str(str(filter_dir))}

[filters.config.add-header]
request_headers = {{ "x-from" = "sluicegate" }}
response_headers = {{ "x-hello" = "world" }}
"""
    return s


THREE_FILTERS = ["add-header", "security-headers", "canary"]


def three_filter_chain(conf: str, src: Path, filter_dir: Path) -> str:
    """The add-header route of `sluicegate_conf` turned into a chain of three cheap filters:
    add-header (request + response headers), security-headers (four response headers, no CORS) and
    canary (reads a header and a cookie; weight 0, so every request stays on its upstream)."""
    for name in THREE_FILTERS[1:]:
        wasm = src / f"{name}.wasm"
        if not wasm.is_file():
            raise BenchError(f"{wasm} missing: build it with `bash scripts/build-filters.sh`")
        shutil.copy2(wasm, filter_dir / f"{name}.wasm")
    conf = conf.replace('filters = ["add-header"]', f"filters = {json.dumps(THREE_FILTERS)}", 1)
    return conf + """
[filters.config.canary]
upstream = "app"
weight_percent = 0
"""


# ---------------------------------------------------------------------------------------------
# load generators and parsing

UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(v: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", v.strip())
    if not m:
        raise ValueError(f"unparsable latency {v!r}")
    return float(m.group(1)) * UNIT[m.group(2)]


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not m:
        raise ValueError("no Requests/sec line")
    r["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if not m:
            raise ValueError(f"no {pct}% latency line (was --latency passed?)")
        r[f"p{pct}_ms"] = to_ms(m.group(1))
    m = re.search(r"^\s+(\d+) requests in ([\d.]+)(\w+),", out, re.M)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                  map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx_3xx"] = int(m.group(1)) if m else 0
    return r


def parse_h2load(out: str) -> dict:
    r: dict = {}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not m:
        raise ValueError("no 'finished in ... req/s' line")
    r["rps"] = float(m.group(1))
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if m:
        r.update(dict(zip(("total", "started", "done", "succeeded", "failed", "errored", "timeout"),
                          map(int, m.groups()))))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups())))
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        r["min_ms"], r["max_ms"], r["mean_ms"] = (to_ms(x) for x in m.groups())
    return r


# ---------------------------------------------------------------------------------------------
# summary


def summarize(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt_rps(v: float) -> str:
    return f"{v:,.0f}"


def fmt_ms(v: float) -> str:
    return f"{v:.2f}"


def cpu_busy(seconds: float = 1.0) -> float:
    """Percent of all CPUs not idle over `seconds` (a build or other load skews every number)."""
    def snap():
        with open("/proc/stat") as f:
            v = list(map(int, f.readline().split()[1:]))
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return idle, sum(v)
    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def stat_fields() -> list[int]:
    """The all-CPU line of /proc/stat: user nice system idle iowait irq softirq steal ... (jiffies)."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return v + [0] * (8 - len(v))


def stat_totals() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    v = stat_fields()
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def machine_split(a: list[int], b: list[int]) -> dict[str, int]:
    """Jiffies the whole machine spent between two `stat_fields` snapshots, by kind. `kernel` is
    system + irq + softirq: loopback TCP is mostly softirq work (the receiving side of every send),
    which /proc/PID/stat does not charge to any process, so a per-process count would miss it."""
    d = [y - x for x, y in zip(a, b)]
    return {"user": d[0] + d[1], "kernel": d[2] + d[5] + d[6], "steal": d[7], "idle": d[3] + d[4]}


def foreign_jiffies(ours: set[int]) -> dict[int, tuple[int, int]]:
    """pid -> (utime+stime+cutime+cstime, ppid) of every process that is not ours: not in our
    targets' process groups, not in this script's process group (wrk, run.sh), not a kernel thread."""
    snap = {}
    me = os.getpgrp()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid, pgrp = int(d), int(rest[1]), int(rest[2])
        if pgrp in ours or pgrp == me or pid == 2 or ppid == 2:
            continue
        snap[pid] = (int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14]), ppid)
    return snap


def foreign_delta(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> int:
    """CPU jiffies foreign processes used between snapshots a and b. A process's total includes its
    reaped children, so a child that exits and is reaped adds its whole life to its parent: count
    every total's growth, and take back what children gone since `a` had already used by then."""
    total = sum(t - a.get(pid, (0, 0))[0] for pid, (t, _) in b.items())
    total -= sum(t for pid, (t, ppid) in a.items() if pid not in b and ppid in b)
    return max(0, total)


CLK_TCK = os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU used during one measurement by processes that are not ours (another build, another
    benchmark), as a percent of the machine. Anything above a few percent means that run competed
    with foreign load. Approximate: children reaped by an excluded process are not seen."""

    def __init__(self, pgids: set[int]):
        self.pgids = pgids

    def __enter__(self):
        # The /proc walk first, so its own CPU falls outside the window.
        self.f0 = foreign_jiffies(self.pgids)
        self.s0 = stat_fields()
        return self

    def __exit__(self, *exc):
        s1 = stat_fields()
        f1 = foreign_jiffies(self.pgids)
        foreign = foreign_delta(self.f0, f1)
        self.split = machine_split(self.s0, s1)
        total = max(1, sum(self.split.values()))
        self.busy_pct = 100.0 * (self.split["user"] + self.split["kernel"]) / total
        # /proc is read process by process while others exit: a child reaped mid-snapshot can be
        # counted twice, so never report more than the machine's busy time.
        self.foreign_pct = min(100.0 * foreign / total, self.busy_pct)
        return False


# ---------------------------------------------------------------------------------------------
# main


ALL_KEYS = ["direct", "sluicegate", "sluicegate-filter", "sluicegate-3filters", "nginx", "haproxy", "pingora",
            "envoy", "envoy-wasm"]

LABELS = {
    "direct": "direct (nginx backend)",
    "sluicegate": "sluicegate",
    "sluicegate-filter": "sluicegate + add-header",
    "sluicegate-3filters": "sluicegate + 3 filters",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "pingora": "pingora",
    "envoy": "envoy",
    "envoy-wasm": "envoy + proxy-wasm",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 s (default 5 rounds of 5 s)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--backends", type=int, default=1,
                    help="balance over this many backend addresses (round robin in every proxy)")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unrecorded wrk per target first")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(ALL_KEYS)}")
    ap.add_argument("--h2", action="store_true", help="also h2load h2c runs (sluicegate, nginx, envoy)")
    ap.add_argument("--retries", type=int, default=1,
                    help=f"measure a run again when other processes used >{FOREIGN_RETRY:.0f}%% of the machine")
    ap.add_argument("--wait-quiet", type=float, default=60,
                    help="wait up to this many seconds for the machine to be idle (<20%% busy) first")
    ap.add_argument("--seed", type=int, help="order shuffle seed (default: time-based, recorded)")
    ap.add_argument("--sluicegate", default=str(ROOT / "target/release/sluicegate"))
    ap.add_argument("--add-header-wasm", default=str(ROOT / "target/filters/add-header.wasm"))
    ap.add_argument("--pingora", default=str(PINGORA_BIN),
                    help="the Pingora peer's binary (bench/pingora-peer; built on demand at the default path)")
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", "envoy"))
    ap.add_argument("--envoy-wasm", default=str(ROOT / "target/bench/wasm32-unknown-unknown/release/"
                                                       "bench_envoy_add_header.wasm"))
    ap.add_argument("--out", default=str(BENCH / "out"))
    args = ap.parse_args()

    rounds = args.rounds or (2 if args.quick else 5)
    duration = args.duration or (2 if args.quick else 5)
    seed = args.seed if args.seed is not None else int(time.time())
    keys = ALL_KEYS if not args.only else [k.strip() for k in args.only.split(",") if k.strip()]
    for k in keys:
        if k not in ALL_KEYS:
            ap.error(f"unknown target {k!r}; known: {', '.join(ALL_KEYS)}")
    if "direct" not in keys:
        keys = ["direct"] + keys  # every ratio is against it

    out = Path(args.out)
    work = out / "work"
    raw = out / "raw"
    for d in (work, raw):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for name in ("results.md", "results.json"):  # a failed run must not leave old numbers behind
        if (out / name).exists():
            (out / name).replace(out / name.replace("results.", "results.prev."))

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    envoy = shutil.which(args.envoy) or args.envoy
    for tool in ("wrk",) + (("h2load",) if args.h2 else ()):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found (run bench/run.sh, which installs it)")

    procs = Processes(work / "pids")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    busy_before = cpu_busy(1.0)
    waited = 0.0
    if busy_before > 20 and args.wait_quiet > 0:
        log(f"machine {busy_before:.0f}% busy; waiting up to {args.wait_quiet:.0f}s for it to be idle")
        t0 = time.monotonic()
        while busy_before > 20 and time.monotonic() - t0 < args.wait_quiet:
            busy_before = cpu_busy(2.0)
        waited = time.monotonic() - t0
    if busy_before > 20:
        log(f"WARNING: the machine is {busy_before:.0f}% busy before starting: "
            "numbers will be skewed (a build running?)")

    need_ports = args.backends + 2 * len(keys) + 4
    ports = iter(free_ports(need_ports))
    backend_ports = [next(ports) for _ in range(args.backends)]
    backend_port = backend_ports[0]
    targets: dict[str, Target] = {}

    # --- backend -----------------------------------------------------------------------------
    (work / "backend").mkdir()
    conf = work / "backend" / "nginx.conf"
    conf.write_text(backend_conf(work, backend_ports))
    t = Target("direct", LABELS["direct"], backend_port)
    t.procs.append(procs.spawn("backend nginx", [nginx, "-e", str(work / "backend" / "error.log"),
                                                 "-p", str(work / "backend"), "-c", str(conf)],
                               work / "backend" / "stdout.log", match="nginx"))
    targets["direct"] = t
    log(f"backend nginx on 127.0.0.1:{','.join(map(str, backend_ports))}")
    wait_ready(procs, t, 15)

    # --- proxies -----------------------------------------------------------------------------
    for key in keys:
        if key == "direct":
            continue
        port = next(ports)
        d = work / key
        d.mkdir()
        filtered = key in ("sluicegate-filter", "sluicegate-3filters", "envoy-wasm")
        t = Target(key, LABELS[key], port, filtered=filtered)
        timeout = 15.0
        if key in ("sluicegate", "sluicegate-filter", "sluicegate-3filters"):
            exe = Path(args.sluicegate)
            if not exe.is_file():
                raise BenchError(f"{exe} missing: build it with `cargo build --release -p sluicegate`")
            filter_dir = None
            if key in ("sluicegate-filter", "sluicegate-3filters"):
                wasm = Path(args.add_header_wasm)
                if not wasm.is_file():
                    raise BenchError(f"{wasm} missing: build it with `bash scripts/build-filters.sh`")
                filter_dir = d / "filters"
                filter_dir.mkdir()
                shutil.copy2(wasm, filter_dir / "add-header.wasm")
            admin = next(ports)
            cfg = d / "sluicegate.toml"
            cfg.write_text(sluicegate_conf(port, admin, backend_ports, filter_dir))
            if key == "sluicegate" and args.h2:
                t.h2_port = port  # h2c prior knowledge on the same listener, if the host speaks it
            env = dict(os.environ, NO_COLOR="1")  # plain logs in bench/out/work/*/sluicegate.log
            if key == "sluicegate-3filters":
                cfg.write_text(three_filter_chain(cfg.read_text(), Path(args.add_header_wasm).parent, filter_dir))
            t.procs.append(procs.spawn(key, [str(exe), "run", "--config", str(cfg)], d / "sluicegate.log",
                                       env=env, match="sluicegate"))
            timeout = 60.0
        elif key == "nginx":
            h2_port = next(ports) if args.h2 else None
            t.h2_port = h2_port
            cfg = d / "nginx.conf"
            cfg.write_text(nginx_proxy_conf(work, port, backend_ports, h2_port))
            t.procs.append(procs.spawn("nginx proxy", [nginx, "-e", str(d / "error.log"), "-p", str(d),
                                                       "-c", str(cfg)], d / "stdout.log", match="nginx"))
        elif key == "haproxy":
            cfg = d / "haproxy.cfg"
            cfg.write_text(haproxy_conf(port, backend_ports))
            t.procs.append(procs.spawn("haproxy", [haproxy, "-db", "-f", str(cfg)], d / "haproxy.log"))
        elif key == "pingora":
            exe = ensure_pingora(Path(args.pingora))
            t.procs.append(procs.spawn("pingora", pingora_argv(exe, port, backend_ports), d / "pingora.log",
                                       match="bench-pingora-peer"))
            timeout = 30.0
        elif key in ("envoy", "envoy-wasm"):
            wasm = None
            if key == "envoy-wasm":
                wasm = Path(args.envoy_wasm)
                if not wasm.is_file():
                    raise BenchError(f"{wasm} missing: build bench/envoy-filter (bench/run.sh does)")
                wasm = wasm.resolve()
            if args.h2 and key == "envoy":
                t.h2_port = port  # codec_type AUTO takes h2c prior knowledge on the same port
            cfg = d / "envoy.yaml"
            cfg.write_text(envoy_conf(port, backend_ports, wasm))
            t.procs.append(procs.spawn_setsid(
                key, [envoy, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                      "-l", "warn", "--log-path", str(d / "envoy.log")],
                d / "stdout.log", d / "envoy.pid"))
            timeout = 30.0
        log(f"{t.label}: starting on 127.0.0.1:{port}")
        took = wait_ready(procs, t, timeout)
        log(f"{t.label}: ready in {took:.2f}s")
        targets[key] = t

    # --- verify ------------------------------------------------------------------------------
    verified = {}
    for key, t in targets.items():
        hdrs = verify(t)
        verified[key] = {k: hdrs[k] for k in sorted(hdrs) if k in
                         ("server", "x-hello", "x-seen-from", "via", "content-length", "connection")}
        log(f"verified {t.label}: 200, body ok" + (", x-hello: world, x-from reached backend"
                                                   if t.filtered else ", no filter headers"))

    h2_targets = [t for t in targets.values() if t.h2_port]
    h2_skipped = {}
    if args.h2:
        ok = []
        for t in h2_targets:
            o = run_out(["h2load", "-n", "4", "-c", "1", f"http://127.0.0.1:{t.h2_port}/"])
            try:
                r = parse_h2load(o)
                good = r.get("succeeded") == 4 and r.get("status", {}).get("2xx") == 4
            except ValueError:
                good = False
            if good:
                ok.append(t)
                log(f"h2c verified: {t.label}")
            else:
                h2_skipped[t.key] = first_line(o[-400:]) if o else "no output"
                log(f"h2c NOT supported/working on {t.label}; skipped for h2 ({h2_skipped[t.key]})")
        h2_targets = ok

    # --- warm-up -----------------------------------------------------------------------------
    order0 = list(targets)
    rng = random.Random(seed)
    rng.shuffle(order0)
    if args.warmup > 0:
        log(f"warm-up: {args.warmup}s per target")
        for key in order0:
            subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.warmup}s", targets[key].url],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # --- rounds ------------------------------------------------------------------------------
    pgids = {p.pid for t in targets.values() for p in t.procs}
    results: dict[str, list[dict]] = {k: [] for k in targets}
    h2_results: dict[str, list[dict]] = {t.key: [] for t in h2_targets}
    orders = []
    n = len(order0)
    est = rounds * (len(targets) + len(h2_targets)) * (duration + 1)
    log(f"{rounds} rounds x {len(targets)} targets x {duration}s "
        f"(wrk -t1 -c{args.connections}){' + h2load' if h2_targets else ''}: ~{est}s")
    for rnd in range(rounds):
        order = order0[rnd % n:] + order0[:rnd % n]  # rotate a fixed shuffle: every position visited
        orders.append(order)
        for key in order:
            t = targets[key]
            argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{duration}s", "--latency", t.url]
            for attempt in range(args.retries + 1):
                with CpuWatch(pgids) as cw:
                    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       timeout=duration + 60)
                o = p.stdout.decode(errors="replace")
                (raw / f"r{rnd + 1}-{key}{'-retry%d' % attempt if attempt else ''}.wrk.txt").write_text(
                    " ".join(argv) + f"\n# foreign CPU {cw.foreign_pct:.1f}%\n" + o)
                for pr in t.procs:
                    if not procs.alive(pr):
                        raise BenchError(f"{t.label}: {pr.name} (pid {pr.pid}) died during round {rnd + 1}\n"
                                         f"--- {pr.log} (tail) ---\n{tail(pr.log)}")
                if cw.foreign_pct <= FOREIGN_RETRY or attempt == args.retries:
                    break
                log(f"round {rnd + 1}/{rounds} {t.label}: other processes used {cw.foreign_pct:.0f}% of the "
                    f"machine; measuring again ({attempt + 1}/{args.retries})")
                time.sleep(2)
            try:
                r = parse_wrk(o)
            except ValueError as e:
                raise BenchError(f"{t.label}: cannot parse wrk output ({e}):\n{o}")
            r["retries"] = attempt
            r["round"] = rnd + 1
            r["cpu_busy_pct"] = round(cw.busy_pct, 1)
            # What the whole machine (load generator, backend, proxy, kernel) spent per request.
            if r.get("requests"):
                per_req = 1e6 / CLK_TCK / r["requests"]
                r["machine_us_per_req"] = {k: round(v * per_req, 2) for k, v in cw.split.items()
                                           if k in ("user", "kernel")}
            r["foreign_cpu_pct"] = round(cw.foreign_pct, 1)
            results[key].append(r)
            errs = sum(r["socket_errors"].values())
            log(f"round {rnd + 1}/{rounds} {t.label:<24} {r['rps']:>10,.0f} rps  p99 {r['p99_ms']:7.2f} ms"
                + (f"  non-2xx {r['non_2xx_3xx']}" if r["non_2xx_3xx"] else "")
                + (f"  socket errors {r['socket_errors']}" if errs else "")
                + (f"  FOREIGN CPU {cw.foreign_pct:.0f}%" if cw.foreign_pct > FOREIGN_WARN else ""))
            time.sleep(0.5)
        for t in h2_targets:
            argv = ["h2load", "-t1", f"-c{args.connections}", "-m10", "-D", str(duration), "--warm-up-time=0",
                    f"http://127.0.0.1:{t.h2_port}/"]
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60)
            o = p.stdout.decode(errors="replace")
            (raw / f"r{rnd + 1}-{t.key}.h2load.txt").write_text(" ".join(argv) + "\n" + o)
            try:
                r = parse_h2load(o)
            except ValueError as e:
                raise BenchError(f"{t.label}: cannot parse h2load output ({e}):\n{o}")
            r["round"] = rnd + 1
            h2_results[t.key].append(r)
            log(f"round {rnd + 1}/{rounds} h2c {t.label:<20} {r['rps']:>10,.0f} rps  "
                f"mean {r.get('mean_ms', float('nan')):.2f} ms")
            time.sleep(0.5)

    # post-run check: still up and still correct
    for t in targets.values():
        verify(t)

    # --- summarize ---------------------------------------------------------------------------
    summary = {}
    for key, rs in results.items():
        summary[key] = {
            "label": targets[key].label,
            "rps": summarize([r["rps"] for r in rs]),
            "p99_ms": summarize([r["p99_ms"] for r in rs]),
            "p50_ms": summarize([r["p50_ms"] for r in rs]),
            "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in rs),
            "socket_errors": sum(sum(r["socket_errors"].values()) for r in rs),
            "requests": sum(r["requests"] or 0 for r in rs),
            "foreign_cpu_pct": summarize([r["foreign_cpu_pct"] for r in rs]),
        }
    direct = summary["direct"]
    for key, s in summary.items():
        s["rps_vs_direct"] = s["rps"]["median"] / direct["rps"]["median"]
        s["p99_vs_direct"] = s["p99_ms"]["median"] / direct["p99_ms"]["median"]

    def per_round_ratio(a: str, b: str, metric: str) -> list[float]:
        ra = {r["round"]: r[metric] for r in results[a]}
        rb = {r["round"]: r[metric] for r in results[b]}
        return [ra[i] / rb[i] for i in sorted(ra) if i in rb and rb[i]]

    ratio_defs = [
        ("sluicegate / nginx, rps", "sluicegate", "nginx", "rps", "higher is better"),
        ("sluicegate / nginx, p99", "sluicegate", "nginx", "p99_ms", "lower is better"),
        ("sluicegate / haproxy, rps", "sluicegate", "haproxy", "rps", "higher is better"),
        ("sluicegate / haproxy, p99", "sluicegate", "haproxy", "p99_ms", "lower is better"),
        ("sluicegate / pingora, rps", "sluicegate", "pingora", "rps", "higher is better"),
        ("sluicegate / pingora, p99", "sluicegate", "pingora", "p99_ms", "lower is better"),
        ("sluicegate / envoy, rps", "sluicegate", "envoy", "rps", "higher is better"),
        ("sluicegate+filter / sluicegate, rps", "sluicegate-filter", "sluicegate", "rps",
         "filter cost; 1.0 = free"),
        ("sluicegate+filter / sluicegate, p99", "sluicegate-filter", "sluicegate", "p99_ms",
         "filter cost; 1.0 = free"),
        ("sluicegate+3 filters / sluicegate, rps", "sluicegate-3filters", "sluicegate", "rps",
         "3-filter chain cost; 1.0 = free"),
        ("sluicegate+3 filters / sluicegate, p99", "sluicegate-3filters", "sluicegate", "p99_ms",
         "3-filter chain cost; 1.0 = free"),
        ("sluicegate+filter / envoy+wasm, rps", "sluicegate-filter", "envoy-wasm", "rps", "higher is better"),
        ("sluicegate+filter / envoy+wasm, p99", "sluicegate-filter", "envoy-wasm", "p99_ms", "lower is better"),
        ("envoy+wasm / envoy, rps", "envoy-wasm", "envoy", "rps", "Envoy's filter cost, for comparison"),
    ]
    ratios = []
    for name, a, b, metric, note in ratio_defs:
        if a in summary and b in summary:
            pr = per_round_ratio(a, b, metric)
            ratios.append({"name": name, "a": a, "b": b, "metric": metric, "note": note,
                           "ratio_of_medians": summary[a][metric]["median"] / summary[b][metric]["median"],
                           "per_round": summarize(pr)})

    h2_summary = {}
    for key, rs in h2_results.items():
        if rs:
            h2_summary[key] = {"label": targets[key].label, "rps": summarize([r["rps"] for r in rs]),
                               "mean_ms": summarize([r.get("mean_ms", float("nan")) for r in rs]),
                               "failed": sum(r.get("failed", 0) + r.get("errored", 0) + r.get("timeout", 0)
                                             for r in rs),
                               "non_2xx": sum(sum(v for k, v in r.get("status", {}).items() if k != "2xx")
                                              for r in rs)}

    envoy_v = run_out([envoy, "--version"])
    m = re.search(r"version: (\S+)", envoy_v)
    versions = {
        "sluicegate": first_line(run_out([args.sluicegate, "--version"])) if Path(args.sluicegate).exists()
        else "n/a",
        "sluicegate_git": first_line(run_out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])),
        "nginx": first_line(run_out([nginx, "-v"])),
        "haproxy": first_line(run_out([haproxy, "-v"])),
        "pingora": pingora_version() if "pingora" in targets else "not run",
        "envoy": m.group(1) if m else first_line(envoy_v),
        "wrk": first_line(run_out(["wrk", "-v"])),
        "h2load": first_line(run_out(["h2load", "--version"])) if shutil.which("h2load") else "n/a",
        "rustc": first_line(run_out(["rustc", "-V"])),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu_model = "unknown"

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_busy_before_pct": round(busy_before, 1),
        "waited_for_quiet_s": round(waited, 1),
        "reruns_for_foreign_load": sum(r.get("retries", 0) for rs in results.values() for r in rs),
        "rounds": rounds, "duration_s": duration, "connections": args.connections,
        "backends": args.backends,
        "wrk_threads": 1, "warmup_s": args.warmup, "seed": seed, "orders": orders,
        "quick": args.quick,
        "load_generator": f"wrk -t1 -c{args.connections} -d{duration}s --latency",
        "versions": versions,
    }
    doc = {"meta": meta, "targets": summary, "ratios": ratios, "h2c": h2_summary,
           "h2c_skipped": h2_skipped, "verified_headers": verified,
           "runs": results, "h2c_runs": h2_results}

    md = render_md(doc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'} (raw wrk output in {raw})")
    bad = [s["label"] for s in summary.values() if s["non_2xx_3xx"] or s["socket_errors"]]
    if bad:
        log(f"WARNING: non-2xx responses or socket errors on: {', '.join(bad)} (see the table)")
    return 0


def render_md(doc: dict) -> str:
    meta, summary = doc["meta"], doc["targets"]
    v = meta["versions"]
    L = []
    L.append("# Sluicegate benchmark results\n")
    L.append(f"{meta['date']} · {meta['nproc']} CPUs ({meta['cpu_model']}) · "
             f"{meta['rounds']} interleaved rounds × {meta['duration_s']} s per target · "
             f"`{meta['load_generator']}` · medians over rounds, (min–max) spread"
             + (f" · every proxy balances over **{meta['backends']} backends** (round robin)"
                if meta.get("backends", 1) > 1 else "")
             + (" · **quick run**" if meta["quick"] else "") + "\n")
    if meta["cpu_busy_before_pct"] > 20:
        L.append(f"> **Warning:** the machine was {meta['cpu_busy_before_pct']:.0f}% busy before the run; "
                 "numbers are skewed.\n")
    L.append("| target | req/s | req/s spread | p99 ms | p99 spread | p50 ms | req/s vs direct "
             "| p99 vs direct | non-2xx | socket errors | other CPU % |")
    L.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for key, s in summary.items():
        L.append(f"| {s['label']} | {fmt_rps(s['rps']['median'])} | "
                 f"{fmt_rps(s['rps']['min'])}–{fmt_rps(s['rps']['max'])} | {fmt_ms(s['p99_ms']['median'])} | "
                 f"{fmt_ms(s['p99_ms']['min'])}–{fmt_ms(s['p99_ms']['max'])} | {fmt_ms(s['p50_ms']['median'])} | "
                 f"{s['rps_vs_direct']:.2f} | {s['p99_vs_direct']:.2f} | "
                 f"{s['non_2xx_3xx']}{' ⚠' if s['non_2xx_3xx'] else ''} | "
                 f"{s['socket_errors']}{' ⚠' if s['socket_errors'] else ''} | "
                 f"{s['foreign_cpu_pct']['max']:.0f}{' ⚠' if s['foreign_cpu_pct']['max'] > FOREIGN_WARN else ''} |")
    L.append("")
    L.append("*other CPU %*: the most CPU (percent of the machine, approximate) that processes other than "
             "the targets, the backend, wrk and this script used during any of that target's runs; above "
             f"{FOREIGN_WARN:.0f}% that run competed with foreign load (a build?) and its numbers are low.\n")
    if doc["ratios"]:
        L.append("## Key ratios\n")
        L.append("Ratio of the medians, and the spread (min–max) of the same ratio taken within each round.\n")
        L.append("| ratio | value | per-round spread | reading |")
        L.append("|---|--:|--:|---|")
        for r in doc["ratios"]:
            pr = r["per_round"]
            L.append(f"| {r['name']} | {r['ratio_of_medians']:.2f} | {pr['min']:.2f}–{pr['max']:.2f} | {r['note']} |")
        L.append("")
    if doc["h2c"] or doc["h2c_skipped"]:
        L.append("## h2c (h2load -t1 -c{0} -m10)\n".format(meta["connections"]))
        L.append("| target | req/s | req/s spread | mean ms | failed | non-2xx |")
        L.append("|---|--:|--:|--:|--:|--:|")
        for key, s in doc["h2c"].items():
            L.append(f"| {s['label']} | {fmt_rps(s['rps']['median'])} | {fmt_rps(s['rps']['min'])}–"
                     f"{fmt_rps(s['rps']['max'])} | {fmt_ms(s['mean_ms']['median'])} | {s['failed']} | "
                     f"{s['non_2xx']} |")
        for key, why in doc["h2c_skipped"].items():
            L.append(f"| {summary[key]['label']} | skipped: {why} | | | | |")
        L.append("")
    L.append("## Setup\n")
    L.append("All on 127.0.0.1, one worker each, one shared nginx backend returning a fixed 12-byte body "
             "(keep-alive, access_log off). Proxies keep connections to the backend alive. Every target was "
             "checked before and after measuring: 200, the backend's body, and for the filtered ones "
             "`x-hello: world` on the response and `x-from: sluicegate` seen by the backend.\n")
    L.append("## Versions\n")
    for k in ("sluicegate", "sluicegate_git", "nginx", "haproxy", "pingora", "envoy", "wrk", "h2load", "rustc",
              "kernel"):
        if k in v:
            L.append(f"- {k}: `{v[k]}`")
    L.append(f"- nproc: {meta['nproc']}; CPU busy before run: {meta['cpu_busy_before_pct']}%; "
             f"order seed: {meta['seed']}; runs measured again because of foreign load: "
             f"{meta['reruns_for_foreign_load']}")
    L.append("")
    return "\n".join(L)


def run(main_fn) -> None:
    """Every bench script's entry: exit with main's code, or 1 after `FAILED: <why>`."""
    try:
        sys.exit(main_fn())
    except BenchError as e:
        log("FAILED: " + str(e))
        sys.exit(1)


if __name__ == "__main__":
    run(main)
