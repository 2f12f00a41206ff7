#!/usr/bin/env bash
# A three-node Cassandra cluster on loopback (127.0.0.2, .3, .4), for the
# tests that lose a store node under traffic (issue 28: the store keeps
# serving at QUORUM with one node down). Each node is a cassandra.sh node with
# its own address, run directory, JMX port and token; the first is the seed.
#
#   cassandra-cluster.sh start [--fresh]    start the three nodes (the seed first, then the other two at once)
#   cassandra-cluster.sh status             exit 0 iff all three answer CQL and see each other
#   cassandra-cluster.sh stop [--wipe]      stop all three
#   cassandra-cluster.sh kill N             SIGKILL node N (1-3), as a crash
#   cassandra-cluster.sh start-node N       start node N again (keeps its data)
#
# CQL on each node's address at $CQL_PORT; the tests find them through
# KUBECHAT_CQL_CLUSTER (e2e/local/env.sh).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
HERE="$(cd "$(dirname "$0")" && pwd)"

NODES=(127.0.0.2 127.0.0.3 127.0.0.4)
# Murmur3 tokens a third of the ring apart: each node owns a third, and with
# replication factor 3 each holds everything.
TOKENS=(-9223372036854775808 -3074457345618258603 3074457345618258602)
CLUSTER_RUN="$KUBECHAT_RUN/cassandra-cluster"
# Small heaps: three nodes share the machine with the single node and the tests.
CLUSTER_HEAP="${CASSANDRA_CLUSTER_HEAP:-512m}"

# node N ARGS...: run cassandra.sh ARGS as node N (1-based).
node() {
  local n="$1"; shift
  local i=$((n - 1))
  CASSANDRA_ADDRESS="${NODES[$i]}" \
    CASSANDRA_SEEDS="${NODES[0]}:$CASSANDRA_STORAGE_PORT" \
    CASSANDRA_CLUSTER_NAME=kubechat-local-3 \
    CASSANDRA_INITIAL_TOKEN="${TOKENS[$i]}" \
    CASSANDRA_JMX_PORT=$((17201 + i)) \
    CASSANDRA_HEAP="$CLUSTER_HEAP" \
    CASSANDRA_RUN_DIR="$CLUSTER_RUN/node$n" \
    CASSANDRA_FLUSH_SCHEMA=true \
    bash "$HERE/cassandra.sh" "$@"
}

check_node() {
  [[ "${1:-}" =~ ^[1-3]$ ]] || die "node number 1, 2 or 3 expected, got '${1:-}'"
}

# every_node_sees_the_others: each node lists the other two as peers.
every_node_sees_the_others() {
  local address
  for address in "${NODES[@]}"; do
    python3 "$HERE/cqlping.py" --host "$address" --port "$CQL_PORT" --peers 2 >/dev/null 2>&1 || return 1
  done
}

cmd_start() {
  local fresh=()
  case "${1:-}" in
    "") ;;
    --fresh) fresh=(--fresh) ;;
    *) die "usage: $0 start [--fresh]" ;;
  esac
  node 1 start "${fresh[@]}"
  local pids=() n failed=()
  for n in 2 3; do
    node "$n" start "${fresh[@]}" &
    pids+=($!)
  done
  for n in 0 1; do
    wait "${pids[$n]}" || failed+=("node$((n + 2))")
  done
  ((${#failed[@]} == 0)) || die "could not start ${failed[*]} (the lines above say why)"
  wait_until 60 "the nodes to see each other" every_node_sees_the_others \
    || die "the three nodes answer CQL but do not all see each other after 60 s (logs in $CLUSTER_RUN/node*/)"
  log "three-node cluster up on ${NODES[*]} (CQL port $CQL_PORT)"
}

cmd_status() {
  local n status=0
  for n in 1 2 3; do
    node "$n" status || status=1
  done
  if ((status == 0)) && ! every_node_sees_the_others; then
    echo "cassandra-cluster: all nodes answer, but not every node lists the other two as peers"
    status=1
  fi
  return $status
}

cmd_stop() {
  # The three nodes stop together: each takes seconds to flush and exit.
  local n status=0 pids=()
  for n in 1 2 3; do
    node "$n" stop "$@" &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || status=1; done
  return $status
}

cmd_kill() {
  check_node "${1:-}"
  local pid_file="$CLUSTER_RUN/node$1/cassandra.pid"
  pid_alive "$pid_file" || die "node $1 is not running"
  kill -9 "$(cat "$pid_file")"
  log "killed node $1 (${NODES[$(($1 - 1))]}, pid $(cat "$pid_file"))"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  status) cmd_status ;;
  stop) shift; cmd_stop "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  start-node) shift; check_node "${1:-}"; node "$1" start ;;
  *) die "usage: $0 start [--fresh] | status | stop [--wipe] | kill N | start-node N" ;;
esac
