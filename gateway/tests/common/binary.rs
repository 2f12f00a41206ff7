//! Which `kubechat-gateway` binary the process-level tests start.

use std::path::PathBuf;

/// `KUBECHAT_GATEWAY_BIN` when set, else the debug binary cargo built beside
/// this test. The suite (`e2e/test.sh`) sets it to the release build it has
/// just made for the images: the binary that ships, at half the CPU of the
/// debug one (the drain suite: 91 -> 45 core-seconds).
pub fn gateway_binary() -> PathBuf {
    std::env::var_os("KUBECHAT_GATEWAY_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_kubechat-gateway").into(), PathBuf::from)
}
