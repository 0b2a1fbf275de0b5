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
cargo test --release --target-dir target/guest -p sluicegate-sdk -p auth -p rate-limit -p canary 2>&1 | tail -n 40

echo "== host unit tests and end-to-end tests"
cargo test --release -p sluicegate -- --test-threads "${SLUICEGATE_TEST_THREADS:-2}"
