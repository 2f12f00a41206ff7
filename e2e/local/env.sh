# Exports the addresses of the local components for tests and tools.
# Usage: source e2e/local/env.sh
# shellcheck source=e2e/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export KUBECHAT_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export KUBECHAT_CQL_NODE="127.0.0.1:$CQL_PORT"
export KUBECHAT_CQL_CLUSTER="127.0.0.2:$CQL_PORT,127.0.0.3:$CQL_PORT,127.0.0.4:$CQL_PORT"   # e2e/local/cassandra-cluster.sh
export KUBECONFIG="$KUBECHAT_RUN/kube/admin.kubeconfig"
export PATH="$KUBECHAT_BIN:$PATH"
