//! Operators as real processes, each talking to the apiserver through an
//! [`ApiRecorder`] of its own, so a test can pause one with SIGSTOP and see
//! every request it sends, on the test's clock, independently of the
//! operator's own account of what it did.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube::Client;
use kube::client::Body;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// The `kubechat-operator` binary next to the test binary, or
/// `KUBECHAT_OPERATOR_BIN`. Panics with what to do when it is missing or
/// older than the operator's sources.
pub fn operator_binary() -> PathBuf {
    let path = std::env::var_os("KUBECHAT_OPERATOR_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        // <target>/<profile>/deps/<test binary>
        let profile = exe.parent().and_then(Path::parent).expect("the test binary is in <target>/<profile>/deps");
        profile.join("kubechat-operator")
    });
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|e| {
        panic!(
            "the operator binary {} is missing ({e}): build it with `cargo build -p kubechat-operator` \
             (`cargo test --workspace` builds it), or point KUBECHAT_OPERATOR_BIN at one",
            path.display()
        )
    });
    // The binary is built from the operator crate and the two it links.
    let root = crate::repo_root();
    let newest = ["operator/src", "crds/src", "config/src"]
        .iter()
        .filter_map(|dir| crate::kubelet::newest_file(&root.join(dir)))
        .max_by_key(|(_, changed)| *changed);
    if let Some((newest, changed)) = newest
        && changed > built
    {
        panic!(
            "the operator binary {} is older than {}: rebuild it with `cargo build -p kubechat-operator`",
            path.display(),
            newest.display()
        );
    }
    path
}

/// One request as it reached the recorder.
#[derive(Clone, Debug)]
pub struct ApiCall {
    pub at: Instant,
    pub method: Method,
    pub path: String,
}

impl ApiCall {
    /// Anything but a read.
    pub fn is_write(&self) -> bool {
        !matches!(self.method, Method::GET | Method::HEAD | Method::OPTIONS)
    }

    pub fn is_lease(&self) -> bool {
        self.path.starts_with("/apis/coordination.k8s.io/")
    }
}

/// A plain-HTTP proxy on loopback in front of the apiserver: it forwards each
/// request with the test's credentials and records it first.
pub struct ApiRecorder {
    address: std::net::SocketAddr,
    calls: Arc<Mutex<Vec<ApiCall>>>,
    server: JoinHandle<()>,
}

impl ApiRecorder {
    pub async fn start(client: Client) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the API recorder");
        let address = listener.local_addr().expect("the recorder's address");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let log = calls.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (client, log) = (client.clone(), log.clone());
                let service = hyper::service::service_fn(move |request| forward(client.clone(), log.clone(), request));
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { address, calls, server }
    }

    /// Writes a kubeconfig that reaches the apiserver through this recorder.
    pub fn kubeconfig(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: recorded, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: recorded, user: {{}}}}]\n\
             contexts: [{{name: recorded, context: {{cluster: recorded, user: recorded, namespace: default}}}}]\n\
             current-context: recorded\n",
            self.address
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    pub fn calls(&self) -> Vec<ApiCall> {
        self.calls.lock().expect("the recorder's log").clone()
    }
}

impl Drop for ApiRecorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn forward(
    client: Client,
    log: Arc<Mutex<Vec<ApiCall>>>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    if let Ok(mut log) = log.lock() {
        log.push(ApiCall { at: Instant::now(), method: parts.method.clone(), path: parts.uri.path().to_string() });
    }
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(failure(StatusCode::BAD_REQUEST, "unreadable request body"));
    };
    let uri = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forwarded = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        // Hop-by-hop and framing headers belong to each connection.
        if ![HOST, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING].contains(name) {
            forwarded = forwarded.header(name, value);
        }
    }
    let Ok(forwarded) = forwarded.body(Body::from(body.to_vec())) else {
        return Ok(failure(StatusCode::BAD_REQUEST, "unforwardable request"));
    };
    match client.send(forwarded).await {
        Ok(response) => Ok(response),
        Err(e) => Ok(failure(StatusCode::BAD_GATEWAY, &e.to_string())),
    }
}

fn failure(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(message.as_bytes().to_vec()));
    *response.status_mut() = status;
    response
}

/// A `kubechat-operator` process with leader election, scoped to one namespace
/// (its Lease there too). Killed when dropped.
pub struct OperatorProcess {
    pub identity: String,
    child: Child,
    log: PathBuf,
}

impl OperatorProcess {
    pub fn start(kubeconfig: &Path, namespace: &str, identity: &str, lease_seconds: u64, dir: &Path) -> Self {
        let binary = operator_binary();
        let log = dir.join(format!("{identity}.log"));
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone the log file");
        let child = Command::new(&binary)
            .args(["--namespace", namespace, "--lease-namespace", namespace, "--identity", identity])
            .args(["--lease-seconds", &lease_seconds.to_string(), "--admin-addr", "127.0.0.1:0"])
            .args(["--leader-election", "true"])
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", std::env::var("KUBECHAT_OPERATOR_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        Self { identity: identity.to_string(), child, log }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = self.child.id().expect("the operator is still running");
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("a non-zero pid");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("signal {signal:?} to {}: {e}", self.identity));
    }

    /// Freezes the process: it neither renews its Lease nor notices time pass.
    pub fn pause(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    /// SIGTERM, then the exit status within `timeout` (`None`: still running).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.child.id().is_some() {
            self.signal(rustix::process::Signal::TERM);
        }
        self.wait_exit(timeout).await
    }

    /// The exit status once it exits within `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait()).await.ok().and_then(Result::ok)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
