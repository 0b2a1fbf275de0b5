#!/usr/bin/env python3
"""Per-request cost of a filter in each language, measured with
`sluicegate filter bench` (no proxy, no network: the filter calls alone).

    python3 bench/languages.py                 # 5 interleaved rounds
    python3 bench/languages.py --rounds 9 --calls 40000

Peers, measured in the same run: the Rust `add-header` filter (the baseline
every ratio is taken against), `py-router` (Python), `js-validate`
(JavaScript), `c-blocklist` (C). Each runs the phases it asks for, on the
sample request it was written for. Per round the filters run in an order
rotated by one, so each runs early and late; the table shows medians.

Also printed per filter: the component's size, a cold compile (empty
artifact cache: `filter test` end to end, process start included) and a
cached start (the artifact mapped from the cache).

Needs target/release/sluicegate, target/filters/add-header.wasm
(scripts/build-filters.sh) and the language filters
(scripts/build-lang-filters.sh); `--build` runs those first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "sluicegate"
FILTERS = ROOT / "target" / "filters"

# name, language, config (TOML), sample arguments
PEERS = [
    ("add-header", "Rust", 'request_headers = { "x-from" = "sluicegate" }\n'
     'response_headers = { "x-hello" = "world" }\n',
     ["--request", "GET /", "--response", "200"]),
    ("py-router", "Python", 'header = "x-tenant"\nroutes = { beta = "beta-pool", gold = "gold-pool" }\n',
     ["--request", "GET /app", "-H", "x-tenant: beta", "--response", "200"]),
    ("js-validate", "JavaScript", 'required = ["name"]\n',
     ["--request", "POST /users", "--body", json.dumps({"name": "ada", "email": "ada@example.com"})]),
    ("c-blocklist", "C", 'blocked = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.7", "2001:db8::/32"]\n',
     ["--request", "GET /", "--client", "127.0.0.1:40000"]),
]

BENCH_LINE = re.compile(r"warm instance ([0-9.]+) us/request, fresh instance ([0-9.]+) us/request")


def run(argv: list[str], env: dict | None = None, timeout: float = 600) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{p.stdout}{p.stderr}")
    return p.stdout


def bench_once(name: str, cfg: Path, sample: list[str], calls: int) -> tuple[float, float]:
    out = run([str(BIN), "filter", "bench", str(FILTERS / f"{name}.wasm"), "--config", str(cfg),
               "--calls", str(calls), *sample])
    m = BENCH_LINE.search(out)
    if not m:
        sys.exit(f"{name}: no result in\n{out}")
    return float(m.group(1)), float(m.group(2))


def start_time(name: str, cfg: Path, sample: list[str], tmpdir: str) -> float:
    env = dict(os.environ, TMPDIR=tmpdir)
    t = time.perf_counter()
    run([str(BIN), "filter", "test", str(FILTERS / f"{name}.wasm"), "--config", str(cfg), *sample], env=env)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000, help="warm calls per measurement (fresh: calls/20)")
    ap.add_argument("--build", action="store_true", help="build the host and the filters first")
    args = ap.parse_args()

    if args.build:
        subprocess.run(["bash", "scripts/build-filters.sh", "add-header"], cwd=ROOT, check=True)
        subprocess.run(["bash", "scripts/build-lang-filters.sh"], cwd=ROOT, check=True)
        subprocess.run(["cargo", "build", "--release", "-p", "sluicegate"], cwd=ROOT, check=True)
    missing = [str(p) for p in [BIN] + [FILTERS / f"{n}.wasm" for n, *_ in PEERS] if not p.exists()]
    if missing:
        sys.exit("missing: " + ", ".join(missing) + " (run with --build)")

    work = Path(tempfile.mkdtemp(prefix="sluicegate-lang-bench-"))
    try:
        cfgs = {}
        for name, _, cfg, _ in PEERS:
            cfgs[name] = work / f"{name}.toml"
            cfgs[name].write_text(cfg)

        # Start costs: a cold compile into an empty cache, then a cached start.
        starts = {}
        for name, _, _, sample in PEERS:
            cache = work / f"tmp-{name}"
            cache.mkdir()
            cold = start_time(name, cfgs[name], sample, str(cache))
            cached = start_time(name, cfgs[name], sample, str(cache))
            starts[name] = (cold, cached)
            print(f"  {name}: cold start {cold:.2f} s, cached start {cached:.2f} s", file=sys.stderr)

        warm: dict[str, list[float]] = {n: [] for n, *_ in PEERS}
        fresh: dict[str, list[float]] = {n: [] for n, *_ in PEERS}
        order = list(range(len(PEERS)))
        for r in range(args.rounds):
            rot = order[r % len(order):] + order[:r % len(order)]
            for i in rot:
                name, _, _, sample = PEERS[i]
                w, f = bench_once(name, cfgs[name], sample, args.calls)
                warm[name].append(w)
                fresh[name].append(f)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

        base_w = statistics.median(warm["add-header"])
        base_f = statistics.median(fresh["add-header"])
        print()
        print(f"Per-request filter cost, median of {args.rounds} interleaved rounds "
              f"({args.calls} warm / {max(args.calls // 20, 100)} fresh requests each); "
              f"ratios against the Rust add-header measured in the same run.")
        print()
        print("| filter | language | size | cold compile + start | cached start | warm µs/req | × Rust | fresh µs/req | × Rust |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, lang, _, _ in PEERS:
            size = (FILTERS / f"{name}.wasm").stat().st_size
            w = statistics.median(warm[name])
            f = statistics.median(fresh[name])
            cold, cached = starts[name]
            size_s = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"
            print(f"| {name} | {lang} | {size_s} | {cold:.2f} s | {cached:.2f} s | {w:.2f} | {w / base_w:.1f} "
                  f"| {f:.1f} | {f / base_f:.1f} |")
        print()
        print("warm: a pooled instance reused across requests (the default, isolation = \"pool\");")
        print("fresh: a new instance per phase call (isolation = \"request\").")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
