//! The config the operator writes is the config the gateway and the push
//! worker read. A ChatCluster goes through the operator's desired state (the
//! gateway ConfigMap, StatefulSet and push-worker Deployment) to the files and
//! environment one of their containers would see, and from there through the
//! gateway's and the push worker's own config loaders. Drift between the two
//! crates (a renamed key, a moved mount, an environment variable named
//! differently) fails here, without a cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec};
use kube::ResourceExt;
use kubechat_crds::{
    ApnsProvider, ChatCluster, ExternalRedis, ExternalScylla, FcmProvider, SecretKeyRef, WebhookProvider,
};
use kubechat_gateway::config::{GatewayConfig, chat_config};
use kubechat_operator::desired::{admin_token, auth, gateway, push, redis, scylla};
use kubechat_push::{PushWorkerConfig, SecretSource};

/// What a mounted Secret key or a Secret-sourced variable holds here: its name.
fn from_secret(name: &str, key: &str) -> String {
    format!("secret {name}/{key}")
}

/// What one container sees: its files (ConfigMap keys with their text,
/// Secret keys as [`from_secret`]) and its environment.
struct Sees {
    files: BTreeMap<PathBuf, String>,
    env: BTreeMap<String, String>,
}

impl Sees {
    fn new(pod: &PodSpec, container: &Container, config_maps: &[&ConfigMap]) -> Self {
        let config_map = |name: &str| {
            config_maps
                .iter()
                .find(|cm| cm.name_any() == name)
                .unwrap_or_else(|| panic!("ConfigMap {name} is mounted but not among the desired objects"))
        };
        let mut files = BTreeMap::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("mount {} has no volume", mount.name));
            assert!(mount.sub_path.is_none(), "sub_path mounts are not modelled here");
            let dir = Path::new(&mount.mount_path);
            if let Some(source) = &volume.config_map {
                let data = config_map(&source.name).data.clone().unwrap_or_default();
                match &source.items {
                    Some(items) => {
                        for item in items {
                            files.insert(dir.join(&item.path), data.get(&item.key).cloned().unwrap_or_default());
                        }
                    }
                    None => files.extend(data.into_iter().map(|(key, text)| (dir.join(key), text))),
                }
            }
            let secret_items =
                volume.secret.iter().map(|s| (s.secret_name.clone().unwrap_or_default(), s.items.clone())).chain(
                    volume
                        .projected
                        .iter()
                        .flat_map(|p| p.sources.iter().flatten())
                        .filter_map(|source| source.secret.as_ref())
                        .map(|s| (s.name.clone(), s.items.clone())),
                );
            for (secret, items) in secret_items {
                // Without items every key of the Secret is mounted: which ones is not known here.
                let items = items.unwrap_or_else(|| panic!("Secret {secret} is mounted without naming its keys"));
                for item in items {
                    files.insert(dir.join(&item.path), from_secret(&secret, &item.key));
                }
            }
        }
        let env = container
            .env
            .iter()
            .flatten()
            .map(|var| {
                let from = var.value_from.as_ref();
                let value = match (var.value.clone(), from.and_then(|f| f.secret_key_ref.as_ref())) {
                    (Some(value), _) => value,
                    (None, Some(secret)) => from_secret(&secret.name, &secret.key),
                    (None, None) => {
                        format!("field {:?}", from.and_then(|f| f.field_ref.as_ref()).map(|f| &f.field_path))
                    }
                };
                (var.name.clone(), value)
            })
            .collect();
        Self { files, env }
    }

    /// The config file, from where `KUBECHAT_CONFIG` says it is (as the binary reads it).
    fn config_path(&self) -> PathBuf {
        PathBuf::from(self.env.get("KUBECHAT_CONFIG").expect("KUBECHAT_CONFIG is set"))
    }

    fn config_text(&self) -> &str {
        let path = self.config_path();
        self.files.get(&path).unwrap_or_else(|| panic!("{} is not mounted: {:?}", path.display(), self.files.keys()))
    }

    /// The file at `path` (absolute, as the loader would open it).
    fn file(&self, path: &Path) -> &str {
        self.files.get(path).unwrap_or_else(|| panic!("{} is not mounted: {:?}", path.display(), self.files.keys()))
    }

    /// Writes the files under `root`, so a loader can read them from disk.
    fn write_under(&self, root: &Path) {
        for (path, text) in &self.files {
            let at = root.join(path.strip_prefix("/").unwrap_or(path));
            std::fs::create_dir_all(at.parent().expect("a parent")).expect("create the directory");
            std::fs::write(&at, text).expect("write the file");
        }
    }

    fn port(container: &Container, name: &str) -> i32 {
        container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("container {} has no port {name}", container.name))
            .container_port
    }
}

fn example(name: &str) -> ChatCluster {
    let path = kubechat_e2e::repo_root().join("crds/examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn secret(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef { name: name.into(), key: key.into() }
}

/// Every optional part set: external backends with credentials, every push
/// provider, settings off their defaults.
fn everything_external() -> ChatCluster {
    let mut cc = example("minimal.yaml");
    let spec = &mut cc.spec;
    spec.gateway.ports.websocket = 18080;
    spec.gateway.ports.admin = 19090;
    spec.gateway.max_connections_per_pod = 12_345;
    spec.chat.max_message_chars = 4321;
    spec.chat.max_group_members = 77;
    spec.chat.heartbeat_seconds = 7;
    spec.chat.offline_after_seconds = 41;
    spec.chat.presence_fanout_max_members = 9;
    spec.auth.signing_key_secret = Some(secret("team-jwt", "hs256"));
    spec.redis.managed = None;
    spec.redis.external = Some(ExternalRedis {
        url: "rediss://redis.example:6380/2".into(),
        password_secret: Some(secret("redis", "pw")),
        cluster: true,
        seed_urls: vec!["rediss://redis-2.example:6380".into()],
    });
    spec.scylla.managed = None;
    spec.scylla.external = Some(ExternalScylla {
        contact_points: vec!["cql-1.example:9042".into(), "cql-2.example:9042".into()],
        credentials_secret: Some("cql-login".into()),
        local_datacenter: Some("dc-west".into()),
    });
    spec.scylla.keyspace = "chat_west".into();
    spec.push_workers.max_attempts = 11;
    spec.push_workers.providers.webhook = Some(WebhookProvider {
        url: "https://hooks.example/push".into(),
        signing_key_secret: secret("hook", "hmac"),
        include_text: true,
    });
    spec.push_workers.providers.fcm =
        Some(FcmProvider { project_id: "proj-1".into(), credentials_secret: secret("fcm", "sa.json") });
    spec.push_workers.providers.apns = Some(ApnsProvider {
        team_id: "TEAM123456".into(),
        key_id: "KEY1234567".into(),
        topic: "com.example.chat".into(),
        signing_key_secret: secret("apns", "key.p8"),
        sandbox: true,
    });
    cc
}

/// The clusters every check runs on, placed in a namespace as the apiserver would.
fn clusters() -> Vec<ChatCluster> {
    let mut clusters = vec![example("minimal.yaml"), example("full.yaml"), everything_external()];
    for cc in &mut clusters {
        cc.metadata.namespace = Some("team-a".into());
        cc.metadata.uid = Some("00000000-0000-0000-0000-00000000000a".into());
    }
    clusters
}

fn pod_of(spec: Option<&PodSpec>, container: &str) -> (PodSpec, Container) {
    let pod = spec.cloned().expect("a pod spec");
    let container =
        pod.containers.iter().find(|c| c.name == container).cloned().unwrap_or_else(|| panic!("no {container}"));
    (pod, container)
}

#[test]
fn the_gateway_reads_the_config_the_operator_writes() {
    for cc in clusters() {
        let name = cc.name_any();
        let config_map = gateway::config_map(&cc);
        let stateful_set = gateway::stateful_set(&cc, &config_map, cc.spec.gateway.replicas);
        let (pod, container) = pod_of(stateful_set.spec.template.spec.as_ref(), "gateway");
        let sees = Sees::new(&pod, &container, &[&config_map]);

        // Loaded from disk by the gateway's own loader, from where the pod finds it.
        let root = tempfile::tempdir().expect("a temporary directory");
        sees.write_under(root.path());
        let config_path = sees.config_path();
        let file = GatewayConfig::load(&root.path().join(config_path.strip_prefix("/").unwrap_or(&config_path)))
            .unwrap_or_else(|e| panic!("{name}: the gateway refuses the operator's config: {e:#}"));

        let spec = &cc.spec;
        assert_eq!(i32::from(file.listen.websocket), spec.gateway.ports.websocket, "{name}");
        assert_eq!(i32::from(file.listen.admin), spec.gateway.ports.admin, "{name}");
        // The pod's named ports (probes and Services use the names) are where it listens.
        assert_eq!(Sees::port(&container, "websocket"), i32::from(file.listen.websocket), "{name}");
        assert_eq!(Sees::port(&container, "admin"), i32::from(file.listen.admin), "{name}");
        assert_eq!(i64::try_from(file.max_connections).ok(), Some(spec.gateway.max_connections_per_pod), "{name}");

        let chat = chat_config(&file.chat);
        let as_usize = |n: i32| usize::try_from(n).expect("a positive setting");
        assert_eq!(chat.limits.max_message_chars, as_usize(spec.chat.max_message_chars), "{name}");
        assert_eq!(chat.limits.max_group_members, as_usize(spec.chat.max_group_members), "{name}");
        assert_eq!(i64::from(chat.heartbeat_seconds), i64::from(spec.chat.heartbeat_seconds), "{name}");
        let offline = u64::try_from(spec.chat.offline_after_seconds).expect("positive");
        assert_eq!(chat.offline_after, Duration::from_secs(offline), "{name}");
        assert_eq!(chat.presence_fanout_max_members, as_usize(spec.chat.presence_fanout_max_members), "{name}");

        assert_eq!(file.redis.url, redis::url(&cc), "{name}");
        let external = cc.spec.redis.external.as_ref();
        assert_eq!(file.redis.cluster, external.is_some_and(|e| e.cluster), "{name}: a Redis Cluster");
        assert_eq!(file.redis.seed_urls, external.map(|e| e.seed_urls.clone()).unwrap_or_default(), "{name}");
        let redis_password = file.redis.password_env.as_ref().map(|var| sees.env.get(var).cloned());
        let expected = redis::password_ref(&cc).map(|r| Some(from_secret(&r.name, &r.key)));
        assert_eq!(redis_password, expected, "{name}: the Redis password variable the gateway reads");

        assert_eq!(file.scylla.contact_points, scylla::contact_points(&cc), "{name}");
        assert_eq!(file.scylla.keyspace, spec.scylla.keyspace, "{name}");
        assert_eq!(i64::from(file.scylla.replication_factor), i64::from(scylla::replication_factor(&cc)), "{name}");
        let external = spec.scylla.external.as_ref();
        assert_eq!(file.scylla.local_datacenter, external.and_then(|e| e.local_datacenter.clone()), "{name}");
        let credentials = file
            .scylla
            .credentials_env
            .as_ref()
            .map(|c| (sees.env.get(&c.username).cloned(), sees.env.get(&c.password).cloned()));
        let expected = external
            .and_then(|e| e.credentials_secret.as_deref())
            .map(|s| (Some(from_secret(s, "username")), Some(from_secret(s, "password"))));
        assert_eq!(credentials, expected, "{name}: the CQL credential variables the gateway reads");

        let signing = auth::signing_key_ref(&cc);
        assert_eq!(sees.file(&file.auth.signing_key_file), from_secret(&signing.name, &signing.key), "{name}");

        // The admin token the operator sends is the one the gateway reads.
        let token = admin_token::generated(&cc);
        let token_file = file.admin.token_file.as_ref().unwrap_or_else(|| panic!("{name}: no admin token file"));
        assert_eq!(sees.file(token_file), from_secret(&token.name, token.key), "{name}: the admin token");
    }
}

#[test]
fn the_push_worker_reads_the_config_the_operator_writes() {
    for cc in clusters() {
        let name = cc.name_any();
        let config_map = gateway::config_map(&cc);
        let deployment = push::deployment(&cc);
        let (pod, container) = pod_of(deployment.spec.template.spec.as_ref(), "push-worker");
        let sees = Sees::new(&pod, &container, &[&config_map]);

        let file: GatewayConfig = serde_json::from_str(sees.config_text())
            .unwrap_or_else(|e| panic!("{name}: the push worker cannot parse the operator's config: {e}"));
        let config = PushWorkerConfig::from_gateway_config(&file, "pod-0", |var| sees.env.get(var).cloned())
            .unwrap_or_else(|e| panic!("{name}: the push worker refuses the operator's config: {e:#}"));

        let spec = &cc.spec;
        assert_eq!(config.redis.url, redis::url(&cc), "{name}");
        assert_eq!(config.redis.cluster, cc.spec.redis.external.as_ref().is_some_and(|e| e.cluster), "{name}");
        let expected = redis::password_ref(&cc).map(|r| SecretSource::Value(from_secret(&r.name, &r.key)));
        assert_eq!(config.redis_password, expected, "{name}: the Redis password");
        let admin = u16::try_from(Sees::port(&container, "admin")).expect("a port");
        assert_eq!(
            config.admin,
            Some(SocketAddr::from(([0, 0, 0, 0], admin))),
            "{name}: /healthz where the probe looks"
        );
        assert_eq!(i64::from(config.max_attempts), i64::from(spec.push_workers.max_attempts), "{name}");

        // Each provider's secret is read from a file the Deployment mounts from the named Secret.
        let mounted = |source: &SecretSource| match source {
            SecretSource::File(path) => sees.file(path).to_string(),
            SecretSource::Value(_) => panic!("{name}: a provider secret given as a value"),
        };
        let providers = &spec.push_workers.providers;
        let webhook =
            config.providers.webhook.as_ref().map(|w| (w.url.clone(), w.include_text, mounted(&w.signing_key)));
        let expected = providers.webhook.as_ref().map(|w| {
            (w.url.clone(), w.include_text, from_secret(&w.signing_key_secret.name, &w.signing_key_secret.key))
        });
        assert_eq!(webhook, expected, "{name}: webhook");
        let fcm = config.providers.fcm.as_ref().map(|f| (f.project_id.clone(), mounted(&f.credentials)));
        let expected = providers
            .fcm
            .as_ref()
            .map(|f| (f.project_id.clone(), from_secret(&f.credentials_secret.name, &f.credentials_secret.key)));
        assert_eq!(fcm, expected, "{name}: FCM");
        let apns = config
            .providers
            .apns
            .as_ref()
            .map(|a| (a.team_id.clone(), a.key_id.clone(), a.topic.clone(), a.sandbox, mounted(&a.signing_key)));
        let expected = providers.apns.as_ref().map(|a| {
            let key = from_secret(&a.signing_key_secret.name, &a.signing_key_secret.key);
            (a.team_id.clone(), a.key_id.clone(), a.topic.clone(), a.sandbox, key)
        });
        assert_eq!(apns, expected, "{name}: APNs");
    }
}

/// The fixtures cover what the checks above compare: without this, a check
/// of an optional part could pass by seeing `None` on both sides.
#[test]
fn the_clusters_cover_every_optional_part() {
    let clusters = clusters();
    let any = |f: &dyn Fn(&ChatCluster) -> bool| clusters.iter().any(f);
    assert!(any(&|cc| redis::password_secret(cc).is_some()));
    // A managed Redis's clients read the generated password like a named one.
    assert!(any(&|cc| cc.spec.redis.managed.is_some() && redis::password_ref(cc).is_some()));
    assert!(any(&|cc| cc.spec.scylla.external.as_ref().is_some_and(|e| e.credentials_secret.is_some())));
    assert!(any(&|cc| cc.spec.scylla.external.as_ref().is_some_and(|e| e.local_datacenter.is_some())));
    assert!(any(&|cc| cc.spec.auth.signing_key_secret.is_some()));
    assert!(any(&|cc| cc.spec.auth.signing_key_secret.is_none()));
    let providers = |cc: &ChatCluster| cc.spec.push_workers.providers.clone();
    assert!(any(&|cc| providers(cc).webhook.is_some() && providers(cc).fcm.is_some() && providers(cc).apns.is_some()));
    assert!(any(&|cc| providers(cc).apns.is_some_and(|a| a.sandbox)));
    assert!(any(&|cc| providers(cc).webhook.is_none()));
    assert!(any(&|cc| providers(cc).webhook.is_some_and(|w| w.include_text)));
    assert!(any(&|cc| providers(cc).webhook.is_some_and(|w| !w.include_text)));
}
