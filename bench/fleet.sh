#!/usr/bin/env bash
# The cost of fleet state on Redis: a route rate limit and a KV-using
# filter (kv-counter: one increment per request, answered locally), each
# with the local backend and with Redis, against a plain route, in the
# same run. One sluicegate process (workers = 1), one nginx backend, one
# redis-server, wrk -t1 -c50 --latency on 127.0.0.1; rounds interleaved.
#
#   bash bench/fleet.sh               # 3 rounds x 5 s per scenario
#   ROUNDS=5 DURATION=10 bash bench/fleet.sh
#
# Needs target/release/sluicegate (cargo build --release -p sluicegate),
# target/filters/kv-counter.wasm (scripts/build-filters.sh), nginx, wrk and
# redis-server (Debian packages; installed when missing). Prints a
# Markdown table of the median req/s and p99 per scenario.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
EXE="$ROOT/target/release/sluicegate"
[ -x "$EXE" ] || { echo "build first: cargo build --release -p sluicegate" >&2; exit 1; }
[ -f target/filters/kv-counter.wasm ] || bash scripts/build-filters.sh kv-counter
for pkg in nginx:nginx-light wrk:wrk redis-server:redis-server; do
  command -v "${pkg%%:*}" >/dev/null 2>&1 || command -v "/usr/sbin/${pkg%%:*}" >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkg##*:}" >/dev/null; }
done
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

WORK="$(mktemp -d /tmp/sluicegate-fleet-bench.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

BACKEND=$(free_port); REDIS=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
mkdir -p "$WORK/filters" "$WORK/nginx"
cp target/filters/kv-counter.wasm "$WORK/filters/"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "hello world\n"; } }
}
EOF
"$NGINX" -c "$WORK/nginx.conf"
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$BACKEND"; wait_port "$REDIS"

# Limits far above what one process serves: every request is checked and
# passes, so the figures are the check's cost, not rejections.
cat > "$WORK/sluicegate.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$PROXY"]
admin = "127.0.0.1:$ADMIN"
workers = 1

[[upstream]]
name = "app"
endpoints = ["127.0.0.1:$BACKEND"]

[[route]]
path_prefix = "/plain"
upstream = "app"

[[route]]
path_prefix = "/rl-local"
upstream = "app"
rate_limit = { rps = 1000000, key = "route" }

[[route]]
path_prefix = "/rl-redis"
upstream = "app"
rate_limit = { rps = 1000000, key = "route", backend = "redis" }

# The filter answers every request itself; its upstream does not exist,
# so a request that missed the filter would show as an error.
[[upstream]]
name = "nowhere"
endpoints = ["127.0.0.1:1"]

[[route]]
path_prefix = "/kv"
upstream = "nowhere"
filters = ["kv-counter"]

[redis]
url = "redis://127.0.0.1:$REDIS"

[filters]
dir = "$WORK/filters"
timeout_ms = 100
EOF
# The KV scenarios need two processes: [filters.kv] backend is per process.
sed -e "s/127.0.0.1:$PROXY/127.0.0.1:PROXY2/; s/127.0.0.1:$ADMIN/127.0.0.1:ADMIN2/" "$WORK/sluicegate.toml" > "$WORK/redis-kv.toml"
PROXY2=$(free_port); ADMIN2=$(free_port)
sed -i "s/PROXY2/$PROXY2/; s/ADMIN2/$ADMIN2/" "$WORK/redis-kv.toml"
printf '\n[filters.kv]\nbackend = "redis"\ntimeout_ms = 20\n' >> "$WORK/redis-kv.toml"

"$EXE" run --config "$WORK/sluicegate.toml" >"$WORK/local.log" 2>&1 &
PIDS+=($!)
"$EXE" run --config "$WORK/redis-kv.toml" >"$WORK/redis.log.2" 2>&1 &
PIDS+=($!)
wait_port "$PROXY"; wait_port "$PROXY2"
sleep 1

# name|port|path|kv (send x-kv-incr) or empty
SCENARIOS=(
  "plain route|$PROXY|/plain|"
  "rate limit, local|$PROXY|/rl-local|"
  "rate limit, redis|$PROXY|/rl-redis|"
  "kv filter, local|$PROXY|/kv|kv"
  "kv filter, redis|$PROXY2|/kv|kv"
)
for s in "${SCENARIOS[@]}"; do
  IFS='|' read -r name port path extra <<<"$s"
  hdr=(-H "x-plain: 1"); [ "$extra" = kv ] && hdr=(-H "x-kv-incr: n")
  code=$(curl -s -o /dev/null -w '%{http_code}' "${hdr[@]}" "http://127.0.0.1:$port$path")
  [ "$code" = 200 ] || { echo "$name: GET $path answered $code" >&2; tail -20 "$WORK"/*.log >&2; exit 1; }
  wrk -t1 -c50 -d1s "${hdr[@]}" "http://127.0.0.1:$port$path" >/dev/null
done

declare -A RPS P99
for round in $(seq 1 "$ROUNDS"); do
  for s in "${SCENARIOS[@]}"; do
    IFS='|' read -r name port path extra <<<"$s"
    hdr=(-H "x-plain: 1"); [ "$extra" = kv ] && hdr=(-H "x-kv-incr: n")
    out=$(wrk -t1 -c50 -d"${DURATION}s" --latency "${hdr[@]}" "http://127.0.0.1:$port$path")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    errs=$(grep -c "Non-2xx\|Socket errors" <<<"$out" || true)
    [ "$errs" = 0 ] || { echo "$name: errors in round $round:"; echo "$out"; exit 1; } >&2
    RPS["$name"]+="$rps "; P99["$name"]+="$p99 "
    echo "round $round: $name: $rps req/s, p99 $p99" >&2
  done
done

# The Redis scenarios really went through Redis, and never fell back.
# (Every request is one script call: the KV increments, the rest the
# rate-limit checks; the buckets themselves expire within milliseconds.)
kv=$(redis-cli -p "$REDIS" GET 'sluicegate:kv:{kv-counter}:n')
scripts=$(redis-cli -p "$REDIS" INFO commandstats | tr -d '\r' |
  awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {n += $3} END {print n + 0}')
[ "${kv:-0}" -gt 0 ] || { echo "no KV counter in Redis" >&2; exit 1; }
[ "$kv" -gt 10000 ] && [ "$scripts" -gt "$((kv + 10000))" ] || { echo "too few rate-limit scripts in Redis: $scripts" >&2; exit 1; }
# Operations past their deadline (a busy machine) are reported, not hidden.
late=0
for admin in "$ADMIN" "$ADMIN2"; do
  n=$(curl -s "http://127.0.0.1:$admin/metrics" |
    awk '/^sluicegate_redis_errors_total\{/ {n += $2} END {print n + 0}')
  late=$((late + n))
done
echo "checked: $scripts scripts ran in Redis, the KV counter reached $kv; $late operations got no answer in time (fail policy applied)" >&2

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; printf "%.2f\n", v}'; }
echo
echo "| scenario | req/s (median of $ROUNDS) | p99 ms (median) |"
echo "| --- | ---: | ---: |"
for s in "${SCENARIOS[@]}"; do
  IFS='|' read -r name _ _ _ <<<"$s"
  rps=$(median <<<"${RPS[$name]}")
  p99=$(for v in ${P99[$name]}; do to_ms <<<"$v"; done | tr '\n' ' ' | median)
  printf '| %s | %.0f | %s |\n' "$name" "$rps" "$p99"
done
