//! The `ChatCluster` custom resource (`kubechat.dev/v1alpha1`).
//!
//! Layout:
//! - this file: the spec and status types. The CRD's OpenAPI schema, its
//!   defaults and its CEL validation rules are all generated from them.
//! - [`generate`]: renders the CRD YAML that is checked in under `crds/` and
//!   `charts/kubechat/crds/` (`cargo run -p kubechat-crds --bin crdgen`).
//!
//! Every field has a default where one makes sense, so `metadata.name` alone
//! is a valid ChatCluster. The defaults are written into the stored object by
//! the apiserver, so `kubectl get chatcluster -o yaml` shows the effective
//! configuration. One exception: a backend (`redis`, `scylla`) with neither
//! `managed` nor `external` runs managed with the defaults, and is stored as
//! written (a schema default cannot depend on a sibling field); read it
//! through `effective_managed`.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod generate;

/// The API group of every kubechat resource.
pub const API_GROUP: &str = "kubechat.dev";
/// The image that runs both the gateway and the push workers.
pub const DEFAULT_GATEWAY_IMAGE: &str = "ghcr.io/kubechat/kubechat:0.1.0";
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.4-alpine";
pub const DEFAULT_SCYLLA_IMAGE: &str = "scylladb/scylla:2025.1";

/// A chat platform: WebSocket gateways, their Redis and ScyllaDB, and the push workers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubechat.dev",
    version = "v1alpha1",
    kind = "ChatCluster",
    namespaced,
    status = "ChatClusterStatus",
    shortname = "chat",
    category = "kubechat",
    derive = "PartialEq",
    doc = "A chat platform: WebSocket gateways, their Redis and ScyllaDB, and the push workers.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Gateways", "type": "string", "jsonPath": ".status.gatewaysReady"}"#,
    printcolumn = r#"{"name": "Connections", "type": "integer", "jsonPath": ".status.connections"}"#,
    printcolumn = r#"{"name": "Rollout", "type": "string", "jsonPath": ".status.rollout.summary"}"#,
    printcolumn = r#"{"name": "Autoscale", "type": "string", "priority": 1, "jsonPath": ".status.autoscale.reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterSpec {
    /// The WebSocket gateways (a StatefulSet: the ordinal is each gateway's worker id).
    #[serde(default)]
    pub gateway: GatewaySpec,
    /// Redis: session routing, presence and the push queue.
    #[serde(default)]
    pub redis: RedisSpec,
    /// ScyllaDB (any CQL store): durable history, inboxes and membership.
    #[serde(default)]
    pub scylla: ScyllaSpec,
    /// Workers that deliver push notifications to offline devices.
    #[serde(default)]
    pub push_workers: PushWorkersSpec,
    /// Limits and timings of the chat protocol.
    #[serde(default)]
    pub chat: ChatLimits,
    /// Where the gateways find the key that signs client tokens.
    #[serde(default)]
    pub auth: AuthSpec,
    /// How the gateways, the managed Redis and ScyllaDB and the push
    /// workers spread over zones (a topology spread constraint each).
    #[serde(default)]
    pub topology_spread: TopologySpreadSpec,
}

// --------------------------------------------------------------- topology --

/// One topology spread constraint per component, over `zoneKey`: at most
/// `maxSkew` more of its pods in one zone than in another.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpreadSpec {
    /// The node label that names a node's zone.
    #[serde(default = "default_zone_key")]
    #[schemars(length(min = 1, max = 317))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{LABEL_KEY_PATTERN}')"))
        .message("topologySpread.zoneKey must be a label key: an optional DNS subdomain prefix and '/', then 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, e.g. topology.kubernetes.io/zone"))]
    pub zone_key: String,
    /// The largest difference in pods of one component between two zones.
    #[serde(default = "default_max_skew")]
    #[schemars(range(min = 1, max = 100))]
    pub max_skew: i32,
    /// `ScheduleAnyway` (default: a preference; a cluster with one zone, or
    /// a zone out of capacity, still runs every pod) or `DoNotSchedule` (a
    /// pod that would break the spread stays Pending).
    #[serde(default)]
    pub when_unsatisfiable: WhenUnsatisfiable,
}

impl Default for TopologySpreadSpec {
    fn default() -> Self {
        Self { zone_key: default_zone_key(), max_skew: default_max_skew(), when_unsatisfiable: Default::default() }
    }
}

/// A label key: `[prefix/]name` (the prefix a DNS subdomain, the name 1-63
/// characters). Lengths beyond the name's are left to the apiserver.
const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

fn default_zone_key() -> String {
    "topology.kubernetes.io/zone".into()
}
fn default_max_skew() -> i32 {
    1
}

/// What the scheduler does with a pod that would break the spread.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenUnsatisfiable {
    #[default]
    ScheduleAnyway,
    DoNotSchedule,
}

impl WhenUnsatisfiable {
    /// The value Kubernetes uses in `topologySpreadConstraints`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScheduleAnyway => "ScheduleAnyway",
            Self::DoNotSchedule => "DoNotSchedule",
        }
    }
}

// ---------------------------------------------------------------- gateway --

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
// Strictly less: at a target equal to the capacity, a full gateway refuses
// the very clients that would show the autoscaler more load.
#[x_kube(validation = Rule::new("!has(self.autoscale) || self.autoscale.targetConnectionsPerPod < self.maxConnectionsPerPod")
    .message("gateway.autoscale.targetConnectionsPerPod must be less than gateway.maxConnectionsPerPod (a full gateway refuses the clients that would show the autoscaler more load)"))]
pub struct GatewaySpec {
    /// Number of gateway pods when autoscaling is off (with it, only the
    /// first count, kept within its bounds). Lowering it removes the
    /// highest-ordinal gateways one at a time, each drained first.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// Container image (the same image runs the push workers).
    #[serde(default = "default_gateway_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Compute resources of each gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Connections one gateway accepts before refusing new ones; discovery
    /// recommends gateways by their load relative to this.
    #[serde(default = "default_max_connections_per_pod")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_connections_per_pod: i64,
    /// Container ports.
    #[serde(default)]
    pub ports: GatewayPorts,
    /// How a gateway sheds its connections before it is replaced.
    #[serde(default)]
    pub drain: DrainSpec,
    /// Scale the gateways by their connection count instead of `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
    /// How the operator publishes the gateways' load for service discovery.
    #[serde(default)]
    pub discovery: DiscoverySpec,
    /// How the operator replaces gateways when their pod template changes.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Serve the web client at `/` on the client port. It signs in with a
    /// token from your login service (a clustered gateway mints none).
    #[serde(default)]
    pub web_client: bool,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            replicas: default_gateway_replicas(),
            image: default_gateway_image(),
            resources: None,
            max_connections_per_pod: default_max_connections_per_pod(),
            ports: GatewayPorts::default(),
            drain: DrainSpec::default(),
            autoscale: None,
            discovery: DiscoverySpec::default(),
            rollout: RolloutSpec::default(),
            web_client: false,
        }
    }
}

fn default_gateway_replicas() -> i32 {
    2
}
fn default_gateway_image() -> String {
    DEFAULT_GATEWAY_IMAGE.into()
}
fn default_max_connections_per_pod() -> i64 {
    50_000
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.websocket != self.admin").message("gateway.ports.websocket and gateway.ports.admin must differ"))]
pub struct GatewayPorts {
    /// Port of the WebSocket endpoint (`/ws`).
    #[serde(default = "default_websocket_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub websocket: i32,
    /// Port of health, readiness, metrics, load and drain endpoints.
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin: i32,
}

impl Default for GatewayPorts {
    fn default() -> Self {
        Self { websocket: default_websocket_port(), admin: default_admin_port() }
    }
}

fn default_websocket_port() -> i32 {
    8080
}
fn default_admin_port() -> i32 {
    9090
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Seconds over which a draining gateway spreads its clients' reconnects.
    #[serde(default = "default_drain_window_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub window_seconds: i32,
    /// Upper bound on the reconnects per second one draining gateway causes.
    #[serde(default = "default_max_reconnects_per_second")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_reconnects_per_second: i32,
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            window_seconds: default_drain_window_seconds(),
            max_reconnects_per_second: default_max_reconnects_per_second(),
        }
    }
}

fn default_drain_window_seconds() -> i32 {
    60
}
fn default_max_reconnects_per_second() -> i32 {
    500
}

/// The endpoint ConfigMap `<name>-endpoints`: the operator reads every
/// gateway's load on this interval and rewrites the list only when it
/// changed in a way clients care about (see docs/operator.md).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiscoverySpec {
    /// Seconds between two reads of every gateway's load, and the shortest
    /// time between two writes of the endpoint ConfigMap.
    #[serde(default = "default_discovery_interval_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: i32,
}

impl Default for DiscoverySpec {
    fn default() -> Self {
        Self { interval_seconds: default_discovery_interval_seconds() }
    }
}

fn default_discovery_interval_seconds() -> i32 {
    5
}

/// The operator replaces gateways one at a time, highest ordinal first, each
/// drained (`drain`) before it is deleted. The annotation
/// `kubechat.dev/paused: "true"` on the ChatCluster stops it before the next pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Seconds a replacement gateway has to become ready, serving and listed
    /// for discovery; after that the rollout stops (`Degraded`) instead of
    /// draining the next gateway.
    #[serde(default = "default_pod_ready_timeout_seconds")]
    #[schemars(range(min = 10, max = 86_400))]
    pub pod_ready_timeout_seconds: i32,
    /// Gateways added at the new revision before the first old one is
    /// drained, and removed (drained) once every old one is replaced: the
    /// cluster never serves with fewer gateways than before the rollout.
    /// 0: drain first, one gateway fewer while each is replaced.
    #[serde(default = "default_max_surge")]
    #[schemars(range(min = 0, max = 10))]
    pub max_surge: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self { pod_ready_timeout_seconds: default_pod_ready_timeout_seconds(), max_surge: default_max_surge() }
    }
}

fn default_max_surge() -> i32 {
    1
}

fn default_pod_ready_timeout_seconds() -> i32 {
    300
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("gateway.autoscale.minReplicas must be less than or equal to maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.buffer) || (type(self.buffer) == int ? self.buffer >= 0 : self.buffer.matches('^[0-9]{1,4}%$'))")
    .message("gateway.autoscale.buffer must be a count of connections (0 or more) or a percent such as \"20%\""))]
pub struct AutoscaleSpec {
    /// Fewest gateways, whatever the load.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most gateways, whatever the load.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average connections per gateway the autoscaler aims for: it runs
    /// ceil(connections / target) gateways, within min..max.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub target_connections_per_pod: i64,
    /// Seconds the connections must keep needing fewer gateways before any
    /// is removed. Gateways are added at once; removed one at a time, the
    /// highest ordinal first, each drained before it goes.
    #[serde(default = "default_scale_down_cooldown_seconds")]
    #[schemars(range(min = 0, max = 86_400))]
    pub scale_down_cooldown_seconds: i32,
    /// Spare connection capacity kept ready on top of the connections: a
    /// count (`5000`) or a percent of the connections (`"20%"`). The
    /// autoscaler runs ceil((connections + buffer) / target) gateways, so
    /// a burst of new clients lands on gateways already running instead of
    /// waiting for one to start. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
}

fn default_scale_down_cooldown_seconds() -> i32 {
    300
}

// ------------------------------------------------------------ backends --

/// A positive Kubernetes quantity without sign, milli suffix or negative
/// exponent: fractions of a byte are a typo (`10m` for `10M`), never a size.
/// Raw CEL string (`r'…'`): no escaping inside.
const POSITIVE_SIZE_PATTERN: &str =
    r"^([0-9]*[1-9][0-9]*([.][0-9]*)?|[0-9]*[.][0-9]*[1-9][0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][+]?[0-9]+)?$";

/// A DNS-1123 subdomain, as Kubernetes requires of object names such as StorageClasses.
const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Persistent storage of a managed component.
///
/// `size` and `storageClassName` are fixed once set: they end up in a StatefulSet's
/// `volumeClaimTemplates`, which Kubernetes does not let anyone change, so an
/// edit could never be applied.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)")
    .message("storageClassName cannot be changed in place (a StatefulSet's volumeClaimTemplates are immutable): keep the old value, or create a new ChatCluster and move the data")
    .field_path(".storageClassName")
    .reason(Reason::FieldValueForbidden))]
pub struct StorageSpec {
    /// Size of each pod's volume, e.g. `10Gi`: a positive quantity. It cannot
    /// be changed once set; to grow a volume, expand its PersistentVolumeClaim
    /// (`data-<pod>`) directly, if its StorageClass allows volume expansion.
    #[x_kube(
        validation = Rule::new(format!("type(self) == int ? self > 0 : self.matches(r'{POSITIVE_SIZE_PATTERN}')"))
            .message("must be a positive size such as 10Gi, 1024Mi, 1.5Gi or 500M (a Kubernetes quantity with no sign, no milli suffix and not zero)"),
        // A size that was never valid never reached a StatefulSet, so it may still be fixed.
        validation = Rule::new(format!("self == oldSelf || !(type(oldSelf) == int ? oldSelf > 0 : oldSelf.matches(r'{POSITIVE_SIZE_PATTERN}'))"))
            .message("storage size cannot be changed in place (a StatefulSet's volumeClaimTemplates are immutable): keep the old size and grow each PersistentVolumeClaim data-<pod> yourself if its StorageClass allows volume expansion, or create a new ChatCluster with the new size and move the data")
            .reason(Reason::FieldValueForbidden),
    )]
    pub size: Quantity,
    /// StorageClass of the volumes; the cluster default when unset. Cannot be
    /// changed once the component exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{DNS_SUBDOMAIN_PATTERN}')"))
        .message("must be a StorageClass name: a DNS-1123 subdomain of lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, e.g. fast-ssd"))]
    pub storage_class_name: Option<String>,
    /// What becomes of the PersistentVolumeClaims (the data) when the
    /// component's StatefulSet is deleted (with the ChatCluster, or when the
    /// component is switched to external) or scaled down: the StatefulSet's
    /// `persistentVolumeClaimRetentionPolicy`. `Retain` by default, so no data
    /// is lost unless asked for; retained claims stay until deleted by hand
    /// (`kubectl delete pvc -l app.kubernetes.io/instance=<name>`).
    #[serde(default)]
    pub pvc_retention: PvcRetention,
}

/// Whether a managed component's PersistentVolumeClaims outlive its pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PvcRetention {
    /// When the StatefulSet is deleted: `Delete` deletes every claim with it.
    #[serde(default)]
    pub when_deleted: RetentionPolicy,
    /// When the StatefulSet is scaled down: `Delete` deletes the claims of
    /// the removed pods.
    #[serde(default)]
    pub when_scaled: RetentionPolicy,
}

/// `Retain` keeps the claims (and their volumes); `Delete` deletes them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetentionPolicy {
    #[default]
    Retain,
    Delete,
}

impl RetentionPolicy {
    /// The value Kubernetes uses in `persistentVolumeClaimRetentionPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}

/// A key of a Secret in the ChatCluster's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.managed) && has(self.external))")
    .message("redis: set at most one of managed or external (neither means a managed Redis with default settings)"))]
pub struct RedisSpec {
    /// A single Redis pod with persistent storage, run by the operator. Also
    /// what runs, with its defaults, when neither this nor `external` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedRedis>,
    /// A Redis the operator does not run (for high availability, use a
    /// managed service or Sentinel-fronted Redis here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedis>,
}

impl Default for RedisSpec {
    fn default() -> Self {
        Self { managed: Some(ManagedRedis::default()), external: None }
    }
}

impl RedisSpec {
    /// The Redis the operator runs, if any: `managed` as written, or its
    /// defaults when neither `managed` nor `external` is set. A schema default
    /// cannot express "managed unless external", so the stored object keeps
    /// what the user wrote and every reader goes through here.
    pub fn effective_managed(&self) -> Option<Cow<'_, ManagedRedis>> {
        match (&self.managed, &self.external) {
            (Some(managed), _) => Some(Cow::Borrowed(managed)),
            (None, None) => Some(Cow::Owned(ManagedRedis::default())),
            (None, Some(_)) => None,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedis {
    #[serde(default = "default_redis_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default = "default_redis_storage")]
    pub storage: StorageSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for ManagedRedis {
    fn default() -> Self {
        Self { image: default_redis_image(), storage: default_redis_storage(), resources: None }
    }
}

fn default_redis_image() -> String {
    DEFAULT_REDIS_IMAGE.into()
}
fn default_redis_storage() -> StorageSpec {
    StorageSpec { size: Quantity("1Gi".into()), storage_class_name: None, pvc_retention: PvcRetention::default() }
}

/// A TCP port, 1 to 65535, as a regular expression (a macro: `concat!`
/// takes literals only).
macro_rules! port_pattern {
    () => {
        r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
    };
}

/// `redis[s]://[user][:password@]host[:port][/db][?query][#fragment]`, the
/// host a DNS name, an IPv4 address or an `[IPv6]` address, the port 1 to
/// 65535. Raw CEL string.
const REDIS_URL_PATTERN: &str = concat!(
    r"^rediss?://([^@/?#\s]*@)?",
    r"([A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?([.][A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*[.]?|\[[0-9A-Fa-f:.]+\])",
    r"(:",
    port_pattern!(),
    r")?(/[0-9]*)?([?][^#\s]*)?(#\S*)?$",
);

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.seedUrls) || size(self.seedUrls) == 0 || (has(self.cluster) && self.cluster)")
    .message("redis.external.seedUrls name more nodes of a Redis Cluster: set redis.external.cluster: true, or remove them")
    .field_path(".seedUrls"))]
pub struct ExternalRedis {
    /// `redis://host:port[/db]`, or `rediss://…` for TLS. Prefer
    /// `passwordSecret` to a password in the URL.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('redis://') || self.startsWith('rediss://')")
        .message("redis.external.url must start with redis:// or rediss://"),
        validation = Rule::new(format!("!(self.startsWith('redis://') || self.startsWith('rediss://')) || self.matches(r'{REDIS_URL_PATTERN}')"))
        .message("redis.external.url must be redis[s]://[user:password@]host[:port][/db], the host a DNS name, an IPv4 address or an [IPv6] address, the port 1 to 65535, e.g. redis://redis.prod.svc:6379/0"))]
    pub url: String,
    /// Secret key holding the Redis password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// `url` is a node of a Redis Cluster (Redis 7 or later: delivery uses
    /// sharded pub/sub); the gateways learn the other nodes from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// More nodes of the Redis Cluster (same form as `url`), tried when
    /// `url` does not answer. Only with `cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(u, u.startsWith('redis://') || u.startsWith('rediss://'))")
        .message("redis.external.seedUrls must each start with redis:// or rediss://, e.g. redis://redis-1.prod.svc:6379"))]
    pub seed_urls: Vec<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.managed) && has(self.external))")
    .message("scylla: set at most one of managed or external (neither means a managed ScyllaDB with default settings)"))]
#[x_kube(validation = Rule::new("!has(self.replicationFactor) || has(self.external) || self.replicationFactor <= (has(self.managed) ? self.managed.nodes : 1)")
    .message("scylla.replicationFactor must not exceed scylla.managed.nodes (1 unless set): each replica needs a node of its own")
    .field_path(".replicationFactor"))]
pub struct ScyllaSpec {
    /// ScyllaDB nodes run by the operator. Also what runs, with its
    /// defaults, when neither this nor `external` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedScylla>,
    /// A ScyllaDB (or Cassandra) cluster the operator does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalScylla>,
    /// Keyspace of the chat tables.
    #[serde(default = "default_keyspace")]
    #[schemars(length(min = 1, max = 48), regex(pattern = r"^[a-z][a-z0-9_]*$"))]
    pub keyspace: String,
    /// Replication factor of the keyspace; `min(nodes, 3)` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 15))]
    pub replication_factor: Option<i32>,
}

impl Default for ScyllaSpec {
    fn default() -> Self {
        Self {
            managed: Some(ManagedScylla::default()),
            external: None,
            keyspace: default_keyspace(),
            replication_factor: None,
        }
    }
}

impl ScyllaSpec {
    /// The ScyllaDB the operator runs, if any: `managed` as written, or its
    /// defaults when neither `managed` nor `external` is set (see
    /// [`RedisSpec::effective_managed`]).
    pub fn effective_managed(&self) -> Option<Cow<'_, ManagedScylla>> {
        match (&self.managed, &self.external) {
            (Some(managed), _) => Some(Cow::Borrowed(managed)),
            (None, None) => Some(Cow::Owned(ManagedScylla::default())),
            (None, Some(_)) => None,
        }
    }
}

fn default_keyspace() -> String {
    "kubechat".into()
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedScylla {
    /// Number of ScyllaDB nodes. Defaults suit a laptop; use 3 for production.
    #[serde(default = "default_scylla_nodes")]
    #[schemars(range(min = 1, max = 100))]
    pub nodes: i32,
    #[serde(default = "default_scylla_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default = "default_scylla_storage")]
    pub storage: StorageSpec,
    /// Resources of each node; `--smp` and `--memory` are derived from the limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Skip ScyllaDB's production checks (needed on kind and laptops).
    #[serde(default = "default_true")]
    pub developer_mode: bool,
}

impl Default for ManagedScylla {
    fn default() -> Self {
        Self {
            nodes: default_scylla_nodes(),
            image: default_scylla_image(),
            storage: default_scylla_storage(),
            resources: None,
            developer_mode: true,
        }
    }
}

fn default_scylla_nodes() -> i32 {
    1
}
fn default_scylla_image() -> String {
    DEFAULT_SCYLLA_IMAGE.into()
}
fn default_scylla_storage() -> StorageSpec {
    StorageSpec { size: Quantity("10Gi".into()), storage_class_name: None, pvc_retention: PvcRetention::default() }
}
fn default_true() -> bool {
    true
}

/// `host` or `host:port`, the host a DNS name, an IPv4 address, an IPv6
/// address, or `[IPv6]:port`. Raw CEL string.
const CONTACT_POINT_PATTERN: &str = concat!(
    r"^([A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?([.][A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?)*[.]?(:",
    port_pattern!(),
    r")?",
    r"|\[[0-9A-Fa-f:.]+\](:",
    port_pattern!(),
    r")?",
    r"|[0-9A-Fa-f]*:[0-9A-Fa-f]*:[0-9A-Fa-f:.]*)$",
);

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalScylla {
    /// `host:port` (or `host`, port 9042) of one or more nodes.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 261)))]
    #[x_kube(validation = Rule::new(format!("self.all(p, p.matches(r'{CONTACT_POINT_PATTERN}'))"))
        // Names the first bad entry: the apiserver does not say which item failed a list rule.
        .message(Message::Expression(format!("'contact point \"' + self.filter(p, !p.matches(r'{CONTACT_POINT_PATTERN}'))[0] + '\" is wrong: each of scylla.external.contactPoints must be host or host:port, the host a DNS name, an IPv4 address or an IPv6 address ([brackets] with a port), the port 1 to 65535, e.g. scylla-0.db.svc:9042'"))))]
    pub contact_points: Vec<String>,
    /// Secret with `username` and `password` keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Datacenter to prefer for load balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_datacenter: Option<String>,
}

// ---------------------------------------------------------- push workers --

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PushWorkersSpec {
    #[serde(default = "default_push_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Attempts per notification before it goes to the dead-letter stream.
    #[serde(default = "default_push_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,
    /// Where notifications go; a device registers for one of these.
    #[serde(default)]
    pub providers: PushProviders,
}

impl Default for PushWorkersSpec {
    fn default() -> Self {
        Self {
            replicas: default_push_replicas(),
            resources: None,
            max_attempts: default_push_max_attempts(),
            providers: PushProviders::default(),
        }
    }
}

fn default_push_replicas() -> i32 {
    1
}
fn default_push_max_attempts() -> i32 {
    8
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PushProviders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm: Option<FcmProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns: Option<ApnsProvider>,
}

/// HTTPS POST of a JSON notification, signed with HMAC-SHA256.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookProvider {
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("pushWorkers.providers.webhook.url must be an http(s) URL"))]
    pub url: String,
    /// Secret key holding the HMAC signing key.
    pub signing_key_secret: SecretKeyRef,
    /// Include the message text in the notification (off: a summary only).
    #[serde(default)]
    pub include_text: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FcmProvider {
    #[schemars(length(min = 1))]
    pub project_id: String,
    /// Secret key holding the service-account JSON.
    pub credentials_secret: SecretKeyRef,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApnsProvider {
    #[schemars(length(min = 1))]
    pub team_id: String,
    #[schemars(length(min = 1))]
    pub key_id: String,
    /// The app's bundle id (`apns-topic`).
    #[schemars(length(min = 1))]
    pub topic: String,
    /// Secret key holding the `.p8` signing key.
    pub signing_key_secret: SecretKeyRef,
    /// Send to the sandbox environment.
    #[serde(default)]
    pub sandbox: bool,
}

// ------------------------------------------------------------------ chat --

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.heartbeatSeconds < self.offlineAfterSeconds")
    .message("chat.heartbeatSeconds must be less than chat.offlineAfterSeconds"))]
pub struct ChatLimits {
    /// Largest group, sender included.
    #[serde(default = "default_max_group_members")]
    #[schemars(range(min = 2, max = 500))]
    pub max_group_members: i32,
    /// Longest message, in Unicode characters.
    #[serde(default = "default_max_message_chars")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_message_chars: i32,
    /// How often clients send a heartbeat.
    #[serde(default = "default_heartbeat_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub heartbeat_seconds: i32,
    /// A user is offline when no device sent a heartbeat for this long.
    #[serde(default = "default_offline_after_seconds")]
    #[schemars(range(min = 2, max = 3600))]
    pub offline_after_seconds: i32,
    /// Groups up to this size push presence changes to their members;
    /// members of larger groups ask when they open the group.
    #[serde(default = "default_presence_fanout_max_members")]
    #[schemars(range(min = 0, max = 500))]
    pub presence_fanout_max_members: i32,
}

impl Default for ChatLimits {
    fn default() -> Self {
        Self {
            max_group_members: default_max_group_members(),
            max_message_chars: default_max_message_chars(),
            heartbeat_seconds: default_heartbeat_seconds(),
            offline_after_seconds: default_offline_after_seconds(),
            presence_fanout_max_members: default_presence_fanout_max_members(),
        }
    }
}

fn default_max_group_members() -> i32 {
    100
}
fn default_max_message_chars() -> i32 {
    100_000
}
fn default_heartbeat_seconds() -> i32 {
    5
}
fn default_offline_after_seconds() -> i32 {
    30
}
fn default_presence_fanout_max_members() -> i32 {
    50
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret key holding the HS256 key that signs client tokens. When unset
    /// the operator generates a Secret `<name>-auth` with key `signing-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_secret: Option<SecretKeyRef>,
}

// ---------------------------------------------------------------- status --

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub gateway: ComponentStatus,
    #[serde(default)]
    pub redis: ComponentStatus,
    #[serde(default)]
    pub scylla: ComponentStatus,
    #[serde(default)]
    pub push_workers: ComponentStatus,
    /// `ready/desired` gateways, for `kubectl get`.
    #[serde(default)]
    pub gateways_ready: String,
    /// Open WebSocket connections over all gateways, as the endpoint
    /// ConfigMap last published them.
    #[serde(default)]
    pub connections: i64,
    /// Each gateway pod as the endpoint ConfigMap last published it, sorted
    /// by pod name. Always serialized (a merge patch must be able to empty it).
    #[serde(default)]
    pub gateway_pods: Vec<GatewayPodStatus>,
    /// Gateways per zone (the `spec.topologySpread.zoneKey` label of each
    /// gateway pod's node), sorted by zone; empty when no node names a
    /// zone. Always serialized (a merge patch must be able to empty it).
    #[serde(default)]
    pub zones: Vec<ZoneStatus>,
    /// The shards of an external Redis Cluster as the gateways report them
    /// (empty for a single Redis). Always serialized (a merge patch must be
    /// able to empty it).
    #[serde(default)]
    pub redis_shards: Vec<RedisShardStatus>,
    /// ConfigMap that lists the gateways for service discovery.
    #[serde(default)]
    pub endpoint_config_map: String,
    /// The gateway rollout in progress; null when none is. Always serialized
    /// (a merge patch must be able to clear it).
    #[serde(default)]
    pub rollout: Option<RolloutStatus>,
    /// What the autoscaler wants and why; null without `gateway.autoscale`.
    /// Always serialized (a merge patch must be able to clear it).
    #[serde(default)]
    pub autoscale: Option<AutoscaleStatus>,
}

/// The gateways of one zone.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ZoneStatus {
    pub zone: String,
    /// Gateway pods whose node is in this zone.
    pub gateways: i32,
    /// Of those, listed ready.
    pub ready: i32,
    pub connections: i64,
}

/// The autoscaler's view: gateways running, gateways the connections call
/// for, and why the two differ.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscaleStatus {
    /// Gateways the StatefulSet runs now.
    pub current_replicas: i32,
    /// Gateways the connections call for, within min..max.
    pub desired_replicas: i32,
    /// The connections this was decided on (the endpoint list's total).
    pub connections: i64,
    /// `Stable`, `ScaledUp`, `CoolingDown`, `ScalingDown`, `AtMaximum` or `NoLoadReport`.
    pub reason: String,
    /// One sentence for people.
    pub message: String,
    /// Since when the connections have called for fewer gateways than run
    /// (RFC 3339); the cool-down counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below_since: Option<String>,
    /// When the gateway count last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
}

/// Where a gateway rollout stands (the operator resumes from here and from
/// the pods' annotations after a restart or a leader change).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The StatefulSet revision the gateways are moving to.
    pub revision: String,
    /// The pod the current phase is about.
    #[serde(default)]
    pub pod: String,
    /// `Surging` (adding the surge gateways), `Draining`, `Replacing`
    /// (waiting for the new pod), `WaitingForRoom` (until the others can
    /// take the next one's clients), `Stuck`, `Paused` or `Waiting`.
    pub phase: String,
    /// When the rollout started (RFC 3339).
    pub started: String,
    /// Connections the draining gateway still holds, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_left: Option<i64>,
    /// Gateways at the new revision and serving.
    pub updated: i32,
    pub total: i32,
    /// One line for `kubectl get`, e.g. `Draining chat-gateway-1 (1/3)`.
    pub summary: String,
}

/// One gateway's load in the status (the endpoint ConfigMap has the full entry).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPodStatus {
    pub pod: String,
    pub connections: i64,
    /// Accepting new clients (its readiness, and the operator could read its load).
    pub ready: bool,
    pub draining: bool,
    /// Why Kubernetes is taking the pod away (its `DisruptionTarget`
    /// reason, e.g. `EvictionByEvictionAPI` for `kubectl drain`); its
    /// gateway drains meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<String>,
    /// The zone of its node (absent when the node names none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// One master of the Redis Cluster and who listens on it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RedisShardStatus {
    /// `host:port` as the cluster announces it.
    pub master: String,
    /// Slots it serves (16,384 over all shards).
    pub slots: i32,
    pub replicas: Vec<String>,
    /// Gateways holding their subscriptions on it: fewer than the serving
    /// gateways while one resubscribes (a failover, a slot move).
    pub gateways_subscribed: i32,
}

/// Desired and ready pods of one component (both 0 for an external one).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    pub desired: i32,
    pub ready: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn matches(pattern: &str, value: &str) -> bool {
        regex::Regex::new(pattern).expect("pattern compiles").is_match(value)
    }

    // The apiserver's CEL uses RE2; these patterns use only syntax RE2 and the
    // `regex` crate read alike. The e2e admission suite checks the apiserver itself.
    #[test]
    fn zone_keys_must_be_label_keys() {
        for good in ["topology.kubernetes.io/zone", "zone", "example.com/rack_1", "a", "Zone.Name"] {
            assert!(matches(LABEL_KEY_PATTERN, good), "{good} refused");
        }
        for bad in ["", "/zone", "example.com/", "zone/", "-zone", "zone-", "a b", "Example.com/zone", "a/b/c"] {
            assert!(!matches(LABEL_KEY_PATTERN, bad), "{bad} accepted");
        }
    }

    #[test]
    fn sizes_must_be_positive_quantities() {
        for good in ["1Gi", "10Gi", "1024Mi", "1.5Gi", "0.5Gi", ".5Gi", "500M", "1e9", "2E3", "1", "01Gi", "1.Gi"] {
            assert!(matches(POSITIVE_SIZE_PATTERN, good), "{good} refused");
        }
        for bad in ["lots", "-10Gi", "+1Gi", "0", "0Gi", "0.0Gi", ".", "Gi", "10m", "1e-3", "10 Gi", "10GB", "", "1Gi "]
        {
            assert!(!matches(POSITIVE_SIZE_PATTERN, bad), "{bad} accepted");
        }
    }

    #[test]
    fn storage_classes_must_be_dns_subdomains() {
        for good in ["standard", "fast-ssd", "ebs.csi.aws.com", "a", "gp3"] {
            assert!(matches(DNS_SUBDOMAIN_PATTERN, good), "{good} refused");
        }
        for bad in ["Not_A_Valid/Name", "Fast", "-ssd", "ssd-", "a..b", "a b", ""] {
            assert!(!matches(DNS_SUBDOMAIN_PATTERN, bad), "{bad} accepted");
        }
    }

    #[test]
    fn redis_urls_need_a_host() {
        for good in [
            "redis://redis:6379",
            "rediss://host",
            "redis://:pw@redis.ns.svc:6379/0",
            "redis://user:pw@10.0.0.7:6379/2",
            "redis://[fd00::7]:6379",
            "redis://redis.example/",
            "redis://redis.example:6379/0?protocol=resp3",
            "rediss://redis.example#insecure",
        ] {
            assert!(matches(REDIS_URL_PATTERN, good), "{good} refused");
        }
        for bad in [
            "redis://",
            "rediss://",
            "redis://:6379",
            "redis://:pw@",
            "redis://host:port",
            "redis://host/db",
            "redis://two hosts",
            "redis://host:6379/0 ",
            "http://redis:6379",
            "redis://redis:99999",
            "redis://redis:65536/0",
            "redis://redis:0",
        ] {
            assert!(!matches(REDIS_URL_PATTERN, bad), "{bad} accepted");
        }
    }

    #[test]
    fn contact_points_are_host_or_host_port() {
        for good in ["scylla", "scylla.db.svc:9042", "10.0.0.7", "10.0.0.7:9042", "::1", "fd00::7", "[fd00::7]:9042"] {
            assert!(matches(CONTACT_POINT_PATTERN, good), "{good} refused");
        }
        for good in ["scylla:1", "scylla:65535", "[fd00::7]:65535"] {
            assert!(matches(CONTACT_POINT_PATTERN, good), "{good} refused");
        }
        for bad in [
            "not a host port!!",
            "host:",
            "host:port",
            ":9042",
            "[fd00::7",
            "fd00::7]:9042",
            "a/b",
            "",
            "scylla:99999",
            "scylla:65536",
            "scylla:0",
            "scylla:09042",
            "[fd00::7]:70000",
        ] {
            assert!(!matches(CONTACT_POINT_PATTERN, bad), "{bad} accepted");
        }
    }

    /// `effective_managed` stands in for an explicit `managed: {}`, which the
    /// apiserver fills from the schema's defaults: the two must agree.
    #[test]
    fn an_implicit_managed_backend_has_the_schema_defaults() {
        let from_empty: ManagedScylla = serde_json::from_str("{}").expect("managed scylla");
        assert_eq!(from_empty, ManagedScylla::default());
        let from_empty: ManagedRedis = serde_json::from_str("{}").expect("managed redis");
        assert_eq!(from_empty, ManagedRedis::default());

        let scylla: ScyllaSpec = serde_json::from_str(r#"{"keyspace": "chat"}"#).expect("scylla");
        assert_eq!(scylla.effective_managed().as_deref(), Some(&ManagedScylla::default()));
        let redis: RedisSpec = serde_json::from_str("{}").expect("redis");
        assert_eq!(redis.effective_managed().as_deref(), Some(&ManagedRedis::default()));

        let external = ScyllaSpec {
            managed: None,
            external: Some(ExternalScylla {
                contact_points: vec!["scylla:9042".into()],
                credentials_secret: None,
                local_datacenter: None,
            }),
            ..ScyllaSpec::default()
        };
        assert_eq!(external.effective_managed(), None);
    }

    /// The rules the apiserver needs to refuse a volume change are in the CRD.
    #[test]
    fn the_schema_forbids_changing_volumes() {
        let crd = serde_json::to_value(ChatCluster::crd()).expect("crd");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        for storage in [
            &spec["redis"]["properties"]["managed"]["properties"]["storage"],
            &spec["scylla"]["properties"]["managed"]["properties"]["storage"],
        ] {
            let size_rules = storage["properties"]["size"]["x-kubernetes-validations"].as_array().expect("size rules");
            assert!(size_rules.iter().any(|r| r["rule"].as_str().is_some_and(|r| r.starts_with("self == oldSelf"))));
            let rules = storage["x-kubernetes-validations"].as_array().expect("storage rules");
            assert!(rules.iter().any(|r| r["fieldPath"] == ".storageClassName"));
        }
    }
}
