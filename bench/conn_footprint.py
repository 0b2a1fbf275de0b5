#!/usr/bin/env python3
"""Live bytes per idle keep-alive connection on Sluicegate's plain HTTP/1.1 path, by allocation size.

    python3 bench/conn_footprint.py [-n 10000] [--variants default,boxed-slot,no-park]

Builds bench/conn-footprint (its own workspace, --target-dir target/footprint: the host's h1 reader
and ticker compiled in by path, server.rs's per-connection path copied, a counting allocator over
mimalloc v2), opens N connections with one request each (memory.py's client, batches of 200), waits,
and prints the live bytes that grew per connection, split by allocation size, and RSS. No host build.
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402
import memory as M  # noqa: E402
import scenario as S  # noqa: E402

CRATE = S.BENCH / "conn-footprint"
EXE = S.ROOT / "target" / "footprint" / "release" / "bench-conn-footprint"


def ask(p, cmd):
    p.stdin.write(cmd + "\n"); p.stdin.flush()
    return json.loads(p.stdout.readline())


def run(variant, n, settle):
    port = B.free_ports(1)[0]
    p = subprocess.Popen([str(EXE), str(port), "--variant", variant], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        socks = M.open_conns(port, 50); M.request_all(socks); M.close_all(socks); time.sleep(settle)
        ask(p, "base"); base = ask(p, "dump")
        socks = M.open_conns(port, n)
        failed = M.request_all(socks)
        time.sleep(settle)
        held = ask(p, "dump")
        failed += M.request_all(socks)
        M.close_all(socks)
        time.sleep(settle)
        after = ask(p, "dump")
        sizes = ask(p, "sizes")
    finally:
        p.kill(); err = p.stderr.read()
    return {"variant": variant, "n": n, "failed": failed, "sizes": sizes, "stderr": err.strip(),
            "live_kb_per_conn": held["grown_bytes"] / n / 1024, "blocks_per_conn": held["grown_blocks"] / n,
            "rss_kb_per_conn": (held["rss_kb"] - base["rss_kb"]) / n,
            "rss_after_close_kb_over_base": after["rss_kb"] - base["rss_kb"],
            "live_after_close_bytes": after["grown_bytes"],
            "by_size": [(s, c / n) for s, c in held["by_size"] if abs(c) >= n // 2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--variants", default="default,boxed-slot,no-park")
    ap.add_argument("--out", default=str(S.BENCH / "out" / "footprint"))
    args = ap.parse_args()
    S.raise_nofile(args.n + 512)
    subprocess.run(["nice", "-n", "10", "cargo", "build", "--release", "--manifest-path", str(CRATE / "Cargo.toml"),
                    "--target-dir", str(S.ROOT / "target" / "footprint")], check=True)
    res = [run(v, args.n, args.settle) for v in args.variants.split(",")]
    L = ["| variant | live KB/conn | blocks/conn | RSS KB/conn | live after close (B) | RSS after close − base (KB) | failed |",
         "|---|--:|--:|--:|--:|--:|--:|"]
    for r in res:
        L.append(f"| {r['variant']} | {r['live_kb_per_conn']:.2f} | {r['blocks_per_conn']:.2f} | {r['rss_kb_per_conn']:.2f} "
                 f"| {r['live_after_close_bytes']} | {r['rss_after_close_kb_over_base']} | {r['failed']} |")
    for r in res:
        L.append(f"\n{r['variant']}: {r['stderr']}; sizes {r['sizes']}\n\n| allocation size (B) | per conn |\n|--:|--:|")
        L += [f"| {s} | {c:.2f} |" for s, c in r["by_size"]]
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
