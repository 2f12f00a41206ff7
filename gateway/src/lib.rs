//! The kubechat gateway: WebSocket chat with durable history, multi-device
//! sync and presence; the same binary runs the push workers.
//!
//! Layout (arrows point down only):
//! - [`app`]: wiring of the parts into a running gateway.
//! - [`config`]: the config file the operator mounts.
//! - [`client`]: a line-based terminal client.
//! - [`broker`]: cross-gateway routing and presence state (trait; local and Redis).
//! - [`chat`]: sending, sync, history, groups, presence; the local connection hub (no sockets).
//! - [`transport`]: hyper + WebSocket, auth, per-connection limits.
//! - [`ids`]: time-ordered 64-bit ids for messages and inbox positions.
//! - [`push`]: push workers: Redis Stream consumer group → webhook/FCM/APNs.
//! - [`protocol`]: frames, validation and error codes (pure, no I/O).
//! - [`metrics`]: Prometheus metrics; [`throttle`]: warnings that repeat in an incident, rate-limited;
//!   [`failpoint`]: where tests stop a gateway between two steps.
//! - [`store`]: the durable storage trait, with ScyllaDB and embedded (redb) implementations.
//! - [`names`]: the shared vocabulary (user and device ids, push platforms and targets): a
//!   leaf that both [`protocol`] and [`push`] import, so neither imports the other.

pub mod app;
pub mod broker;
pub mod chat;
pub mod client;
pub mod config;
pub mod failpoint;
pub mod ids;
pub mod metrics;
pub mod names;
pub mod protocol;
pub mod push;
pub mod store;
pub mod throttle;
pub mod transport;
