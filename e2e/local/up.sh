#!/usr/bin/env bash
# Installs (if missing) and starts every local component in parallel:
# Redis, Cassandra, the three-node Cassandra cluster (store-node failure
# tests), the Kubernetes control plane, the Centrifugo binary (the
# benchmark's peer; the bench crate's tests run it) and Chromium with its
# WebDriver (the web client's browser tests). Fails naming each
# component that did not come up.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"

components=(redis cassandra cassandra-cluster control-plane centrifugo chromium)
declare -A pids
for c in "${components[@]}"; do
  args=(start)
  # A test run's Cassandra and etcd start empty (see their `start --fresh`).
  [[ "$c" == cassandra* || "$c" == control-plane ]] && args+=(--fresh)
  bash "$HERE/$c.sh" "${args[@]}" &
  pids[$c]=$!
done

failed=()
for c in "${components[@]}"; do
  wait "${pids[$c]}" || failed+=("$c")
done
((${#failed[@]} == 0)) || die "could not start: ${failed[*]} (the lines above say why)"
log "all components up in ${SECONDS}s"
