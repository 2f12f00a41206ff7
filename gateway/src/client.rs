//! A minimal line-based client, enough to chat between two terminals
//! against the standalone gateway (`kubechat-gateway chat --user alice`).

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const HELP: &str = "\
  @bob hello there       send to a user
  #g:123 hi all          send to a group
  /group team bob carol  create a group with members
  /add g:123 dave        add a member
  /channels              list your channels
  /history dm:alice:bob  the newest messages of a channel
  /history dm:alice:bob <id>  the ones before message <id>
  /sync                  everything since this session started
  /who bob carol         who is online (people you share a channel with)
  /quit";

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn message_line(m: &Value) -> String {
    format!("[{}] {}: {}", text(&m["channel"]), text(&m["from"]), text(&m["text"]))
}

fn describe(frame: &Value) -> String {
    let list = |v: &Value| v.as_array().into_iter().flatten().map(text).collect::<Vec<_>>().join(", ");
    match frame["type"].as_str().unwrap_or_default() {
        "message" => message_line(&frame["message"]),
        "group" => {
            let g = &frame["group"];
            format!(
                "  group {} \"{}\" (owner {}): {}",
                text(&g["id"]),
                text(&g["name"]),
                text(&g["owner"]),
                list(&g["members"])
            )
        }
        "channels" => format!("  channels: {}", list(&frame["channels"])),
        "history" => {
            // Pages come newest first; read top to bottom, oldest first.
            let messages: Vec<&Value> = frame["messages"].as_array().into_iter().flatten().collect();
            let mut lines: Vec<String> = messages.iter().rev().map(|m| format!("  {}", message_line(m))).collect();
            if lines.is_empty() {
                lines.push("  (no messages)".into());
            }
            if frame["has_more"] == true
                && let Some(oldest) = messages.last()
            {
                lines.push(format!("  older: /history {} {}", text(&frame["channel"]), text(&oldest["id"])));
            }
            lines.join("\n")
        }
        "synced" => {
            let entries: Vec<String> = frame["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| format!("  {}", message_line(&e["message"])))
                .collect();
            if entries.is_empty() { "  (nothing new)".into() } else { entries.join("\n") }
        }
        "ack" => format!("  ✓ stored as {} in {}", text(&frame["id"]), text(&frame["channel"])),
        "error" => format!("  ✗ {}: {}", text(&frame["code"]), text(&frame["message"])),
        "hello" => format!("connected as {} ({})\n{HELP}", text(&frame["user"]), text(&frame["device"])),
        "reconnect" => format!(
            "  … the gateway asks to move to {} ({})",
            frame["url"].as_str().unwrap_or("another gateway"),
            text(&frame["reason"])
        ),
        "resync" => "  … catching up".to_string(),
        "presence_changed" => {
            format!("  · {} is {}", text(&frame["user"]), if frame["online"] == true { "online" } else { "offline" })
        }
        "presence" => frame["users"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| format!("  · {} is {}", text(&u["user"]), if u["online"] == true { "online" } else { "offline" }))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => frame.to_string(),
    }
}

/// Turns one typed line into a frame (`None`: nothing to send).
pub fn line_to_frame(line: &str, counter: u64) -> Option<Value> {
    let key = format!("cli-{}-{counter}", crate::ids::now_ms());
    let line = line.trim();
    if let Some(rest) = line.strip_prefix('@') {
        let (to, text) = rest.split_once(' ')?;
        return Some(json!({"type": "send", "req": counter.to_string(), "to": {"user": to}, "text": text, "key": key}));
    }
    if let Some(rest) = line.strip_prefix('#') {
        let (to, text) = rest.split_once(' ')?;
        return Some(
            json!({"type": "send", "req": counter.to_string(), "to": {"group": to}, "text": text, "key": key}),
        );
    }
    let mut words = line.split_whitespace();
    match words.next()? {
        "/group" => {
            let name = words.next()?;
            Some(json!({"type": "create_group", "name": name, "members": words.collect::<Vec<_>>()}))
        }
        "/add" => Some(json!({"type": "add_member", "group": words.next()?, "user": words.next()?})),
        "/channels" => Some(json!({"type": "list_channels"})),
        "/history" => {
            let channel = words.next()?;
            Some(match words.next() {
                Some(before) => json!({"type": "history", "channel": channel, "before": before}),
                None => json!({"type": "history", "channel": channel}),
            })
        }
        "/sync" => Some(json!({"type": "sync", "after": "0"})),
        "/who" => Some(json!({"type": "presence", "users": words.collect::<Vec<_>>()})),
        _ => None,
    }
}

/// Where a draining gateway sends its clients: `GET /v1/discovery` on the
/// gateway at `ws_url` (same host and port), or `None`.
async fn discover(ws_url: &str) -> Option<String> {
    let base = ws_url.replacen("ws://", "http://", 1).replacen("wss://", "https://", 1);
    let base = base.split("/v1/ws").next()?;
    let answer: Value = reqwest::get(format!("{base}/v1/discovery")).await.ok()?.json().await.ok()?;
    answer["recommended"].as_str().map(str::to_string)
}

/// A random delay up to `max_ms`, so that clients moved together do not
/// arrive together.
fn jitter(max_ms: u64) -> std::time::Duration {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    std::time::Duration::from_millis(u64::from_le_bytes(bytes) % max_ms.max(1))
}

/// What ended one connection.
enum Ended {
    Quit,
    /// Go to this gateway (or ask discovery at the old one), then sync.
    Moved(Option<String>, std::time::Duration),
}

/// Connects with `token` and chats until `/quit`. `signed_with` says where
/// the token came from, for the error when the gateway refuses it. Follows
/// the protocol's reconnect rules: on a `reconnect` frame or a close
/// meaning "go elsewhere" it waits a random moment, connects to the
/// suggested gateway (or the one discovery recommends) and syncs from its
/// cursor.
pub async fn interactive(url: &str, token: &str, signed_with: &str) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut url = url.to_string();
    let mut cursor: Option<String> = None;
    let mut counter = 0;
    let mut attempts = 0_u32;
    loop {
        let socket = match connect(&url, token, signed_with).await {
            Ok(socket) => socket,
            // A first connection that fails is the user's to fix; a move keeps trying.
            Err(e) if attempts == 0 => return Err(e),
            Err(e) => {
                attempts += 1;
                anyhow::ensure!(attempts < 20, "{e}; giving up");
                println!("  … {e}; retrying");
                tokio::time::sleep(jitter(1000 * u64::from(attempts.min(5)))).await;
                url = discover(&url).await.unwrap_or(url);
                continue;
            }
        };
        let catch_up = attempts > 0;
        match session(socket, &mut lines, &mut counter, &mut cursor, catch_up).await? {
            Ended::Quit => return Ok(()),
            Ended::Moved(to, delay) => {
                tokio::time::sleep(delay).await;
                let next = match to {
                    Some(to) => Some(to),
                    None => discover(&url).await,
                };
                url = next.unwrap_or(url);
                println!("  … moving to {url}");
                attempts = 1;
            }
        }
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: &str, signed_with: &str) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::Error;
    let separator = if url.contains('?') { '&' } else { '?' };
    match tokio_tungstenite::connect_async(format!("{url}{separator}token={token}")).await {
        Ok((socket, _)) => Ok(socket),
        Err(Error::Http(response)) if response.status() == 401 => anyhow::bail!(
            "the gateway at {url} refused the token (401): it was {signed_with}, and the gateway signs with \
             another key; pass --data-dir <the gateway's --data-dir> or a --token it issued"
        ),
        Err(Error::Http(response)) => anyhow::bail!("the gateway at {url} answered {}", response.status()),
        Err(e) => anyhow::bail!("cannot connect to {url}: {e} (is the gateway running there?)"),
    }
}

/// One connection: typed lines out, frames in, heartbeats, until the user
/// quits or the server sends the client elsewhere.
async fn session(
    socket: Socket,
    lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    counter: &mut u64,
    cursor: &mut Option<String>,
    catch_up: bool,
) -> anyhow::Result<Ended> {
    let (mut sink, mut stream) = socket.split();
    if catch_up {
        let after = cursor.clone().unwrap_or_else(|| "0".into());
        sink.send(Message::Text(json!({"type": "sync", "after": after}).to_string().into())).await?;
    }
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut moved: Option<Ended> = None;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if line.trim() == "/quit" {
                    break;
                }
                *counter += 1;
                match line_to_frame(&line, *counter) {
                    Some(frame) => sink.send(Message::Text(frame.to_string().into())).await?,
                    None if !line.trim().is_empty() => println!("{HELP}"),
                    None => {}
                }
            }
            _ = heartbeat.tick() => sink.send(Message::Text(json!({"type": "heartbeat"}).to_string().into())).await?,
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<Value>(&text) {
                    Ok(frame) => {
                        println!("{}", describe(&frame));
                        match frame["type"].as_str() {
                            Some("synced") if frame["has_more"] == false => *cursor = frame["cursor"].as_str().map(str::to_string),
                            Some("synced") => {
                                let next = json!({"type": "sync", "after": frame["next"]});
                                sink.send(Message::Text(next.to_string().into())).await?;
                            }
                            Some("resync") => {
                                let after = cursor.clone().unwrap_or_else(|| "0".into());
                                sink.send(Message::Text(json!({"type": "sync", "after": after}).to_string().into())).await?;
                            }
                            Some("reconnect") => {
                                let delay = jitter(frame["within_ms"].as_u64().unwrap_or(1000));
                                moved = Some(Ended::Moved(frame["url"].as_str().map(str::to_string), delay));
                            }
                            _ => {}
                        }
                    }
                    Err(_) => println!("{text}"),
                },
                Some(Ok(Message::Close(frame))) => {
                    println!("  closed by the server: {frame:?}");
                    return Ok(moved.unwrap_or_else(|| Ended::Moved(None, jitter(2000))));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ok(moved.unwrap_or_else(|| Ended::Moved(None, jitter(2000)))),
            },
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    Ok(Ended::Quit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_frames() {
        let dm = line_to_frame("@bob hello there", 1).expect("frame");
        assert_eq!((dm["to"]["user"].as_str(), dm["text"].as_str()), (Some("bob"), Some("hello there")));
        let group = line_to_frame("/group team bob carol", 2).expect("frame");
        assert_eq!(group["members"], json!(["bob", "carol"]));
        assert!(line_to_frame("hello", 3).is_none());
        assert!(line_to_frame("@bob", 4).is_none());
        assert_eq!(line_to_frame("/history g:1", 6).expect("frame").get("before"), None);
        assert_eq!(line_to_frame("/history g:1 42", 7).expect("frame")["before"], "42");
        assert_eq!(line_to_frame("/who bob carol", 5).expect("frame")["users"], json!(["bob", "carol"]));
    }

    #[test]
    fn replies_read_as_lines() {
        let group =
            json!({"type": "group", "group": {"id": "g:1", "name": "team", "owner": "a", "members": ["a", "b"]}});
        assert_eq!(describe(&group), "  group g:1 \"team\" (owner a): a, b");
        let m = |id: &str, text: &str| json!({"id": id, "channel": "g:1", "from": "a", "text": text});
        let page =
            json!({"type": "history", "channel": "g:1", "messages": [m("2", "new"), m("1", "old")], "has_more": true});
        assert_eq!(describe(&page), "  [g:1] a: old\n  [g:1] a: new\n  older: /history g:1 1");
        assert_eq!(describe(&json!({"type": "channels", "channels": ["g:1", "dm:a:b"]})), "  channels: g:1, dm:a:b");
    }

    #[test]
    fn presence_reads_as_a_sentence() {
        let changed = json!({"type": "presence_changed", "user": "bob", "online": false, "last_active_ms": 1});
        assert_eq!(describe(&changed), "  · bob is offline");
        let asked = json!({"type": "presence", "req": "1", "users": [{"user": "bob", "online": true}]});
        assert_eq!(describe(&asked), "  · bob is online");
    }
}
