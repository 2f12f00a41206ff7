#!/usr/bin/env bash
# A Redis Cluster for tests: Debian's redis-server in cluster mode, three
# masters and three replicas on 127.0.1.1-6 (one port, six loopback
# addresses, as six hosts would be). Tests start their own with
# REDIS_CLUSTER_PORT and REDIS_CLUSTER_DIR set, so one test's failover or
# resharding never meets another's.
# Usage: redis-cluster.sh start | status | stop [--wipe] | kill N | start-node N | seeds
#   kill N        SIGKILL node N (1-6): a crashed master, whose replica takes over
#   start-node N  start node N again (it rejoins, as a replica if it was replaced)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT="${REDIS_CLUSTER_PORT:-17379}"
DIR="${REDIS_CLUSTER_DIR:-$KUBECHAT_RUN/redis-cluster}"
NODES=6
# Failover after a master is silent this long (ms): seconds, not the default 15 s.
NODE_TIMEOUT="${REDIS_CLUSTER_NODE_TIMEOUT:-2000}"

address() { echo "127.0.1.$1"; }
cli() { redis-cli -h "$(address "$1")" -p "$PORT" "${@:2}"; }
healthy() { cli "$1" ping 2>/dev/null | grep -q PONG; }
# Every node sees all six and every slot served (a lone node would say ok
# on its own slots: full coverage is not required, so that a test can watch
# the other shards keep working while one fails over).
cluster_ok() {
  local info; info="$(cli "$1" cluster info 2>/dev/null)" || return 1
  grep -q 'cluster_state:ok' <<<"$info" && grep -q "cluster_known_nodes:$NODES" <<<"$info" \
    && grep -q 'cluster_slots_ok:16384' <<<"$info"
}
all_ok() { for n in $(seq 1 $NODES); do cluster_ok "$n" || return 1; done; }
# Every replica has synced with its master (a failover needs one that did).
replicas_synced() {
  local synced=0
  for n in $(seq 1 $NODES); do
    cli "$n" info replication 2>/dev/null | grep -q 'master_link_status:up' && synced=$((synced + 1))
  done
  ((synced == NODES / 2))
}

start_node() {
  local n="$1" dir="$DIR/n$1"
  mkdir -p "$dir"
  healthy "$n" && return 0
  # Protected mode counts only 127.0.0.1 as loopback: the replicas on
  # 127.0.1.x would be refused (every node binds a loopback address only).
  redis-server --bind "$(address "$n")" --port "$PORT" --dir "$dir" \
    --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
    --cluster-announce-ip "$(address "$n")" --bind-source-addr "$(address "$n")" \
    --cluster-node-timeout "$NODE_TIMEOUT" --cluster-require-full-coverage no \
    --appendonly yes --appendfsync everysec --save "" \
    --protected-mode no \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    || die "redis-server $(address "$n"):$PORT failed to start (see $dir/redis.log)"
  wait_until 20 "node $n" healthy "$n" || die "node $n ($(address "$n"):$PORT) did not answer PING within 20 s"
}

start() {
  apt_install redis-server redis-tools
  if all_ok; then
    log "redis cluster: already up on $(seeds)"
    return 0
  fi
  for n in $(seq 1 $NODES); do start_node "$n" & done
  wait
  for n in $(seq 1 $NODES); do healthy "$n" || die "node $n did not start"; done
  if [[ "$(cli 1 cluster info | grep -o 'cluster_known_nodes:[0-9]*')" == "cluster_known_nodes:1" ]]; then
    local nodes=()
    for n in $(seq 1 $NODES); do nodes+=("$(address "$n"):$PORT"); done
    # The first three become masters, each with one replica.
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 \
      || { tail -n 20 "$DIR/create.log" >&2; die "redis-cli --cluster create failed"; }
  fi
  wait_until 30 "cluster state ok" all_ok || { cli 1 cluster info >&2; die "the cluster did not reach cluster_state:ok within 30 s"; }
  wait_until 30 "replicas synced" replicas_synced || die "the replicas did not sync with their masters within 30 s (see $DIR/n*/redis.log)"
  log "redis cluster: 3 masters + 3 replicas up on $(seeds) after ${SECONDS}s"
}

seeds() {
  local out=()
  for n in $(seq 1 $NODES); do out+=("$(address "$n"):$PORT"); done
  (IFS=,; echo "${out[*]}")
}

status() {
  local down=0
  for n in $(seq 1 $NODES); do
    if healthy "$n"; then
      echo "redis cluster node $n ($(address "$n"):$PORT): $(cli "$n" role | head -1), $(cli "$n" cluster info | grep cluster_state | tr -d '\r')"
    else
      echo "redis cluster node $n ($(address "$n"):$PORT): DOWN"
      down=1
    fi
  done
  return $down
}

stop() {
  for n in $(seq 1 $NODES); do stop_pid "$DIR/n$n/redis.pid" "redis cluster node $n" & done
  wait
  if [[ "${1:-}" == "--wipe" ]]; then rm -rf "$DIR"; fi
}

kill_node() {
  local pidfile="$DIR/n$1/redis.pid"
  pid_alive "$pidfile" || die "node $1 is not running"
  kill -9 "$(cat "$pidfile")"
  log "SIGKILLed node $1 ($(address "$1"):$PORT)"
}

case "${1:-}" in
  start) start ;;
  status) status ;;
  stop) shift; stop "$@" ;;
  kill) kill_node "${2:?node number}" ;;
  start-node) start_node "${2:?node number}" ;;
  seeds) seeds ;;
  *) die "usage: $0 start | status | stop [--wipe] | kill N | start-node N | seeds" ;;
esac
