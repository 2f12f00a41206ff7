#!/usr/bin/env bash
# Stops every local component. Pass --wipe to also delete their data.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"
status=0
for c in control-plane cassandra-cluster cassandra redis; do
  bash "$HERE/$c.sh" stop "$@" || status=1
done
exit $status
