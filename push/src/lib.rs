//! Push workers: notifications for recipients with no connected device.
//!
//! The gateway appends a [`PushJob`] to the stream [`PUSH_STREAM`] (field
//! [`JOB_FIELD`], JSON). Push workers (the `kubechat-gateway` binary in
//! `push-worker` mode) read it through a consumer group and send one
//! notification per registered device of the recipient, through a webhook,
//! FCM or APNs. They share nothing with the chat path but the job format
//! and the device registrations, both defined here.
//!
//! Layout (imports point down the list):
//! - [`names`]: user and device ids, [`PushTarget`], [`Platform`] (a leaf; the gateway's protocol uses it).
//! - [`job`]: the job format, written by the gateway and read by the workers.
//! - [`targets`]: device registration in Redis ([`register_target`]).
//! - [`config`]: [`PushWorkerConfig`], from the gateway config file (`kubechat_config`).
//! - [`http`]: the request shape, the shared client, sending and classifying failures.
//! - [`credentials`]: the APNs provider token (ES256 JWT) and the FCM OAuth access token.
//! - [`provider`]: the [`Provider`] trait, the webhook/FCM/APNs request shapes and senders.
//! - [`metrics`]: the Prometheus metrics ([`PushMetrics`]).
//! - [`admin`]: `/healthz` and `/metrics` of a running worker.
//! - [`worker`]: the consumer-group loop ([`run_push_worker`]).
//!
//! Redis keys:
//! Jobs are spread over [`PUSH_PARTITIONS`] streams by user (`kubechat:push:{tag}`, the tags
//! spread over the slots, so a Redis Cluster spreads them over its masters); each worker
//! consumes every partition, and the unpartitioned `kubechat:push` too while an earlier version
//! left jobs there (an upgrade sends them rather than leaving them behind). The keys about a
//! stream's entries start with its name and so carry its tag: one slot, so the atomic steps over
//! several of them work on a cluster.
//! - `kubechat:push-targets:{user}`: hash, device id → `{"platform":"webhook"|"fcm"|"apns","token":"…"}`
//!   (tagged with the user, as the broker's keys of the user).
//! - `kubechat:push:{tag}` ([`PushWorkerConfig::stream`] and a partition's tag): a job stream,
//!   consumer group `push-workers`.
//! - `kubechat:push:dead:{tag}` ([`PushWorkerConfig::dead_letter_stream`]): jobs given up on,
//!   one entry per (job, device) with the error and the attempt count.
//! - `{stream}-attempts:{entry id}`: hash per stream entry,
//!   fields `{device}` (attempts made), `{device}:error` (last error), `{device}:dead` (dead-lettered).
//!   Deleted when the entry is acked; expires after 7 days otherwise.
//! - `{stream}-pushed:{message id}:{device}`: set (NX, 7 days) after a successful send; checked
//!   before every send, so a redelivered or re-enqueued job notifies each device at most once
//!   (barring a crash between the provider's acceptance and this SET).

pub mod admin;
pub mod config;
pub mod credentials;
pub mod http;
pub mod job;
pub mod metrics;
pub mod names;
pub mod provider;
pub mod targets;
pub mod worker;

pub use config::{ApnsConfig, FcmConfig, ProvidersConfig, PushWorkerConfig, SecretSource, WebhookConfig};
pub use job::{JOB_FIELD, MessageRef, PUSH_PARTITIONS, PUSH_STREAM, PushJob, partition_of, partition_streams};
pub use metrics::PushMetrics;
pub use names::{MAX_TOKEN_LEN, Platform, PushTarget};
pub use provider::{ApnsProvider, FcmProvider, HttpRequest, Provider, ProviderError, Providers, WebhookProvider};
pub use targets::{
    MAX_TARGETS_PER_USER, PushTargetError, pushed_key, register_target, targets, targets_key, unregister_stale_target,
    unregister_target,
};
pub use worker::{run_push_worker, run_push_worker_with};
