#!/usr/bin/env bash
# Stops every local component. Pass --wipe to also delete their data.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"
# All at once: they are independent, and Cassandra and the control plane
# each take seconds to stop (one after another, the teardown took ~28 s).
status=0
pids=()
for c in control-plane cassandra-cluster cassandra redis; do
  bash "$HERE/$c.sh" stop "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
