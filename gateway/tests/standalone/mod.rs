//! A real standalone gateway process (the release command `standalone`)
//! over a data folder, and a WebSocket client for it: for tests that kill
//! it, damage its files or its disk, and start it again.

#![allow(dead_code)]

#[path = "../common/binary.rs"]
mod binary;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kubechat_gateway::transport::auth::Authenticator;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a gateway that must refuse to start may take to exit.
const REFUSAL: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The data folder of a gateway run in `root`.
pub fn data_dir(root: &Path) -> PathBuf {
    root.join("data")
}

fn command(root: &Path, port: u16) -> Command {
    let mut command = Command::new(binary::gateway_binary());
    command
        .args(["standalone", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir(root))
        // The store's debug lines say when a checkpoint was taken.
        .env("RUST_LOG", "info,kubechat_gateway::store=debug")
        .stdout(Stdio::null());
    command
}

/// A running gateway; killed (SIGKILL) if dropped while running.
pub struct Gateway {
    pub root: PathBuf,
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl Gateway {
    /// Starts a gateway on the data folder in `root`; its log goes to a
    /// file there. Returns at once: [`Gateway::connect`] waits for it.
    pub fn start(root: &Path) -> Self {
        Self::start_on(root, free_port())
    }

    /// [`Gateway::start`] on a given port (a restart where clients expect it).
    pub fn start_on(root: &Path, port: u16) -> Self {
        Self::start_with(root, port, &[])
    }

    /// [`Gateway::start`] with checkpoints only when half a log file waits
    /// for one (none on a timer): for tests that need their writes to be in
    /// the log alone, however slowly the machine runs them.
    pub fn start_without_timed_checkpoints(root: &Path) -> Self {
        Self::start_checkpointing_every(root, 86_400)
    }

    /// [`Gateway::start`] with a checkpoint at least every `seconds`.
    pub fn start_checkpointing_every(root: &Path, seconds: u64) -> Self {
        Self::start_with(root, free_port(), &["--checkpoint-every", &seconds.to_string()])
    }

    fn start_with(root: &Path, port: u16, args: &[&str]) -> Self {
        let log = root.join(format!("gateway-{port}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        // Its log lines go to stdout, panics to stderr: both into the file.
        let stdout = stderr.try_clone().expect("log file");
        let child = command(root, port).args(args).stdout(stdout).stderr(stderr).spawn().expect("start the gateway");
        Self { root: root.to_path_buf(), port, child, log }
    }

    /// Connects as `user` once the gateway accepts connections.
    pub async fn connect(&mut self, user: &str) -> Socket {
        let started = Instant::now();
        loop {
            if let Ok(key) = std::fs::read(data_dir(&self.root).join("signing-key")) {
                let token = Authenticator::new(&key).expect("key").mint(user, "phone", 600).expect("token");
                let url = format!("ws://127.0.0.1:{}/v1/ws?token={token}", self.port);
                if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await {
                    assert_eq!(next(&mut socket).await["type"], "hello");
                    return socket;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the gateway exited ({status}) instead of starting:\n{}", self.log_text());
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the gateway did not accept connections within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the gateway logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log records this gateway replayed when it started (0 when its log
    /// says nothing about a replay: the last checkpoint had them all).
    pub fn replayed_records(&self) -> u64 {
        let text = self.log_text();
        let Some(line) = text.lines().find(|l| l.contains("replayed the embedded store's log")) else { return 0 };
        field(line, "records").unwrap_or_else(|| panic!("no record count in {line:?}"))
    }

    /// The newest record a checkpoint holds, by the log (0: none yet).
    pub fn checkpointed_through(&self) -> u64 {
        let text = self.log_text();
        let lines = text.lines().filter(|l| l.contains("embedded store checkpoint taken"));
        lines.filter_map(|line| field(line, "through")).max().unwrap_or(0)
    }

    /// SIGKILL: no shutdown, no checkpoint.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM, then waits for the clean shutdown (the store's last checkpoint).
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(status.success(), "kill -TERM {pid}");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no clean shutdown within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a gateway on the data folder in `root` that must refuse to start:
/// returns what it printed. Fails if it starts (accepts connections)
/// or has not exited within a minute.
pub fn refused(root: &Path) -> String {
    let port = free_port();
    let mut child = command(root, port).stderr(Stdio::piped()).spawn().expect("start the gateway");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let output = child.wait_with_output().expect("output");
            let stderr = String::from_utf8_lossy(&output.stderr).to_string();
            assert!(!status.success(), "the gateway exited with success instead of refusing:\n{stderr}");
            return stderr;
        }
        let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if listening || started.elapsed() > REFUSAL {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "the gateway {} instead of refusing to start:\n{}",
                if listening { "started" } else { "neither started nor exited within a minute" },
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn next(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("connection open")
            .expect("read");
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// Sends a frame and returns the reply carrying its `req`.
pub async fn request(socket: &mut Socket, mut frame: Value, req: &str) -> Value {
    frame["req"] = json!(req);
    socket.send(Message::Text(frame.to_string().into())).await.expect("send");
    loop {
        let reply = next(socket).await;
        if reply["req"] == req {
            return reply;
        }
    }
}

/// Sends `text` to `to` under `key`; the reply (`ack` or `error`).
pub async fn send(socket: &mut Socket, to: &str, text: &str, key: &str) -> Value {
    let frame = json!({"type": "send", "to": {"user": to}, "text": text, "key": key});
    request(socket, frame, &format!("req-{key}")).await
}

/// Sends `count` messages to `to` (keys `{prefix}{i}`), each acked; their ids.
pub async fn send_acked(socket: &mut Socket, to: &str, prefix: &str, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        let ack = send(socket, to, &format!("{prefix} {i}"), &format!("{prefix}{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        ids.push(ack["id"].as_str().expect("id").to_string());
    }
    ids
}

/// Every message id in the connected user's inbox, in inbox order.
pub async fn inbox(socket: &mut Socket) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = "0".to_string();
    let mut page = 0;
    loop {
        let sync = json!({"type": "sync", "after": after, "limit": 100});
        let reply = request(socket, sync, &format!("sync-{page}")).await;
        assert_eq!(reply["type"], "synced", "{reply}");
        for entry in reply["entries"].as_array().expect("entries") {
            ids.push(entry["message"]["id"].as_str().expect("id").to_string());
        }
        if reply["has_more"] != json!(true) {
            return ids;
        }
        after = reply["next"].as_str().expect("next").to_string();
        page += 1;
    }
}

/// A log file's records: `(offset, seq, payload length)` from its start
/// (after its header, if it has one) to the first that does not follow.
pub fn log_records(bytes: &[u8]) -> Vec<(usize, u64, usize)> {
    // Format 2 starts with a 4 KiB header and pads records to 8 bytes;
    // earlier formats start with records, unpadded.
    let format_2 = bytes.starts_with(b"KCHATWAL");
    let (mut at, align) = if format_2 { (4096, 8) } else { (0, 1) };
    let mut records: Vec<(usize, u64, usize)> = Vec::new();
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
        let Some(payload) = bytes.get(at + 16..at + 16 + len) else { break };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(payload);
        let follows = records.last().is_none_or(|&(_, last, _)| last + 1 == seq);
        if len == 0 || hasher.finalize() != crc || !follows {
            break;
        }
        records.push((at, seq, len));
        at += (16 + len).next_multiple_of(align);
    }
    records
}

/// One log record as formats 0 and 1 framed it (`len | crc | seq | payload`).
pub fn log_record(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    let mut record = Vec::new();
    record.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_le_bytes());
    record.extend_from_slice(&hasher.finalize().to_le_bytes());
    record.extend_from_slice(&seq.to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// The number a log line gives as `name=N` (the log is plain text: its
/// output is not a terminal).
fn field(line: &str, name: &str) -> Option<u64> {
    let value = line.split(&format!(" {name}=")).nth(1)?;
    value.split_whitespace().next()?.parse().ok()
}
