//! NetworkPolicies for the managed backends: only this ChatCluster's
//! gateways and push workers reach its Redis and its ScyllaDB's CQL port,
//! and ScyllaDB nodes reach each other's internode port. Nothing is built
//! for an external backend: it is not in the cluster's namespace.
//!
//! A policy selects pods by their labels, so every rule here names the
//! component labels of one ChatCluster (`app.kubernetes.io/instance`): the
//! gateways of another ChatCluster in the same namespace are refused too.

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

pub fn objects(cc: &ChatCluster) -> Vec<DesiredObject> {
    let mut objects = Vec::new();
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
    fn external_backends_get_no_policy() {
        let cc = ChatCluster::test().with_spec(|s| {
            s.redis.managed = None;
            s.redis.external = Some(ExternalRedis { url: "redis://r.example:6379".into(), password_secret: None });
            s.scylla.managed = None;
            s.scylla.external = Some(ExternalScylla {
                contact_points: vec!["s.example:9042".into()],
                credentials_secret: None,
                local_datacenter: None,
            });
        });
        assert!(objects(&cc).is_empty());
        assert_eq!(objects(&ChatCluster::test()).len(), 2);
    }
}
