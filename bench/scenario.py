"""Shared pieces of the extra benchmark scenarios (memory.py, reload.py, perf_profile.py).

They reuse bench.py's process management, config generators and parsing (`import bench as B`), and
add what a scenario needs on top: starting the shared nginx backend and a proxy in one call, the
memory of a process group, the file-descriptor limit, and a results file with the same metadata
(versions, core count, foreign CPU) as the main run.

bench.py's config generators take one backend port, or (once `--backends N` is merged) a list of
ports; `backend_arg` passes whichever the running bench.py expects, so these scenarios work with both.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import os
import platform
import resource
import shutil
import signal
import time
from pathlib import Path

import bench as B  # noqa: E402  (bench/ is on sys.path: the scripts live next to it)

ROOT = B.ROOT
BENCH = B.BENCH


def backend_arg(fn, port: int):
    """`port` as the generator `fn` wants it: an int (`backend`) or a list (`backends`)."""
    params = inspect.signature(fn).parameters
    return [port] if "backends" in params or "ports" in params else port


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (children inherit it); returns the
    new soft limit. The hard limit cannot be raised without privileges: the caller checks."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def on_signals() -> None:
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def haproxy_bin() -> str:
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def start_backend(procs: B.Processes, work: Path, port: int) -> B.Target:
    """The shared nginx backend of bench.py (one worker, `200 hello world`)."""
    d = work / "backend"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(B.backend_conf(work, backend_arg(B.backend_conf, port)))
    t = B.Target("direct", "direct (nginx backend)", port)
    t.procs.append(procs.spawn("backend nginx", [nginx_bin(), "-e", str(d / "error.log"), "-p", str(d),
                                                 "-c", str(conf)], d / "stdout.log", match="nginx"))
    B.wait_ready(procs, t, 15)
    return t


def add_header_dir(wasm: Path, dest: Path) -> Path:
    """A filter directory at `dest` holding the add-header component `wasm` (the benches' one filter)."""
    if not wasm.is_file():
        raise B.BenchError(f"{wasm} missing: bench/run.sh builds it (scripts/build-filters.sh)")
    dest.mkdir()
    shutil.copy2(wasm, dest / "add-header.wasm")
    return dest


def sluicegate_toml(port: int, admin: int, backend: int, filter_dir: Path | None) -> str:
    return B.sluicegate_conf(port, admin, backend_arg(B.sluicegate_conf, backend), filter_dir)


def start_sluicegate(procs: B.Processes, work: Path, key: str, label: str, port: int, exe: Path,
                     toml: str, timeout: float = 60) -> B.Target:
    d = work / key
    d.mkdir(parents=True, exist_ok=True)
    if not exe.is_file():
        raise B.BenchError(f"{exe} missing: build it with `cargo build --release -p sluicegate`")
    exe = exe.resolve()  # the process runs in its work dir
    cfg = d / "sluicegate.toml"
    cfg.write_text(toml)
    t = B.Target(key, label, port)
    env = dict(os.environ, NO_COLOR="1")
    t.procs.append(procs.spawn(key, [str(exe), "run", "--config", str(cfg)], d / "sluicegate.log",
                               env=env, match="sluicegate"))
    B.wait_ready(procs, t, timeout)
    return t


def start_nginx_proxy(procs: B.Processes, work: Path, key: str, label: str, port: int, backend: int,
                      connections: int | None = None) -> B.Target:
    """bench.py's nginx proxy config; with `connections`, room for that many clients."""
    d = work / key
    d.mkdir(parents=True, exist_ok=True)
    text = B.nginx_proxy_conf(work, port, backend_arg(B.nginx_proxy_conf, backend), None)
    # bench.py names its work dir "nginx"; ours may differ (pid file, temp paths).
    text = text.replace(str(work / "nginx") + "/", str(d) + "/")
    if connections:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        text = text.replace("worker_connections 8192", f"worker_connections {connections + 1024}")
        text = text.replace("worker_rlimit_nofile 65536", f"worker_rlimit_nofile {nofile}")
    (d / "tmp").mkdir(exist_ok=True)
    cfg = d / "nginx.conf"
    cfg.write_text(text)
    t = B.Target(key, label, port)
    t.procs.append(procs.spawn(label, [nginx_bin(), "-e", str(d / "error.log"), "-p", str(d), "-c", str(cfg)],
                               d / "stdout.log", match="nginx"))
    B.wait_ready(procs, t, 15)
    return t


def start_haproxy(procs: B.Processes, work: Path, key: str, port: int, backend: int,
                  connections: int | None = None) -> B.Target:
    d = work / key
    d.mkdir(parents=True, exist_ok=True)
    text = B.haproxy_conf(port, backend_arg(B.haproxy_conf, backend))
    if connections:
        # HAProxy reserves two descriptors per connection (client and server side) up front.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        text = text.replace("maxconn 8192", f"maxconn {min(connections + 1024, (nofile - 200) // 2)}")
    cfg = d / "haproxy.cfg"
    cfg.write_text(text)
    t = B.Target(key, "haproxy", port)
    t.procs.append(procs.spawn("haproxy", [haproxy_bin(), "-db", "-f", str(cfg)], d / "haproxy.log"))
    B.wait_ready(procs, t, 15)
    return t


# ---------------------------------------------------------------------------------------------
# memory


def group_pids(pgid: int) -> list[int]:
    """Every live process in process group `pgid` (a target leads its own group: nginx's master and
    worker, or the one sluicegate process)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(rest[2]) == pgid and rest[0] not in ("Z", "X"):
            pids.append(int(d))
    return sorted(pids)


def proc_mem_kb(pid: int) -> dict:
    """VmRSS and PSS (proportional: shared pages split between sharers) of one process, in KiB."""
    r = {"rss_kb": 0, "pss_kb": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    r["rss_kb"] = int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    r["pss_kb"] = int(line.split()[1])
    except OSError:
        r["pss_kb"] = r["rss_kb"]
    return r


def target_mem_mb(t: B.Target) -> dict:
    """Summed RSS and PSS (MiB) of every process of a target, and how many processes that was."""
    rss = pss = 0
    n = 0
    for p in t.procs:
        for pid in group_pids(p.pid) or [p.pid]:
            m = proc_mem_kb(pid)
            rss += m["rss_kb"]
            pss += m["pss_kb"]
            n += 1
    return {"rss_mb": rss / 1024, "pss_mb": pss / 1024, "processes": n}


# ---------------------------------------------------------------------------------------------
# metadata and results


def versions(exe: Path) -> dict:
    v = {
        "sluicegate": B.first_line(B.run_out([str(exe), "--version"])) if exe.exists() else "n/a",
        "sluicegate_git": B.first_line(B.run_out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])),
        "nginx": B.first_line(B.run_out([nginx_bin(), "-v"])),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    if shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists():
        v["haproxy"] = B.first_line(B.run_out([haproxy_bin(), "-v"]))
    if shutil.which("wrk"):
        v["wrk"] = B.first_line(B.run_out(["wrk", "-v"]))
    return v


def meta(exe: Path, busy_before: float, **extra) -> dict:
    try:
        cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu_model = "unknown"
    m = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_busy_before_pct": round(busy_before, 1),
        "versions": versions(exe),
    }
    m.update(extra)
    return m


def write_results(out: Path, doc: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    B.log(f"wrote {out / 'results.md'} and {out / 'results.json'}")


def median_spread(vals: list[float]) -> dict:
    return B.summarize(vals) if vals else {"median": float("nan"), "min": float("nan"),
                                           "max": float("nan"), "n": 0}


def wait_until(pred, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()
