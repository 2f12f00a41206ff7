//! Named points where a gateway can be made to stop, so that tests can kill
//! it between two steps of a send (`KUBECHAT_FAILPOINTS=send-after-reserve`,
//! comma-separated). Unset in production: then a check is one read of an
//! empty list.

use std::sync::OnceLock;

/// After the idempotency key is reserved, before any row is written.
pub const SEND_AFTER_RESERVE: &str = "send-after-reserve";
/// After every row of a send is written, before it is acknowledged.
pub const SEND_BEFORE_ACK: &str = "send-before-ack";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("KUBECHAT_FAILPOINTS")
            .map(|list| list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    })
}

/// Never returns when `name` is armed (the task waits until the process is
/// killed); returns at once otherwise.
pub async fn pause(name: &str) {
    if armed().iter().any(|p| p == name) {
        tracing::warn!(failpoint = name, "paused at a failpoint (KUBECHAT_FAILPOINTS)");
        std::future::pending::<()>().await;
    }
}
