#!/usr/bin/env bash
# The whole test suite, from a fresh clone: lint, bring up the real
# components (Redis, Cassandra, a local Kubernetes control plane), run every
# test (unit, integration, e2e against the local control plane), tear down.
# Exits non-zero on any failure.
#
#   KUBECHAT_KEEP_UP=1   leave the components running afterwards
#   KUBECHAT_NO_UP=1     use components that are already running (do not start or stop them)
#   KUBECHAT_TEST_JOBS=N shared test binaries run N at a time (default 3; e2e/local/run-tests.sh)
#   extra arguments      are passed to every test binary (e.g. a test name filter)
source "$(dirname "${BASH_SOURCE[0]}")/local/lib.sh"
cd "$REPO_ROOT"

# The cargo target dir lives in the cache: CI's fresh clone builds warm.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KUBECHAT_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# One build per run, not an edit loop: incremental state only fills the
# cached target dir (it had grown to 25 GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n==> %s (at %ss)\n' "$*" "$SECONDS" >&2; }

up_pid=""
cleanup() {
  local code=$?
  [[ -n "$up_pid" ]] && kill "$up_pid" 2>/dev/null
  if [[ -z "${KUBECHAT_NO_UP:-}" && -z "${KUBECHAT_KEEP_UP:-}" ]]; then
    step "tearing down components"
    bash e2e/local/down.sh --wipe-stores || true
  fi
  step "finished with exit code $code"
  exit "$code"
}
trap cleanup EXIT

if [[ -z "${KUBECHAT_NO_UP:-}" ]]; then
  step "starting components in the background (log: $KUBECHAT_RUN/up.log)"
  bash e2e/local/up.sh >"$KUBECHAT_RUN/up.log" 2>&1 &
  up_pid=$!
fi

# One run's builds at a time: the cached target dir and the source stamps
# below are shared by every clone on the machine.
exec 8>"$KUBECHAT_CACHE/build.lock"
flock 8
# Sources unchanged since the last run's builds get back the mtimes they had
# then, so a fresh clone rebuilds only the crates that changed.
python3 e2e/local/source-stamps.py restore "$REPO_ROOT" "$CARGO_TARGET_DIR" "$KUBECHAT_CACHE"

# jemalloc (the gateway's allocator) is built from C with make.
command -v make >/dev/null || apt_install make
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "building tests"
cargo test --workspace --locked --no-run
step "release binaries for the container images (e2e/tests/image.rs)"
cargo build --release --locked -p kubechat-gateway -p kubechat-operator
# Tests that start gateway or operator processes start these: the binaries
# that ship, at half the CPU of the debug builds (in-process gateways and
# operators stay debug). The operator's debug binary is then not needed (a
# package's binaries are built only for its own integration tests).
export KUBECHAT_GATEWAY_BIN="$CARGO_TARGET_DIR/release/kubechat-gateway"
export KUBECHAT_OPERATOR_BIN="$CARGO_TARGET_DIR/release/kubechat-operator"
python3 e2e/local/source-stamps.py record "$REPO_ROOT" "$CARGO_TARGET_DIR" "$KUBECHAT_CACHE"
flock -u 8

if [[ -n "$up_pid" ]]; then
  step "waiting for components"
  if ! wait "$up_pid"; then
    up_pid=""
    cat "$KUBECHAT_RUN/up.log" >&2
    echo "ERROR: the components above could not be started; no test was run" >&2
    exit 1
  fi
  up_pid=""
  cat "$KUBECHAT_RUN/up.log" >&2
fi

# shellcheck source=e2e/local/env.sh
source e2e/local/env.sh
bash e2e/local/status.sh

step "tests (e2e/local/run-tests.sh)"
bash e2e/local/run-tests.sh "$@"
