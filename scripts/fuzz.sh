#!/usr/bin/env bash
# Fuzz the host's input-facing code with cargo-fuzz (libFuzzer).
#
#   bash scripts/fuzz.sh              # every target, 6 s each (the bounded run of scripts/test.sh)
#   bash scripts/fuzz.sh 3600 h1_framing   # one target for an hour (the long run)
#   SLUICEGATE_FUZZ_WIT=1 bash scripts/fuzz.sh 600 wit_boundary   # the WIT boundary (builds wasmtime)
#
# cargo-fuzz wants a nightly toolchain; this project builds on stable, so
# the run uses RUSTC_BOOTSTRAP=1 and no sanitizer (`-s none`: coverage
# guidance and Rust's own checks — panics, overflow and debug assertions —
# still apply). Installs cargo-fuzz and a C++ compiler (libFuzzer) if
# missing. Crashes are written to fuzz/artifacts/<target>/ and fail the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SECS="${1:-6}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
    TARGETS=(config headers h1_framing cache_semantics)
    if [ "${SLUICEGATE_FUZZ_WIT:-0}" = 1 ]; then TARGETS+=(wit_boundary); fi
fi

if ! command -v c++ >/dev/null 2>&1; then
    echo "installing a C++ compiler (libFuzzer is C++)"
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

export RUSTC_BOOTSTRAP=1
for t in "${TARGETS[@]}"; do
    features=()
    if [ "$t" = wit_boundary ]; then
        features=(--features wit)
        [ -f target/test-filters/fuzz-guest.wasm ] || bash scripts/build-filters.sh fuzz-guest
    fi
    mkdir -p "fuzz/corpus/$t"
    echo "== fuzz $t (${SECS}s)"
    # The seeds in fuzz/seeds/<target> are read; new inputs go to fuzz/corpus/<target>.
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    log="target/fuzz-$t.log"
    mkdir -p target
    if ! cargo fuzz run -s none --fuzz-dir fuzz "${features[@]}" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$SECS" -max_len=8192 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz target $t failed (log: $log; crash input in fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done )" "$log" | tr '\n' ' '
    echo
done
