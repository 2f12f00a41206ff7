//! kubechat operator: reconciles ChatCluster resources.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the operator's reconcile loop is not built yet (tracked by the operator issue)")
}
