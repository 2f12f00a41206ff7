#!/usr/bin/env bash
# Stops every local component.
#   --wipe          also delete their data
#   --wipe-stores   also delete Cassandra's data (so it is killed, not
#                   drained: seconds of flushing every test table saved), as
#                   `e2e/test.sh` does: its next run starts Cassandra empty
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"
wipe=() wipe_stores=()
case "${1:-}" in
  "") ;;
  --wipe) wipe=(--wipe) wipe_stores=(--wipe) ;;
  --wipe-stores) wipe_stores=(--wipe) ;;
  *) die "usage: $0 [--wipe | --wipe-stores]" ;;
esac
# All at once: they are independent, and Cassandra and the control plane
# each take seconds to stop (one after another, the teardown took ~28 s).
status=0
pids=()
for c in control-plane cassandra-cluster cassandra redis; do
  if [[ "$c" == cassandra* ]]; then
    bash "$HERE/$c.sh" stop "${wipe_stores[@]}" &
  else
    bash "$HERE/$c.sh" stop "${wipe[@]}" &
  fi
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
