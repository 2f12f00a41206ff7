//! Why pods that should exist are not running, when the cause is definite:
//! the controller cannot create them (PodSecurity, quota: `FailedCreate`),
//! the scheduler cannot place them, a volume claim cannot be bound, or a
//! container cannot start. Without this a refused pod looks like a rollout
//! that never ends.
//!
//! Only workloads short of ready pods are looked into, so a settled cluster
//! costs no request here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::calls::{Verb, counted};
use crate::{Error, Result};

/// Pod problems listed by name before the rest are only counted.
const MAX_PODS_NAMED: usize = 3;
/// Older warnings are history, not the cause of today's shortfall.
const FRESH_FOR: SignedDuration = SignedDuration::from_mins(60);
/// Container waiting reasons that do not clear up on their own.
const STUCK_WAITING: [&str; 6] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
];

pub async fn stateful_set(client: &Client, sts: &StatefulSet) -> Result<Vec<String>> {
    let desired = sts.spec.replicas.unwrap_or(1);
    let status = sts.status.clone().unwrap_or_default();
    if status.ready_replicas.unwrap_or(0) >= desired {
        return Ok(Vec::new());
    }
    let namespace = sts.namespace().unwrap_or_default();
    let name = sts.name_any();
    let selector = sts.spec.selector.match_labels.clone().unwrap_or_default();
    let pods = list_pods(client, &namespace, &selector).await?;
    let mut problems = pod_problems(&pods);
    if (pods.len() as i32) < desired {
        let fields = format!("involvedObject.kind=StatefulSet,involvedObject.name={name},type=Warning");
        let events = events(client, &namespace, &fields).await?;
        problems.extend(
            latest(&events, "FailedCreate", now())
                .map(|message| format!("StatefulSet {name} cannot create pods: {message}")),
        );
    }
    if pods.iter().any(waits_for_a_volume) {
        let claims: Vec<String> =
            sts.spec.volume_claim_templates.iter().flatten().map(|t| format!("{}-{name}-", t.name_any())).collect();
        // The volume binder reports an unbindable claim as a Normal event.
        let events = events(client, &namespace, "involvedObject.kind=PersistentVolumeClaim").await?;
        problems.extend(claim_problems(&events, &claims, now()));
    }
    Ok(problems)
}

pub async fn deployment(client: &Client, deployment: &Deployment) -> Result<Vec<String>> {
    let desired = deployment.spec.replicas.unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    if status.ready_replicas.unwrap_or(0) >= desired {
        return Ok(Vec::new());
    }
    let name = deployment.name_any();
    // The Deployment controller already reports refused pods as a condition.
    let mut problems: Vec<String> = status
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True"))
        .map(|c| format!("Deployment {name} cannot create pods: {}", c.message.clone().unwrap_or_default()))
        .collect();
    let selector = deployment.spec.selector.match_labels.clone().unwrap_or_default();
    let pods = list_pods(client, &deployment.namespace().unwrap_or_default(), &selector).await?;
    problems.extend(pod_problems(&pods));
    Ok(problems)
}

async fn list_pods(client: &Client, namespace: &str, labels: &BTreeMap<String, String>) -> Result<Vec<Pod>> {
    let selector = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = counted(Verb::List, api.list(&ListParams::default().labels(&selector)))
        .await
        .map_err(Error::kube(format!("listing pods {selector} in {namespace}")))?;
    Ok(pods.items)
}

async fn events(client: &Client, namespace: &str, fields: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let events = counted(Verb::List, api.list(&ListParams::default().fields(fields)))
        .await
        .map_err(Error::kube(format!("listing events {fields} in {namespace}")))?;
    Ok(events.items)
}

fn now() -> Timestamp {
    Timestamp::now()
}

/// What keeps each pod from running, at most [`MAX_PODS_NAMED`] named.
pub fn pod_problems(pods: &[Pod]) -> Vec<String> {
    let mut problems: Vec<String> = pods.iter().filter_map(pod_problem).collect();
    if problems.len() > MAX_PODS_NAMED {
        let more = problems.len() - MAX_PODS_NAMED;
        problems.truncate(MAX_PODS_NAMED);
        problems.push(format!("{more} more pod(s) with problems"));
    }
    problems
}

fn pod_problem(pod: &Pod) -> Option<String> {
    let name = pod.name_any();
    let status = pod.status.as_ref()?;
    let unschedulable = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
    if let Some(c) = unschedulable {
        return Some(format!("pod {name} cannot be scheduled: {}", c.message.clone().unwrap_or_default()));
    }
    status.container_statuses.iter().flatten().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref().filter(|r| STUCK_WAITING.contains(r))?;
        Some(format!("pod {name}: container {} {reason}: {}", c.name, waiting.message.clone().unwrap_or_default()))
    })
}

fn waits_for_a_volume(pod: &Pod) -> bool {
    pod_problem(pod).is_some_and(|p| p.contains("PersistentVolumeClaim"))
}

fn event_time(event: &Event) -> Option<Timestamp> {
    let micro = event.event_time.as_ref().map(|t| t.0);
    let time = event.last_timestamp.as_ref().or(event.first_timestamp.as_ref()).map(|Time(t)| *t);
    time.or(micro).or(event.metadata.creation_timestamp.as_ref().map(|Time(t)| *t))
}

fn is_fresh(event: &Event, now: Timestamp) -> bool {
    event_time(event).is_some_and(|t| now.duration_since(t) <= FRESH_FOR)
}

/// The message of the newest fresh event with `reason`.
pub fn latest(events: &[Event], reason: &str, now: Timestamp) -> Option<String> {
    events
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason) && is_fresh(e, now))
        .max_by_key(|e| event_time(e))
        .and_then(|e| e.message.clone())
}

/// The newest fresh warning of each claim whose name starts with one of
/// `prefixes` (`<template>-<statefulset>-`).
pub fn claim_problems(events: &[Event], prefixes: &[String], now: Timestamp) -> Vec<String> {
    let mut newest: BTreeMap<String, &Event> = BTreeMap::new();
    let binding_failure = |e: &&Event| matches!(e.reason.as_deref(), Some("FailedBinding" | "ProvisioningFailed"));
    for event in events.iter().filter(binding_failure).filter(|e| is_fresh(e, now)) {
        let Some(claim) = event.involved_object.name.clone() else { continue };
        if !prefixes.iter().any(|p| claim.starts_with(p.as_str())) {
            continue;
        }
        let newer = newest.get(&claim).is_none_or(|held| event_time(event) > event_time(held));
        if newer {
            newest.insert(claim, event);
        }
    }
    newest
        .into_iter()
        .map(|(claim, e)| {
            format!("PersistentVolumeClaim {claim} is not bound: {}", e.message.clone().unwrap_or_default())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, ObjectReference, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("timestamp")
    }

    fn pod(name: &str, status: PodStatus) -> Pod {
        Pod {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            status: Some(status),
            ..Default::default()
        }
    }

    fn unschedulable(name: &str, message: &str) -> Pod {
        pod(
            name,
            PodStatus {
                phase: Some("Pending".into()),
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: Some("Unschedulable".into()),
                    message: Some(message.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        )
    }

    fn event(object: &str, reason: &str, message: &str, seconds: i64) -> Event {
        Event {
            involved_object: ObjectReference { name: Some(object.into()), ..Default::default() },
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_timestamp: Some(Time(at(seconds))),
            ..Default::default()
        }
    }

    #[test]
    fn unschedulable_and_stuck_containers_are_named() {
        let waiting = |reason: &str| {
            pod(
                "chat-push-x",
                PodStatus {
                    container_statuses: Some(vec![ContainerStatus {
                        name: "push".into(),
                        state: Some(ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: Some(reason.into()),
                                message: Some("details".into()),
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            )
        };
        let problems = pod_problems(&[
            unschedulable("chat-redis-0", "0/1 nodes are available: 1 Insufficient cpu."),
            waiting("ImagePullBackOff"),
            waiting("ContainerCreating"),
            pod("fine", PodStatus::default()),
        ]);
        assert_eq!(
            problems,
            vec![
                "pod chat-redis-0 cannot be scheduled: 0/1 nodes are available: 1 Insufficient cpu.",
                "pod chat-push-x: container push ImagePullBackOff: details",
            ]
        );
    }

    #[test]
    fn many_pods_are_summarised() {
        let pods: Vec<Pod> = (0..5).map(|i| unschedulable(&format!("p{i}"), "no")).collect();
        let problems = pod_problems(&pods);
        assert_eq!(problems.len(), MAX_PODS_NAMED + 1);
        assert_eq!(problems.last().map(String::as_str), Some("2 more pod(s) with problems"));
    }

    #[test]
    fn the_newest_fresh_failure_is_the_cause() {
        let events = [
            event("chat-scylla", "FailedCreate", "old: forbidden", -7200),
            event("chat-scylla", "FailedCreate", "forbidden: violates PodSecurity", -30),
            event("chat-scylla", "FailedCreate", "forbidden: exceeded quota", -60),
            event("chat-scylla", "SuccessfulCreate", "created", 0),
        ];
        assert_eq!(latest(&events, "FailedCreate", at(0)).as_deref(), Some("forbidden: violates PodSecurity"));
        assert_eq!(latest(&events[..1], "FailedCreate", at(0)), None, "two hours old: history");
    }

    #[test]
    fn claims_of_the_statefulset_only_newest_each() {
        let events = [
            event("data-chat-redis-0", "ProvisioningFailed", "storageclass \"fast\" not found", -10),
            event("data-chat-redis-0", "ProvisioningFailed", "older", -100),
            event("data-other-redis-0", "FailedBinding", "not ours", -5),
            event("data-chat-scylla-0", "FailedBinding", "no storage class is set", -5),
        ];
        let prefixes = vec!["data-chat-redis-".to_string(), "data-chat-scylla-".to_string()];
        assert_eq!(
            claim_problems(&events, &prefixes, at(0)),
            vec![
                "PersistentVolumeClaim data-chat-redis-0 is not bound: storageclass \"fast\" not found",
                "PersistentVolumeClaim data-chat-scylla-0 is not bound: no storage class is set",
            ]
        );
    }
}
