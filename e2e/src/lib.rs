//! Test support for suites that drive the real components.
//!
//! Layout:
//! - [`components`]: where Redis, Cassandra (the CQL stand-in for ScyllaDB) and
//!   the local Kubernetes control plane are, and connections to them that fail
//!   with a message naming the missing component and the script that starts it.
//! - [`cluster`]: the CRD, throw-away namespaces, an in-process operator and polling.
//! - [`tools`]: the pinned `kubectl` and `helm` binaries built by `e2e/local`.
//! - [`kubelet`]: runs a real gateway process for each gateway Pod (on its
//!   loopback Pod IP), since kwok's nodes run nothing.
//! - [`operator_process`]: operators as real processes (to pause with SIGSTOP),
//!   each behind a proxy that records every API request it sends.
//! - [`client`]: WebSocket clients that hold connections open, and tokens for them.
//!
//! The addresses come from the environment `e2e/test.sh` exports (see
//! `e2e/local/env.sh`); the defaults match the ports in `e2e/local/lib.sh`, so
//! `cargo test` also works against components started by hand.

pub mod client;
pub mod cluster;
pub mod components;
pub mod gateways;
pub mod kubelet;
pub mod operator_process;
pub mod tools;

/// The repository root. From the runtime `CARGO_MANIFEST_DIR` (set by `cargo
/// test` and `e2e/local/run-tests.sh`) rather than the path compiled in: the
/// cached target dir is shared by clones, so a test binary may have been
/// built in another one.
pub fn repo_root() -> std::path::PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    std::path::Path::new(&package).join("..")
}

/// A name unique to this test process and call, for namespaces, keys and
/// keyspaces, so concurrent tests and repeated runs never collide.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{n}-{:x}", std::process::id(), nanos & 0xffff)
}
