#!/usr/bin/env bash
# The benchmark of docs/benchmarks.md: kubechat and Centrifugo (the peer),
# back to back, driven by the same load tool (kubechat-bench), each server
# started fresh for each workload and pinned to core 0, the client to core 1.
#
#   bench/run.sh                 full run (idle 19.9k, connect 10k, group up to 5k msg/s, pairs 5k/20k, two gateways)
#   bench/run.sh --quick         small sizes and short steps (a few minutes)
#   bench/run.sh --no-cluster    skip the two-gateway run (Redis + Cassandra)
#   bench/run.sh --only group,pairs5k   a subset: idle connect group pairs5k pairs20k cluster
#   bench/run.sh --out DIR       results into DIR (default bench/results)
#   bench/run.sh --baseline REV  also run the two-gateway row with the gateway
#                                built at git REV (the code before a change), same run
#                                (or BENCH_BASELINE_GATEWAY=/path/to/kubechat-gateway)
#   BENCH_GATEWAY=/path/to/kubechat-gateway BENCH_GATEWAY_LABEL=a8bb0f2 bench/run.sh ...
#                                every kubechat row with that build (e.g. the
#                                code before a change) instead of this tree's;
#                                the label names it in the report
#
# Writes DIR/latest.json (every raw result, the machine, versions, command)
# and DIR/latest.md (the table with kubechat, Centrifugo and their ratio).
# shellcheck source-path=SCRIPTDIR source=../e2e/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../e2e/local/lib.sh"
cd "$REPO_ROOT"

COMMAND="bench/run.sh${*:+ $*}"
STARTED_AT="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
QUICK=""; CLUSTER=1; ONLY=""; OUT="bench/results"; BASELINE_REV=""
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-cluster) CLUSTER="" ;;
    --only) ONLY="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --baseline) BASELINE_REV="$2"; shift ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
  shift
done
wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }

# Sizes: the issue's table (full) or a short version of it (quick).
if [[ -n "$QUICK" ]]; then
  IDLE_N=2000; IDLE_HOLD=10; CONNECT_N=2000; GROUP_RATES=500,1000; STEP_S=4; PAIRS=100; PAIRS_S=5; ONE_TO_ONE_S=5
  CLUSTER=""
else
  # One-to-one rows run a minute: stalls on a minute's scale (the store's
  # checkpoint) fall inside the window.
  IDLE_N=19900; IDLE_HOLD=30; CONNECT_N=10000; GROUP_RATES=500,750,1000,2000,5000; STEP_S=10; PAIRS=500; PAIRS_S=20
  ONE_TO_ONE_S=60
fi
KUBECHAT_PORT="${BENCH_KUBECHAT_PORT:-18080}"
CENTRIFUGO_PORT="${BENCH_CENTRIFUGO_PORT:-18000}"
SERVER_CPU="${BENCH_SERVER_CPU:-0}"
CLIENT_CPU="${BENCH_CLIENT_CPU:-1}"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KUBECHAT_CACHE/target}"
command -v taskset >/dev/null || die "taskset is missing (Debian's util-linux)"
command -v python3 >/dev/null || die "python3 is missing (it writes the report)"
command -v curl >/dev/null || die "curl is missing (readiness checks)"

if [[ -n "${BENCH_GATEWAY:-}" ]]; then
  log "building kubechat-bench (release); the gateway is $BENCH_GATEWAY"
  cargo build --release --locked -p kubechat-bench
else
  log "building kubechat-gateway and kubechat-bench (release)"
  cargo build --release --locked -p kubechat-gateway -p kubechat-bench
fi
GATEWAY="${BENCH_GATEWAY:-$CARGO_TARGET_DIR/release/kubechat-gateway}"
[[ -x "$GATEWAY" ]] || die "no gateway binary at $GATEWAY"
BENCH="$CARGO_TARGET_DIR/release/kubechat-bench"
bash e2e/local/centrifugo.sh install
CENTRIFUGO="$KUBECHAT_BIN/centrifugo"
BASELINE_GATEWAY="${BENCH_BASELINE_GATEWAY:-}"
if [[ -n "$BASELINE_REV" && -z "$BASELINE_GATEWAY" ]]; then
  log "building the baseline gateway at $BASELINE_REV"
  baseline_src="$KUBECHAT_CACHE/bench-baseline/src"
  rm -rf "$baseline_src"; mkdir -p "$(dirname "$baseline_src")"
  git worktree prune
  git worktree add --force --detach "$baseline_src" "$BASELINE_REV" >/dev/null
  (cd "$baseline_src" && CARGO_TARGET_DIR="$KUBECHAT_CACHE/bench-baseline/target" \
    cargo build --release --locked -p kubechat-gateway)
  BASELINE_GATEWAY="$KUBECHAT_CACHE/bench-baseline/target/release/kubechat-gateway"
fi

# Both the client and the servers hold up to ~19,900 sockets.
ulimit -n "$(ulimit -Hn)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kubechat-bench.XXXXXX")"
log "work dir $WORK"
SERVER_PID=""
STARTED_COMPONENTS=()
cleanup() {
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null
  for pid in "${EXTRA_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for c in "${STARTED_COMPONENTS[@]}"; do bash "e2e/local/$c.sh" stop || true; done
}
EXTRA_PIDS=()
trap cleanup EXIT

# ------------------------------------------------------------- servers ----

# wait_port PORT PID NAME LOG: the server accepts connections (or died).
wait_port() {
  local port="$1" pid="$2" name="$3" logfile="$4"
  for _ in $(seq 1 100); do
    port_open "$port" && return 0
    pid_running "$pid" || { tail -n 20 "$logfile" >&2; die "$name exited while starting"; }
    sleep 0.1
  done
  tail -n 20 "$logfile" >&2
  die "$name did not listen on 127.0.0.1:$port within 10 s"
}

# Each start_* sets SERVER_PID, SERVER_URL and KEY_ARGS.
start_kubechat() {
  local dir="$WORK/kubechat-$1"
  port_open "$KUBECHAT_PORT" && die "port $KUBECHAT_PORT is taken; set BENCH_KUBECHAT_PORT"
  mkdir -p "$dir/data"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/data/signing-key"
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$GATEWAY" standalone --data-dir "$dir/data" \
    --listen "127.0.0.1:$KUBECHAT_PORT" >"$dir/server.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$KUBECHAT_PORT" "$SERVER_PID" "kubechat-gateway" "$dir/server.log"
  SERVER_URL="ws://127.0.0.1:$KUBECHAT_PORT/v1/ws"
  KEY_ARGS=(--key-file "$dir/data/signing-key")
}

start_centrifugo() {
  local dir="$WORK/centrifugo-$1" key
  port_open "$CENTRIFUGO_PORT" && die "port $CENTRIFUGO_PORT is taken; set BENCH_CENTRIFUGO_PORT"
  mkdir -p "$dir"
  key="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  # In-memory engine, HMAC tokens, clients may subscribe and publish; no
  # history, presence or join/leave (the defaults); no usage stats.
  cat >"$dir/config.json" <<EOF
{
  "http_server": {"address": "127.0.0.1", "port": $CENTRIFUGO_PORT},
  "log": {"level": "warn"},
  "engine": {"type": "memory"},
  "usage_stats": {"disabled": true},
  "http_api": {"disabled": true},
  "health": {"enabled": true},
  "client": {"token": {"hmac_secret_key": "$key"}},
  "channel": {"without_namespace": {"allow_subscribe_for_client": true, "allow_publish_for_client": true}}
}
EOF
  taskset -c "$SERVER_CPU" "$CENTRIFUGO" -c "$dir/config.json" >"$dir/server.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$CENTRIFUGO_PORT" "$SERVER_PID" "centrifugo" "$dir/server.log"
  SERVER_URL="ws://127.0.0.1:$CENTRIFUGO_PORT/connection/websocket"
  KEY_ARGS=(--key "$key")
}

stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do pid_running "$SERVER_PID" || break; sleep 0.1; done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

FAILED=()
# bench SERVER NAME WORKLOAD ARGS...: a fresh server, one run of the tool.
bench() {
  local server="$1" name="$2"; shift 2
  log "$name on $server"
  "start_$server" "$name"
  if ! taskset -c "$CLIENT_CPU" "$BENCH" --server "$server" --url "$SERVER_URL" "${KEY_ARGS[@]}" \
    --server-pid "$SERVER_PID" --json "$WORK/$server-$name.json" "$@"; then
    FAILED+=("$server-$name")
    log "FAILED: $name on $server (server log: $WORK/$server-$name/server.log)"
  fi
  if [[ "$server" == kubechat && "$name" == group ]]; then
    # Stored bytes: the embedded store's growth over the run.
    du -sb "$WORK/kubechat-group/data" | cut -f1 >"$WORK/kubechat-group.stored-bytes"
  fi
  stop_server
  # Hundreds of MB after the message runs; the logs stay.
  if [[ "$server" == kubechat ]]; then rm -rf "$WORK/kubechat-$name/data"; fi
}

both() { bench kubechat "$@"; bench centrifugo "$@"; }

wanted idle && both idle idle --connections "$IDLE_N" --rate 2000 --hold "$IDLE_HOLD"
wanted connect && both connect connect --connections "$CONNECT_N"
if wanted group; then
  # The empty store's size, to subtract.
  start_kubechat empty && stop_server
  du -sb "$WORK/kubechat-empty/data" | cut -f1 >"$WORK/kubechat-empty.stored-bytes"
  rm -rf "$WORK/kubechat-empty/data"
  both group group --members 100 --rates "$GROUP_RATES" --duration "$STEP_S"
fi
wanted pairs5k && both pairs5k pairs --pairs "$PAIRS" --rate 5000 --duration "$ONE_TO_ONE_S"
wanted pairs20k && both pairs20k pairs --pairs "$PAIRS" --rate 20000 --duration "$ONE_TO_ONE_S"

# ------------------------------------------- two gateways: Redis + Cassandra ----
#
# The clustered data path against its ceiling, all in one run on one warm
# Cassandra: first the store itself (raw single-row INSERTs and LWTs from the
# same tool, with the same number of requests in flight), then two gateways
# of each build (--baseline: the code before, same run) with one-to-one pairs
# at CLUSTER_OFFER msg/s (what they sustain) and at half of what they
# sustained (ack latency).

CLUSTER_OFFER="${BENCH_CLUSTER_OFFER:-5000}"
CQL_IN_FLIGHT="${BENCH_CQL_IN_FLIGHT:-256}"

# start_pair BINARY NAME WORKER_BASE: two gateways of BINARY on a fresh
# keyspace; sets CLUSTER_URLS, CLUSTER_PIDS, CLUSTER_ADMIN. The gateway ids
# are the variant's (NAME without -max/-half): a restart under the same id
# takes its worker id back at once.
start_pair() {
  local binary="$1" name="$2" worker="$3" dir="$WORK/cluster-$2" keyspace i
  keyspace="bench_${name//-/_}_$(date +%s)"
  mkdir -p "$dir"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/signing-key"
  CLUSTER_URLS=(); CLUSTER_PIDS=(); CLUSTER_ADMIN=()
  for i in 0 1; do
    local ws_port=$((KUBECHAT_PORT + 10 + i)) admin_port=$((KUBECHAT_PORT + 20 + i))
    port_open "$ws_port" && die "port $ws_port is taken"
    cat >"$dir/gw-$i.json" <<JSON
{
  "listen": {"websocket": $ws_port, "admin": $admin_port},
  "maxConnections": 20000,
  "chat": {"maxGroupMembers": 100, "maxMessageChars": 100000, "heartbeatSeconds": 5, "offlineAfterSeconds": 30},
  "redis": {"url": "redis://127.0.0.1:$REDIS_PORT", "passwordEnv": null},
  "scylla": {"contactPoints": ["127.0.0.1:$CQL_PORT"], "keyspace": "$keyspace", "replicationFactor": 1,
             "localDatacenter": null, "credentialsEnv": null},
  "auth": {"signingKeyFile": "$dir/signing-key"}
}
JSON
    # Started one after the other: the first creates the keyspace.
    RUST_LOG=warn taskset -c "$SERVER_CPU" "$binary" gateway --config "$dir/gw-$i.json" \
      --worker-id $((worker + i)) --gateway-id "bench-${name%-*}-$i" >"$dir/gw-$i.log" 2>&1 &
    EXTRA_PIDS+=($!); CLUSTER_PIDS+=(--server-pid "$!"); CLUSTER_ADMIN+=("$admin_port")
    local ready=""
    for _ in $(seq 1 600); do
      if [[ "$(curl -s "http://127.0.0.1:$admin_port/readyz" 2>/dev/null)" == ready ]]; then ready=1; break; fi
      pid_running "${EXTRA_PIDS[-1]}" || break
      sleep 0.1
    done
    [[ -n "$ready" ]] || { tail -n 20 "$dir/gw-$i.log" >&2; return 1; }
    CLUSTER_URLS+=(--url "ws://127.0.0.1:$ws_port/v1/ws")
  done
}

stop_pair() {
  local pid
  for pid in "${EXTRA_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${EXTRA_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  EXTRA_PIDS=()
}

# pairs_run NAME RATE: one pairs run on two fresh gateways of the variant.
pairs_run() {
  local name="$1" rate="$2" port
  taskset -c "$CLIENT_CPU" "$BENCH" --server kubechat "${CLUSTER_URLS[@]}" \
    --key-file "$WORK/cluster-$name/signing-key" "${CLUSTER_PIDS[@]}" --json "$WORK/cluster-$name.json" \
    pairs --pairs "$PAIRS" --rate "$rate" --duration "$PAIRS_S" || FAILED+=("cluster-$name")
  for port in "${CLUSTER_ADMIN[@]}"; do curl -s "http://127.0.0.1:$port/metrics"; done >"$WORK/cluster-$name.metrics"
}

# cluster_variant BINARY NAME WORKER_BASE: the sustained run, then the half-rate run.
cluster_variant() {
  local binary="$1" name="$2" worker="$3" sustained
  log "two gateways ($name): $PAIRS pairs at $CLUSTER_OFFER msg/s offered"
  if ! start_pair "$binary" "$name-max" "$worker"; then
    FAILED+=("cluster-$name"); log "gateways ($name) not ready"; stop_pair; return 0
  fi
  pairs_run "$name-max" "$CLUSTER_OFFER"
  stop_pair
  sustained="$(python3 -c 'import json, sys
s = [x for x in json.load(open(sys.argv[1]))["steps"] if not x["warmup"]][0]
print(int(s["acked"] / s["duration_s"]))' "$WORK/cluster-$name-max.json" 2>/dev/null || echo 0)"
  if ((sustained < 2)); then log "($name) sustained nothing: no half-rate run"; return 0; fi
  log "two gateways ($name): $PAIRS pairs at $((sustained / 2)) msg/s (half of the $sustained/s sustained)"
  if ! start_pair "$binary" "$name-half" "$worker"; then
    FAILED+=("cluster-$name"); stop_pair; return 0
  fi
  pairs_run "$name-half" "$((sustained / 2))"
  stop_pair
}

cluster() {
  local c
  for c in redis cassandra; do
    if ! bash "e2e/local/$c.sh" status >/dev/null 2>&1; then
      bash "e2e/local/$c.sh" start || { FAILED+=(cluster); log "no two-gateway run: $c did not start"; return 0; }
      STARTED_COMPONENTS+=("$c")
    fi
  done
  # The store alone (the first run also warms Cassandra up).
  log "raw Cassandra: single-row INSERT, then LWT, $CQL_IN_FLIGHT in flight"
  taskset -c "$CLIENT_CPU" "$BENCH" --json "$WORK/cql-warmup.json" cql --contact "127.0.0.1:$CQL_PORT" \
    --shape insert --in-flight "$CQL_IN_FLIGHT" --duration 10 --warmup 0 >/dev/null 2>&1 || true
  taskset -c "$CLIENT_CPU" "$BENCH" --json "$WORK/cql-insert.json" cql --contact "127.0.0.1:$CQL_PORT" \
    --shape insert --in-flight "$CQL_IN_FLIGHT" --duration "$PAIRS_S" --rates 0.5 || FAILED+=(cql-insert)
  taskset -c "$CLIENT_CPU" "$BENCH" --json "$WORK/cql-lwt.json" cql --contact "127.0.0.1:$CQL_PORT" \
    --shape lwt --in-flight "$CQL_IN_FLIGHT" --duration "$PAIRS_S" || FAILED+=(cql-lwt)
  if [[ -n "$BASELINE_GATEWAY" ]]; then cluster_variant "$BASELINE_GATEWAY" before 910; fi
  cluster_variant "$GATEWAY" after 900
}
if [[ -n "$CLUSTER" ]] && wanted cluster; then cluster; fi

# ------------------------------------------------------------- report ----

mkdir -p "$OUT"
BENCH_COMMAND="$COMMAND" BENCH_DATE="$STARTED_AT" BENCH_QUICK="$QUICK" BENCH_FAILED="${FAILED[*]}" \
  BENCH_PINNING="server: taskset -c $SERVER_CPU; client: taskset -c $CLIENT_CPU" \
  BENCH_CENTRIFUGO_VERSION="$("$CENTRIFUGO" version | head -n1)" \
  BENCH_KUBECHAT_VERSION="${BENCH_GATEWAY:+${BENCH_GATEWAY_LABEL:-a build at $BENCH_GATEWAY}}" \
  python3 bench/report.py "$WORK" "$OUT"
log "wrote $OUT/latest.json and $OUT/latest.md (raw results and server logs in $WORK)"
cat "$OUT/latest.md"
((${#FAILED[@]} == 0)) || die "failed: ${FAILED[*]} (logs in $WORK)"
