#!/usr/bin/env bash
# Redis for tests: Debian's redis-server on 127.0.0.1:$REDIS_PORT.
# Usage: redis.sh install | start | status | stop [--wipe]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR="$KUBECHAT_RUN/redis"
PIDFILE="$DIR/redis.pid"
LOGFILE="$DIR/redis.log"

install() {
  apt_install redis-server redis-tools
  command -v redis-server >/dev/null || die "redis-server is not on PATH after installing Debian's redis-server"
}

healthy() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

start() {
  install
  if healthy; then
    log "redis: already up on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  port_open "$REDIS_PORT" && die "port $REDIS_PORT is taken by something that is not Redis; set REDIS_PORT"
  mkdir -p "$DIR"
  # Debian's package may have started its own server on 6379; ours is separate.
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$DIR" \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$LOGFILE" \
    --appendonly yes --appendfsync everysec --save "" \
    || die "redis-server failed to start (see $LOGFILE)"
  if ! wait_until 20 "redis" healthy; then
    tail -n 20 "$LOGFILE" >&2 || true
    die "Redis did not answer PING on 127.0.0.1:$REDIS_PORT within 20 s"
  fi
  log "redis: up on 127.0.0.1:$REDIS_PORT"
}

status() {
  if healthy; then
    echo "redis: up on 127.0.0.1:$REDIS_PORT"
  else
    echo "redis: DOWN (no PONG from 127.0.0.1:$REDIS_PORT)"
    return 1
  fi
}

stop() {
  stop_pid "$PIDFILE" redis
  if [[ "${1:-}" == "--wipe" ]]; then rm -rf "$DIR"; fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  status) status ;;
  stop) shift; stop "$@" ;;
  *) die "usage: $0 install | start | status | stop [--wipe]" ;;
esac
