//! The kubechat gateway: WebSocket chat with durable history, multi-device
//! sync and presence. The same binary runs the push workers, which live in
//! their own crate (`kubechat_push`): the chat path only enqueues their jobs.
//!
//! Layout (arrows point down only):
//! - [`app`]: wiring of the parts into a running gateway.
//! - [`config`]: the config file the operator mounts.
//! - [`client`]: a line-based terminal client.
//! - [`broker`]: cross-gateway routing and presence state (trait; local, and Redis
//!   or a Redis Cluster through `kubechat_redis`).
//! - [`chat`]: sending, sync, history, groups, presence; the local connection hub (no sockets).
//! - [`transport`]: hyper + WebSocket, auth, per-connection limits.
//! - [`ids`]: time-ordered 64-bit ids for messages and inbox positions.
//! - [`protocol`]: frames, validation and error codes (pure, no I/O).
//! - [`metrics`]: Prometheus metrics; [`throttle`]: warnings that repeat in an incident, rate-limited;
//!   [`failpoint`]: where tests stop a gateway between two steps.
//! - [`store`]: the durable storage trait, with ScyllaDB and embedded (redb) implementations.
//! - [`names`]: user and device ids, push platforms and targets: `kubechat_push::names`, the
//!   vocabulary the protocol shares with the push workers.

pub mod app;
pub mod broker;
pub mod chat;
pub mod client;
pub mod config;
pub mod failpoint;
pub mod ids;
pub mod metrics;
pub use kubechat_push::names;
pub mod protocol;
pub mod store;
pub mod throttle;
pub mod transport;
