#!/usr/bin/env python3
"""Isolation scenario: does one tenant's computing filter starve a plain route?

    python3 bench/isolation.py [--rounds 3] [--seconds 5]

Sluicegate with two workers in front of the shared nginx backend, and three kinds of route:
`/plain` (no filter), `/heavy`, `/heavy2`, `/heavy3` (the `probe` test filter, which computes for
5 ms per call when the request carries `x-probe-spin-ms: 5`, within its 50 ms deadline) and `/loop`
(`hostile-loop`, which computes until its deadline cuts it off). Every filter keeps the default CPU
share, `max_cpu_percent = 25` (of both workers together: half a core).

Each round, interleaved, runs `wrk -t1 -c10 --latency` on `/plain` for `--seconds`:
  alone        nothing else;
  heavy        while `wrk -c20` hits `/heavy` with the 5 ms header;
  loop         while `wrk -c20` hits `/loop`;
  three        while three `wrk -c7` hit `/heavy`, `/heavy2`, `/heavy3` (the filter on three routes).
For the loaded runs the filter's CPU share is read from `/filters` (`cpu_seconds` over the window,
as a share of both workers) and its shed calls (`shed`, answered 503).

Goal (issue 21): the plain route keeps >= 50 % of its unloaded req/s with p99 <= 5 ms; the filter's
share stays at its limit (+-10 %). Results: bench/out/isolation/results.{md,json}.
Needs nginx, wrk, target/release/sluicegate and target/test-filters/{probe,hostile-loop}.wasm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402

LOADS = ["alone", "heavy", "loop", "three"]


def config(port: int, admin: int, backend: int, filters: Path) -> str:
    up = B.toml_str(f"127.0.0.1:{backend}")
    routes = "".join(
        f'\n[[route]]\npath_prefix = "/{r}"\nupstream = "app"\nfilters = ["{f}"]\n'
        for r, f in [("heavy2", "probe"), ("heavy3", "probe"), ("heavy", "probe"), ("loop", "hostile-loop")]
    )
    return f"""[proxy]
listen = [{B.toml_str(f"127.0.0.1:{port}")}]
workers = 2
admin = {B.toml_str(f"127.0.0.1:{admin}")}

[[upstream]]
name = "app"
endpoints = [{up}]
{routes}
[[route]]
path_prefix = "/"
upstream = "app"

[filters]
dir = {B.toml_str(str(filters))}
timeout_ms = 50
"""


def wrk(port: int, path: str, conns: int, secs: int, header: str | None = None) -> subprocess.Popen:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if header:
        argv += ["-H", header]
    return subprocess.Popen(argv + [f"http://127.0.0.1:{port}{path}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def filters_json(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/filters", timeout=5) as r:
        return {f["name"]: f for f in json.load(r)["filters"]}


def one(port: int, admin: int, load: str, secs: int) -> dict:
    extra = []
    spin = "x-probe-spin-ms: 5"
    if load == "heavy":
        extra = [wrk(port, "/heavy", 20, secs + 1, spin)]
    elif load == "loop":
        extra = [wrk(port, "/loop", 20, secs + 1)]
    elif load == "three":
        extra = [wrk(port, p, 7, secs + 1, spin) for p in ("/heavy", "/heavy2", "/heavy3")]
    if extra:
        time.sleep(0.5)
    before = filters_json(admin)
    t0 = time.monotonic()
    plain = wrk(port, "/plain", 10, secs)
    out, _ = plain.communicate()
    window = time.monotonic() - t0
    after = filters_json(admin)
    for p in extra:
        p.communicate()
    r = B.parse_wrk(out)
    name = "hostile-loop" if load == "loop" else "probe"
    res = {"rps": r.get("rps", 0.0), "p99_ms": r.get("p99_ms", float("nan"))}
    if extra:
        cpu = after[name]["cpu_seconds"] - before[name]["cpu_seconds"]
        res["filter_cpu_pct"] = 100.0 * cpu / (window * 2)
        res["filter_shed"] = after[name]["shed"] - before[name]["shed"]
        res["filter_calls"] = after[name]["calls"] - before[name]["calls"]
        res["filter_slow"] = after[name]["slow"]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--exe", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--out", default=str(S.BENCH / "out/isolation"))
    args = ap.parse_args()
    S.on_signals()
    work = S.fresh_dir(Path(args.out) / "work")
    fdir = work / "filters"
    fdir.mkdir()
    for f in ("probe", "hostile-loop"):
        src = S.ROOT / "target/test-filters" / f"{f}.wasm"
        if not src.is_file():
            raise B.BenchError(f"{src} missing: run scripts/build-filters.sh")
        (fdir / f"{f}.wasm").write_bytes(src.read_bytes())
    busy = B.cpu_busy()
    procs = B.Processes(work / "pids")
    results: dict[str, list[dict]] = {k: [] for k in LOADS}
    try:
        backend, port, admin = B.free_ports(3)
        S.start_backend(procs, work, backend)
        S.start_sluicegate(procs, work, "sluicegate", "Sluicegate", port, Path(args.exe),
                           config(port, admin, backend, fdir))
        # Warm up: the filters' versions learn they are slow.
        for p in [wrk(port, "/heavy", 4, 1, "x-probe-spin-ms: 5"), wrk(port, "/loop", 2, 1),
                  wrk(port, "/plain", 4, 1)]:
            p.communicate()
        for rnd in range(args.rounds):
            for load in LOADS:
                r = one(port, admin, load, args.seconds)
                B.log(f"round {rnd + 1} {load}: {r}")
                results[load].append(r)
    finally:
        procs.stop_all()
    doc = {"meta": S.meta(Path(args.exe), busy, rounds=args.rounds, seconds=args.seconds),
           "results": results}
    S.write_results(Path(args.out), doc, render(doc))
    return 0


def med(rows: list[dict], key: str) -> float:
    vals = sorted(r[key] for r in rows if key in r)
    return vals[len(vals) // 2] if vals else float("nan")


def render(doc: dict) -> str:
    res = doc["results"]
    alone = med(res["alone"], "rps")
    lines = [
        "# Isolation: a plain route while a computing filter is hammered",
        "",
        f"{doc['meta']['date']}, {doc['meta']['nproc']} cores, {doc['meta']['rounds']} interleaved rounds "
        f"x {doc['meta']['seconds']} s, medians. Plain route: `wrk -t1 -c10`; two workers; filter share "
        "`max_cpu_percent = 25` (of both workers).",
        "",
        "| load beside the plain route | plain req/s | kept | plain p99 | filter CPU share | filter calls | shed |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for load, label in [("alone", "nothing"), ("heavy", "20 conns on a 5 ms filter"),
                        ("loop", "20 conns on a filter looping to its deadline"),
                        ("three", "the 5 ms filter on 3 routes, 7 conns each")]:
        rows = res[load]
        rps = med(rows, "rps")
        kept = f"{100 * rps / alone:.0f} %" if alone else "-"
        share = med(rows, "filter_cpu_pct")
        lines.append(
            f"| {label} | {rps:,.0f} | {kept} | {med(rows, 'p99_ms'):.2f} ms | "
            + (f"{share:.1f} %" if share == share else "-") + " | "
            + (f"{med(rows, 'filter_calls'):,.0f}" if load != "alone" else "-") + " | "
            + (f"{med(rows, 'filter_shed'):,.0f}" if load != "alone" else "-") + " |"
        )
    lines += ["", "Goal: kept >= 50 %, p99 <= 5 ms, share at 25 % +-10 %.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    B.run(main)
