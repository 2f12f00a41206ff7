//! A standalone gateway process killed with SIGKILL right after acking
//! loses nothing: every acked message is in the recipient's inbox and in
//! history once after a restart (the write-ahead log is replayed), and a
//! retried key is still recognised.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kubechat_gateway::transport::auth::Authenticator;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn start(dir: &Path, port: u16) -> Child {
    let log = std::fs::File::create(dir.join(format!("gateway-{port}.log"))).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_kubechat-gateway"))
        .args(["standalone", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the gateway")
}

async fn connect(dir: &Path, port: u16, user: &str) -> Socket {
    let started = Instant::now();
    loop {
        if let Ok(key) = std::fs::read(dir.join("data/signing-key")) {
            let token = Authenticator::new(&key).expect("key").mint(user, "phone", 600).expect("token");
            let url = format!("ws://127.0.0.1:{port}/v1/ws?token={token}");
            if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await {
                assert_eq!(next(&mut socket).await["type"], "hello");
                return socket;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the gateway did not accept connections within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next(socket: &mut Socket) -> Value {
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
async fn request(socket: &mut Socket, mut frame: Value, req: &str) -> Value {
    frame["req"] = json!(req);
    socket.send(Message::Text(frame.to_string().into())).await.expect("send");
    loop {
        let reply = next(socket).await;
        if reply["req"] == req {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut gateway = start(dir.path(), port);
    let mut alice = connect(dir.path(), port, "alice").await;

    let mut acked = Vec::new();
    // 90: within the per-connection burst of frames (100).
    for i in 0..90 {
        let send = json!({"type": "send", "to": {"user": "bob"}, "text": format!("m{i}"), "key": format!("k{i}")});
        let ack = request(&mut alice, send, &format!("r{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(ack["id"].as_str().expect("id").to_string());
    }
    // Killed at once: no shutdown, no checkpoint; only the log holds the last writes.
    gateway.kill().expect("SIGKILL");
    gateway.wait().expect("reaped");

    let port = free_port();
    let mut gateway = start(dir.path(), port);
    let mut bob = connect(dir.path(), port, "bob").await;
    let mut synced = Vec::new();
    let mut after = "0".to_string();
    for page in 0..20 {
        let reply = request(&mut bob, json!({"type": "sync", "after": after, "limit": 100}), &format!("s{page}")).await;
        assert_eq!(reply["type"], "synced", "{reply}");
        for entry in reply["entries"].as_array().expect("entries") {
            synced.push(entry["message"]["id"].as_str().expect("id").to_string());
        }
        if reply["has_more"] != json!(true) {
            break;
        }
        after = reply["next"].as_str().expect("next").to_string();
    }
    assert_eq!(synced, acked, "every acked message once, in order, after the restart");

    let history = request(&mut bob, json!({"type": "history", "channel": "dm:alice:bob", "limit": 200}), "h").await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(90), "{history}");

    let mut alice = connect(dir.path(), port, "alice").await;
    let retry = json!({"type": "send", "to": {"user": "bob"}, "text": "m89", "key": "k89"});
    let ack = request(&mut alice, retry, "again").await;
    assert_eq!((ack["duplicate"].clone(), ack["id"].clone()), (json!(true), json!(acked[89])), "{ack}");

    gateway.kill().expect("stop");
    let _ = gateway.wait();
}
