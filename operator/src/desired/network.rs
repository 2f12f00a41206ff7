//! NetworkPolicies. For the managed backends: only this ChatCluster's
//! gateways and push workers reach its Redis and its ScyllaDB's CQL port,
//! and ScyllaDB nodes reach each other's internode port. Nothing is built
//! for an external backend: it is not in the cluster's namespace. For the
//! gateways: anyone reaches the WebSocket port, only the operator's pods the
//! admin port (drain, load).
//!
//! A policy selects pods by their labels, so every rule here names the
//! component labels of one ChatCluster (`app.kubernetes.io/instance`): the
//! gateways of another ChatCluster in the same namespace are refused too.
//!
//! The kubelet's probes need no rule: traffic from the node a pod runs on is
//! always allowed (Kubernetes' NetworkPolicy semantics). Policies take
//! effect only where the network plugin enforces them.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kubechat_crds::ChatCluster;

use super::{DesiredObject, Names, gateway, owned_meta, push, redis, scylla, selector_labels};

/// Internode (gossip and streaming) port of ScyllaDB.
pub const SCYLLA_INTERNODE_PORT: i32 = 7000;
/// The label every namespace carries with its own name (Kubernetes 1.21+).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The operator's own pods: its namespace and labels that select them (the
/// chart passes both). The only peers of a gateway's admin port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorPods {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

impl Default for OperatorPods {
    /// The chart's operator in `default` (what the operator assumes when
    /// started without `POD_NAMESPACE` and `KUBECHAT_OPERATOR_POD_LABELS`).
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            labels: BTreeMap::from([("app.kubernetes.io/name".to_string(), "kubechat-operator".to_string())]),
        }
    }
}

impl OperatorPods {
    /// Labels written `key=value,key=value` (the chart's environment
    /// variable); an error that says what is wrong.
    pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
        let mut labels = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("`{pair}` is not key=value"))?;
            labels.insert(key.to_string(), value.to_string());
        }
        if labels.is_empty() {
            return Err("no labels: the admin port would admit every pod of the namespace".into());
        }
        Ok(labels)
    }

    /// The policy peer: these labels in that namespace (one peer, so both must match).
    fn peer(&self) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), self.namespace.clone())])),
                ..Default::default()
            }),
            pod_selector: Some(LabelSelector { match_labels: Some(self.labels.clone()), ..Default::default() }),
            ..Default::default()
        }
    }
}

pub fn objects(cc: &ChatCluster, operator: &OperatorPods) -> Vec<DesiredObject> {
    let mut objects = vec![DesiredObject::NetworkPolicy(gateway_policy(cc, operator))];
    if cc.spec.redis.effective_managed().is_some() {
        objects.push(DesiredObject::NetworkPolicy(redis_policy(cc)));
    }
    if cc.spec.scylla.effective_managed().is_some() {
        objects.push(DesiredObject::NetworkPolicy(scylla_policy(cc)));
    }
    objects
}

fn pods_of(cc: &ChatCluster, component: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector { match_labels: Some(selector_labels(cc, component)), ..Default::default() }),
        ..Default::default()
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(IntOrString::Int(port)), protocol: Some("TCP".into()), ..Default::default() }
}

/// The clients of the backends: this cluster's gateways and push workers.
fn clients(cc: &ChatCluster) -> Vec<NetworkPolicyPeer> {
    vec![pods_of(cc, gateway::COMPONENT), pods_of(cc, push::COMPONENT)]
}

/// A policy on `component`'s pods admitting only `ingress`. With the
/// Ingress type listed, anything the rules do not name is refused.
fn policy(cc: &ChatCluster, name: String, component: &str, ingress: Vec<NetworkPolicyIngressRule>) -> NetworkPolicy {
    NetworkPolicy {
        metadata: owned_meta(cc, name, component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(cc, component)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    }
}

pub fn redis_policy(cc: &ChatCluster) -> NetworkPolicy {
    let rule = NetworkPolicyIngressRule { from: Some(clients(cc)), ports: Some(vec![tcp(redis::PORT)]) };
    policy(cc, Names(&cc.name_any()).redis(), redis::COMPONENT, vec![rule])
}

/// The gateways: the WebSocket port from anywhere (clients come from
/// outside the cluster too), the admin port from the operator only.
pub fn gateway_policy(cc: &ChatCluster, operator: &OperatorPods) -> NetworkPolicy {
    let ports = &cc.spec.gateway.ports;
    let clients = NetworkPolicyIngressRule { from: None, ports: Some(vec![tcp(ports.websocket)]) };
    let admin = NetworkPolicyIngressRule { from: Some(vec![operator.peer()]), ports: Some(vec![tcp(ports.admin)]) };
    policy(cc, Names(&cc.name_any()).gateway_policy(), gateway::COMPONENT, vec![clients, admin])
}

pub fn scylla_policy(cc: &ChatCluster) -> NetworkPolicy {
    let cql = NetworkPolicyIngressRule { from: Some(clients(cc)), ports: Some(vec![tcp(scylla::CQL_PORT)]) };
    let internode = NetworkPolicyIngressRule {
        from: Some(vec![pods_of(cc, scylla::COMPONENT)]),
        ports: Some(vec![tcp(SCYLLA_INTERNODE_PORT)]),
    };
    policy(cc, Names(&cc.name_any()).scylla(), scylla::COMPONENT, vec![cql, internode])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::fixtures::ChatClusterExt;
    use kubechat_crds::{ExternalRedis, ExternalScylla};
    use std::collections::BTreeMap;

    /// Components of the pods one ingress rule admits, and its ports.
    type Rule = (Vec<String>, Vec<i32>);

    /// (selected pods' component, its rules) of a policy.
    fn summary(policy: &NetworkPolicy) -> (String, Vec<Rule>) {
        let spec = policy.spec.clone().expect("spec");
        let component = |s: &Option<LabelSelector>| {
            let labels: BTreeMap<String, String> = s.clone().and_then(|s| s.match_labels).unwrap_or_default();
            assert_eq!(
                labels.get(crate::desired::LABEL_INSTANCE).map(String::as_str),
                Some("chat"),
                "one cluster's pods"
            );
            labels.get(crate::desired::LABEL_COMPONENT).cloned().unwrap_or_default()
        };
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]), "refuses what it does not admit");
        let rules = spec
            .ingress
            .unwrap_or_default()
            .iter()
            .map(|rule| {
                let peers = rule.from.iter().flatten().map(|p| {
                    assert!(p.namespace_selector.is_none() && p.ip_block.is_none(), "pods of this namespace only");
                    component(&p.pod_selector)
                });
                let ports = rule.ports.iter().flatten().map(|p| match p.port {
                    Some(IntOrString::Int(n)) => n,
                    _ => panic!("a numbered port"),
                });
                (peers.collect(), ports.collect())
            })
            .collect();
        (component(&spec.pod_selector), rules)
    }

    #[test]
    fn only_gateways_and_push_workers_reach_redis() {
        let (selected, rules) = summary(&redis_policy(&ChatCluster::test()));
        assert_eq!(selected, "redis");
        assert_eq!(rules, vec![(vec!["gateway".to_string(), "push-worker".to_string()], vec![6379])]);
    }

    #[test]
    fn only_gateways_and_push_workers_reach_cql_and_only_scylla_its_internode_port() {
        let (selected, rules) = summary(&scylla_policy(&ChatCluster::test()));
        assert_eq!(selected, "scylla");
        assert_eq!(
            rules,
            vec![
                (vec!["gateway".to_string(), "push-worker".to_string()], vec![9042]),
                (vec!["scylla".to_string()], vec![7000]),
            ]
        );
    }

    #[test]
    fn the_peers_are_the_labels_the_workloads_carry() {
        let cc = ChatCluster::test();
        let gateway_pods = gateway::stateful_set(&cc, &gateway::config_map(&cc), 2).spec.template.metadata;
        let push_pods = push::deployment(&cc).spec.template.metadata;
        let peers = clients(&cc);
        for (peer, pods) in peers.iter().zip([gateway_pods, push_pods]) {
            let wanted = peer.pod_selector.clone().and_then(|s| s.match_labels).unwrap_or_default();
            let labels = pods.and_then(|m| m.labels).unwrap_or_default();
            assert!(wanted.iter().all(|(k, v)| labels.get(k) == Some(v)), "{wanted:?} ⊄ {labels:?}");
        }
    }

    #[test]
    fn anyone_reaches_the_gateways_websocket_port_and_only_the_operator_their_admin_port() {
        let cc = ChatCluster::test();
        let operator = OperatorPods {
            namespace: "kubechat-system".into(),
            labels: OperatorPods::parse_labels(
                "app.kubernetes.io/name=kubechat-operator,app.kubernetes.io/instance=kc",
            )
            .expect("labels"),
        };
        let policy = gateway_policy(&cc, &operator);
        assert_eq!(policy.metadata.name.as_deref(), Some("chat-gateway"));
        let spec = policy.spec.expect("spec");
        assert_eq!(spec.pod_selector.and_then(|s| s.match_labels), Some(selector_labels(&cc, gateway::COMPONENT)));
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]), "refuses what it does not admit");
        let rules = spec.ingress.expect("rules");
        let port = |rule: &NetworkPolicyIngressRule| match rule.ports.as_deref() {
            Some([NetworkPolicyPort { port: Some(IntOrString::Int(n)), protocol: Some(p), .. }]) if p == "TCP" => *n,
            other => panic!("one TCP port: {other:?}"),
        };
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert_eq!(port(&rules[0]), 8080);
        assert_eq!(rules[0].from, None, "no peers listed: every source");
        assert_eq!(port(&rules[1]), 9090);
        let peers = rules[1].from.clone().expect("peers");
        // One peer holding both selectors: pods with these labels *in* that
        // namespace. (Two peers would admit either, e.g. every pod there.)
        assert_eq!(peers.len(), 1, "{peers:?}");
        let peer = &peers[0];
        assert!(peer.ip_block.is_none());
        let namespaces = peer.namespace_selector.clone().and_then(|s| s.match_labels).expect("namespace selector");
        assert_eq!(namespaces, BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), "kubechat-system".to_string())]));
        let pods = peer.pod_selector.clone().and_then(|s| s.match_labels).expect("pod selector");
        assert_eq!(pods, operator.labels);
        assert_eq!(pods.get("app.kubernetes.io/instance").map(String::as_str), Some("kc"));
    }

    #[test]
    fn the_gateway_policy_follows_the_ports_of_the_spec() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.gateway.ports.websocket = 18080;
            s.gateway.ports.admin = 19090;
        });
        let rules = gateway_policy(&cc, &OperatorPods::default()).spec.and_then(|s| s.ingress).expect("rules");
        let ports: Vec<_> = rules.iter().flat_map(|r| r.ports.iter().flatten().map(|p| p.port.clone())).collect();
        assert_eq!(ports, [Some(IntOrString::Int(18080)), Some(IntOrString::Int(19090))]);
    }

    #[test]
    fn operator_labels_are_parsed_or_refused_with_a_reason() {
        let parsed = OperatorPods::parse_labels(" a=1, b = 2 ,").expect("labels");
        assert_eq!(parsed, BTreeMap::from([("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]));
        assert!(OperatorPods::parse_labels("a").expect_err("no =").contains("`a`"));
        assert!(OperatorPods::parse_labels("=1").is_err());
        assert!(OperatorPods::parse_labels(" , ").expect_err("empty").contains("every pod"));
    }

    #[test]
    fn external_backends_get_no_policy() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.redis.managed = None;
            s.redis.external = Some(ExternalRedis {
                url: "redis://r.example:6379".into(),
                password_secret: None,
                cluster: false,
                seed_urls: Vec::new(),
            });
            s.scylla.managed = None;
            s.scylla.external = Some(ExternalScylla {
                contact_points: vec!["s.example:9042".into()],
                credentials_secret: None,
                local_datacenter: None,
            });
        });
        let names = |cc: &ChatCluster| -> Vec<String> {
            objects(cc, &OperatorPods::default()).iter().map(DesiredObject::name).collect()
        };
        assert_eq!(names(&cc), ["chat-gateway"], "the gateways' policy only");
        assert_eq!(names(&ChatCluster::test()), ["chat-gateway", "chat-redis", "chat-scylla"]);
    }
}
