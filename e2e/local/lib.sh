# shellcheck shell=bash
# Shared settings for the local component scripts. Sourced, never run.
#
# Everything that is downloaded or built lives in $KUBECHAT_CACHE, outside the
# clone, so a fresh clone on the same machine (CI) starts warm. Runtime state
# (pid files, logs, data) lives in $KUBECHAT_RUN.

set -euo pipefail

KUBECHAT_CACHE="${KUBECHAT_CACHE:-$HOME/.cache/kubechat}"
KUBECHAT_RUN="${KUBECHAT_RUN:-$KUBECHAT_CACHE/run}"
KUBECHAT_BIN="$KUBECHAT_CACHE/bin"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export KUBECHAT_CACHE KUBECHAT_RUN KUBECHAT_BIN REPO_ROOT

# Loopback ports, chosen away from the defaults so a developer's own services
# (Redis on 6379, Cassandra on 9042, a kind cluster on 6443) never collide.
REDIS_PORT="${REDIS_PORT:-16379}"
CQL_PORT="${CQL_PORT:-19042}"
CASSANDRA_STORAGE_PORT="${CASSANDRA_STORAGE_PORT:-17000}"
ETCD_CLIENT_PORT="${ETCD_CLIENT_PORT:-12379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-12380}"
APISERVER_PORT="${APISERVER_PORT:-16443}"
CONTROLLER_MANAGER_PORT="${CONTROLLER_MANAGER_PORT:-20257}"
SCHEDULER_PORT="${SCHEDULER_PORT:-20259}"
export REDIS_PORT CQL_PORT CASSANDRA_STORAGE_PORT ETCD_CLIENT_PORT ETCD_PEER_PORT \
  APISERVER_PORT CONTROLLER_MANAGER_PORT SCHEDULER_PORT

# Pinned versions of everything the tests run against.
KUBERNETES_VERSION="v1.37.2"   # kube-apiserver, controller-manager, scheduler, kubectl
ETCD_VERSION="v3.6.16"
KWOK_VERSION="v0.8.0"
HELM_VERSION="v3.22.0"
KUBE_SCORE_VERSION="v1.20.0"  # chart best-practice checks (e2e/tests/hardening.rs)
CASSANDRA_VERSION="5.0.9"
CENTRIFUGO_VERSION="v6.9.1"    # the benchmark's peer (e2e/local/centrifugo.sh)
export KUBERNETES_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION KUBE_SCORE_VERSION CASSANDRA_VERSION CENTRIFUGO_VERSION

# Go builds and module downloads are cached with everything else.
export GOMODCACHE="${GOMODCACHE:-$KUBECHAT_CACHE/go/mod}"
export GOCACHE="${GOCACHE:-$KUBECHAT_CACHE/go/build}"
export GOFLAGS="${GOFLAGS:--mod=mod}"
export GOTOOLCHAIN=local

mkdir -p "$KUBECHAT_CACHE" "$KUBECHAT_RUN" "$KUBECHAT_BIN"

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(basename "$0" .sh)" "$*" >&2; exit 1; }

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s.
wait_until() {
  local timeout="$1"; shift 2  # $2 only documents the call site
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.5
  done
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pid_running PID: PID is a running process. An exited process that its
# parent or init has not reaped yet (a zombie; some sandboxes' init reaps only
# every couple of seconds) does not count.
pid_running() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat; stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# pid_alive FILE: the pid in FILE names a running process.
pid_alive() { [[ -f "$1" ]] && pid_running "$(cat "$1")"; }

# stop_pid FILE NAME: TERM the process, then KILL it if it lingers.
stop_pid() {
  local file="$1" name="$2"
  if pid_alive "$file"; then
    local pid; pid="$(cat "$file")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do pid_running "$pid" || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$file"
}

# apt_install PKG...: install Debian packages that are missing.
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]} == 0)) && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  # Components start in parallel: one apt at a time (dpkg's own lock refuses the second).
  mkdir -p "$KUBECHAT_CACHE"
  exec {apt_lock}>"$KUBECHAT_CACHE/apt.lock"
  flock "$apt_lock"
  $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  exec {apt_lock}>&-
}
