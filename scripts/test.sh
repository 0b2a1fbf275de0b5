#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs the wasm target,
# builds the filters and the host, runs unit and end-to-end tests.
#
#   bash scripts/test.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "== building filters (wasm32-wasip2 components)"
bash scripts/build-filters.sh

echo "== building Python, JavaScript and C filters and templates (installs their toolchains once)"
bash scripts/build-lang-filters.sh --templates

# The status page test renders the admin page in headless Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (Debian) for the status page test"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

# The fleet tests (tests/e2e/fleet.rs) start their own redis-server per test.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (Debian) for the fleet tests"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

# No separate `cargo build --release`: the dev-dependencies change the
# feature set of shared dependencies, so a plain build and a test build are
# two full builds of wasmtime. `cargo test` builds the binary the end-to-end
# tests run (CARGO_BIN_EXE_sluicegate).

LOG="$ROOT/target/test-output.log"
mkdir -p "$ROOT/target"
: > "$LOG"

echo "== guest SDK and filter unit tests (native)"
cargo test --target-dir target/guest -p sluicegate-sdk -p sluicegate-sdk-v2 -p add-header -p add-header-v2 -p auth -p rate-limit -p canary -p security-headers 2>&1 | tee -a "$LOG"
# The callout filters in an invocation of their own (as in build-filters.sh):
# they turn on the SDK's `callouts` feature, so its callout tests run here.
cargo test --target-dir target/guest -p sluicegate-sdk-v2 -p ext-authz -p jwks-auth 2>&1 | tee -a "$LOG"

echo "== host unit tests and end-to-end tests (real binary, real sockets, real filters)"
cargo test --release -p sluicegate --lib --tests -- --test-threads "${SLUICEGATE_TEST_THREADS:-2}" 2>&1 | tee -a "$LOG"

echo "== fault, soak and isolation tests, alone (10,000 connections; a soak of \${SLUICEGATE_SOAK_SECS:-120} s with RSS sampled; a hammered computing filter)"
cargo test --release -p sluicegate --test e2e -- soak:: isolation:: cache::disk:: --ignored --skip soak::puts_around_an_idle_close_1000 --test-threads 1 --nocapture 2>&1 | tee -a "$LOG"

echo "== fuzzing: a bounded run of every fuzz target (\${SLUICEGATE_FUZZ_SECS:-6} s each; long runs: docs/security.md)"
bash scripts/fuzz.sh "${SLUICEGATE_FUZZ_SECS:-6}"

# One closing line over every test binary above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f; if (p == 0 || f > 0) exit 1 }' "$LOG"
