//! The gateway config file (`gateway.json` in the gateway ConfigMap), which
//! gateways and push workers mount. Its types are the gateway's own
//! (`kubechat_config`): a field renamed on one side fails to compile on the
//! other.

use std::path::Path;

use kube::ResourceExt;
use kubechat_config::{self as config, AUTH_DIR, GatewayConfig};
use kubechat_crds::{ChatCluster, PushWorkersSpec};

use super::{Names, admin_token, redis, scylla};

/// The config every gateway and push worker reads (no secrets: those are
/// mounted files or environment variables from Secrets). Its types are the
/// gateway's own (`kubechat_config`): a field renamed on one side fails to
/// compile on the other.
pub fn gateway_config(cc: &ChatCluster) -> GatewayConfig {
    let spec = &cc.spec;
    // The CRD schema bounds every one of these; a negative value never gets here.
    let count = |value: i32| u32::try_from(value).unwrap_or(0);
    let external_scylla = spec.scylla.external.as_ref();
    GatewayConfig {
        listen: config::Listen {
            websocket: u16::try_from(spec.gateway.ports.websocket).unwrap_or(0),
            admin: u16::try_from(spec.gateway.ports.admin).unwrap_or(0),
        },
        max_connections: usize::try_from(spec.gateway.max_connections_per_pod).unwrap_or(0),
        web_client: spec.gateway.web_client,
        drain: config::Drain {
            window_seconds: count(spec.gateway.drain.window_seconds),
            max_reconnects_per_second: count(spec.gateway.drain.max_reconnects_per_second),
        },
        chat: config::Chat {
            max_group_members: count(spec.chat.max_group_members) as usize,
            max_message_chars: count(spec.chat.max_message_chars) as usize,
            heartbeat_seconds: count(spec.chat.heartbeat_seconds),
            offline_after_seconds: count(spec.chat.offline_after_seconds),
            presence_fanout_max_members: count(spec.chat.presence_fanout_max_members) as usize,
            send_retry_window_seconds: config::DEFAULT_SEND_RETRY_WINDOW_SECONDS,
        },
        redis: config::Redis {
            url: redis::url(cc),
            password_env: redis::password_ref(cc).map(|_| redis::PASSWORD_ENV.into()),
            cluster: spec.redis.external.as_ref().is_some_and(|e| e.cluster),
            seed_urls: spec.redis.external.as_ref().map(|e| e.seed_urls.clone()).unwrap_or_default(),
        },
        scylla: config::Scylla {
            contact_points: scylla::contact_points(cc),
            keyspace: spec.scylla.keyspace.clone(),
            replication_factor: count(scylla::replication_factor(cc)),
            local_datacenter: external_scylla.and_then(|e| e.local_datacenter.clone()),
            credentials_env: external_scylla.and_then(|e| e.credentials_secret.as_ref()).map(|_| {
                config::CredentialsEnv { username: scylla::USERNAME_ENV.into(), password: scylla::PASSWORD_ENV.into() }
            }),
        },
        auth: config::Auth { signing_key_file: Path::new(AUTH_DIR).join(config::SIGNING_KEY_FILE) },
        admin: config::Admin { token_file: Some(admin_token::token_file()) },
        push: push_section(&spec.push_workers),
        discovery: Some(config::Discovery {
            endpoint_config_map: Names(&cc.name_any()).endpoints(),
            namespace: cc.namespace().unwrap_or_default(),
        }),
    }
}

/// The `push` section of the gateway config: the providers without their
/// Secret references (a pod cannot read a Secret by name: the secrets are
/// mounted under `PUSH_SECRETS_DIR` by `super::push::deployment`).
pub fn push_section(spec: &PushWorkersSpec) -> config::Push {
    let providers = &spec.providers;
    config::Push {
        max_attempts: u32::try_from(spec.max_attempts).unwrap_or(1),
        secrets_dir: None,
        providers: config::PushProviders {
            webhook: providers.webhook.as_ref().map(|w| config::Webhook {
                url: w.url.clone(),
                include_text: w.include_text,
                signing_key_file: None,
            }),
            fcm: providers
                .fcm
                .as_ref()
                .map(|f| config::Fcm { project_id: f.project_id.clone(), credentials_file: None }),
            apns: providers.apns.as_ref().map(|a| config::Apns {
                team_id: a.team_id.clone(),
                key_id: a.key_id.clone(),
                topic: a.topic.clone(),
                sandbox: a.sandbox,
                signing_key_file: None,
            }),
        },
    }
}
