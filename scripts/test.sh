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

echo "== building the host (release)"
cargo build --release -p sluicegate

echo "== guest SDK and filter unit tests (native)"
cargo test --target-dir target/guest -p sluicegate-sdk -p add-header -p auth -p rate-limit -p canary -p security-headers

echo "== host unit tests and end-to-end tests"
cargo test --release -p sluicegate -- --test-threads "${SLUICEGATE_TEST_THREADS:-2}"
