//! The benchmark at toy scale against real servers, so the tool cannot rot:
//! a standalone `kubechat-gateway` and a Centrifugo built by
//! `e2e/local/centrifugo.sh install` (part of `e2e/local/up.sh`). Asserts
//! that every message was acked and delivered exactly once, never timings.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const KEY: &str = "small-run-signing-key-0123456789abcdef";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// A server process, killed when the test ends.
struct Server {
    child: Child,
    name: &'static str,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn spawn(name: &'static str, mut command: Command, port: u16, url: String, dir: tempfile::TempDir) -> Self {
        let log = std::fs::File::create(dir.path().join("server.log")).expect("server log");
        let child = command
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut server = Server { child, name, url, dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited with {status}; log:\n{}", server.log());
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{name} not listening within 20 s:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn kubechat() -> Self {
        let bench = PathBuf::from(env!("CARGO_BIN_EXE_kubechat-bench"));
        let gateway = bench.with_file_name("kubechat-gateway");
        assert!(
            gateway.exists(),
            "{} is missing: `cargo test --workspace` builds it, or run `cargo build -p kubechat-gateway`",
            gateway.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("signing-key"), KEY).expect("write the signing key");
        let port = free_port();
        let mut command = Command::new(gateway);
        command
            .args(["standalone", "--data-dir"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn");
        Server::spawn("kubechat-gateway", command, port, format!("ws://127.0.0.1:{port}/v1/ws"), dir)
    }

    fn centrifugo() -> Self {
        let binary = centrifugo_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = serde_json::json!({
            "http_server": {"address": "127.0.0.1", "port": port},
            "log": {"level": "warn"},
            "engine": {"type": "memory"},
            "usage_stats": {"disabled": true},
            "http_api": {"disabled": true},
            "client": {"token": {"hmac_secret_key": KEY}},
            "channel": {"without_namespace": {"allow_subscribe_for_client": true, "allow_publish_for_client": true}},
        });
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).expect("write the Centrifugo config");
        let mut command = Command::new(binary);
        command.arg("-c").arg(&config_path);
        Server::spawn("centrifugo", command, port, format!("ws://127.0.0.1:{port}/connection/websocket"), dir)
    }

    fn kind(&self) -> &'static str {
        if self.name == "centrifugo" { "centrifugo" } else { "kubechat" }
    }

    /// Runs the tool against this server and returns its exit and output.
    fn bench(&self, key: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kubechat-bench"))
            .args(["--server", self.kind(), "--url", &self.url, "--key", key, "--server-pid"])
            .arg(self.child.id().to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubechat-bench")
    }

    fn run(&self, args: &[&str]) -> Value {
        let output = self.bench(KEY, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "kubechat-bench {args:?} failed: {stderr}\nserver log:\n{}", self.log());
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"))
    }
}

fn centrifugo_binary() -> PathBuf {
    let cache = std::env::var("KUBECHAT_CACHE").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/kubechat")
    });
    let binary = Path::new(&cache).join("bin/centrifugo");
    assert!(
        binary.exists(),
        "Centrifugo is not built at {}: run `e2e/local/centrifugo.sh install` (e2e/local/up.sh does)",
        binary.display()
    );
    binary
}

/// Every message of every step acked once and delivered exactly once to each
/// recipient; no error, no close.
fn assert_exactly_once(report: &Value, what: &str) {
    let steps = report["steps"].as_array().unwrap_or_else(|| panic!("{what}: no steps in {report}"));
    assert!(!steps.is_empty(), "{what}: no steps");
    for step in steps {
        let sent = step["sent"].as_u64().unwrap_or(0);
        assert!(sent > 0, "{what}: nothing sent in {step}");
        assert_eq!(step["acked"], sent, "{what}: acks ≠ sends in {step}");
        assert_eq!(step["errors"], serde_json::json!({}), "{what}: errors in {step}");
        let expected = sent * step["recipients_per_message"].as_u64().unwrap_or(0);
        assert_eq!(step["expected_deliveries"], expected, "{what}: {step}");
        assert_eq!(step["unique_deliveries"], expected, "{what}: not every message delivered in {step}");
        assert_eq!(step["deliveries"], expected, "{what}: duplicate deliveries in {step}");
        assert_eq!(step["duplicates"], 0, "{what}: {step}");
    }
    assert_eq!(report["run"]["closes"], serde_json::json!({}), "{what}: connections closed: {report}");
    assert_eq!(report["run"]["bad_stamps"], 0, "{what}: {report}");
    assert_eq!(report["run"]["errors_without_request"], serde_json::json!({}), "{what}: {report}");
}

fn small_workloads(server: &Server) {
    let kind = server.kind();
    let pairs = server.run(&["pairs", "--pairs", "3", "--rate", "60", "--duration", "2", "--warmup", "0.5"]);
    assert_exactly_once(&pairs, &format!("{kind} pairs"));
    assert_eq!(pairs["params"]["connections"], 6);

    let group = server.run(&[
        "group",
        "--members",
        "8",
        "--rates",
        "20,40",
        "--duration",
        "1.5",
        "--warmup",
        "0",
        "--gap",
        "0.5",
    ]);
    assert_exactly_once(&group, &format!("{kind} group"));
    let recipients = if kind == "centrifugo" { 8 } else { 7 };
    assert!(group["steps"].as_array().is_some_and(|s| s.len() == 2), "{group}");
    assert_eq!(group["steps"][0]["recipients_per_message"], recipients);

    let idle = server.run(&["idle", "--connections", "20", "--hold", "1", "--settle", "0.2"]);
    assert_eq!(idle["opened"], 20, "{idle}");
    assert_eq!(idle["still_open_at_end"], 20, "{idle}");
    assert!(idle["server_usage"]["rss_kib_end"].as_u64().is_some_and(|r| r > 0), "server sampled from /proc: {idle}");

    let connect = server.run(&["connect", "--connections", "30"]);
    assert_eq!(connect["opened"], 30, "{connect}");

    // A wrong key: a clear failure, not a report of zeros.
    let refused = server.bench("not-the-key-0123456789abcdef", &["connect", "--connections", "2"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a refused token must fail the run: {stderr}");
    assert!(stderr.contains("the first connection failed"), "{stderr}");
}

#[test]
fn the_tool_runs_against_a_standalone_gateway() {
    small_workloads(&Server::kubechat());
}

#[test]
fn the_tool_runs_against_centrifugo() {
    small_workloads(&Server::centrifugo());
}

/// The broker workload on a Redis of its own: every send is routed across
/// gateways and delivered once, and the report carries Redis' CPU per send.
#[test]
fn the_broker_workload_routes_and_delivers_every_send() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new("redis-server");
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
    let redis = Server::spawn("redis-server", command, port, format!("redis://127.0.0.1:{port}"), dir);
    let output = Command::new(env!("CARGO_BIN_EXE_kubechat-bench"))
        .args(["broker", "--redis", &redis.url, "--gateways", "3", "--users", "300"])
        .args(["--rates", "200,400", "--duration", "1", "--warmup", "0.5", "--in-flight", "16"])
        .stdin(Stdio::null())
        .output()
        .expect("run kubechat-bench broker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubechat-bench broker failed: {stderr}\nredis log:\n{}", redis.log());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert!(report["raw_spublish"]["rate"].as_f64().unwrap_or(0.0) > 0.0, "no raw SPUBLISH rate: {report}");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{report}");
    for step in steps {
        assert_eq!(step["errors"], 0, "{step}");
        assert!(step["sends"].as_u64().unwrap_or(0) > 0, "nothing measured: {step}");
        assert_eq!(step["routed_in_step"], step["delivered_in_step"], "a routed send was not delivered: {step}");
        assert!(step["redis_cpu_us_per_send"].as_f64().is_some(), "{step}");
    }
}
