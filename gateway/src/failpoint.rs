//! Named points where a gateway can be made to stop or misbehave, so that
//! tests can kill it between two steps of a send, or see what the operator
//! does with a gateway that serves no one
//! (`KUBECHAT_FAILPOINTS=send-after-reserve`, comma-separated). Unset in production: then a check is one read of an
//! empty list.

use std::sync::OnceLock;

/// After the idempotency key is reserved, before any row is written.
pub const SEND_AFTER_RESERVE: &str = "send-after-reserve";
/// After every row of a send is written, before it is acknowledged.
pub const SEND_BEFORE_ACK: &str = "send-before-ack";
/// Every WebSocket upgrade is refused (503) while the admin port and the
/// readiness probe report ready: a gateway that looks up but serves no one.
pub const REFUSE_WEBSOCKET: &str = "refuse-websocket";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("KUBECHAT_FAILPOINTS")
            .map(|list| list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    })
}

/// Whether `name` is armed.
pub fn is_armed(name: &str) -> bool {
    armed().iter().any(|p| p == name)
}

/// Never returns when `name` is armed (the task waits until the process is
/// killed); returns at once otherwise.
pub async fn pause(name: &str) {
    if is_armed(name) {
        tracing::warn!(failpoint = name, "paused at a failpoint (KUBECHAT_FAILPOINTS)");
        std::future::pending::<()>().await;
    }
}
