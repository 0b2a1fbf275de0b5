#!/usr/bin/env bash
# Every benchmark scenario, one after the other, then docs/benchmarks.md and docs/img/*.svg.
#
#   bash bench/run.sh --all [--quick] [--rounds N] [--duration S] [--build] [--skip a,b] [--no-report]
#   (or bash bench/all.sh ...)
#
# Scenarios (results under bench/out/, logs in bench/out/logs/<name>.log):
#   main      plain proxy, 1 filter, 3 filters, h2c: bench.py --h2 vs nginx, HAProxy, Envoy(+Wasm)
#   balance   every proxy balancing over 3 backend ports (bench.py --backends 3), if bench.py has it
#   light     plain proxy and 1 filter at 5 connections, below saturation (bench.py --connections 5)
#   memory    RSS idle and with 10,000 idle keep-alive connections (bench/memory.py)
#   reload    filter hot-swap latency under load vs nginx reload (bench/reload.py)
#   cache     cache hits vs nginx proxy_cache (bench/cache_bench.py via run.sh --cache), if present
#   languages per-language filter cost (bench/languages.py), if present
#   profile   perf profile of the plain proxy (bench/perf_profile.py)
#   callgrind instructions per request: plain proxy, cache hit, one filter (bench/callgrind.py)
# then bench/report.py writes docs/benchmarks.md from whatever succeeded.
#
# Each scenario has a time limit and a failure does not stop the others; bench/out/all-status.tsv
# records what ran, how long and how it ended. Expected duration on a quiet 2-core machine, installs
# and builds not counted: about 20 minutes with the defaults, about 7 with --quick.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
OUT="$BENCH/out"
cd "$ROOT"
log() { echo "[bench:all] $*" >&2; }

QUICK=()
MAIN=()
BUILD=()
SKIP=","
REPORT=1
while [ $# -gt 0 ]; do
    case "$1" in
        --all) ;;
        --quick) QUICK=(--quick) ;;
        --rounds|--duration) MAIN+=("$1" "$2"); shift ;;
        --build) BUILD=(--build) ;;
        --skip) SKIP=",$2,"; shift ;;
        --no-report) REPORT=0 ;;
        -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ROUNDS=("${QUICK[@]+"${QUICK[@]}"}" "${MAIN[@]+"${MAIN[@]}"}")

mkdir -p "$OUT/logs"
STATUS="$OUT/all-status.tsv"
printf 'scenario\tstatus\tseconds\tnote\n' >"$STATUS"

# Whatever a scenario recorded in a pid file and left running (it was killed hard): stop it.
cleanup() {
    local f pid name
    for f in "$OUT"/work/pids "$OUT"/*/work/pids; do
        [ -f "$f" ] || continue
        while read -r pid name; do
            [ -n "${pid:-}" ] || continue
            if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"; then
                kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
            fi
        done <"$f"
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# step NAME SECONDS COMMAND...: run with a time limit, log to bench/out/logs/NAME.log, record status.
step() {
    local name="$1" limit="$2"
    shift 2
    if [[ "$SKIP" == *",$name,"* ]]; then
        printf '%s\tskipped\t0\t--skip\n' "$name" >>"$STATUS"
        log "$name: skipped (--skip)"
        return 0
    fi
    log "$name: $* (limit ${limit}s, log bench/out/logs/$name.log)"
    local t0=$SECONDS rc
    timeout --kill-after=30 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    cleanup
    local took=$((SECONDS - t0)) status=ok note=""
    if [ $rc = 124 ] || [ $rc = 137 ]; then
        status=failed; note="time limit ${limit}s reached"
    elif [ $rc != 0 ]; then
        status=failed; note="$(grep -m1 -E 'FAILED|Error|error:' "$OUT/logs/$name.log" | cut -c1-200)"
        [ -n "$note" ] || note="exit $rc"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "${note//$'\t'/ }" >>"$STATUS"
    log "$name: $status in ${took}s${note:+ ($note)}"
}

skip() {  # skip NAME WHY
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$STATUS"
    log "$1: skipped ($2)"
}

# 1. The main table. run.sh installs the peers and builds what is missing (--build: always).
step main 2400 bash "$BENCH/run.sh" "${BUILD[@]+"${BUILD[@]}"}" --h2 "${ROUNDS[@]+"${ROUNDS[@]}"}"

# 2. Balancing over three backend ports: needs bench.py's --backends (the balance branch).
if python3 "$BENCH/bench.py" --help 2>/dev/null | grep -q -- '--backends'; then
    step balance 1500 bash "$BENCH/run.sh" --backends 3 --only sluicegate,nginx,haproxy,envoy \
        --out "$OUT/balance" "${ROUNDS[@]+"${ROUNDS[@]}"}"
else
    skip balance "bench.py has no --backends option yet"
fi

# 2b. Light load: 5 connections, where no proxy saturates its core (the main table's 50 do).
step light 900 bash "$BENCH/run.sh" --connections 5 --only sluicegate,sluicegate-filter,nginx,haproxy \
    --out "$OUT/light" "${ROUNDS[@]+"${ROUNDS[@]}"}"

# 3, 4. Memory and hot reload (need only nginx, haproxy, wrk, the host and our filters: run.sh above).
step memory 900 python3 "$BENCH/memory.py" "${QUICK[@]+"${QUICK[@]}"}"
step reload 900 python3 "$BENCH/reload.py" "${QUICK[@]+"${QUICK[@]}"}"

# 5. Cache hits, if that scenario exists.
if [ -f "$BENCH/cache_bench.py" ]; then
    step cache 900 bash "$BENCH/run.sh" --cache "${ROUNDS[@]+"${ROUNDS[@]}"}"
else
    skip cache "bench/cache_bench.py not present"
fi

# 6. Per-language filter cost, if that scenario exists (it prints its table on stdout).
if [ -f "$BENCH/languages.py" ]; then
    mkdir -p "$OUT/languages"
    lang_rounds=(); [ ${#QUICK[@]} = 0 ] || lang_rounds=(--rounds 2)
    step languages 1800 bash -c 'python3 "$1" "${@:3}" >"$2" || { echo "retrying with --build"; python3 "$1" --build "${@:3}" >"$2"; }' \
        _ "$BENCH/languages.py" "$OUT/languages/results.md" "${lang_rounds[@]+"${lang_rounds[@]}"}"
else
    skip languages "bench/languages.py not present"
fi

# 7. Profile of the plain proxy.
if ! command -v perf >/dev/null; then
    log "installing linux-perf"
    { apt-get install -y -q --no-install-recommends linux-perf >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends linux-perf >/dev/null; }; } || true
fi
if command -v perf >/dev/null; then
    step profile 600 python3 "$BENCH/perf_profile.py" --seconds 10
else
    skip profile "perf not installable (Debian linux-perf)"
fi

# 7b. Instructions per request: plain proxy, cache hit, one filter (callgrind: deterministic,
#     unlike time).
if ! command -v valgrind >/dev/null; then
    log "installing valgrind"
    { apt-get install -y -q --no-install-recommends valgrind >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends valgrind >/dev/null; }; } || true
fi
if command -v valgrind >/dev/null; then
    step callgrind 900 python3 "$BENCH/callgrind.py"
    step callgrind-cache 900 python3 "$BENCH/callgrind.py" --cache
    step callgrind-filter 900 python3 "$BENCH/callgrind.py" --filter
else
    skip callgrind "valgrind not installable (Debian valgrind)"
    skip callgrind-cache "valgrind not installable (Debian valgrind)"
    skip callgrind-filter "valgrind not installable (Debian valgrind)"
fi

# 8. The report.
if [ "$REPORT" = 1 ]; then
    python3 "$BENCH/report.py" || { log "report.py failed"; exit 1; }
fi
log "done: $(awk -F'\t' 'NR>1 {printf "%s=%s ", $1, $2}' "$STATUS")"
if awk -F'\t' 'NR>1 && $2=="failed" {f=1} END {exit !f}' "$STATUS"; then
    exit 1
fi
