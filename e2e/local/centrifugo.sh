#!/usr/bin/env bash
# Centrifugo, the peer the benchmark compares against (bench/run.sh) and that
# the bench crate's test suite drives: built from its Go module at a pinned
# version into $KUBECHAT_BIN/centrifugo. Nothing is started here: the
# benchmark and the tests start their own instances with their own config.
#
#   centrifugo.sh install   build it unless already built at CENTRIFUGO_VERSION
#   centrifugo.sh status    print whether the binary is there at that version
#   centrifugo.sh version   print the pinned version
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODULE="github.com/centrifugal/centrifugo/v6"
BINARY="$KUBECHAT_BIN/centrifugo"
STAMP="$KUBECHAT_BIN/.stamps/centrifugo"
# The release sets this version variable the same way; `centrifugo version` prints it.
LDFLAGS="-s -w -X $MODULE/internal/build.Version=${CENTRIFUGO_VERSION#v}"

up_to_date() {
  [[ -x "$BINARY" && -f "$STAMP" && "$(cat "$STAMP")" == "$CENTRIFUGO_VERSION $LDFLAGS" ]]
}

install() {
  if up_to_date; then
    log "centrifugo $CENTRIFUGO_VERSION up to date"
    return
  fi
  command -v go >/dev/null || die "go is not installed (needed to build Centrifugo)"
  exec 8>"$KUBECHAT_BIN/.centrifugo.lock"
  flock 8
  up_to_date && return  # built by a concurrent run while we waited
  log "building centrifugo $CENTRIFUGO_VERSION from $MODULE (cold: a few minutes on 2 cores)"
  local start=$SECONDS tmp
  tmp="$(mktemp -d "$KUBECHAT_BIN/.build.XXXXXX")"
  # GOFLAGS from lib.sh (-mod=mod) is meaningless outside a main module. If a
  # future pin needs a newer Go than the machine's, the go command fetches the
  # toolchain its go.mod names only when GOTOOLCHAIN allows it: set
  # CENTRIFUGO_GOTOOLCHAIN (e.g. go1.27.3) for that.
  GOTOOLCHAIN="${CENTRIFUGO_GOTOOLCHAIN:-local}" GOFLAGS="" GOBIN="$tmp" CGO_ENABLED=0 \
    go install -trimpath -ldflags "$LDFLAGS" "$MODULE@$CENTRIFUGO_VERSION" \
    || { rm -rf "$tmp"; die "go install $MODULE@$CENTRIFUGO_VERSION failed"; }
  mv -f "$tmp/centrifugo" "$BINARY"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$STAMP")"
  printf '%s\n' "$CENTRIFUGO_VERSION $LDFLAGS" >"$STAMP"
  log "built centrifugo $CENTRIFUGO_VERSION in $((SECONDS - start)) s: $BINARY"
}

status() {
  if up_to_date; then
    echo "centrifugo: $CENTRIFUGO_VERSION at $BINARY"
  else
    echo "centrifugo: MISSING ($BINARY at $CENTRIFUGO_VERSION; run e2e/local/centrifugo.sh install)"
    return 1
  fi
}

case "${1:-}" in
  install | start) install ;;  # start: up.sh starts every component by name
  status) status ;;
  stop) ;;                      # no process of its own
  version) echo "$CENTRIFUGO_VERSION" ;;
  *) die "usage: $0 install | status | version" ;;
esac
