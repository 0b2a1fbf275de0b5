#!/usr/bin/env bash
# The demo, from a fresh machine: builds the example filters and the proxy,
# then serves http://127.0.0.1:8080 in front of two local backends
# (127.0.0.1:9001 and :9002) with the example filters loaded.
# Admin API and metrics: http://127.0.0.1:9901. Stop with Ctrl-C.
#
#   bash scripts/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/build-filters.sh
bash scripts/build-lang-filters.sh
cargo build --release -p sluicegate
cat <<'TXT'

Sluicegate demo on http://127.0.0.1:8080 — try:
  curl -i http://127.0.0.1:8080/hello                        # add-header + security-headers
  curl -i -H 'x-canary: 1' http://127.0.0.1:8080/            # canary filter picks the canary upstream
  curl -i http://127.0.0.1:8080/private                      # 401 from the auth filter
  curl -i -H 'x-api-key: demo-key' http://127.0.0.1:8080/private
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/limited; done
  curl -i -H 'x-tenant: beta' http://127.0.0.1:8080/py/     # Python: routed to the canary upstream
  curl -i -X POST -d '{"oops' http://127.0.0.1:8080/js/      # JavaScript: 400, invalid JSON
  curl -i --interface 127.0.0.2 http://127.0.0.1:8080/c/     # C: 403, blocked client address
  curl http://127.0.0.1:9901/filters ; curl http://127.0.0.1:9901/metrics

TXT
exec target/release/sluicegate demo --filters target/filters
