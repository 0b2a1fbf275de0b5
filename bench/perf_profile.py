#!/usr/bin/env python3
"""Profile Sluicegate's plain proxy hot path with perf, under wrk load.

    python3 bench/perf_profile.py [--seconds 10] [--callgraph] [--sluicegate PATH]

Starts bench.py's nginx backend and Sluicegate (one worker, one route, no filters), runs
`wrk -t1 -c50` against it, and meanwhile `perf record` on the Sluicegate process only (flat
profile at 999 Hz; with --callgraph also a DWARF call-graph profile, which is much larger). The
release profile keeps line tables, so symbols resolve. Needs `perf` (Debian `linux-perf`).

Writes bench/out/profile/: perf.data, top.txt (self time by symbol), dso.txt (by binary:
kernel vs the sluicegate binary vs libc), results.json (user/kernel share, the top symbols, the
wrk figures measured while profiling: perf costs some throughput). docs/benchmarks.md has the
reading of a run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import scenario as S  # noqa: E402


def perf_report(data: Path, sort: str, extra: list[str] | None = None) -> str:
    p = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
                        "--percent-limit", "0.3", *(extra or [])],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600)
    return p.stdout.decode(errors="replace")


def parse_rows(report: str) -> list[tuple[float, str]]:
    rows = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((float(m.group(1)), m.group(2)))
    return rows


def group_symbols(rows: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """Self time summed by component: kernel, allocator, libc, hyper, tokio, our code, ..."""
    cats = [("kernel", lambda n: "[k]" in n), ("mimalloc", lambda n: "mi_" in n),
            ("libc (memcpy/memmove)", lambda n: n.startswith("libc")),
            ("hyper + hyper-util", lambda n: "hyper" in n), ("tokio/mio", lambda n: "tokio" in n or "mio::" in n),
            ("sluicegate host code", lambda n: "sluicegate::" in n),
            ("http/httparse/bytes", lambda n: any(x in n for x in ("http::", "httparse", "bytes::")))]
    out: dict[str, float] = {}
    for p, n in rows:
        name = next((c for c, pred in cats if pred(n)), "other")
        out[name] = out.get(name, 0) + p
    return [(k, round(v, 1)) for k, v in sorted(out.items(), key=lambda kv: -kv[1])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--callgraph", action="store_true", help="also a DWARF call-graph profile")
    ap.add_argument("--sluicegate", default=str(S.ROOT / "target/release/sluicegate"))
    ap.add_argument("--out", default=str(S.BENCH / "out" / "profile"))
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise B.BenchError("perf not found: apt-get install linux-perf")
    out = Path(args.out)
    work = S.fresh_dir(out / "work")
    procs = B.Processes(work / "pids")
    S.on_signals()
    exe = Path(args.sluicegate)
    busy = B.cpu_busy(1.0)

    backend, port, admin = B.free_ports(3)
    S.start_backend(procs, work, backend)
    t = S.start_sluicegate(procs, work, "sluicegate", "sluicegate", port, exe,
                           S.sluicegate_toml(port, admin, backend, None))
    B.verify(t)
    subprocess.run(["wrk", "-t1", "-c50", "-d2s", t.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = t.procs[0].pid
    results = {}
    for kind in ["flat"] + (["dwarf"] if args.callgraph else []):
        data = out / f"perf-{kind}.data"
        rec = ["perf", "record", "-o", str(data), "-p", str(pid)]
        rec += ["-F", "999"] if kind == "flat" else ["-F", "199", "--call-graph", "dwarf,16384"]
        wrk = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{args.seconds + 2}s", "--latency", t.url],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1)
        subprocess.run(rec + ["--", "sleep", str(args.seconds)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=args.seconds + 120)
        o = wrk.communicate(timeout=args.seconds + 60)[0].decode(errors="replace")
        results[f"wrk_{kind}"] = B.parse_wrk(o)
    data = out / "perf-flat.data"
    top = perf_report(data, "dso,sym")
    dso = perf_report(data, "dso")
    (out / "top.txt").write_text(top)
    (out / "dso.txt").write_text(dso)
    if args.callgraph:
        cg = subprocess.run(["perf", "report", "-i", str(out / "perf-dwarf.data"), "--stdio", "--children",
                             "--sort", "sym", "--percent-limit", "2", "-g", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=900)
        (out / "children.txt").write_text(cg.stdout.decode(errors="replace"))
    rows = parse_rows(top)
    every = parse_rows(subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort",
                                       "dso,sym"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      timeout=600).stdout.decode(errors="replace"))
    kernel = sum(p for p, name in rows if "[k]" in name)
    dso_rows = parse_rows(dso)
    doc = {"scenario": "profile",
           "meta": S.meta(exe, busy, seconds=args.seconds),
           "kernel_pct": round(sum(p for p, n in dso_rows if "kernel" in n), 1),
           "kernel_pct_top_symbols": round(kernel, 1),
           "by_dso": dso_rows[:10], "top_symbols": rows[:40], "groups": group_symbols(every), **results}
    md = ["# Profile of the plain proxy (perf, self time)\n",
          f"kernel share {doc['kernel_pct']}% · wrk while profiling: {results['wrk_flat']['rps']:,.0f} rps\n",
          "| % | symbol |", "|--:|---|", *(f"| {p:.1f} | `{n}` |" for p, n in rows[:30]), ""]
    S.write_results(out, doc, "\n".join(md))
    return 0


if __name__ == "__main__":
    B.run(main)
