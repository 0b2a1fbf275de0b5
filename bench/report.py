#!/usr/bin/env python3
"""Write docs/benchmarks.md and its charts (docs/img/bench-*.svg) from the results of every scenario.

    python3 bench/report.py [--out bench/out] [--doc docs/benchmarks.md]

Reads what exists under bench/out/ (run by `bash bench/run.sh --all`, i.e. bench/all.sh):

  results.json             main table: plain proxy, 1 and 3 filters, h2c (bench.py --h2)
  balance/results.json     3-endpoint balancing (bench.py --backends 3)
  memory/results.json      bench/memory.py
  reload/results.json      bench/reload.py
  cache/results.json       bench/cache_bench.py (cache hits vs nginx proxy_cache)
  languages/results.{json,md}  bench/languages.py (its table is included as printed)
  profile/results.json     bench/perf_profile.py
  callgrind/results.json   bench/callgrind.py
  all-status.tsv           which scenarios ran, failed or were skipped (bench/all.sh)

A scenario with no results is listed as not measured, with the reason from all-status.tsv. Every
figure is shown as a ratio to a peer or to direct-to-backend measured in the same run, with its
min–max spread over the rounds. Charts are hand-written SVG (no dependencies): horizontal bars of
the median with min–max whiskers. Stdlib only.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import html
import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COLORS = {"sluicegate": "#2b6cb0", "peer": "#a0aec0", "direct": "#718096", "goal": "#c53030",
          "series2": "#ed8936"}


# ---------------------------------------------------------------------------------------------
# small helpers


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def spread(vals: list[float]) -> dict | None:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def f2(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def f1(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def frps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def sp(s: dict | None, fmt=f2, unit: str = "") -> str:
    """`median (min–max)`."""
    if not s:
        return "—"
    return f"{fmt(s['median'])}{unit} ({fmt(s['min'])}–{fmt(s['max'])})"


def per_round(runs: dict, a: str, b: str, metric: str) -> dict | None:
    """The ratio a/b of `metric`, taken within each round (the two ran back to back)."""
    if a not in runs or b not in runs:
        return None
    ra = {r["round"]: r[metric] for r in runs[a]}
    rb = {r["round"]: r[metric] for r in runs[b]}
    return spread([ra[i] / rb[i] for i in ra if rb.get(i)])


def per_round_fn(runs: dict, f) -> dict | None:
    """`f` of each round's figures by target (`{key: run}`), over the rounds where every target
    `f` reads ran; None when no round has them all."""
    rounds: dict = {}
    for key, rs in runs.items():
        for r in rs:
            rounds.setdefault(r["round"], {})[key] = r
    vals = []
    for rd in rounds.values():
        try:
            vals.append(f(rd))
        except (KeyError, ZeroDivisionError):
            continue
    return spread(vals) if vals else None


def is_sluicegate(key: str) -> bool:
    return key.startswith("sluicegate")


# ---------------------------------------------------------------------------------------------
# SVG


def bar_chart(path: Path, title: str, rows: list[dict], unit: str = "", ref: tuple[float, str] | None = None,
              note: str = "") -> str:
    """Horizontal bars. rows: {label, value, lo, hi, color, series?}. Returns the file name."""
    rows = [r for r in rows if r.get("value") is not None]
    width, left, right, bar_h, gap, top = 760, 230, 90, 18, 8, 46
    height = top + len(rows) * (bar_h + gap) + 44
    vmax = max([r.get("hi") or r["value"] for r in rows] + [ref[0] if ref else 0] + [1e-9]) * 1.08
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + plot_w * max(0.0, v) / vmax

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{e(title)}</text>']
    if note:
        out.append(f'<text x="{width / 2}" y="36" text-anchor="middle" fill="#4a5568">{e(note)}</text>')
    # grid and ticks
    step = nice_step(vmax / 5)
    t = 0.0
    axis_y = top + len(rows) * (bar_h + gap)
    while t <= vmax:
        out.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{axis_y}" stroke="#edf2f7"/>')
        out.append(f'<text x="{x(t):.1f}" y="{axis_y + 14}" text-anchor="middle" fill="#4a5568">'
                   f'{fmt_tick(t)}</text>')
        t += step
    out.append(f'<text x="{left + plot_w / 2}" y="{axis_y + 30}" text-anchor="middle" fill="#4a5568">{e(unit)}</text>')
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        out.append(f'<text x="{left - 8}" y="{y + bar_h - 5}" text-anchor="end">{e(r["label"])}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{max(0.5, x(r["value"]) - left):.1f}" height="{bar_h}" '
                   f'fill="{r.get("color", COLORS["peer"])}"/>')
        lo, hi = r.get("lo"), r.get("hi")
        if lo is not None and hi is not None and hi > lo:
            cy = y + bar_h / 2
            out.append(f'<line x1="{x(lo):.1f}" y1="{cy}" x2="{x(hi):.1f}" y2="{cy}" stroke="black"/>')
            for v in (lo, hi):
                out.append(f'<line x1="{x(v):.1f}" y1="{cy - 5}" x2="{x(v):.1f}" y2="{cy + 5}" stroke="black"/>')
        label_x = x(max(r["value"], hi or 0)) + 6
        out.append(f'<text x="{label_x:.1f}" y="{y + bar_h - 5}">{e(r.get("text", fmt_tick(r["value"])))}</text>')
    if ref:
        out.append(f'<line x1="{x(ref[0]):.1f}" y1="{top - 8}" x2="{x(ref[0]):.1f}" y2="{axis_y}" '
                   f'stroke="{COLORS["goal"]}" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x(ref[0]):.1f}" y="{top - 10}" text-anchor="middle" fill="{COLORS["goal"]}">'
                   f'{e(ref[1])}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path.name


def nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".") if v != int(v) else f"{v:.0f}"
    return f"{v:.2f}"


# ---------------------------------------------------------------------------------------------
# sections


class Report:
    def __init__(self, out: Path, img: Path, img_rel: str):
        self.out, self.img, self.img_rel = out, img, img_rel
        self.L: list[str] = []
        self.versions: dict[str, str] = {}
        self.loads: list[str] = []
        self.goals: dict[str, tuple[str, str]] = {}
        self.worst_foreign = 0.0   # most CPU used by processes outside the benchmark, any scenario
        self.budget: dict | None = None  # the plain-proxy goal in CPU terms (main scenario)
        self.filter_budget: dict | None = None  # the same for the one-filter goal
        self.main_vs_nginx = ""  # req/s and p99 against nginx, main scenario
        self.filter_rps: dict | None = None  # add-header's req/s over plain, per round
        self.quick = False
        self.status = self.read_status()

    def read_status(self) -> dict[str, dict]:
        p = self.out / "all-status.tsv"
        if not p.exists():
            return {}
        with p.open() as f:
            return {r["scenario"]: r for r in csv.DictReader(f, delimiter="\t")}

    def missing(self, name: str, what: str) -> None:
        st = self.status.get(name)
        why = f"{st['status']}: {st['note']}" if st and st.get("note") else (st["status"] if st else "not run")
        self.L.append(f"*Not measured in this run ({why}).* Run `bash bench/run.sh --all` ({what}).\n")

    def chart(self, name: str, *args, **kw) -> None:
        fname = bar_chart(self.img / f"bench-{name}.svg", *args, **kw)
        self.L.append(f"![{args[0]}]({self.img_rel}/{fname})\n")

    def note_meta(self, scenario: str, meta: dict) -> None:
        for k, v in (meta.get("versions") or {}).items():
            self.versions.setdefault(k, v)
        if "nproc" in meta:
            self.versions.setdefault("cores", f"{meta['nproc']} ({meta.get('cpu_model', '?')})")

    # --- throughput tables (main and balance) ---------------------------------------------------
    def throughput(self, doc: dict, name: str) -> None:
        meta, summary, runs = doc["meta"], doc["targets"], doc["runs"]
        self.note_meta(name, meta)
        foreign = [r.get("foreign_cpu_pct", 0) for rs in runs.values() for r in rs]
        self.worst_foreign = max([self.worst_foreign, statistics.median(foreign)])
        self.quick |= bool(meta.get("quick"))
        self.loads.append(f"{name}: CPU busy before {meta.get('cpu_busy_before_pct', '?')}%, other processes used "
                          f"{statistics.median(foreign):.0f}% of the machine (median run), "
                          f"{max(foreign):.0f}% at most; {meta.get('reruns_for_foreign_load', 0)} runs measured again")
        self.L.append(f"{meta['date']} · {meta['rounds']} interleaved rounds × {meta['duration_s']} s per target · "
                      f"`{meta['load_generator']}`"
                      + (f" · every proxy balances over **{meta['backends']} backend ports** (round robin)"
                         if meta.get("backends", 1) > 1 else "")
                      + (" · quick run" if meta.get("quick") else "") + "\n")
        peer = "nginx" if "nginx" in summary else None
        L = self.L
        L.append("| target | req/s (min–max) | × direct | × nginx | p99 ms (min–max) | p99 × nginx | "
                 "p50 ms | errors | other CPU % (max) |")
        L.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        rows_rps, rows_p99 = [], []
        for key, s in summary.items():
            vs_direct = per_round(runs, key, "direct", "rps")
            vs_nginx = per_round(runs, key, peer, "rps") if peer and key != peer else None
            p99_nginx = per_round(runs, key, peer, "p99_ms") if peer and key != peer else None
            errs = s.get("non_2xx_3xx", 0) + s.get("socket_errors", 0)
            label = s["label"]
            bold = f"**{label}**" if is_sluicegate(key) else label
            L.append(f"| {bold} | {frps(s['rps']['median'])} ({frps(s['rps']['min'])}–{frps(s['rps']['max'])}) | "
                     f"{sp(vs_direct)} | {sp(vs_nginx)} | {sp(s['p99_ms'])} | {sp(p99_nginx)} | "
                     f"{f2(s['p50_ms']['median'])} | {errs}{' ⚠' if errs else ''} | "
                     f"{s['foreign_cpu_pct']['max']:.0f}{' ⚠' if s['foreign_cpu_pct']['max'] > 5 else ''} |")
            color = COLORS["sluicegate"] if is_sluicegate(key) else COLORS["direct" if key == "direct" else "peer"]
            if key != "direct" and vs_direct:
                rows_rps.append({"label": label, "value": vs_direct["median"], "lo": vs_direct["min"],
                                 "hi": vs_direct["max"], "color": color})
            rows_p99.append({"label": label, "value": s["p99_ms"]["median"], "lo": s["p99_ms"]["min"],
                             "hi": s["p99_ms"]["max"], "color": color, "text": f"{s['p99_ms']['median']:.2f} ms"})
        L.append("")
        L.append("*× direct*, *× nginx*: the ratio within each round (targets run back to back), median and "
                 "min–max over the rounds. *errors*: non-2xx responses plus socket errors. *other CPU*: the most "
                 "that processes outside the benchmark used during any of the target's runs (⚠ above 5%).\n")
        self.chart(f"{name}-rps", f"{name}: req/s as a share of direct-to-backend", rows_rps,
                   unit="req/s ÷ direct (same round); whiskers: min–max over rounds")
        self.chart(f"{name}-p99", f"{name}: p99 latency", rows_p99, unit="ms (median over rounds; whiskers: min–max)")
        if doc.get("ratios"):
            L.append("Key ratios (ratio of the medians; spread: the same ratio within each round):\n")
            L.append("| ratio | value | per-round spread | reading |")
            L.append("|---|--:|--:|---|")
            for r in doc["ratios"]:
                pr = r["per_round"]
                L.append(f"| {r['name']} | {r['ratio_of_medians']:.2f} | {pr['min']:.2f}–{pr['max']:.2f} | {r['note']} |")
            L.append("")
        self.cpu_budget(doc, name)
        if doc.get("h2c") or doc.get("h2c_skipped"):
            L.append(f"**HTTP/2 (h2c, prior knowledge)**: `h2load -t1 -c{meta['connections']} -m10`, same rounds.\n")
            L.append("| target | req/s (min–max) | × nginx h2c | mean ms | failed | non-2xx |")
            L.append("|---|--:|--:|--:|--:|--:|")
            h2runs = doc.get("h2c_runs", {})
            rows = []
            for key, s in doc["h2c"].items():
                vs = per_round(h2runs, key, "nginx", "rps") if key != "nginx" else None
                L.append(f"| {s['label']} | {frps(s['rps']['median'])} ({frps(s['rps']['min'])}–{frps(s['rps']['max'])}) "
                         f"| {sp(vs)} | {f2(s['mean_ms']['median'])} | {s['failed']} | {s['non_2xx']} |")
                rows.append({"label": s["label"], "value": s["rps"]["median"], "lo": s["rps"]["min"],
                             "hi": s["rps"]["max"], "text": frps(s["rps"]["median"]),
                             "color": COLORS["sluicegate"] if is_sluicegate(key) else COLORS["peer"]})
            for key, why in doc.get("h2c_skipped", {}).items():
                L.append(f"| {summary.get(key, {}).get('label', key)} | skipped: {why} | | | | |")
            L.append("")
            if rows:
                self.chart(f"{name}-h2c", f"{name}: h2c req/s", rows, unit="req/s (median; whiskers: min–max)")

    def cpu_budget(self, doc: dict, name: str) -> None:
        """Where the machine's CPU goes per request, and what a 1.2x-nginx proxy could spend.

        Every target here is measured with the load generator and the backend on the same cores,
        so a request's cost is the whole machine's: wrk, the backend, the proxy and the kernel's
        loopback TCP work (mostly softirq, which no process is charged for). The per-round
        difference to direct-to-backend is the proxy hop's share."""
        runs, summary = doc["runs"], doc["targets"]
        if "direct" not in runs or not any("machine_us_per_req" in r for r in runs["direct"]):
            return
        ncores = doc["meta"].get("nproc") or 1

        def cost(r: dict, kind: str) -> float:
            m = r["machine_us_per_req"]
            return m["user"] + m["kernel"] if kind == "total" else m[kind]

        def paired(a: str, b: str) -> list[tuple[dict, dict]]:
            """(a's run, b's run) for every round in which both recorded their CPU."""
            rb = {r["round"]: r for r in runs.get(b, []) if "machine_us_per_req" in r}
            return [(r, rb[r["round"]]) for r in runs.get(a, [])
                    if "machine_us_per_req" in r and r["round"] in rb]

        def extra(key: str, base: str, kind: str) -> dict | None:
            """What `key` costs per request beyond `base`, round by round."""
            return spread([cost(r, kind) - cost(b, kind) for r, b in paired(key, base)])

        L = self.L
        L.append("Where the CPU goes: what the **whole machine** spent per request (wrk, the backend, the "
                 "proxy and the kernel's loopback TCP work, from /proc/stat over each run), and the proxy "
                 "hop's share of it: the same figure minus direct-to-backend's in the same round. *kernel* is "
                 "system + irq + softirq time; most of it is TCP on loopback, charged to no process.\n")
        L.append("| target | machine busy % | µs/request: user | kernel | total | proxy hop: user | kernel | total |")
        L.append("|---|--:|--:|--:|--:|--:|--:|--:|")
        for key in summary:
            rs = [r for r in runs[key] if "machine_us_per_req" in r]
            if not rs:
                continue
            busy = spread([r.get("cpu_busy_pct") for r in rs])
            cells = [sp(spread([cost(r, k) for r in rs]), f1) for k in ("user", "kernel", "total")]
            hops = (["—"] * 3 if key == "direct"
                    else [sp(extra(key, "direct", k), f1) for k in ("user", "kernel", "total")])
            label = f"**{summary[key]['label']}**" if is_sluicegate(key) else summary[key]["label"]
            L.append(f"| {label} | {f1(busy['median']) if busy else '—'} | " + " | ".join(cells) + " | "
                     + " | ".join(hops) + " |")
        L.append("")
        if name != "main" or "nginx" not in runs:
            return
        # The plain-proxy goal in CPU terms: at 1.2x nginx's rate, with every core busy all the
        # time, a request may cost the machine at most ncores s / (1.2 x nginx rps); wrk and the
        # backend take direct-to-backend's cost of that, the rest is all the proxy hop may use.
        b = spread([ncores * 1e6 / (1.2 * n["rps"]) - cost(d, "total") for n, d in paired("nginx", "direct")])
        k, u = extra("nginx", "direct", "kernel"), extra("nginx", "direct", "user")
        h = extra("sluicegate", "direct", "total")
        if b and k and u:
            self.budget = {"budget": b, "nginx_kernel": k}
            L.append(f"**The plain-proxy goal in CPU terms.** At 1.2× nginx's rate, with all {ncores} cores busy "
                     f"all the time, a request may cost the machine at most {ncores} s ÷ (1.2 × nginx req/s); "
                     f"wrk and the backend take direct-to-backend's cost of that. That leaves the proxy hop "
                     f"**{sp(b, f1)} µs** per request, user and kernel together (median and min–max over the rounds). "
                     f"nginx's own hop spends {sp(k, f1)} µs in the kernel and {sp(u, f1)} µs in user space; "
                     f"Sluicegate's hop costs {sp(h, f1)} µs in all.\n")
        # The filter goal the same way: at 0.95x the unfiltered rate, a filtered request may cost
        # the machine 1/0.95 of an unfiltered one, so the filter may add 5.3% of that.
        fb_s = spread([cost(p, "total") * (1 / 0.95 - 1) for _, p in paired("sluicegate-filter", "sluicegate")])
        fc_s = extra("sluicegate-filter", "sluicegate", "total")
        if fb_s and fc_s:
            self.filter_budget = {"budget": fb_s, "cost": fc_s}
            L.append(f"**The one-filter goal in CPU terms.** At 0.95× the unfiltered rate, a filtered request may "
                     f"cost the machine 1/0.95 of an unfiltered one: the filter (both its calls, the guest and its "
                     f"host calls) may add **{sp(fb_s, f1)} µs**. It adds {sp(fc_s, f1)} µs.\n")

    def goals_from_main(self, doc: dict) -> None:
        """The throughput halves of the goals (issue 29); the instruction halves come from
        callgrind-peers (`goals_from_instructions`)."""
        runs = doc["runs"]
        r = per_round(runs, "sluicegate", "nginx", "rps")
        p = per_round(runs, "sluicegate", "nginx", "p99_ms")
        if r and p:
            self.main_vs_nginx = f"rps × nginx {sp(r)}, p99 × nginx {sp(p)}"
        b = per_round(runs, "sluicegate-filter", "sluicegate", "rps")
        if b:
            self.filter_rps = b
        # 3 filters: per-request time (1/rps) over plain, against 3× the one filter's.
        one = per_round_fn(runs, lambda rd: 1 / rd["sluicegate-filter"]["rps"] - 1 / rd["sluicegate"]["rps"])
        three = per_round_fn(runs, lambda rd: 1 / rd["sluicegate-3filters"]["rps"] - 1 / rd["sluicegate"]["rps"])
        if one and three and one["median"] > 0:
            k = three["median"] / one["median"]
            self.goals["three"] = ("met" if k <= 3.0 else "not met",
                                   f"3 filters add {k:.2f}× the one filter's time per request "
                                   f"({three['median'] * 1e6:.1f} µs against {one['median'] * 1e6:.1f} µs, "
                                   "from req/s in the main scenario)")

    def goals_from_instructions(self, doc: dict) -> None:
        """Instructions per request beside the peers, one run (bench/callgrind_peers.py)."""
        t = doc.get("targets", {})
        ir = {k: v["ir_per_request"] for k, v in t.items() if "ir_per_request" in v}
        sg, ng, hp = ir.get("sluicegate"), ir.get("nginx"), ir.get("haproxy")
        if sg and ng:
            st = "met" if sg <= ng else ("stepping stone met (≤ HAProxy)" if hp and sg <= hp else "not met")
            self.goals["plain"] = (st, f"{sg:,} instructions per request against nginx's {ng:,} "
                                   f"(×{sg / ng:.2f})" + (f" and HAProxy's {hp:,} (×{sg / hp:.2f})" if hp else "")
                                   + (f"; {self.main_vs_nginx}" if self.main_vs_nginx else ""))
        sf = ir.get("sluicegate-filter")
        if sg and sf:
            inc = sf - sg
            fr = self.filter_rps
            met = inc <= 6000 and bool(fr and fr["median"] >= 0.9)
            self.goals["filter"] = ("met" if met else "not met",
                                    f"add-header adds {inc:,} instructions per request"
                                    + (f"; req/s × plain {sp(fr)}" if fr else "; req/s not measured"))

    # --- memory ---------------------------------------------------------------------------------
    def memory(self, doc: dict) -> None:
        meta, t = doc["meta"], doc["targets"]
        self.note_meta("memory", meta)
        n = meta["connections"]
        fr = [r.get("foreign_cpu_pct", 0) for rs in doc.get("runs", {}).values() for r in rs]
        if fr:
            self.loads.append(f"memory: other processes used {statistics.median(fr):.0f}% of the machine "
                              f"(median round), {max(fr):.0f}% at most (memory figures are not CPU-bound)")
        self.L.append(f"{meta['date']} · one worker each · {meta['rounds']} interleaved rounds · RSS summed over "
                      f"each target's processes (nginx: master + worker), MiB\n")
        ng = t.get("nginx")
        self.L.append(f"| target | idle at start | idle after load | − nginx (× nginx) | {n:,} conns (min–max) | × nginx | "
                      f"KB per conn | failed requests |")
        self.L.append("|---|--:|--:|--:|--:|--:|--:|--:|")
        rows_idle, rows_held = [], []
        runs = doc.get("runs", {})
        for key, s in t.items():
            d = s["idle_after_load"]["rss_mb"] - ng["idle_after_load"]["rss_mb"] if ng else None
            color = COLORS["sluicegate"] if is_sluicegate(key) else COLORS["peer"]
            rows_idle.append({"label": s["label"], "value": s["idle_after_load"]["rss_mb"], "color": color,
                              "text": f"{s['idle_after_load']['rss_mb']:.1f} MB"})
            if "skipped" in s:
                self.L.append(f"| {s['label']} | {f1(s['idle_start']['rss_mb'])} | {f1(s['idle_after_load']['rss_mb'])} | "
                              f"{'' if d is None else idle_vs(s, ng)} | — ({s['skipped']}) | | | |")
                continue
            h = s["held_rss_mb"]
            x = per_round(runs, key, "nginx", "held_rss_mb") if ng and key != "nginx" else None
            self.L.append(f"| {'**' + s['label'] + '**' if is_sluicegate(key) else s['label']} | "
                          f"{f1(s['idle_start']['rss_mb'])} | {f1(s['idle_after_load']['rss_mb'])} | "
                          f"{'' if d is None or key == 'nginx' else idle_vs(s, ng)} | {sp(h, f1)} | {sp(x, f1)} | "
                          f"{f1(s['per_conn_kb']['median'])} | {s['failed_requests']}{' ⚠' if s['failed_requests'] else ''} |")
            rows_held.append({"label": s["label"], "value": h["median"], "lo": h["min"], "hi": h["max"],
                              "color": color, "text": f"{h['median']:.0f} MB"})
        self.L.append("")
        for key, s in t.items():
            if s.get("failed_requests"):
                ft = s.get("filter_timeouts")
                self.L.append(f"⚠ {s['label']}: {s['failed_requests']} failed requests"
                              + (f"; its log shows {ft} filter call(s) over the filter time limit (fail_closed "
                                 "answers 500; the limit is wall-clock time, which a starved machine eats)"
                                 if ft else "") + ".\n")
        self.L.append("*idle after load*: after 1 s of `wrk -c50` and a pause. *KB per conn*: (RSS with the "
                      "connections − idle after load) ÷ connections. Every connection carried a request before "
                      "and after the measurement (all must answer 200).\n")
        self.chart("memory-idle", "Idle RSS (after load)", rows_idle, unit="MiB", ref=None)
        self.chart("memory-conns", f"RSS holding {n:,} idle keep-alive connections", rows_held,
                   unit="MiB (median; whiskers: min–max over rounds)", ref=(100.0, "goal: 100 MB"))
        sg = t.get("sluicegate")
        if sg and ng:
            d = sg["idle_after_load"]["rss_mb"] - ng["idle_after_load"]["rss_mb"]
            self.goals["idle"] = ("met" if d <= 20 else "not met", f"sluicegate − nginx = {d:+.1f} MB after load "
                                  f"({sg['idle_start']['rss_mb'] - ng['idle_start']['rss_mb']:+.1f} MB at start)")
        if sg and "held_rss_mb" in sg:
            h = sg["held_rss_mb"]
            x = per_round(runs, "sluicegate", "nginx", "held_rss_mb") if ng and "held_rss_mb" in ng else None
            self.goals["conns"] = ("met" if x and x["median"] <= 2.0 else "not met",
                                   f"{h['median']:.0f} MB ({h['min']:.0f}–{h['max']:.0f}) with {n:,} connections"
                                   + (f"; nginx {ng['held_rss_mb']['median']:.0f} MB, × nginx {sp(x)}" if x else ""))

    # --- reload ---------------------------------------------------------------------------------
    def reload(self, doc: dict) -> None:
        meta, t = doc["meta"], doc["targets"]
        self.note_meta("reload", meta)
        self.loads.append(f"reload: other processes used {meta.get('foreign_cpu_pct', '?')}% of the machine")
        self.L.append(f"{meta['date']} · {meta['reloads']} reloads per target, alternating · {meta['clients']} "
                      f"keep-alive clients, one request every {meta['interval_ms']:g} ms each, plus a poller\n")
        self.L.append("| target | what changes | p50 ms | p99 ms | min–max ms | × nginx (p50, p99) | requests | "
                      "failed | reconnects | lost reloads |")
        self.L.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        what = {"sluicegate": "filter `.wasm` renamed into the filter dir",
                "nginx": "`nginx.conf` renamed + SIGHUP"}
        r = doc.get("ratios_sluicegate_over_nginx") or {}
        rows = []
        for key, s in t.items():
            x = f"{r['p50']:.2f}, {r['p99']:.2f}" if key == "sluicegate" and r else ""
            self.L.append(f"| {s['label']} | {what.get(key, '')} | {f1(s['p50_ms'])} | {f1(s['p99_ms'])} | "
                          f"{f1(s['min_ms'])}–{f1(s['max_ms'])} | {x} | {s['requests']:,} | "
                          f"{s['failed']}{' ⚠' if s['failed'] else ''} | {s['reconnects']} | "
                          f"{s['lost']}{' ⚠' if s['lost'] else ''} |")
            if s["p50_ms"] is not None:
                color = COLORS["sluicegate"] if is_sluicegate(key) else COLORS["peer"]
                rows.append({"label": f"{s['label']} p50", "value": s["p50_ms"], "lo": s["min_ms"],
                             "hi": s["p99_ms"], "color": color, "text": f"{s['p50_ms']:.0f} ms"})
        self.L.append("")
        hw = t.get("sluicegate", {}).get("host_reload_ms")
        if hw:
            self.L.append(f"Sluicegate's own log says a reload (hash, compile, instantiate, swap) took "
                          f"{hw['median']:.0f} ms median ({hw['min']:.0f}–{hw['max']:.0f}); the rest of the latency "
                          "is the file watch, the 10 ms debounce and the next request.\n")
        sg = t.get("sluicegate", {})
        if sg.get("failed"):
            ft = sg.get("filter_timeouts")
            self.L.append(f"⚠ Failed requests on Sluicegate: {'; '.join(sg.get('errors', [])[:3])}"
                          + (f". The log shows {ft} filter call(s) over the filter time limit (default 10 ms, "
                             "wall clock): on a CPU-starved machine the worker thread can be descheduled inside "
                             "a filter call, which then answers 500 (fail_closed), reload or not." if ft else "")
                          + "\n")
        self.L.append("*failed*: non-200, wrong body, or an error on a fresh connection (must be 0). "
                      "*reconnects*: the proxy closed an idle kept-alive connection between two requests "
                      "and the client reconnected (nginx's old worker does that after a reload).\n")
        self.chart("reload", "Change → first response by the new version", rows,
                   unit="ms: bar p50, whisker min–p99")

    # --- cache ----------------------------------------------------------------------------------
    def cache(self, doc: dict, md: str | None) -> None:
        raw = doc.get("raw") if doc else None
        if not raw:
            if md:
                self.L.append(md.split("\n", 1)[1] if md.startswith("#") else md)
            return
        self.L.append(f"{doc.get('date', '')} · {doc.get('rounds')} rounds × {doc.get('duration_s')} s, "
                      f"`wrk -t1 -c{doc.get('connections')}`, alternating which goes first\n")
        self.L.append("| target | req/s (min–max) | × nginx proxy_cache | p99 ms (min–max) |")
        self.L.append("|---|--:|--:|--:|")
        ratio = spread(doc.get("per_round_ratio") or [])
        rows = []
        for key, rs in raw.items():
            rps = spread([r["rps"] for r in rs])
            p99 = spread([r["p99_ms"] for r in rs])
            self.L.append(f"| {key} | {frps(rps['median'])} ({frps(rps['min'])}–{frps(rps['max'])}) | "
                          f"{sp(ratio) if key == 'sluicegate' else ''} | {sp(p99)} |")
            rows.append({"label": key, "value": rps["median"], "lo": rps["min"], "hi": rps["max"],
                         "color": COLORS["sluicegate"] if is_sluicegate(key) else COLORS["peer"],
                         "text": frps(rps["median"])})
        self.L.append("")
        if "backend_requests_during_rounds" in doc:
            self.L.append(f"Backend requests during the rounds: {doc['backend_requests_during_rounds']} "
                          "(the figures are cache hits, not proxying).\n")
        self.chart("cache", "Cache hits: req/s", rows, unit="req/s (median; whiskers: min–max)")
        if ratio:
            self.goals["cache"] = ("met" if ratio["median"] >= 1.5 else "not met", f"× nginx proxy_cache {sp(ratio)}")

    # --- profile --------------------------------------------------------------------------------
    def profile(self, doc: dict) -> None:
        self.note_meta("profile", doc["meta"])
        w = doc.get("wrk_flat", {})
        self.L.append(f"{doc['meta']['date']} · `perf record -F 999` on the Sluicegate process for "
                      f"{doc['meta'].get('seconds')} s under `wrk -t1 -c50` (plain proxy, one worker; "
                      f"{frps(w.get('rps'))} req/s while profiled) · self time\n")
        self.L.append(f"**Kernel {doc['kernel_pct']:.0f}%, user {100 - doc['kernel_pct']:.0f}%.** By binary: "
                      + ", ".join(f"{n.split()[0]} {p:.1f}%" for p, n in doc.get("by_dso", [])[:4]) + ".\n")
        groups = doc.get("groups") or group_symbols(doc.get("top_symbols", []))
        if groups:
            self.L.append("Self time by component (all samples): "
                          + ", ".join(f"{k} {v:.1f}%" for k, v in groups) + ".\n")
        self.L.append("| % | top symbols |")
        self.L.append("|--:|---|")
        for p, n in doc.get("top_symbols", [])[:15]:
            m = re.match(r"(\S+)\s+\[(.)\]\s+(.*)", n)
            kind, sym = (("kernel" if m.group(2) == "k" else m.group(1)), m.group(3)) if m else ("", n)
            self.L.append(f"| {p:.1f} | `{sym[:110]}` ({kind}) |")
        self.L.append("")

    # --- callgrind -------------------------------------------------------------------------------
    def callgrind(self, doc: dict) -> None:
        self.note_meta("callgrind", doc["meta"])
        self.L.append(f"{doc['meta']['date']} · `valgrind --tool=callgrind`, {doc.get('what', 'plain proxy')}, "
                      "one worker · "
                      f"{doc['requests']:,} requests (`h2load --h1 -c50`) after a warm-up · user-space "
                      "instructions of the whole process per request; unlike time, the count repeats to "
                      "within half a percent from run to run\n")
        self.L.append(f"**{doc['ir_per_request']:,} instructions per request.**\n")
        self.L.append("| Ir/request | function, inclusive (Sluicegate's own) |")
        self.L.append("|--:|---|")
        for n, name in doc.get("top_inclusive", [])[:12]:
            self.L.append(f"| {n:,} | `{name[:110]}` |")
        self.L.append("")
        self.L.append("| Ir/request | function, self |")
        self.L.append("|--:|---|")
        for n, name in doc.get("top_self", [])[:12]:
            self.L.append(f"| {n:,} | `{name[:110]}` |")
        self.L.append("")


def idle_vs(s: dict, ng: dict) -> str:
    a, b = s["idle_after_load"]["rss_mb"], ng["idle_after_load"]["rss_mb"]
    return f"{a - b:+.1f} (×{a / b:.2f})" if b else f"{a - b:+.1f}"


def group_symbols(rows: list) -> list[tuple[str, float]]:
    cats = [("kernel", lambda n: "[k]" in n), ("mimalloc", lambda n: "mi_" in n),
            ("libc (memcpy/memmove)", lambda n: n.startswith("libc")),
            ("hyper", lambda n: "hyper" in n), ("tokio/mio", lambda n: "tokio" in n or "mio::" in n),
            ("sluicegate", lambda n: "sluicegate::" in n),
            ("http/httparse/bytes", lambda n: any(x in n for x in ("http::", "httparse", "bytes::")))]
    out: dict[str, float] = {}
    for p, n in rows:
        for name, pred in cats:
            if pred(n):
                out[name] = out.get(name, 0) + p
                break
        else:
            out["other"] = out.get("other", 0) + p
    return sorted(out.items(), key=lambda kv: -kv[1])


# ---------------------------------------------------------------------------------------------
# the document


INTRO = """# Benchmarks

Sluicegate against nginx, HAProxy and Envoy (with and without a proxy-wasm filter), on loopback, one
worker each. Produced by `bash bench/run.sh --all` (see [bench/README.md](../bench/README.md)),
which runs every scenario and then `bench/report.py`, which wrote this page and its charts. Every
figure is a ratio to a peer or to direct-to-backend measured **in the same run**, with the min–max
spread over the interleaved rounds; absolute numbers swing ±25% between runs on this kind of
machine, ratios much less.
"""

CALLGRIND_READING = """**Reading** (2026-11-30). Time on two shared cores moves by 10% between runs, which hides
changes of a few percent; an instruction count does not move, so each change below was kept only if
it lowered it. Before this round the plain proxy cost **51,908 instructions per request**
(commit f3b5728); after it, 42,750 (**−17.6%**):

- **Hop-by-hop removal** looked up each of nine names in the header map, twice per message
  (`contains_key`, then `remove`), through a `const` array that was rebuilt and dropped at every
  use: 5,400 instructions per request, the largest single item of Sluicegate's own code. It is now
  one pass over the names present, matched on their text, and a lookup only for those found
  (under 400).
- **Large futures were copied at every level.** Each `async fn` future is built on the stack and
  copied into its caller's state when awaited, and the server copies the whole request future to
  the heap: 6,600 instructions of `memcpy` per request. The rare paths (connecting, admission to
  a limited upstream, the response filters, the access log entry) are now boxed, and two wrapper
  layers (`send_upstream`, `Proxy::forward`) return the client's future instead of awaiting it:
  the request future went from 6,200 to 2,792 bytes (a unit test keeps it under 3 KB) and `memcpy`
  to 3,100 instructions.
- **Smaller items**: the strict HTTP/1 reader scans with `memchr` and 256-entry byte tables (3,080
  → 2,240); the upstream pool is keyed with FxHash and holds hyper's connection boxed (checkout and
  check-in moved most of a kilobyte each); `X-Forwarded-*` names are constants and the usual
  request (no `X-Forwarded-For` yet) builds no list; `Via` and `X-Forwarded-For` are added through
  the map's entry (one lookup, not a `get` then an `insert`); origin hiding decides in one pass
  which headers to touch; the keep-alive parking timer is polled again only when it has fired or
  the task's waker changed (it was re-registered at every request boundary, ~600 instructions).
- **Latency histograms** (`host/src/hist.rs`): the exporter's histograms stored every sample with
  a clock read under an epoch guard until a 5 s upkeep folded them (about 300 instructions each,
  two per plain request, two more per filter); they are now atomic bucket counters, with the
  same text in `/metrics`.

What remains is mostly hyper's two dispatchers (parsing and writing both sides), the header map's
hashing, and tokio's readiness and timer bookkeeping: no single item of Sluicegate's own code is
above 3% any more.

**Second round** (2026-11-30, later; `callgrind.py --cache` added to count cache hits). A cache hit
cost **25,611** instructions, now **19,383 (−24%)**; the plain proxy went from 42,750 to 39,887
(−6.7%):

- **Hits without a future.** A hit went down the whole asynchronous cache path: a boxed future
  (1.5 KB copied into it), an origin object made and dropped, the key copied into an `Arc<str>`.
  `HttpCache::try_hit` now finds and answers a fresh hit synchronously, before any of that; a miss
  takes the old path (and looks the key up once more).
- **Header maps that grew on every hit.** A clone of a `HeaderMap` keeps the size of its hash index
  but not its entries' spare room, so each field a hit added (`Age`, `Cache-Status`, `Via`) grew it
  and at times rebuilt the index: about 600 instructions a field. The stored quick head now holds an
  `Age` slot to overwrite and index room for the rest. Likewise a forwarded request gets room for
  its four added names (`X-Forwarded-*`, `Via`) at once, not one growth at a time.
- **hyper's header-read timer.** With a timer configured, hyper makes, registers and drops a boxed
  `Sleep` for every request head (30 s by default). The strict reader already keeps `header_read_ms`
  for a head that arrives in pieces, arming its deadline only then, and idle connections are parked
  and closed by their own timer; hyper's is now off (the slowloris test still passes).
- **Smaller**: `Cache-Status` is rendered with `itoa` and set through one map entry; each
  connection's idle timer is polled only when due or when the task's waker changed (as the parking
  timer already was); the request's host is borrowed, not copied; and the strict reader's separate
  CR/LF/NUL pass now runs only to name the fault of a head already refused (its line checks
  exclude those bytes; a unit test puts each of them at every position of five heads).
"""

PROFILE_READING = """**Reading** (the profile above; the CPU figures are the main scenario's *Where the CPU goes*
table, which is measured in every run):

- **CPU per request, plain proxy.** The proxy hop's kernel time is about nginx's: both make 2
  `recvfrom` + 2 `writev` per request (`strace -c`), and most of the kernel's share is loopback TCP
  in softirq context, which `/proc/PID/stat` charges to no process (an earlier reading of this
  page, from per-process ticks, said Sluicegate spent more kernel time than nginx; the whole
  machine's `/proc/stat` says it does not). **The gap is user time: about twice nginx's per
  request.** 1.2× nginx leaves the hop less CPU than nginx's hop spends in the kernel plus a
  fraction of its user time (see the CPU budget under *Where the CPU goes*): no user space as large
  as hyper's two HTTP/1 dispatchers (client side and server side) and tokio's readiness machinery
  fits in it, nor nginx's own.
- **Upstream connections are driven inline** (`host/src/upstream/pool.rs`): a per-worker pool of
  hyper `client::conn::http1` connections, polled by the request that holds one, then by its
  response body, and put back when the body ends, as nginx's upstream keepalive does (hyper-util's
  pooled client cost an mpsc hop, a oneshot, two task switches and a spawned task per request,
  about 12% of user time). TLS upstreams and upgrades still use hyper-util's client.
- **Cache hits** keep the policy's hit head, worked out when an entry is stored, for requests
  without cache directives of their own (`docs/cache.md`, "Quick hits"): 9.0 → 4.6–5.1 µs user per
  hit; cache hits are now level with or a little above nginx `proxy_cache` (1.00× then 1.07×).
- **What a filter costs** (corrected the same afternoon, once `bench/callgrind.py --filter` could
  count it). A request through the add-header filter costs **58,425 instructions against 39,957**
  without it: +18,500, nearly half as much again, so the filter's cost is mostly instructions, not
  (as this page said before, from perf's sample shares) a colder cache. 13,000 of them are the
  filter's two calls: per call about 3,200 run the guest and its `set-header` import, ~900 go to
  wasmtime 48 re-deriving the export's function reference (`lifted_core_func` → `lookup_vmdef`,
  every call), ~350 to `post_return`, ~500 to lowering and lifting the arguments and result, and the
  rest to our own wrapper (instance pool, deadline, heads lent and taken back). The other ~5,000 are
  the chain, the copy of the request head kept for the response phase and the boxed response phase.
  `sluicegate filter bench` (2.0–2.2 µs per request) times the calls alone, so it agrees with the
  first part. The heads used to be lent through wasmtime's resource table (a box, a move and a
  downcast per host call); they now wait in two slots of the store's state (`host_api::Lent`):
  −1,155 instructions per filtered request. The 1-filter ratio fell from 0.82–0.85 to 0.73 as the
  plain path got faster because this cost did not shrink with it. Closing it means fewer crossings
  per request (the host already skips the phases a filter does not ask for; fixed header edits
  could be declared at `init` and applied natively) and a wasmtime whose typed calls keep their
  function reference.
- **Noise**: the machine's two cores are shared; nginx alone varied 51–80k req/s between runs that
  day. The plain-proxy ratio was 0.71 (per-round median) in the full run at 08:50 and 0.80 in the
  main scenario re-run at 09:40 with Sluicegate at the same 46.9k req/s and nginx lower: take it as
  "0.7–0.8", and the instruction count above for the size of each change.
"""

MEMORY_READING = """**Reading**: idle, Sluicegate is close to nginx (its extra megabytes are the tokio runtime,
the metrics registry and, with a filter, the wasmtime engine and a compiled component). hyper 1.x
keeps an 8 KB read buffer and an 8 KB write buffer for the whole life of an HTTP/1 connection, with
no option to release them; that made 10,000 idle connections cost 328 MB (~31 KB each). Since
2026-11-30 an HTTP/1.1 connection idle at a request boundary for `keepalive_park_ms` (default
20 ms) is **parked**, as nginx does with its idle keep-alive connections: the strict reader shows
hyper an end of stream, hyper closes its side and frees its buffers, and the socket waits for the
client's next bytes with no buffer at all; the next request gets a new hyper connection on the same
socket (`docs/request-lifecycle.md`). What is left per idle connection is the task, the socket
registration, the idle timer and the reader's small state. mimalloc is built in its v2 mode, which
hands freed pages back to the OS after 10 ms (v3 waits a second and only when the thread allocates
again, so an idle proxy kept the peak). Under load a connection is never idle for 20 ms, so the hot
path pays nothing for this.
"""

SETUP = """## Setup and caveats

- All on 127.0.0.1, one worker each, one shared nginx backend returning a fixed 12-byte body
  (keep-alive, access_log off); proxies keep backend connections alive. Every target is checked
  before and after measuring: 200, the backend's body, and for the filtered ones `x-hello: world`
  on the response and `x-from: sluicegate` seen by the backend. Configs are in
  `bench/out/*/work/` after a run and in the scripts.
- **1 filter**: `add-header` (adds a request and a response header). **3 filters**: `add-header`,
  `security-headers` (four response headers) and `canary` (reads a header and a cookie, weight 0),
  chained on one route. Envoy + proxy-wasm runs `bench/envoy-filter`, which does what add-header
  does, on V8 (the only Wasm runtime in the PyPI Envoy build).
- **Two shared cores**: wrk, the proxy and the backend compete for them; a proxy that spends more
  CPU per request also starves the backend and the load generator. The numbers describe this
  machine under this contention, not what each proxy does on a dedicated core.
- p99 comes from wrk's histogram (closed loop, coordinated omission at saturation): latency at full
  load, not at a fixed request rate.
- Earlier per-call figures (`sluicegate filter bench`): add-header 0.98 µs per call warm, 21 µs
  with a fresh instance; probe (~15 host calls) 10 µs warm, 35 µs fresh.
"""


def build(out: Path, doc_path: Path) -> str:
    img = doc_path.parent / "img"
    rep = Report(out, img, "img")
    L = rep.L
    L.append(INTRO)
    goals_at = len(L)  # the goals table goes here, once every scenario has been read

    main = load(out / "results.json")
    L.append("## Plain proxy, 1 and 3 filters, HTTP/2\n")
    if main:
        rep.throughput(main, "main")
        rep.goals_from_main(main)
    else:
        rep.missing("main", "bench.py --h2")

    L.append("## 3-endpoint balancing\n")
    bal = load(out / "balance" / "results.json")
    if bal:
        L.append("Every proxy balances round robin over three ports of the backend nginx (the same process: "
                 "this measures the balancing hop, not three machines).\n")
        rep.throughput(bal, "balance")
    else:
        rep.missing("balance", "bench.py --backends 3")

    L.append("## Light load: 5 connections\n")
    light = load(out / "light" / "results.json")
    if light:
        L.append("The main table's 50 connections keep each proxy's one worker at or near a full core, so there "
                 "the rate follows what each spends per request. With 5 connections the rate is set more by "
                 "each request's round trip through wrk, the proxy and the backend: this is how the proxies "
                 "compare when the proxy's CPU is not the only limit.\n")
        rep.throughput(light, "light")
    else:
        rep.missing("light", "bench.py --connections 5")

    L.append("## Cache hits\n")
    cache = load(out / "cache" / "results.json")
    cache_md = (out / "cache" / "results.md").read_text() if (out / "cache" / "results.md").exists() else None
    if cache or cache_md:
        rep.cache(cache or {}, cache_md)
    else:
        rep.missing("cache", "bench/cache_bench.py")

    L.append("## Memory\n")
    mem = load(out / "memory" / "results.json")
    if mem:
        rep.memory(mem)
        L.append(MEMORY_READING)
    else:
        rep.missing("memory", "bench/memory.py")

    L.append("## Hot reload\n")
    rl = load(out / "reload" / "results.json")
    if rl:
        rep.reload(rl)
    else:
        rep.missing("reload", "bench/reload.py")

    L.append("## Filter cost per language\n")
    lang_md = out / "languages" / "results.md"
    if lang_md.exists() and lang_md.read_text().strip():
        L.append(lang_md.read_text().strip() + "\n")
    else:
        rep.missing("languages", "bench/languages.py")

    L.append("## Profile of the plain proxy\n")
    prof = load(out / "profile" / "results.json")
    if prof:
        rep.profile(prof)
    else:
        rep.missing("profile", "bench/perf_profile.py")
    L.append(PROFILE_READING)

    L.append("## Instructions per request\n")
    for title, name, flag in (("Plain proxy", "callgrind", ""), ("Cache hit", "callgrind-cache", " --cache"),
                              ("One filter (add-header)", "callgrind-filter", " --filter")):
        L.append(f"### {title}\n")
        cg = load(out / name / "results.json")
        if cg:
            rep.callgrind(cg)
        else:
            rep.missing(name, f"bench/callgrind.py{flag}")
    L.append(CALLGRIND_READING)

    # Goals, at the top.
    peers = load(out / "callgrind-peers" / "results.json")
    if peers:
        rep.goals_from_instructions(peers)
    g = [("Plain proxy: instructions per request ≤ nginx's (stepping stone: ≤ HAProxy's), same run; "
          "then req/s ≥ 1.0× nginx and p99 ≤ nginx's", "plain"),
         ("One filter: add-header adds ≤ 6,000 instructions per request, req/s ≥ 0.9× plain", "filter"),
         ("3 filters: at most 3× the one-filter increment", "three"),
         ("Cache hits ≥ 1.5× nginx proxy_cache req/s", "cache"),
         ("Idle memory within nginx's + 20 MB", "idle"),
         ("10,000 idle connections in ≤ 2× nginx's RSS", "conns")]
    G = ["## Goals\n", "| goal | status | measured (median, min–max over rounds) |", "|---|---|---|"]
    for text, key in g:
        st, detail = rep.goals.get(key, ("not measured", ""))
        G.append(f"| {text} | {'✅ met' if st == 'met' else ('❌ not met' if st == 'not met' else st)} | {detail} |")
    G.append("")
    if rep.worst_foreign > 10 or rep.quick:
        G[0:0] = [f"> ⚠ **Indicative only.** This page comes from a "
                  f"{'quick run (few, short rounds) ' if rep.quick else 'run '}"
                  + (f"on a busy machine: in the median run other processes used {rep.worst_foreign:.0f}% of it "
                     "(see *Machine, load and versions*). " if rep.worst_foreign > 10 else "")
                  + "Ratios from the same run still compare the targets under equal conditions, but re-run "
                  "`bash bench/run.sh --all` on a quiet machine before quoting any figure.\n"]
    L[goals_at:goals_at] = G

    L.append(SETUP)
    L.append("## Machine, load and versions\n")
    if rep.loads:
        L.append("Foreign load (processes outside the benchmark, measured by the harness during the runs):\n")
        L.extend(f"- {x}" for x in rep.loads)
        L.append("")
    if rep.status:
        L.append("Scenarios: " + ", ".join(f"{k} {v['status']} ({v['seconds']} s)" for k, v in rep.status.items()) + "\n")
    for k, v in rep.versions.items():
        L.append(f"- {k}: `{v}`")
    L.append(f"\nReport written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}.\n")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="where the scenarios wrote results")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    doc_path = Path(args.doc)
    text = build(Path(args.out), doc_path)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(text)
    print(f"[bench:report] wrote {doc_path} and charts in {doc_path.parent / 'img'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
