//! A "process kubelet" for gateway Pods.
//!
//! kwok makes Pods Running and Ready without running anything. This runs a
//! real `kubechat-gateway` process for every gateway Pod of one ChatCluster
//! that has an IP (the control plane hands out loopback IPs, see
//! `e2e/local/control-plane.sh`), from the Pod's own spec, the way a kubelet
//! would:
//!
//! - the container's args and environment, with `fieldRef`s (pod name, IP,
//!   labels…) and `secretKeyRef`s resolved;
//! - ConfigMap, Secret and emptyDir volumes written under a temp folder.
//!   There is no mount namespace, so container paths are mapped to those
//!   folders: in environment values, and in JSON files of ConfigMap volumes
//!   (the gateway config names the signing key by its container path).
//!
//! A Pod whose image contains [`BROKEN_IMAGE_MARK`] is never started (an
//! image that cannot be pulled); one whose tag ends in
//! [`FAILPOINT_IMAGE_MARK`]`<name>` starts with that gateway failpoint armed.
//! A Pod that is deleted gets SIGTERM, then SIGKILL after its grace period
//! (at most [`MAX_GRACE`]), and stays (Terminating) until its process has
//! exited, as with a real kubelet: the kubelet holds a finalizer
//! ([`PROCESS_FINALIZER`]) on every Pod whose process it started (kwok
//! deletes a deleted Pod at once otherwise, and the StatefulSet would start
//! its successor beside a gateway still draining). A process that exits (or that a test kills) is
//! not restarted: a test sees exactly what it did.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Pods whose image contains this are never started (see [`ProcessKubelet`]).
pub const BROKEN_IMAGE_MARK: &str = "broken";
/// Pods whose image tag ends in `failpoint-<name>` start with the gateway
/// failpoint `<name>` armed (`KUBECHAT_FAILPOINTS`), e.g.
/// `kubechat:0.4.0-failpoint-refuse-websocket`.
pub const FAILPOINT_IMAGE_MARK: &str = "failpoint-";
/// Held on every Pod whose process runs, until that process has exited.
pub const PROCESS_FINALIZER: &str = "e2e.kubechat.dev/process";
/// How long a deleted Pod's process may take to stop after SIGTERM.
pub const MAX_GRACE: Duration = Duration::from_secs(30);
const SYNC_EVERY: Duration = Duration::from_millis(100);

/// The `kubechat-gateway` binary next to the test binary (cargo puts both
/// in `$CARGO_TARGET_DIR/<profile>`), or `KUBECHAT_GATEWAY_BIN`. Panics
/// with what to do when it is missing or older than the gateway's sources.
pub fn gateway_binary() -> PathBuf {
    let path = std::env::var_os("KUBECHAT_GATEWAY_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        // <target>/<profile>/deps/<test binary>
        let profile = exe.parent().and_then(Path::parent).expect("the test binary is in <target>/<profile>/deps");
        profile.join("kubechat-gateway")
    });
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|e| {
        panic!(
            "the gateway binary {} is missing ({e}): build it with `cargo build -p kubechat-gateway` \
             (`cargo test --workspace` builds it), or point KUBECHAT_GATEWAY_BIN at one",
            path.display()
        )
    });
    // The binary is built from the gateway crate and the two it links.
    let root = crate::repo_root();
    let newest = ["gateway/src", "push/src", "config/src"]
        .iter()
        .filter_map(|dir| newest_file(&root.join(dir)))
        .max_by_key(|(_, changed)| *changed);
    if let Some((newest, changed)) = newest
        && changed > built
    {
        panic!(
            "the gateway binary {} is older than {}: rebuild it with `cargo build -p kubechat-gateway`",
            path.display(),
            newest.display()
        );
    }
    path
}

pub(crate) fn newest_file(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok().map(|t| (path, t))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.1 > n.1)
        {
            newest = Some(c);
        }
    }
    newest
}

/// A gateway Pod whose process was started.
#[derive(Clone, Debug)]
pub struct RunningPod {
    pub name: String,
    pub ip: IpAddr,
    pub websocket: SocketAddr,
    pub admin: SocketAddr,
}

impl RunningPod {
    /// The URL clients use (what the gateway advertises).
    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.websocket)
    }
}

struct Process {
    uid: String,
    pod: RunningPod,
    child: Option<Child>,
    exit: Option<ExitStatus>,
    log: PathBuf,
}

type Processes = Arc<Mutex<BTreeMap<String, Process>>>;

/// The pods whose process runs, readable from any task.
#[derive(Clone)]
pub struct RunningPods(Processes);

impl RunningPods {
    /// Pods whose process runs, by name.
    pub fn get(&self) -> Vec<RunningPod> {
        let processes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        processes.values().filter(|p| p.child.is_some() && p.exit.is_none()).map(|p| p.pod.clone()).collect()
    }
}

/// Runs the gateway Pods of one ChatCluster as local processes.
pub struct ProcessKubelet {
    processes: Processes,
    pods_api: Api<Pod>,
    selector: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl ProcessKubelet {
    /// Starts watching the gateway Pods of ChatCluster `cluster` in `namespace`.
    pub fn start(client: &Client, namespace: &str, cluster: &str) -> Self {
        let binary = gateway_binary();
        let dir = tempfile::Builder::new().prefix("kubelet-").tempdir().expect("a temp dir for the kubelet");
        let processes: Processes = Arc::default();
        let stop = CancellationToken::new();
        let selector = format!("app.kubernetes.io/instance={cluster},app.kubernetes.io/component=gateway");
        let pods_api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let (pods, writer) = reflector::store::<Pod>();
        let events = watcher(pods_api.clone(), watcher::Config::default().labels(&selector)).default_backoff();
        let sync = Sync {
            client: client.clone(),
            pods_api: pods_api.clone(),
            namespace: namespace.to_string(),
            binary,
            root: dir.path().to_path_buf(),
            processes: processes.clone(),
        };
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let watch = reflector::reflector(writer, events).for_each(|_| async {});
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = watch => {}
                    () = sync.run(pods) => {}
                }
            }
        });
        Self { processes, pods_api, selector, stop, task: Some(task), _dir: dir }
    }

    /// Waits until `count` Pods have a running process that says it is
    /// ready (`/v1/admin/load`); panics with their logs after `timeout`.
    pub async fn wait_ready(&self, count: usize, timeout: Duration) -> Vec<RunningPod> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let running: Vec<RunningPod> = self.running();
            if running.len() >= count {
                let mut ready = Vec::new();
                for pod in &running {
                    let load = kubechat_operator::discovery::poll::read_load(pod.admin, Duration::from_secs(1)).await;
                    if load.is_ok_and(|l| l.ready && l.pod == pod.name) {
                        ready.push(pod.clone());
                    }
                }
                if ready.len() >= count {
                    return ready;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{count} ready gateway processes not there after {timeout:?}; {}", self.describe());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Pods whose process runs, by name.
    pub fn running(&self) -> Vec<RunningPod> {
        self.running_pods().get()
    }

    /// [`running`](Self::running) for a task of its own.
    pub fn running_pods(&self) -> RunningPods {
        RunningPods(self.processes.clone())
    }

    /// SIGKILL: no drain, no goodbye.
    pub fn kill(&self, pod: &str) {
        self.signal(pod, rustix::process::Signal::KILL);
    }

    /// SIGTERM: what a Pod deletion sends first.
    pub fn terminate(&self, pod: &str) {
        self.signal(pod, rustix::process::Signal::TERM);
    }

    fn signal(&self, pod: &str, signal: rustix::process::Signal) {
        let pid = self.with(|p| p.get(pod).and_then(|p| p.child.as_ref()).and_then(Child::id));
        let pid = pid.unwrap_or_else(|| panic!("no running process for pod {pod}; {}", self.describe()));
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("a non-zero pid");
        rustix::process::kill_process(pid, signal).unwrap_or_else(|e| panic!("signal {signal:?} to {pod}: {e}"));
    }

    /// The end of a Pod's process log.
    pub fn log_tail(&self, pod: &str, lines: usize) -> String {
        let path = self.with(|p| p.get(pod).map(|p| p.log.clone()));
        let text = path.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every process, its state and the end of its log (for failure messages).
    pub fn describe(&self) -> String {
        let names: Vec<(String, String)> = self.with(|p| {
            p.values()
                .map(|p| {
                    let state = match (&p.child, &p.exit) {
                        (_, Some(status)) => format!("exited: {status}"),
                        (Some(_), None) => "running".to_string(),
                        (None, None) => "not started".to_string(),
                    };
                    (p.pod.name.clone(), format!("{} on {} ({state})", p.pod.name, p.pod.ip))
                })
                .collect()
        });
        if names.is_empty() {
            return "no gateway pod has been started".into();
        }
        names
            .into_iter()
            .map(|(name, line)| format!("{line}; log:\n{}", self.log_tail(&name, 20)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills every process, stops watching and lets go of the Pods (their
    /// namespace can then be deleted).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let children: Vec<Child> = self.with(|p| p.values_mut().filter_map(|p| p.child.take()).collect());
        for mut child in children {
            let _ = child.kill().await;
        }
        let held = self.pods_api.list(&ListParams::default().labels(&self.selector)).await;
        for pod in held.map(|l| l.items).unwrap_or_default() {
            release(&self.pods_api, &pod.name_any(), pod.uid().as_deref().unwrap_or_default()).await;
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Process>) -> T) -> T {
        f(&mut self.processes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for ProcessKubelet {
    fn drop(&mut self) {
        self.stop.cancel();
        // Children are spawned with kill_on_drop: dropping them kills them.
        self.with(|p| p.clear());
    }
}

/// The sync loop: the processes follow the Pods.
struct Sync {
    client: Client,
    pods_api: Api<Pod>,
    namespace: String,
    binary: PathBuf,
    root: PathBuf,
    processes: Processes,
}

impl Sync {
    async fn run(self, pods: Store<Pod>) {
        if pods.wait_until_ready().await.is_err() {
            return;
        }
        loop {
            self.reap();
            let live = pods.state();
            // Start a process for every live Pod with an IP that has none (by uid).
            for pod in &live {
                let uid = pod.uid().unwrap_or_default();
                let has_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| !ip.is_empty());
                let known = self.with(|p| p.get(&pod.name_any()).is_some_and(|p| p.uid == uid));
                if pod.metadata.deletion_timestamp.is_none() && has_ip && !known && !refused(pod) {
                    self.start(pod).await;
                }
            }
            // Stop the processes of Pods that are gone or being deleted.
            let doomed: Vec<(Child, Duration, String, String)> = self.with(|processes| {
                let mut doomed = Vec::new();
                processes.retain(|name, process| {
                    let pod = live.iter().find(|p| p.name_any() == *name && p.uid().as_deref() == Some(&process.uid));
                    let deleted = pod.is_none_or(|p| p.metadata.deletion_timestamp.is_some());
                    if deleted && let Some(child) = process.child.take() {
                        let grace = pod
                            .and_then(|p| p.spec.as_ref()?.termination_grace_period_seconds)
                            .map_or(MAX_GRACE, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)).min(MAX_GRACE));
                        doomed.push((child, grace, name.clone(), process.uid.clone()));
                    }
                    !deleted
                });
                doomed
            });
            for (child, grace, name, uid) in doomed {
                let api = self.pods_api.clone();
                tokio::spawn(async move {
                    stop_child(child, grace).await;
                    release(&api, &name, &uid).await;
                });
            }
            tokio::time::sleep(SYNC_EVERY).await;
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Process>) -> T) -> T {
        f(&mut self.processes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Notes processes that exited.
    fn reap(&self) {
        self.with(|processes| {
            for process in processes.values_mut() {
                if process.exit.is_none()
                    && let Some(child) = process.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    process.exit = Some(status);
                }
            }
        });
    }

    async fn start(&self, pod: &Pod) {
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let dir = self.root.join(format!("{name}-{uid}"));
        let log = dir.join("log");
        let started = self.launch(pod, &dir, &log).await;
        let (child, running) = match started {
            Ok(started) => started,
            Err(e) => {
                // Retried at the next sync (a Secret or ConfigMap may not exist yet).
                tracing::debug!(pod = %name, error = %e, "cannot start the gateway process yet");
                return;
            }
        };
        self.with(|p| {
            p.insert(name.clone(), Process { uid: uid.clone(), pod: running, child: Some(child), exit: None, log })
        });
        hold(&self.pods_api, pod, &uid).await;
    }

    async fn launch(&self, pod: &Pod, dir: &Path, log: &Path) -> Result<(Child, RunningPod), String> {
        let spec = pod.spec.as_ref().ok_or("no pod spec")?;
        let container = spec.containers.first().ok_or("no container")?;
        let ip: IpAddr = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .ok_or("no pod IP")?
            .parse()
            .map_err(|e| format!("pod IP: {e}"))?;
        if !ip.is_loopback() {
            return Err(format!(
                "pod IP {ip} is not a loopback address: is kwok's CIDR from e2e/local/control-plane.sh?"
            ));
        }
        let port = |name: &str| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .map(|port| SocketAddr::new(ip, port))
                .ok_or(format!("container port {name} missing"))
        };
        let running = RunningPod { name: pod.name_any(), ip, websocket: port("websocket")?, admin: port("admin")? };

        let mounts = self.write_volumes(pod, container, dir).await?;
        let mut env = BTreeMap::new();
        for var in container.env.iter().flatten() {
            env.insert(var.name.clone(), map_paths(&self.env_value(pod, var).await?, &mounts));
        }
        if let Some(failpoint) = container.image.as_deref().and_then(|i| i.rsplit_once(FAILPOINT_IMAGE_MARK)) {
            env.insert("KUBECHAT_FAILPOINTS".into(), failpoint.1.to_string());
        }
        // The image's entrypoint is the gateway binary; a command would name
        // a path inside the image.
        if container.command.is_some() {
            return Err("containers with a command are not supported".into());
        }
        let mut command = Command::new(&self.binary);
        let log_file = std::fs::File::create(log).map_err(|e| format!("log file: {e}"))?;
        let log_err = log_file.try_clone().map_err(|e| format!("log file: {e}"))?;
        command
            .args(container.args.iter().flatten().map(|a| map_paths(a, &mounts)))
            .env_clear()
            .envs(&env)
            .env("RUST_LOG", std::env::var("KUBECHAT_GATEWAY_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| format!("spawn {}: {e}", self.binary.display()))?;
        Ok((child, running))
    }

    /// Writes the Pod's volumes under `dir`; returns (container path, host path) per mount.
    async fn write_volumes(
        &self,
        pod: &Pod,
        container: &Container,
        dir: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let host = dir.join("volumes").join(&mount.name);
            std::fs::create_dir_all(&host).map_err(|e| format!("{}: {e}", host.display()))?;
            mounts.push((mount.mount_path.trim_end_matches('/').to_string(), host));
        }
        // Longest container path first, so nested mounts map correctly.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        for volume in &volumes {
            let host = dir.join("volumes").join(&volume.name);
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            if let Some(source) = &volume.config_map {
                let cm = self.config_map(&source.name).await?;
                let data = cm.data.unwrap_or_default();
                files.extend(project(&source.items, data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()));
            } else if let Some(source) = &volume.secret {
                let name = source.secret_name.clone().unwrap_or_default();
                let data = self.secret(&name).await?.data.unwrap_or_default();
                files.extend(project(&source.items, data.into_iter().map(|(k, v)| (k, v.0)).collect()));
            }
            for (file, bytes) in files {
                let bytes = match (volume.config_map.is_some(), serde_json::from_slice(&bytes)) {
                    (true, Ok(json)) => map_json_paths(json, &mounts).to_string().into_bytes(),
                    _ => bytes,
                };
                let path = host.join(&file);
                std::fs::create_dir_all(&host).map_err(|e| format!("{}: {e}", host.display()))?;
                std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        Ok(mounts)
    }

    async fn config_map(&self, name: &str) -> Result<ConfigMap, String> {
        Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
            .get(name)
            .await
            .map_err(|e| format!("ConfigMap {name}: {e}"))
    }

    async fn secret(&self, name: &str) -> Result<Secret, String> {
        Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .get(name)
            .await
            .map_err(|e| format!("Secret {name}: {e}"))
    }

    /// An environment variable's value, resolved like the kubelet does.
    async fn env_value(&self, pod: &Pod, var: &EnvVar) -> Result<String, String> {
        if let Some(value) = &var.value {
            return Ok(value.clone());
        }
        let Some(source) = &var.value_from else { return Ok(String::new()) };
        if let Some(field) = &source.field_ref {
            return field_value(pod, &field.field_path)
                .ok_or(format!("{}: no value at {}", var.name, field.field_path));
        }
        if let Some(key) = &source.secret_key_ref {
            let data = self.secret(&key.name).await?.data.unwrap_or_default();
            let value = data.get(&key.key).ok_or(format!("Secret {} has no key {}", key.name, key.key))?;
            return Ok(String::from_utf8_lossy(&value.0).into_owned());
        }
        if let Some(key) = &source.config_map_key_ref {
            let data = self.config_map(&key.name).await?.data.unwrap_or_default();
            return data.get(&key.key).cloned().ok_or(format!("ConfigMap {} has no key {}", key.name, key.key));
        }
        Err(format!("{}: unsupported valueFrom", var.name))
    }
}

/// A Pod whose image names [`BROKEN_IMAGE_MARK`]: never started, like an
/// image that cannot be pulled (for tests of a rollout that gets stuck).
fn refused(pod: &Pod) -> bool {
    let image = pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.as_deref());
    image.is_some_and(|i| i.contains(BROKEN_IMAGE_MARK))
}

/// Adds [`PROCESS_FINALIZER`] to the Pod whose process just started (the
/// patch names its uid: a successor of the same name is not touched). A
/// Pod deleted meanwhile refuses new finalizers: its process is stopped at
/// the next sync anyway.
async fn hold(api: &Api<Pod>, pod: &Pod, uid: &str) {
    let mut finalizers = pod.finalizers().to_vec();
    if finalizers.iter().any(|f| f == PROCESS_FINALIZER) {
        return;
    }
    finalizers.push(PROCESS_FINALIZER.to_string());
    let patch = serde_json::json!({"metadata": {"uid": uid, "finalizers": finalizers}});
    if let Err(e) = api.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::debug!(pod = %pod.name_any(), error = %e, "finalizer not added");
    }
}

/// Removes [`PROCESS_FINALIZER`] from the Pod `name` with `uid`, once its
/// process has exited; the Pod then goes. A JSON patch that tests the uid
/// and the entry, retried when the Pod changed in between.
async fn release(api: &Api<Pod>, name: &str, uid: &str) {
    for _ in 0..5 {
        let Ok(pod) = api.get(name).await else { return };
        if pod.uid().as_deref() != Some(uid) {
            return;
        }
        let Some(index) = pod.finalizers().iter().position(|f| f == PROCESS_FINALIZER) else { return };
        let path = format!("/metadata/finalizers/{index}");
        let patch: json_patch::Patch = match serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "test", "path": path, "value": PROCESS_FINALIZER},
            {"op": "remove", "path": path},
        ])) {
            Ok(patch) => patch,
            Err(_) => return,
        };
        match api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)).await {
            Ok(_) => return,
            Err(e) => tracing::debug!(pod = name, error = %e, "finalizer not removed yet"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop_child(mut child: Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()).and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The files of a ConfigMap or Secret volume: every key, or the listed items.
fn project(
    items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    data: BTreeMap<String, Vec<u8>>,
) -> Vec<(String, Vec<u8>)> {
    match items {
        None => data.into_iter().collect(),
        Some(items) => items.iter().filter_map(|i| Some((i.path.clone(), data.get(&i.key)?.clone()))).collect(),
    }
}

/// A downward-API field of the Pod.
fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let quoted = |prefix: &str| path.strip_prefix(prefix)?.strip_suffix("']").map(str::to_string);
    if let Some(key) = quoted("metadata.labels['") {
        return pod.labels().get(&key).cloned();
    }
    if let Some(key) = quoted("metadata.annotations['") {
        return pod.annotations().get(&key).cloned();
    }
    match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "status.podIP" => pod.status.as_ref()?.pod_ip.clone(),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone(),
        _ => None,
    }
}

/// `value` with a leading container mount path replaced by its host folder.
fn map_paths(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (container, host) in mounts {
        if let Some(rest) = value.strip_prefix(container.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", host.display());
        }
    }
    value.to_string()
}

fn map_json_paths(value: serde_json::Value, mounts: &[(String, PathBuf)]) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(map_paths(&s, mounts)),
        Value::Array(items) => Value::Array(items.into_iter().map(|v| map_json_paths(v, mounts)).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, map_json_paths(v, mounts))).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_map_to_host_folders() {
        let mounts = vec![("/etc/kubechat".to_string(), PathBuf::from("/tmp/p/config"))];
        assert_eq!(map_paths("/etc/kubechat/gateway.json", &mounts), "/tmp/p/config/gateway.json");
        assert_eq!(map_paths("/etc/kubechat", &mounts), "/tmp/p/config");
        assert_eq!(map_paths("/etc/kubechatter", &mounts), "/etc/kubechatter", "whole path segments only");
        let json = serde_json::json!({"auth": {"signingKeyFile": "/etc/kubechat/key"}, "n": 1});
        assert_eq!(map_json_paths(json, &mounts)["auth"]["signingKeyFile"], "/tmp/p/config/key");
    }

    #[test]
    fn downward_api_fields() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("chat-gateway-2".into());
        pod.metadata.labels = Some(BTreeMap::from([("apps.kubernetes.io/pod-index".to_string(), "2".to_string())]));
        pod.status =
            Some(k8s_openapi::api::core::v1::PodStatus { pod_ip: Some("127.1.0.3".into()), ..Default::default() });
        assert_eq!(field_value(&pod, "metadata.name").as_deref(), Some("chat-gateway-2"));
        assert_eq!(field_value(&pod, "status.podIP").as_deref(), Some("127.1.0.3"));
        assert_eq!(field_value(&pod, "metadata.labels['apps.kubernetes.io/pod-index']").as_deref(), Some("2"));
        assert_eq!(field_value(&pod, "metadata.labels['missing']"), None);
    }
}
