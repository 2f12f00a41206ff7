#!/usr/bin/env bash
# The whole product on a laptop: on a host with Docker and kind, build the two
# images, create a kind cluster, load the images, `helm install` the chart,
# apply the dev example, wait for Ready, and chat through it:
#
#   1. a port-forward to the gateway Service answers /readyz;
#   2. a 1:1 and a group round trip with the bundled client
#      (`kubechat-gateway chat`, run in pods of the gateway image);
#   3. an image change of the gateways while alice keeps sending: the operator
#      drains the gateways one at a time; both clients are moved (`reconnect`)
#      and every message alice got an ack for reaches bob.
#
#   e2e/kind/run.sh            KEEP=1 leaves the cluster up afterwards
#
# It is never run by e2e/test.sh or CI here (no container engine on those
# machines); README "Trying it on kind" says which parts of it run there
# against the local control plane instead. It fails at once, saying what is
# missing, when docker, kind, kubectl or helm is not there.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-kubechat-e2e}"
NS=kubechat-system
APP_NS=chat
EXAMPLE="$REPO_ROOT/charts/kubechat/examples/dev.yaml"
CC=chat-dev

log() { printf '[kind] %s\n' "$*" >&2; }
die() { printf '[kind] ERROR: %s\n' "$*" >&2; exit 1; }

# kubectl and helm: the ones on PATH, else the pinned builds of e2e/local.
PATH="$PATH:${KUBECHAT_CACHE:-$HOME/.cache/kubechat}/bin"
missing=()
for tool in docker kind kubectl helm; do command -v "$tool" >/dev/null || missing+=("$tool"); done
((${#missing[@]} == 0)) || die "missing: ${missing[*]}. This walkthrough needs Docker and kind \
(https://kind.sigs.k8s.io); kubectl and helm can come from \`bash e2e/local/control-plane.sh install\`."
docker info >/dev/null 2>&1 || die "docker is installed but its daemon does not answer (docker info)"

VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$REPO_ROOT/charts/kubechat/Chart.yaml")"
GATEWAY_IMAGE="ghcr.io/kubechat/kubechat:$VERSION"
NEXT_IMAGE="ghcr.io/kubechat/kubechat:$VERSION-next"  # same contents, another name: an image change
OPERATOR_IMAGE="ghcr.io/kubechat/kubechat-operator:$VERSION"

WORK="$(mktemp -d)"
pids=()
cleanup() {
  local code=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
  if [[ -z "${KEEP:-}" ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  ((code == 0)) && log "passed" || log "FAILED (exit $code)"
  exit "$code"
}
trap cleanup EXIT

log "building $GATEWAY_IMAGE and $OPERATOR_IMAGE"
docker build --target gateway -t "$GATEWAY_IMAGE" "$REPO_ROOT"
docker build --target operator -t "$OPERATOR_IMAGE" "$REPO_ROOT"
docker tag "$GATEWAY_IMAGE" "$NEXT_IMAGE"

kind get clusters 2>/dev/null | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER" >/dev/null
kind load docker-image --name "$CLUSTER" "$GATEWAY_IMAGE" "$NEXT_IMAGE" "$OPERATOR_IMAGE"

log "helm install"
helm upgrade --install kubechat "$REPO_ROOT/charts/kubechat" --namespace "$NS" --create-namespace \
  --set image.pullPolicy=Never --wait --timeout 5m
kind load docker-image --name "$CLUSTER" busybox:1.37 2>/dev/null || true
helm test kubechat --namespace "$NS" --timeout 3m

log "applying $EXAMPLE"
kubectl create namespace "$APP_NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply --namespace "$APP_NS" -f "$EXAMPLE"
kubectl wait --namespace "$APP_NS" "chatcluster/$CC" --for=condition=Ready --timeout=15m
kubectl get chatclusters --namespace "$APP_NS"

log "port-forward to the gateway Service"
kubectl port-forward --namespace "$APP_NS" "svc/$CC-gateway" 18080:8080 >"$WORK/port-forward.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 40); do curl -fsS http://127.0.0.1:18080/readyz >/dev/null 2>&1 && break; sleep 0.5; done
curl -fsS http://127.0.0.1:18080/readyz || die "the gateway does not answer /readyz through the port-forward"

# Tokens signed with the cluster's generated key, by the gateway image itself.
key="$(kubectl get secret --namespace "$APP_NS" "$CC-auth" -o jsonpath='{.data.signing-key}' | base64 -d)"
printf '%s' "$key" >"$WORK/key"
token() {
  docker run --rm -v "$WORK/key:/key:ro" "$GATEWAY_IMAGE" token --key-file /key --user "$1" --device kind
}

# client NAME: the bundled client in a pod; lines written to $WORK/NAME.in
# are typed into it, what it prints goes to $WORK/NAME.out.
client() {
  local name="$1"
  mkfifo "$WORK/$name.in"
  # Hold the fifo open so the client's stdin stays open between lines.
  sleep infinity >"$WORK/$name.in" &
  pids+=($!)
  kubectl run "$name" --namespace "$APP_NS" --image "$GATEWAY_IMAGE" --image-pull-policy Never \
    --restart Never --rm -i --quiet -- \
    chat --url "ws://$CC-gateway:8080/v1/ws" --user "$name" --token "$(token "$name")" \
    <"$WORK/$name.in" >"$WORK/$name.out" 2>&1 &
  pids+=($!)
}
say() { printf '%s\n' "$2" >"$WORK/$1.in"; }
# expect NAME TEXT SECONDS: TEXT appears in what NAME's client printed.
expect() {
  local deadline=$((SECONDS + $3))
  until grep -qF -- "$2" "$WORK/$1.out" 2>/dev/null; do
    ((SECONDS < deadline)) || { cat "$WORK/$1.out" >&2; die "$1 never printed: $2"; }
    sleep 0.5
  done
}

log "1:1 and group round trips"
client bob
client alice
expect bob "connected as bob" 60
expect alice "connected as alice" 60
say alice "@bob hi bob, from kind"
expect bob "hi bob, from kind" 30
say alice "/group kind-team bob"
expect alice "g:" 30
group="$(grep -o 'g:[0-9]\+' "$WORK/alice.out" | head -n1)"
say alice "#$group hi team"
expect bob "hi team" 30

log "image change to $NEXT_IMAGE while alice sends"
kubectl patch --namespace "$APP_NS" "chatcluster/$CC" --type merge \
  -p "{\"spec\":{\"gateway\":{\"image\":\"$NEXT_IMAGE\"}}}"
n=0
rollout_deadline=$((SECONDS + 900))
until kubectl get statefulset --namespace "$APP_NS" "$CC-gateway" \
    -o jsonpath='{.status.updatedReplicas}/{.status.replicas}/{.status.readyReplicas}' | grep -qx '2/2/2' \
  && kubectl wait --namespace "$APP_NS" "chatcluster/$CC" --for=condition=Ready --timeout=1s >/dev/null 2>&1; do
  ((SECONDS < rollout_deadline)) || die "the rollout did not finish within 15 min"
  n=$((n + 1))
  say alice "@bob during rollout $n"
  sleep 1
done
say alice "@bob after rollout"
expect bob "after rollout" 60
grep -qF "moving to" "$WORK/alice.out" || die "alice was never moved to another gateway (no drain?)"
grep -qF "moving to" "$WORK/bob.out" || die "bob was never moved to another gateway (no drain?)"

# Nothing acked is lost: bob syncs from the start, and every 1:1 message
# alice got an ack for is there (acks are counted, texts are unique).
say bob "/sync"
sleep 5
acked="$(grep -c 'stored as [0-9]* in dm:' "$WORK/alice.out" || true)"
delivered="$(grep -oE 'hi bob, from kind|during rollout [0-9]+|after rollout' "$WORK/bob.out" | sort -u | wc -l)"
((delivered >= acked)) || die "alice had $acked 1:1 messages acknowledged, bob has $delivered of them"
log "$acked acknowledged 1:1 messages, all at bob; both clients drained and reconnected"
