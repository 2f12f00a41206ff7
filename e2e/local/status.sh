#!/usr/bin/env bash
# Prints whether each local component is up; exits non-zero if any is down.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"
status=0
for c in redis cassandra cassandra-cluster control-plane centrifugo chromium; do
  bash "$HERE/$c.sh" status || status=1
done
exit $status
