//! The kubechat gateway: WebSocket chat with durable history, multi-device
//! sync and presence; the same binary runs the push workers.
//!
//! Layout (arrows point down only):
//! - [`ids`]: time-ordered 64-bit ids for messages and inbox positions.
//! - [`store`]: the durable storage trait, with ScyllaDB and embedded (redb) implementations.

pub mod ids;
pub mod store;
