#!/usr/bin/env bash
# A real, local Kubernetes control plane for the e2e tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake nodes
# whose Pods go Running/Ready without a kubelet or container runtime). Like
# controller-runtime's envtest, but with the controllers running, so
# StatefulSets, garbage collection, ServiceAccounts etc. behave as in a cluster.
#
#   control-plane.sh install        build the binaries into $KUBECHAT_BIN
#   control-plane.sh start [--fresh]  install if needed, then start everything
#                                   (--fresh: a stopped etcd starts from empty data)
#   control-plane.sh status         print each component; non-zero if any is down
#   control-plane.sh stop [--wipe]  stop everything; --wipe drops etcd data + PKI
#
# Contract for other scripts and the Rust tests: once `start` returns, the
# cluster is reachable with the admin kubeconfig $KUBECHAT_RUN/kube/admin.kubeconfig
# (https://127.0.0.1:$APISERVER_PORT, user CN=kubechat-admin in system:masters,
# certificates embedded), 2 Ready fake nodes labelled type=kwok exist (in zones
# zone-a and zone-b: topology.kubernetes.io/zone), and the
# default ServiceAccount in namespace "default" exists.
#
# Binaries are built from source (the machines this runs on reach the Go module
# proxy, not GitHub releases), from the modules under e2e/local/go/ and with
# `go install`. Each binary has a stamp next to it; it is rebuilt only when it
# is missing or its pinned version (or module files) changed.

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KUBE_DIR="$KUBECHAT_RUN/kube"
PKI_DIR="$KUBE_DIR/pki"
ETCD_DATA_DIR="$KUBE_DIR/etcd"
ADMIN_KUBECONFIG="$KUBE_DIR/admin.kubeconfig"
GO_MODULES_DIR="$REPO_ROOT/e2e/local/go"
STAMP_DIR="$KUBECHAT_BIN/.stamps"
KWOK_STAGES="$KUBECHAT_BIN/kwok-stages.yaml"

SERVICE_CIDR="10.0.0.0/24"
SERVICE_IP="10.0.0.1"      # first address of SERVICE_CIDR: the "kubernetes" Service
# kwok hands out Pod IPs from here. Loopback on purpose: every 127.x address
# is local on Linux, so the e2e harness runs a real process per gateway Pod
# bound to the Pod's IP, and whatever dials a Pod IP (the operator reading
# gateway load) never leaves this machine. The price: the endpoints
# controllers cannot publish these IPs (Endpoints and EndpointSlices refuse
# loopback addresses), so Services have no endpoints; nothing here uses them.
POD_CIDR="127.1.0.0/16"
FAKE_NODES=(kwok-node-0 kwok-node-1)
# One zone per fake node (the zone spread tests: status.zones).
FAKE_ZONES=(zone-a zone-b)
KWOK_PORT="${KWOK_PORT:-20247}"  # kwok's /healthz; nothing else uses it

# Start order; stop runs it backwards.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

kubectl() { "$KUBECHAT_BIN/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

# ---------------------------------------------------------------- install ----

# digest TEXT [FILE...]: a short digest of TEXT and the files' contents. Stamps
# hold "VERSION DIGEST-OF-BUILD-FLAGS-AND-MODULE-FILES".
digest() {
  { printf '%s\n' "$1"; shift; (($# == 0)) || cat "$@"; } | sha256sum | cut -c1-16
}

# up_to_date STAMP NAME...: every binary NAME exists and its stamp reads STAMP.
up_to_date() {
  local stamp="$1" name; shift
  for name in "$@"; do
    [[ -x "$KUBECHAT_BIN/$name" && -f "$STAMP_DIR/$name" ]] || return 1
    [[ "$(cat "$STAMP_DIR/$name")" == "$stamp" ]] || return 1
  done
}

write_stamps() {
  local stamp="$1" name; shift
  mkdir -p "$STAMP_DIR"
  for name in "$@"; do printf '%s\n' "$stamp" >"$STAMP_DIR/$name"; done
}

# go_build_module DIR OUTDIR LDFLAGS PACKAGE...: build from one of our modules,
# with its checked-in go.mod/go.sum as the only source of truth.
go_build_module() {
  local dir="$1" out="$2" ldflags="$3"; shift 3
  (cd "$dir" && CGO_ENABLED=0 go build -mod=readonly -buildvcs=false -trimpath -ldflags "$ldflags" -o "$out/" "$@")
}

install_kubernetes() {
  local dir="$GO_MODULES_DIR/kubernetes"
  local version="${KUBERNETES_VERSION#v}" major minor
  major="${version%%.*}"; minor="${version#*.}"; minor="${minor%%.*}"
  # Both packages back `version.Get()`: component-base for the servers and
  # kubectl, client-go's for clients built on it.
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major"
    ldflags+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  local stamp; stamp="$KUBERNETES_VERSION $(digest "$ldflags" "$dir/go.mod" "$dir/go.sum")"
  if up_to_date "$stamp" "${KUBE_BINARIES[@]}"; then
    log "kubernetes $KUBERNETES_VERSION binaries up to date"
    return
  fi
  grep -q "^require k8s.io/kubernetes $KUBERNETES_VERSION\$" "$dir/go.mod" \
    || die "$dir/go.mod does not require k8s.io/kubernetes $KUBERNETES_VERSION (KUBERNETES_VERSION in lib.sh)"
  local tmp; tmp="$(mktemp -d "$KUBECHAT_BIN/.build.XXXXXX")"
  log "building ${KUBE_BINARIES[*]} $KUBERNETES_VERSION (cold: ~11 min on 2 cores)"
  local start=$SECONDS
  local pkgs=() name
  for name in "${KUBE_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$name"); done
  go_build_module "$dir" "$tmp" "$ldflags" "${pkgs[@]}" \
    || { rm -rf "$tmp"; die "go build of the kubernetes binaries failed"; }
  for name in "${KUBE_BINARIES[@]}"; do mv -f "$tmp/$name" "$KUBECHAT_BIN/$name"; done
  rm -rf "$tmp"
  write_stamps "$stamp" "${KUBE_BINARIES[@]}"
  log "built kubernetes binaries in $((SECONDS - start)) s"
}

install_etcd() {
  local dir="$GO_MODULES_DIR/etcd" ldflags="-s -w"
  local stamp; stamp="$ETCD_VERSION $(digest "$ldflags" "$dir/go.mod" "$dir/go.sum" "$dir/main.go")"
  if up_to_date "$stamp" etcd; then
    log "etcd $ETCD_VERSION up to date"
    return
  fi
  grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION\$" "$dir/go.mod" \
    || die "$dir/go.mod does not require go.etcd.io/etcd/server/v3 $ETCD_VERSION (ETCD_VERSION in lib.sh)"
  local tmp; tmp="$(mktemp -d "$KUBECHAT_BIN/.build.XXXXXX")"
  log "building etcd $ETCD_VERSION"
  local start=$SECONDS
  go_build_module "$dir" "$tmp" "$ldflags" . || { rm -rf "$tmp"; die "go build of etcd failed"; }
  mv -f "$tmp/etcd" "$KUBECHAT_BIN/etcd"
  rm -rf "$tmp"
  write_stamps "$stamp" etcd
  log "built etcd in $((SECONDS - start)) s"
}

# go_install NAME PACKAGE VERSION LDFLAGS: `go install PACKAGE@VERSION`.
go_install() {
  local name="$1" pkg="$2" version="$3" ldflags="$4"
  local stamp; stamp="$version $(digest "$ldflags")"
  if up_to_date "$stamp" "$name"; then
    log "$name $version up to date"
    return
  fi
  log "building $name $version"
  local start=$SECONDS tmp
  tmp="$(mktemp -d "$KUBECHAT_BIN/.build.XXXXXX")"
  # GOFLAGS from lib.sh (-mod=mod) is meaningless outside a main module.
  GOFLAGS="" GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "$pkg@$version" \
    || { rm -rf "$tmp"; die "go install $pkg@$version failed"; }
  mv -f "$tmp/$name" "$KUBECHAT_BIN/$name"
  rm -rf "$tmp"
  write_stamps "$stamp" "$name"
  log "built $name in $((SECONDS - start)) s"
}

install_kwok() {
  go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" \
    "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
  # The kwok binary has no built-in stages (kwokctl writes them into its
  # config), so ship the default ones of the same release next to it: nodes
  # become Ready and renew their leases, Pods go Running/Ready, and deleted
  # Pods are released.
  if [[ -f "$KWOK_STAGES" && "$(head -n1 "$KWOK_STAGES")" == "# kwok $KWOK_VERSION" ]]; then
    return
  fi
  local src
  src="$(GOFLAGS="" go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$src/kustomize/stage" ]] || die "cannot find the kwok $KWOK_VERSION sources in the module cache"
  local stage="$src/kustomize/stage" file
  {
    echo "# kwok $KWOK_VERSION"
    for file in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
      [[ -f "$stage/$file" ]] || die "kwok $KWOK_VERSION has no stage $file"
      echo "---"
      cat "$stage/$file"
    done
  } >"$KWOK_STAGES.tmp"
  mv -f "$KWOK_STAGES.tmp" "$KWOK_STAGES"
}

# lock FD FILE: hold an exclusive lock on FILE until the script exits, so that
# concurrent runs (parallel test jobs) wait for each other instead of racing.
# FD is 8 (install) or 9 (start/stop); launch() keeps both from the daemons.
lock() {
  local fd="$1" file="$2"
  case "$fd" in
    8) exec 8>"$file" ;;
    9) exec 9>"$file" ;;
    *) die "lock: unsupported fd $fd" ;;
  esac
  if ! flock -n "$fd"; then
    log "waiting for another $(basename "$0") holding $file"
    flock "$fd"
  fi
}

cmd_install() {
  command -v go >/dev/null || die "go is not installed (needed to build the control plane)"
  lock 8 "$KUBECHAT_BIN/.install.lock"
  local start=$SECONDS
  install_etcd
  install_kubernetes
  install_kwok
  # helm reports Capabilities.KubeVersion from these when not talking to a
  # cluster (`helm template`); upstream derives them from its client-go.
  local kube_minor="${KUBERNETES_VERSION#v*.}"; kube_minor="${kube_minor%%.*}"
  go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor"
  # Scores `helm template` output (e2e/tests/hardening.rs); no cluster needed.
  go_install kube-score github.com/zegl/kube-score/cmd/kube-score "$KUBE_SCORE_VERSION" \
    "-s -w -X main.version=$KUBE_SCORE_VERSION"
  log "install done in $((SECONDS - start)) s"
}

# -------------------------------------------------------------------- pki ----

# [CA=NAME] sign_cert NAME SUBJECT EXTENSIONS: key + certificate signed by the
# CA (default: the cluster CA "ca").
sign_cert() {
  local name="$1" subject="$2" extensions="$3" ca="${CA:-ca}"
  openssl req -new -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$PKI_DIR/$name.key" -out "$PKI_DIR/$name.csr" 2>/dev/null \
    || die "openssl: cannot create the $name key/CSR"
  openssl x509 -req -in "$PKI_DIR/$name.csr" -CA "$PKI_DIR/$ca.crt" -CAkey "$PKI_DIR/$ca.key" \
    -CAcreateserial -days 3650 -sha256 -out "$PKI_DIR/$name.crt" \
    -extfile <(printf '%s\n' "$extensions") 2>/dev/null \
    || die "openssl: cannot sign the $name certificate"
  rm -f "$PKI_DIR/$name.csr"
}

# Bump when ensure_pki starts producing different files; existing PKI is then
# regenerated on the next start.
PKI_LAYOUT=2

ensure_pki() {
  if [[ "$(cat "$PKI_DIR/.complete" 2>/dev/null)" == "$PKI_LAYOUT" ]]; then
    return
  fi
  command -v openssl >/dev/null || apt_install openssl
  log "generating PKI in $PKI_DIR"
  rm -rf "$PKI_DIR"
  mkdir -p "$PKI_DIR"
  chmod 700 "$PKI_DIR"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=kubechat-ca" \
    -keyout "$PKI_DIR/ca.key" -out "$PKI_DIR/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null \
    || die "openssl: cannot create the CA"
  sign_cert apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$SERVICE_IP"
  sign_cert admin "/O=system:masters/CN=kubechat-admin" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  # Aggregation layer: kube-apiserver authenticates to extension API servers
  # (e.g. metrics-server) with this client cert from a CA of its own.
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=kubechat-front-proxy-ca" \
    -keyout "$PKI_DIR/front-proxy-ca.key" -out "$PKI_DIR/front-proxy-ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null \
    || die "openssl: cannot create the front-proxy CA"
  CA=front-proxy-ca sign_cert front-proxy-client "/CN=front-proxy-client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  openssl genrsa -out "$PKI_DIR/sa.key" 2048 2>/dev/null || die "openssl: cannot create the service-account key"
  openssl rsa -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub" 2>/dev/null \
    || die "openssl: cannot derive the service-account public key"
  chmod 600 "$PKI_DIR"/*.key
  echo "$PKI_LAYOUT" >"$PKI_DIR/.complete"
}

write_admin_kubeconfig() {
  local tmp="$ADMIN_KUBECONFIG.tmp"
  (
    umask 077
    cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubechat
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 "$PKI_DIR/ca.crt")
users:
- name: kubechat-admin
  user:
    client-certificate-data: $(base64 -w0 "$PKI_DIR/admin.crt")
    client-key-data: $(base64 -w0 "$PKI_DIR/admin.key")
contexts:
- name: kubechat
  context:
    cluster: kubechat
    user: kubechat-admin
    namespace: default
current-context: kubechat
EOF
  )
  mv -f "$tmp" "$ADMIN_KUBECONFIG"
}

# -------------------------------------------------------------- processes ----

pid_file() { printf '%s/%s.pid' "$KUBE_DIR" "$1"; }
log_file() { printf '%s/%s.log' "$KUBE_DIR" "$1"; }

# running NAME: NAME's pid file names a live process that is really NAME (not
# an unrelated process that reused the pid after a reboot).
running() {
  local pidf; pidf="$(pid_file "$1")"
  pid_alive "$pidf" || return 1
  local argv0
  argv0="$(tr '\0' '\n' <"/proc/$(cat "$pidf")/cmdline" 2>/dev/null | head -n1)" || return 1
  [[ "$argv0" == "$KUBECHAT_BIN/$1" ]]
}

# fail NAME REASON: show the end of NAME's log and exit.
fail() {
  local name="$1" reason="$2" file; file="$(log_file "$name")"
  if [[ -s "$file" ]]; then
    printf -- '----- last 40 lines of %s -----\n' "$file" >&2
    tail -n 40 "$file" >&2
    printf -- '-----\n' >&2
  fi
  die "$name: $reason"
}

https_get() {
  curl -fs --max-time 3 --cacert "$PKI_DIR/ca.crt" \
    --cert "$PKI_DIR/admin.crt" --key "$PKI_DIR/admin.key" "$@"
}

# healthy NAME: the component answers its health check.
healthy() {
  case "$1" in
    etcd) curl -fs --max-time 3 "http://127.0.0.1:$ETCD_CLIENT_PORT/health" | grep -q '"health":"true"' ;;
    kube-apiserver) [[ "$(https_get "https://127.0.0.1:$APISERVER_PORT/readyz")" == ok ]] ;;
    # Self-signed serving certs; /healthz is always allowed.
    kube-controller-manager) [[ "$(curl -kfs --max-time 3 "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz")" == ok ]] ;;
    kube-scheduler) [[ "$(curl -kfs --max-time 3 "https://127.0.0.1:$SCHEDULER_PORT/healthz")" == ok ]] ;;
    kwok) [[ "$(curl -fs --max-time 3 "http://127.0.0.1:$KWOK_PORT/healthz")" == ok ]] ;;
    *) return 1 ;;
  esac
}

component_port() {
  case "$1" in
    etcd) echo "$ETCD_CLIENT_PORT" ;;
    kube-apiserver) echo "$APISERVER_PORT" ;;
    kube-controller-manager) echo "$CONTROLLER_MANAGER_PORT" ;;
    kube-scheduler) echo "$SCHEDULER_PORT" ;;
    kwok) echo "$KWOK_PORT" ;;
  esac
}

# await NAME TIMEOUT: wait until NAME is healthy; fail early if it exits.
await() {
  local name="$1" timeout="$2" deadline=$((SECONDS + $2))
  until healthy "$name"; do
    # The pid alone: until the launcher's shell has exec'd the binary, its
    # command line is still bash, which `running` would take for an exit.
    pid_alive "$(pid_file "$name")" || fail "$name" "exited during startup"
    ((SECONDS < deadline)) || fail "$name" "not healthy after ${timeout} s"
    sleep 0.25
  done
}

# launch NAME ARGS...: start $KUBECHAT_BIN/NAME in the background, in its own
# session (so it outlives the calling shell), logging to $KUBE_DIR/NAME.log.
launch() {
  local name="$1"; shift
  local pidf; pidf="$(pid_file "$name")"
  local port; port="$(component_port "$name")"
  if port_open "$port"; then
    die "$name: port $port is already in use by another process (not started by this script)"
  fi
  rm -f "$pidf"
  # The inner shell records its own pid and then becomes the component. etcd
  # reads ETCD_* variables as flags, and lib.sh exports ETCD_VERSION & co.
  # shellcheck disable=SC2016
  setsid bash -c 'unset "${!ETCD_@}"; echo $$ >"$0"; exec "$@"' "$pidf" "$KUBECHAT_BIN/$name" "$@" \
    >"$(log_file "$name")" 2>&1 </dev/null 8>&- 9>&- &
  local _
  for _ in $(seq 1 40); do [[ -s "$pidf" ]] && break; sleep 0.05; done
  [[ -s "$pidf" ]] || fail "$name" "did not start"
}

# check_ports: fail before starting anything if a port that a stopped
# component needs is taken by something else.
check_ports() {
  local name port busy=()
  for name in "${COMPONENTS[@]}"; do
    running "$name" && continue
    port="$(component_port "$name")"
    port_open "$port" && busy+=("$port ($name)")
    if [[ "$name" == etcd ]] && port_open "$ETCD_PEER_PORT"; then
      busy+=("$ETCD_PEER_PORT (etcd peer)")
    fi
  done
  ((${#busy[@]} == 0)) || die "ports in use by processes not started by this script: ${busy[*]}"
}

# start_component NAME TIMEOUT ARGS...: launch unless already running, then
# wait for its health check.
start_component() {
  local name="$1" timeout="$2"; shift 2
  [[ -x "$KUBECHAT_BIN/$name" ]] || die "$KUBECHAT_BIN/$name is missing; run: $0 install"
  if running "$name"; then
    await "$name" "$timeout"
    log "$name already running (pid $(cat "$(pid_file "$name")"))"
    return
  fi
  local start=$SECONDS
  launch "$name" "$@"
  await "$name" "$timeout"
  log "$name up (pid $(cat "$(pid_file "$name")"), $((SECONDS - start)) s)"
}

start_etcd() {
  mkdir -p "$ETCD_DATA_DIR"
  chmod 700 "$ETCD_DATA_DIR"
  local peer="http://127.0.0.1:$ETCD_PEER_PORT" client="http://127.0.0.1:$ETCD_CLIENT_PORT"
  # --unsafe-no-fsync: this is throwaway test state; fsync dominates latency.
  start_component etcd 30 \
    --name=kubechat \
    --data-dir="$ETCD_DATA_DIR" \
    --listen-client-urls="$client" --advertise-client-urls="$client" \
    --listen-peer-urls="$peer" --initial-advertise-peer-urls="$peer" \
    --initial-cluster="kubechat=$peer" \
    --initial-cluster-state=new \
    --unsafe-no-fsync=true \
    --log-level=warn
}

start_apiserver() {
  start_component kube-apiserver 90 \
    --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$PKI_DIR/apiserver.crt" \
    --tls-private-key-file="$PKI_DIR/apiserver.key" \
    --client-ca-file="$PKI_DIR/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI_DIR/sa.pub" \
    --service-account-signing-key-file="$PKI_DIR/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --requestheader-client-ca-file="$PKI_DIR/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI_DIR/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI_DIR/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true \
    --profiling=false \
    --v=1
}

# Client-side rate limits well above the defaults (controller-manager 20/s,
# scheduler 50/s): with one client for every controller, a suite deleting a
# hundred clusters' namespaces queued the others' pod creations and Events
# for tens of seconds behind it (a quota's FailedCreate and a claim's
# FailedBinding came after the tests' bounds).
start_controller_manager() {
  start_component kube-controller-manager 60 \
    --kubeconfig="$ADMIN_KUBECONFIG" \
    --authentication-kubeconfig="$ADMIN_KUBECONFIG" \
    --authorization-kubeconfig="$ADMIN_KUBECONFIG" \
    --bind-address=127.0.0.1 \
    --secure-port="$CONTROLLER_MANAGER_PORT" \
    --controllers='*' \
    --leader-elect=false \
    --use-service-account-credentials=false \
    --service-account-private-key-file="$PKI_DIR/sa.key" \
    --root-ca-file="$PKI_DIR/ca.crt" \
    --cluster-signing-cert-file="$PKI_DIR/ca.crt" \
    --cluster-signing-key-file="$PKI_DIR/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --cluster-name=kubechat \
    --kube-api-qps=400 \
    --kube-api-burst=800 \
    --profiling=false \
    --v=1
}

start_scheduler() {
  start_component kube-scheduler 60 \
    --kubeconfig="$ADMIN_KUBECONFIG" \
    --authentication-kubeconfig="$ADMIN_KUBECONFIG" \
    --authorization-kubeconfig="$ADMIN_KUBECONFIG" \
    --bind-address=127.0.0.1 \
    --secure-port="$SCHEDULER_PORT" \
    --leader-elect=false \
    --kube-api-qps=400 \
    --kube-api-burst=800 \
    --profiling=false \
    --v=1
}

start_kwok() {
  [[ -f "$KWOK_STAGES" ]] || die "$KWOK_STAGES is missing; run: $0 install"
  # --node-lease-duration-seconds: kwok's built-in default (40) is applied only
  # to a KwokConfiguration document, which the stages file lacks. Without it
  # kwok keeps no node Leases, the node lifecycle controller marks the nodes
  # NotReady after ~50 s and kwok flips them back: flapping nodes, tainted and
  # eventually evicted Pods.
  if running kwok && ! tr '\0' '\n' <"/proc/$(cat "$(pid_file kwok)")/cmdline" | grep -qxF -- "--cidr=$POD_CIDR"; then
    # Started by an older version of this script (another Pod network):
    # Pods it gave an address would keep one outside $POD_CIDR.
    log "kwok runs with another Pod CIDR; restarting it with $POD_CIDR"
    stop_pid "$(pid_file kwok)" kwok
  fi
  if ! running kwok; then
    # Leases are held by a random per-process identity; a new kwok would wait
    # out the previous one's lease (40 s) before managing the node and its
    # Pods. Nobody holds them now, so drop them and let the new kwok recreate.
    kubectl -n kube-node-lease delete lease "${FAKE_NODES[@]}" --ignore-not-found >/dev/null \
      || fail kube-apiserver "cannot delete stale node leases"
  fi
  start_component kwok 60 \
    --config="$KWOK_STAGES" \
    --kubeconfig="$ADMIN_KUBECONFIG" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --cidr="$POD_CIDR" \
    --node-lease-duration-seconds=40 \
    --node-ip=127.0.0.1 \
    --server-address="127.0.0.1:$KWOK_PORT"
}

fake_nodes_manifest() {
  local i node
  for i in "${!FAKE_NODES[@]}"; do
    node="${FAKE_NODES[$i]}"
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $node
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: $node
    topology.kubernetes.io/zone: ${FAKE_ZONES[$i]}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    node-role.kubernetes.io/agent: ""
status:
  capacity: {cpu: "32", memory: 128Gi, pods: "110", ephemeral-storage: 1Ti}
  allocatable: {cpu: "32", memory: 128Gi, pods: "110", ephemeral-storage: 1Ti}
EOF
  done
}

ensure_cluster_objects() {
  local out
  out="$(fake_nodes_manifest | kubectl apply -f - 2>&1)" || die "creating the fake nodes failed: $out"
  local deadline=$((SECONDS + 60)) node
  for node in "${FAKE_NODES[@]}"; do
    until [[ "$(kubectl get node "$node" \
      -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; do
      running kwok || fail kwok "exited while bringing up the fake nodes"
      ((SECONDS < deadline)) || fail kwok "node $node is not Ready after 60 s"
      sleep 0.25
    done
    # kwok manages a node's Pods only while it holds the node's Lease.
    until kubectl -n kube-node-lease get lease "$node" >/dev/null 2>&1; do
      running kwok || fail kwok "exited while bringing up the fake nodes"
      ((SECONDS < deadline)) || fail kwok "no Lease for node $node after 60 s"
      sleep 0.25
    done
  done
  # kube-apiserver creates the namespaces; the controller-manager's
  # serviceaccount controller the "default" ServiceAccount, without which the
  # ServiceAccount admission plugin rejects Pods.
  wait_until 60 "namespaces" kubectl get namespace default kube-system \
    || fail kube-apiserver "namespaces default/kube-system missing after 60 s"
  wait_until 60 "default ServiceAccount" kubectl -n default get serviceaccount default \
    || fail kube-controller-manager "ServiceAccount default/default missing after 60 s"
}

cmd_start() {
  local start=$SECONDS fresh=false
  case "${1:-}" in
    "") ;;
    --fresh) fresh=true ;;
    *) die "usage: $0 start [--fresh]" ;;
  esac
  mkdir -p "$KUBE_DIR"
  lock 9 "$KUBE_DIR/.lock"
  # Objects a test run leaves behind (a failed test's namespace) pile up
  # run after run: their Services alone exhaust the /24 service range. A
  # test run starts from an empty etcd; a running one is left alone.
  if $fresh && ! running etcd && [[ -d "$ETCD_DATA_DIR" ]]; then
    rm -rf "$ETCD_DATA_DIR"
    log "wiped $ETCD_DATA_DIR (--fresh)"
  fi
  cmd_install
  command -v curl >/dev/null || apt_install curl
  check_ports
  ensure_pki
  write_admin_kubeconfig
  start_etcd
  start_apiserver
  start_controller_manager
  start_scheduler
  start_kwok
  ensure_cluster_objects
  log "control plane ready in $((SECONDS - start)) s: export KUBECONFIG=$ADMIN_KUBECONFIG"
}

cmd_status() {
  local down=0 name pidf
  for name in "${COMPONENTS[@]}"; do
    pidf="$(pid_file "$name")"
    if running "$name" && healthy "$name"; then
      printf '%-24s up    pid %s\n' "$name" "$(cat "$pidf")"
    elif running "$name"; then
      printf '%-24s down  pid %s running but unhealthy (see %s)\n' "$name" "$(cat "$pidf")" "$(log_file "$name")"
      down=1
    else
      printf '%-24s down\n' "$name"
      down=1
    fi
  done
  return "$down"
}

cmd_stop() {
  local wipe=false name i
  case "${1:-}" in
    "") ;;
    --wipe) wipe=true ;;
    *) die "stop: unknown argument '$1' (expected --wipe)" ;;
  esac
  mkdir -p "$KUBE_DIR"
  lock 9 "$KUBE_DIR/.lock"
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name="${COMPONENTS[i]}"
    if running "$name"; then
      stop_pid "$(pid_file "$name")" "$name"
    fi
    rm -f "$(pid_file "$name")"
  done
  if $wipe; then
    rm -rf "$ETCD_DATA_DIR" "$PKI_DIR" "$ADMIN_KUBECONFIG"
    log "wiped etcd data and PKI"
  fi
}

usage() {
  sed -n '/^#   /s/^#   //p' "$0" >&2
  exit 2
}

main() {
  case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    status) cmd_status ;;
    stop) shift; cmd_stop "$@" ;;
    *) usage ;;
  esac
}

# One line, so that editing this file while it runs cannot change what runs.
main "$@"; exit
